"""Checkpoints of upstream EasyEdit's adapter methods (GRACE, WISE), never pickled.

Both keep their edits in an adapter module they put into the model, plus (WISE) state in
module-level lists.  A resumable benchmark cell saves that state at every checkpoint as
safetensors (tensors) + JSON (everything else) and, on resume, lets the method wrap the
fresh model's layer as its first edit would and then puts the saved state into it.

* GRACE: the codebook (keys, values, radii ``epsilons``, label tensors, nested edit ids)
  and the query position ``key_id``.
* WISE: the side memory ``new_weight``, the wrapped layer's weight (merges write it), the
  memory list with its activation statistics, the gradient mask, counters, and the
  module's ``edit_history`` / ``merge_group_edit_history`` (token tensors + flags).

Only upstream's text-model classes are handled (not the multimodal ones).
"""
from __future__ import annotations

import importlib
import json
import re
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple, Union

import torch
from safetensors.torch import load_file, save_file

from ..util import nethook

# --------------------------------------------------------------------------------
# GRACE
# --------------------------------------------------------------------------------
GRACE_FILES = ("grace_codebook.safetensors", "grace_codebook.json")
# What a GRACE adapter holds between edits; the rest is set by each edit or is config.
GRACE_CODEBOOK_TENSORS = ("keys", "values", "epsilons")


def _read_checkpoint(
    alg: str, files: Sequence[str], layer: str, directory: Union[str, Path]
) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    """(JSON metadata, tensors) of a saved adapter, checked to be for ``layer``."""
    directory = Path(directory)
    tensor_file, meta_file = (directory / name for name in files)
    if not (tensor_file.is_file() and meta_file.is_file()):
        raise FileNotFoundError(f"no {alg} state in {directory}: delete the cell's work dir to restart it")
    meta = json.loads(meta_file.read_text())
    if meta.get("layer") != layer:
        raise ValueError(f"{alg} checkpoint in {directory} is for {meta.get('layer')!r}, the hparams name {layer!r}")
    return meta, load_file(str(tensor_file))


def adapter_layer_name(hparams: Any) -> str:
    """The module GRACE/WISE wrap: ``inner_params[0]`` without ``.weight``, ``[i]`` as ``.i``."""
    name = re.sub(r"\[(\d+)\]", r".\1", str(hparams.inner_params[0]))
    return name.rsplit(".", 1)[0] if name.endswith((".weight", ".bias")) else name


class _Close:
    """End-of-list marker on ``_flatten_nested``'s stack."""


def _flatten_nested(value: Any) -> List[Any]:
    """A nested list as a flat token list (GRACE nests its edit ids one level per edit,
    deeper than JSON encoders recurse after ~1,000 edits)."""
    tokens: List[Any] = []
    stack: List[Any] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, _Close):
            tokens.append(["]"])
        elif isinstance(item, list):
            tokens.append(["["])
            stack.append(_Close())
            stack.extend(reversed(item))
        else:
            tokens.append(["v", item])
    return tokens


def _unflatten_nested(tokens: Sequence[Sequence[Any]]) -> Any:
    stack: List[List[Any]] = [[]]
    for token in tokens:
        if token[0] == "[":
            stack.append([])
        elif token[0] == "]":
            done = stack.pop()
            stack[-1].append(done)
        else:
            stack[-1].append(token[1])
    if len(stack) != 1 or len(stack[0]) != 1:
        raise ValueError("malformed nested list in the GRACE checkpoint")
    return stack[0][0]


def save_grace_codebook(model: Any, layer: str, edits_done: int, directory: Union[str, Path]) -> None:
    """Write the GRACE adapter's codebook at ``layer`` (none before the first edit)."""
    directory = Path(directory)
    adapter = nethook.get_module(model, layer)
    meta: Dict[str, Any] = {"layer": layer, "edits_done": edits_done, "codebook": "keys" in adapter.__dict__}
    tensors: Dict[str, Any] = {}
    if meta["codebook"]:
        for name in GRACE_CODEBOOK_TENSORS:
            tensors[name] = getattr(adapter, name).detach().cpu().contiguous()
        for i, label in enumerate(adapter.key_labels):
            tensors[f"key_label.{i}"] = label.detach().cpu().contiguous()
        meta["key_labels"] = len(adapter.key_labels)
        meta["edit_ids"] = _flatten_nested(adapter.edit_ids)
        meta["key_id"] = int(adapter.key_id)
    save_file(tensors, str(directory / GRACE_FILES[0]))
    (directory / GRACE_FILES[1]).write_text(json.dumps(meta))


def load_grace_codebook(model: Any, hparams: Any, layer: str, directory: Union[str, Path]) -> int:
    """Wrap ``layer`` in a GRACE adapter holding the saved codebook; returns the edits done."""
    meta, tensors = _read_checkpoint("GRACE", GRACE_FILES, layer, directory)
    grace = importlib.import_module("easyeditor.models.grace.GRACE")
    device = next(model.parameters()).device
    grace.GRACE(config=hparams, model=model, device=device)  # wraps the layer, as the first edit does
    adapter = nethook.get_module(model, layer)
    if not isinstance(adapter, grace.GRACEAdapter):
        raise ValueError(f"{layer} is not wrapped by a GRACE adapter after setup")
    if meta["codebook"]:
        adapter.keys = tensors["keys"].to(device)
        adapter.values = torch.nn.Parameter(tensors["values"].to(device), requires_grad=True)
        adapter.epsilons = tensors["epsilons"].to(device)
        adapter.key_labels = [tensors[f"key_label.{i}"].to(device) for i in range(meta["key_labels"])]
        adapter.edit_ids = _unflatten_nested(meta["edit_ids"])
        adapter.key_id = meta["key_id"]
    return int(meta["edits_done"])


