"""Load, convert, check and save the TopK SAE that MicroEdit hooks into the residual stream.

Where the SAE comes from, in this order (``MicroEditHyperParams``):

1. ``sae_path`` when it exists: a SAE-Lens folder (``cfg.json`` +
   ``sae_weights.safetensors``, read with ``SAE.load_from_disk``) or an EleutherAI
   ``sparsify`` folder (``cfg.json`` + ``sae.safetensors``, converted here);
   ``sae_format`` forces one of the two, ``auto`` tells them apart by the weights file;
2. ``sae_release``/``sae_id`` through SAE-Lens' pretrained directory (online);
3. otherwise an ``SAEError`` that says how to get one (``easyedit-nmke train-sae``, a
   download, or a release).  ``ensure_sae`` (``train_sae.py``) trains and caches one
   instead when the hparams carry ``sae_train_*``.

Whatever the source, the SAE comes back as a SAE-Lens ``TopKSAE`` in float32 with the
plain contract MicroEdit relies on::

    acts  = TopK_k(ReLU((x - b_dec) @ W_enc + b_enc))     (b_dec subtracted when
    x_hat = acts @ W_dec + b_dec                            apply_b_dec_to_input)

``rescale_acts_by_decoder_norm`` is folded into the weights (decoder rows then have
unit norm), and ``sae_k`` replaces the SAE's own k.  A standard ReLU SAE is accepted
only when ``sae_k`` is set: that opts in to keeping its k largest activations.

Only safetensors and JSON are ever read: nothing is unpickled.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Mapping, Optional, Union

import torch
from safetensors import safe_open
from torch import nn

from ...util.env import hub_reachable
from ...util.model_parts import ArchitectureError, num_layers
from ...util.nethook import get_module

if TYPE_CHECKING:  # pragma: no cover
    from sae_lens import TopKSAE
    from transformers import PreTrainedTokenizerBase

    from .microedit_hparams import MicroEditHyperParams

SAE_LENS_WEIGHTS = "sae_weights.safetensors"
SPARSIFY_WEIGHTS = "sae.safetensors"
CFG_FILE = "cfg.json"
METRICS_FILE = "training_metrics.json"
# SAE-Lens release loaders that read safetensors only; the others may read pickles.
_SAFE_RELEASE_LOADERS = ("sae_lens", "sparsify")


class SAEError(ValueError):
    """No usable SAE for MicroEdit, with the reason and how to get one."""


def _how_to_get_one() -> str:
    return (
        "get one by setting sae_train_d_sae and sae_train_k (MicroEdit then trains a TopK SAE on the model "
        "on first use and saves it at sae_path; with the easyedit-nmke plugin installed, "
        "`easyedit-nmke train-sae --hparams <this hparams YAML>` trains it ahead), by putting a SAE-Lens "
        "or EleutherAI sparsify folder at sae_path, or by setting sae_release/sae_id (SAE-Lens pretrained "
        "SAEs, needs the network)"
    )


# --------------------------------------------------------------------------- checks


def hidden_size(model: nn.Module) -> Optional[int]:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for attr in ("hidden_size", "n_embd", "d_model"):
        value = getattr(config, attr, None)
        if isinstance(value, int):
            return value
    return None


def check_layer(model: nn.Module, hparams: "MicroEditHyperParams") -> str:
    """Name of the decoder block the SAE reads; ``SAEError`` when the layer does not exist."""
    layer = hparams.layer
    try:
        count = num_layers(model)
    except ArchitectureError as exc:
        raise SAEError(str(exc)) from exc
    if not 0 <= layer < count:
        raise SAEError(
            f"MicroEdit layer {layer} is out of range: {type(model).__name__} has {count} layers (0..{count - 1})"
        )
    name = hparams.layer_module_tmp.format(layer)
    try:
        get_module(model, name)
    except LookupError as exc:
        raise SAEError(
            f"layer_module_tmp {hparams.layer_module_tmp!r} does not match {type(model).__name__} (no module {name!r})"
        ) from exc
    if hparams.ln_f_module:
        try:
            get_module(model, hparams.ln_f_module)
        except LookupError as exc:
            raise SAEError(f"ln_f_module {hparams.ln_f_module!r}: {type(model).__name__} has no such module") from exc
    return name


def sae_block_index(sae: nn.Module) -> Optional[int]:
    """Decoder block whose output the SAE was trained on, from its hook name (None: unknown)."""
    hook = getattr(sae.cfg.metadata, "hook_name", None) or ""
    match = re.fullmatch(r"blocks\.(\d+)\.hook_resid_(pre|post)", hook)
    if match is None:
        return None
    block = int(match.group(1))
    return block if match.group(2) == "post" else block - 1


def check_sae(sae: nn.Module, hparams: "MicroEditHyperParams", model: Optional[nn.Module] = None) -> None:
    """``SAEError`` unless ``sae`` is a TopK SAE that fits ``model`` at ``hparams.layer``."""
    from sae_lens import TopKSAE

    if not isinstance(sae, TopKSAE):
        raise SAEError(f"MicroEdit needs a TopK SAE; got {type(sae).__name__}")
    block = sae_block_index(sae)
    if block is not None and block != hparams.layer:
        raise SAEError(
            f"the SAE was trained on {sae.cfg.metadata.hook_name} (the output of decoder block {block}), "
            f"but MicroEdit hooks the output of block {hparams.layer} (layers: [{hparams.layer}]); "
            f"set layers: [{block}] or use an SAE for that layer"
        )
    if model is not None:
        name = check_layer(model, hparams)
        size = hidden_size(model)
        if size is not None and sae.cfg.d_in != size:
            raise SAEError(
                f"the SAE reads {sae.cfg.d_in}-dimensional activations, but {type(model).__name__} has hidden size "
                f"{size} at layer {hparams.layer} ({name}); this SAE belongs to another model"
            )


# --------------------------------------------------------------------------- conversion


def _plain_topk(sae: nn.Module, k: Optional[int]) -> "TopKSAE":
    """A ``TopKSAE`` without decoder-norm rescaling, with k replaced when given."""
    from sae_lens import StandardSAE, TopKSAE
    from sae_lens.saes.topk_sae import TopKSAEConfig

    if k is not None and not 0 < k <= sae.cfg.d_sae:
        raise SAEError(f"sae_k must be in [1, {sae.cfg.d_sae}] for this SAE, got {k}")
    if isinstance(sae, StandardSAE) and not isinstance(sae, TopKSAE):
        if k is None:
            raise SAEError(
                "the SAE is a standard ReLU SAE, not a TopK SAE; MicroEdit needs TopK latents. "
                "Set sae_k to keep only its k largest activations per token (the MicroEdit paper does this "
                "for Mistral-7B's SAE), or use a TopK SAE"
            )
        cfg = TopKSAEConfig(
            d_in=sae.cfg.d_in,
            d_sae=sae.cfg.d_sae,
            k=k,
            dtype=sae.cfg.dtype,
            device=sae.cfg.device,
            apply_b_dec_to_input=sae.cfg.apply_b_dec_to_input,
            normalize_activations=sae.cfg.normalize_activations,
            reshape_activations=sae.cfg.reshape_activations,
            rescale_acts_by_decoder_norm=False,
            metadata=sae.cfg.metadata,
        )
        converted = TopKSAE(cfg)
        converted.load_state_dict(
            {name: sae.state_dict()[name] for name in ("W_enc", "b_enc", "W_dec", "b_dec")}, strict=True
        )
        return converted
    if not isinstance(sae, TopKSAE):
        architecture = sae.cfg.architecture() if hasattr(sae.cfg, "architecture") else type(sae).__name__
        raise SAEError(f"MicroEdit needs a TopK SAE; this one has architecture {architecture!r} ({type(sae).__name__})")
    if sae.cfg.rescale_acts_by_decoder_norm:
        sae.fold_W_dec_norm()  # decoder rows to unit norm, encoder scaled to match: same outputs
        sae.cfg.rescale_acts_by_decoder_norm = False
    if k is not None:
        sae.cfg.k = k
        sae.activation_fn = sae.get_activation_fn()
    return sae


def _read_json(path: Path) -> Dict[str, Any]:
    try:
        with open(path, "r", encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise SAEError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise SAEError(f"{path}: expected a JSON object")
    return data


def load_sparsify_folder(folder: Union[str, Path], device: str = "cpu", dtype: torch.dtype = torch.float32) -> "TopKSAE":
    """An EleutherAI sparsify SAE folder as a SAE-Lens ``TopKSAE`` with the same outputs.

    sparsify encodes ``top_k(relu(encoder(x - b_dec)))`` and decodes
    ``sum_i act_i W_dec[i] + b_dec`` (``encoder.weight`` [d_sae, d_in], ``W_dec``
    [d_sae, d_in]).  SAE-Lens' TopK takes the k largest pre-activations and then
    applies ReLU, which gives the same activations: where fewer than k are positive,
    both keep exactly the positive ones.
    """
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

    folder = Path(folder)
    cfg = _read_json(folder / CFG_FILE)
    if cfg.get("activation", "topk") != "topk":
        raise SAEError(f"{folder}: sparsify activation {cfg.get('activation')!r} is not TopK")
    for flag in ("transcode", "skip_connection", "signed", "embed_skip", "gram_lookup"):
        if cfg.get(flag):
            raise SAEError(f"{folder}: sparsify option {flag}=true is not supported (MicroEdit needs a plain TopK SAE)")
    try:
        d_in = int(cfg["d_in"])
        k = int(cfg["k"])
    except (KeyError, TypeError, ValueError) as exc:
        raise SAEError(f"{folder}/{CFG_FILE} lacks d_in or k") from exc
    d_sae = int(cfg.get("num_latents") or 0) or d_in * int(cfg.get("expansion_factor", 32))

    weights_path = folder / SPARSIFY_WEIGHTS
    tensors: Dict[str, torch.Tensor] = {}
    with safe_open(str(weights_path), framework="pt", device="cpu") as f:
        for key in f.keys():
            tensors[key] = f.get_tensor(key)
    if "W_skip" in tensors:
        raise SAEError(f"{weights_path}: has a skip connection (W_skip), not a plain SAE")
    expected = {"encoder.weight": (d_sae, d_in), "encoder.bias": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    for key, shape in expected.items():
        if key not in tensors:
            raise SAEError(f"{weights_path}: missing tensor {key!r} (has {sorted(tensors)})")
        if tuple(tensors[key].shape) != shape:
            raise SAEError(f"{weights_path}: {key} has shape {tuple(tensors[key].shape)}, cfg.json implies {shape}")

    match = re.search(r"layers[._](\d+)$", folder.name)
    metadata = SAEMetadata(
        model_name=folder.parent.name,
        hook_name=f"blocks.{match.group(1)}.hook_resid_post" if match else None,
        hf_hook_name=folder.name,
        source_format="sparsify",
    )
    sae_cfg = TopKSAEConfig(
        d_in=d_in,
        d_sae=d_sae,
        k=k,
        dtype=str(dtype).replace("torch.", ""),
        device=str(device),
        apply_b_dec_to_input=True,  # sparsify subtracts b_dec before encoding
        normalize_activations="none",
        rescale_acts_by_decoder_norm=False,
        metadata=metadata,
    )
    sae = TopKSAE(sae_cfg)
    state = {
        "W_enc": tensors["encoder.weight"].T.contiguous(),
        "b_enc": tensors["encoder.bias"],
        "W_dec": tensors["W_dec"],
        "b_dec": tensors["b_dec"],
    }
    sae.load_state_dict({name: t.to(dtype) for name, t in state.items()}, strict=True)
    return sae.to(device)


def detect_format(folder: Path) -> Optional[str]:
    if not (folder / CFG_FILE).is_file():
        return None
    if (folder / SAE_LENS_WEIGHTS).is_file():
        return "sae_lens"
    if (folder / SPARSIFY_WEIGHTS).is_file():
        return "sparsify"
    return None


def load_sae_folder(
    folder: Union[str, Path], sae_format: str = "auto", device: str = "cpu", dtype: torch.dtype = torch.float32
) -> nn.Module:
    """The SAE stored in ``folder`` (any SAE-Lens architecture, or sparsify converted to TopK)."""
    from sae_lens import SAE

    folder = Path(folder)
    found = detect_format(folder)
    fmt = found if sae_format == "auto" else sae_format
    if fmt is None:
        raise SAEError(
            f"{folder} is neither a SAE-Lens folder ({CFG_FILE} + {SAE_LENS_WEIGHTS}) "
            f"nor a sparsify folder ({CFG_FILE} + {SPARSIFY_WEIGHTS}); files: {sorted(p.name for p in folder.iterdir())}"
        )
    if fmt == "sparsify":
        if not (folder / SPARSIFY_WEIGHTS).is_file():
            raise SAEError(f"sae_format is sparsify but {folder / SPARSIFY_WEIGHTS} does not exist")
        return load_sparsify_folder(folder, device=device, dtype=dtype)
    if not (folder / SAE_LENS_WEIGHTS).is_file() or not (folder / CFG_FILE).is_file():
        raise SAEError(f"sae_format is sae_lens but {folder} lacks {CFG_FILE} or {SAE_LENS_WEIGHTS}")
    try:
        return SAE.load_from_disk(str(folder), device=device, dtype=str(dtype).replace("torch.", ""))
    except KeyError as exc:  # unknown architecture name in cfg.json
        raise SAEError(f"{folder}: SAE-Lens cannot build this SAE (unknown {exc})") from exc


def load_pretrained(release: str, sae_id: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> nn.Module:
    """A SAE-Lens pretrained SAE (downloads; safetensors-only releases)."""
    from sae_lens import SAE
    from sae_lens.loading.pretrained_sae_loaders import get_conversion_loader_name
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory, get_repo_id_and_folder_name

    directory = get_pretrained_saes_directory()
    if release not in directory:
        raise SAEError(f"sae_release {release!r} is not in SAE-Lens' pretrained directory")
    if sae_id not in directory[release].saes_map:
        ids = list(directory[release].saes_map)
        raise SAEError(f"sae_id {sae_id!r} is not in release {release!r}; ids: {ids[:8]}{' ...' if len(ids) > 8 else ''}")
    loader = get_conversion_loader_name(release)
    if loader not in _SAFE_RELEASE_LOADERS:
        raise SAEError(
            f"release {release!r} uses SAE-Lens' {loader!r} loader, which may read pickled checkpoints; "
            "convert it to a SAE-Lens folder yourself and set sae_path"
        )
    try:
        if loader == "sparsify":
            from huggingface_hub import hf_hub_download

            repo_id, folder_name = get_repo_id_and_folder_name(release, sae_id)
            paths = [hf_hub_download(repo_id, f"{folder_name}/{name}") for name in (CFG_FILE, SPARSIFY_WEIGHTS)]
            return load_sparsify_folder(Path(paths[0]).parent, device=device, dtype=dtype)
        return SAE.from_pretrained(release, sae_id, device=device, dtype=str(dtype).replace("torch.", ""))
    except SAEError:
        raise
    except Exception as exc:  # network or hub errors
        raise SAEError(f"could not download {release}/{sae_id}: {type(exc).__name__}: {exc}") from exc


# --------------------------------------------------------------------------- API


def load_sae(
    hparams: "MicroEditHyperParams",
    model: Optional[nn.Module] = None,
    device: Union[str, torch.device] = "cpu",
    dtype: torch.dtype = torch.float32,
) -> "TopKSAE":
    """The TopK SAE for ``hparams`` (see the module docstring), checked against ``model`` when given."""
    if model is not None:
        check_layer(model, hparams)  # before any loading or download
    device = str(device)
    path = hparams.resolved_sae_path()
    if path is not None and path.exists():
        if not path.is_dir():
            raise SAEError(f"sae_path {path} is a file; it must be a folder")
        sae = load_sae_folder(path, hparams.sae_format, device=device, dtype=dtype)
    elif hparams.sae_release and hparams.sae_id:
        if not hub_reachable():
            where = f"no SAE at {path} and " if path is not None else ""
            raise SAEError(
                f"{where}HF_HUB_OFFLINE is set, so {hparams.sae_release}/{hparams.sae_id} cannot be downloaded; "
                + _how_to_get_one()
            )
        sae = load_pretrained(hparams.sae_release, hparams.sae_id, device=device, dtype=dtype)
    else:
        where = f"no SAE at {path}" if path is not None else "no sae_path and no sae_release/sae_id"
        raise SAEError(f"{where}; " + _how_to_get_one())
    sae = _plain_topk(sae, hparams.sae_k)
    sae.eval()
    check_sae(sae, hparams, model)
    return sae


def save_sae(sae: nn.Module, directory: Union[str, Path], metrics: Optional[Mapping[str, Any]] = None) -> Path:
    """Write ``sae`` as a SAE-Lens folder (+ ``training_metrics.json``), replacing ``directory`` atomically."""
    directory = Path(directory)
    partial = directory.with_name(directory.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    if hasattr(sae, "save_inference_model"):  # a SAE-Lens TrainingSAE
        sae.save_inference_model(str(partial))
    else:
        sae.save_model(str(partial))
    if metrics is not None:
        with open(partial / METRICS_FILE, "w", encoding="utf-8") as f:
            json.dump(dict(metrics), f, indent=2, sort_keys=True)
    if directory.exists():
        shutil.rmtree(directory)
    partial.rename(directory)
    return directory


def read_metrics(directory: Union[str, Path]) -> Optional[Dict[str, Any]]:
    path = Path(directory) / METRICS_FILE
    return _read_json(path) if path.is_file() else None