# --------------------------------------------------------------------------------
# WISE
# --------------------------------------------------------------------------------
WISE_FILES = ("wise_state.safetensors", "wise_state.json")
_MEAN_ACT_FIELDS = ("avg", "count", "sum", "min_a")


def _mean_act_dict(stats: Any) -> Dict[str, float]:
    return {name: getattr(stats, name) for name in _MEAN_ACT_FIELDS}


def _mean_act(cls: Any, fields: Dict[str, float]) -> Any:
    stats = cls()
    for name in _MEAN_ACT_FIELDS:
        setattr(stats, name, fields[name])
    return stats


def _save_history(prefix: str, history: Sequence[Any], tensors: Dict[str, torch.Tensor]) -> List[Any]:
    """WISE's history entries are [tokens dict, used flag]: tensors out, (keys, flag) back."""
    entries = []
    for i, (tokens, used) in enumerate(history):
        for key, value in tokens.items():
            tensors[f"{prefix}.{i}.{key}"] = value.detach().cpu().contiguous()
        entries.append([sorted(tokens), bool(used)])
    return entries


def _load_history(prefix: str, entries: Sequence[Any], tensors: Dict[str, torch.Tensor]) -> List[Any]:
    return [[{key: tensors[f"{prefix}.{i}.{key}"] for key in keys}, used] for i, (keys, used) in enumerate(entries)]


def save_wise_state(model: Any, layer: str, edits_done: int, directory: Union[str, Path]) -> None:
    """Write the WISE adapter at ``layer`` and WISE's module-level histories."""
    wise = importlib.import_module("easyeditor.models.wise.WISE")
    directory = Path(directory)
    adapter = nethook.get_module(model, layer)
    meta: Dict[str, Any] = {"layer": layer, "edits_done": edits_done, "adapter": isinstance(adapter, wise.WISEAdapter)}
    tensors: Dict[str, torch.Tensor] = {}
    if meta["adapter"]:
        tensors["new_weight"] = adapter.new_weight.detach().cpu().contiguous()
        tensors["layer_weight"] = adapter.layer.weight.detach().cpu().contiguous()
        for i, weight in enumerate(adapter.memory_weight):
            tensors[f"memory_weight.{i}"] = weight.detach().cpu().contiguous()
        mask = getattr(adapter, "weight_mask", None)
        if mask is not None:
            tensors["weight_mask"] = mask.detach().cpu().contiguous()
        if adapter.used_mask is not None:
            tensors["used_mask"] = torch.from_numpy(adapter.used_mask.copy())
        meta.update(
            memory_weights=len(adapter.memory_weight),
            memory_mean_act=[_mean_act_dict(stats) for stats in adapter.memory_mean_act],
            editing_mean_act=_mean_act_dict(adapter.editing_mean_act),
            merge_cnt=adapter.merge_cnt,
            editing_total_cnt=adapter.editing_total_cnt,
            edit_history=_save_history("edit_history", wise.edit_history, tensors),
            merge_group_edit_history=[
                _save_history(f"merge_group.{g}", group, tensors) for g, group in enumerate(wise.merge_group_edit_history)
            ],
        )
    save_file(tensors, str(directory / WISE_FILES[0]))
    (directory / WISE_FILES[1]).write_text(json.dumps(meta))


def reset_wise_histories() -> None:
    """Empty WISE's module-level edit histories (a new cell must not see another's)."""
    wise = importlib.import_module("easyeditor.models.wise.WISE")
    wise.edit_history = []
    wise.merge_group_edit_history = []


def load_wise_state(model: Any, hparams: Any, layer: str, directory: Union[str, Path]) -> int:
    """Wrap ``layer`` in a WISE adapter holding the saved state; returns the edits done."""
    wise = importlib.import_module("easyeditor.models.wise.WISE")
    wise_utils = importlib.import_module("easyeditor.models.wise.utils")
    meta, tensors = _read_checkpoint("WISE", WISE_FILES, layer, directory)
    if not meta["adapter"]:
        return int(meta["edits_done"])
    device = next(model.parameters()).device
    wise.WISE(config=hparams, model=model, device=device)  # wraps the layer, as the first edit does
    adapter = nethook.get_module(model, layer)
    if not isinstance(adapter, wise.WISEAdapter):
        raise ValueError(f"{layer} is not wrapped by a WISE adapter after setup")
    with torch.no_grad():
        adapter.new_weight.copy_(tensors["new_weight"].to(device))
        adapter.layer.weight.copy_(tensors["layer_weight"].to(device))
    adapter.memory_weight = [tensors[f"memory_weight.{i}"].to(device) for i in range(meta["memory_weights"])]
    adapter.memory_mean_act = [_mean_act(wise_utils.EditingMeanAct, f) for f in meta["memory_mean_act"]]
    adapter.editing_mean_act = _mean_act(wise_utils.EditingMeanAct, meta["editing_mean_act"])
    adapter.merge_cnt = int(meta["merge_cnt"])
    adapter.editing_total_cnt = int(meta["editing_total_cnt"])
    if "weight_mask" in tensors:
        adapter.weight_mask = tensors["weight_mask"].to(device)
    if "used_mask" in tensors:
        adapter.used_mask = tensors["used_mask"].numpy().copy()
    wise.edit_history = _load_history("edit_history", meta["edit_history"], tensors)
    wise.merge_group_edit_history = [
        _load_history(f"merge_group.{g}", group, tensors) for g, group in enumerate(meta["merge_group_edit_history"])
    ]
    return int(meta["edits_done"])
