"""Lifelong NMKE state of one edited model: null-space bases, accumulated keys, prefixes, counters.

The state is attached to the model object it belongs to (``model.nmke_state``), so
two models edited in one process never share it; ``save``/``load`` persist it as
safetensors + JSON for resumable runs, and ``reset`` forgets the edits while
keeping the (expensive, edit-independent) null-space bases and context prefixes.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .nullspace import cache_in_basis, null_space_basis

STATE_ATTRIBUTE = "nmke_state"
STATE_VERSION = 2  # 1 stored projectors P = B Bᵀ; they still load (basis recovered from P)


@dataclass
class ReadoutCache:
    """U·diag(g)·V of one layer and the weight version it was computed for.

    V holds the neurons' write vectors as the residual stream sees them: the down
    projection's columns, times the post-FFN norm's gain where there is one (Gemma;
    ``util.model_parts.linearised_ffn_writes``).  Only the down projection's version is
    tracked: the unembedding and the norms are never edited.
    """

    matrix: torch.Tensor
    weight_version: int
    weight_data_ptr: int  # a replaced weight tensor (``param.data = ...``) keeps the version count

    def matches(self, weight: torch.Tensor) -> bool:
        return self.weight_version == weight._version and self.weight_data_ptr == weight.data_ptr()


@dataclass
class BasisCache:
    """Bᵀ C B of one layer and the key cache C (tensor and in-place version) it was computed from."""

    matrix: torch.Tensor
    source: torch.Tensor
    source_version: int

    def matches(self, key_cache: torch.Tensor) -> bool:
        return self.source is key_cache and self.source_version == key_cache._version


@dataclass
class UndoRecord:
    """What the last edit changed, to take its keys back out of C if an editor restores the weights.

    Only the edit's keys are kept (C −= K Kᵀ undoes C += K Kᵀ up to float rounding):
    a copy of C would be d_ff² floats per layer and edit (4 GB on Llama-3-8B).
    """

    originals: Dict[int, torch.Tensor]  # down-projection weights before the edit
    keys: Dict[int, torch.Tensor]  # the edit's keys K [d_ff, n] per layer
    num_edits: int
    kept_neurons: Dict[int, int]
    # False when the update came out exactly zero: then "restored" cannot be told
    # from "kept", and the edit's keys stay in C.
    weights_changed: bool = True


@dataclass
class NMKEState:
    layers: List[int]
    key_moments: Dict[int, torch.Tensor] = field(default_factory=dict)  # E[k kᵀ] over the corpus
    null_bases: Dict[int, torch.Tensor] = field(default_factory=dict)  # B per layer [d_ff, r], P = B Bᵀ
    key_cache: Dict[int, torch.Tensor] = field(default_factory=dict)  # C = Σ K Kᵀ of past edits
    context_templates: List[str] = field(default_factory=list)
    # Corpus settings and threshold the moments and null spaces were built with (nmke_main.null_space_settings).
    null_space_settings: Dict[str, Any] = field(default_factory=dict)
    num_edits: int = 0
    kept_neurons: Dict[int, int] = field(default_factory=dict)  # total kept neurons per layer, for reporting
    timings: Dict[str, float] = field(default_factory=dict)  # seconds spent per phase
    # Derived, never saved: rebuilt when missing or stale.
    readout: Dict[int, ReadoutCache] = field(default_factory=dict, repr=False)
    basis_cache: Dict[int, BasisCache] = field(default_factory=dict, repr=False)  # Bᵀ C B [r, r]
    last_edit: Optional[UndoRecord] = field(default=None, repr=False)
    last_edit_info: Dict[str, Any] = field(default_factory=dict, repr=False)

    def rollback_if_restored(self, weights: Dict[int, torch.Tensor]) -> bool:
        """Undo the last edit's statistics when the weights are back to their pre-edit values.

        EasyEdit's non-sequential mode writes the original weights back after each
        edit; then C must not keep that edit's keys (AlphaEdit's global cache does,
        which silently constrains later, independent edits).
        """
        record = self.last_edit
        if record is None:
            return False
        self.last_edit = None
        if not record.weights_changed:
            return False
        if not all(torch.equal(weights[layer], record.originals[layer]) for layer in record.originals):
            return False
        for layer, keys in record.keys.items():
            self.remove_edit_keys(layer, keys)
        self.num_edits = record.num_edits
        self.kept_neurons = record.kept_neurons
        return True

    def key_cache_in_basis(self, layer: int) -> torch.Tensor:
        """Bᵀ C B for ``layer``: kept up to date by ``add_edit_keys``, rebuilt if C changed otherwise."""
        key_cache = self.key_cache[layer]
        entry = self.basis_cache.get(layer)
        if entry is None or not entry.matches(key_cache):
            basis = self.null_bases[layer]
            entry = BasisCache(cache_in_basis(basis, key_cache.to(basis.device)), key_cache, key_cache._version)
            self.basis_cache[layer] = entry
        return entry.matrix

    def add_edit_keys(self, layer: int, keys: torch.Tensor) -> None:
        """C += K Kᵀ for an edit's keys [d_ff, n], and the same in basis coordinates (r × r, not d_ff³)."""
        self._add_outer_product(layer, keys, 1.0)

    def remove_edit_keys(self, layer: int, keys: torch.Tensor) -> None:
        """C −= K Kᵀ: takes back an ``add_edit_keys`` (exactly up to float rounding)."""
        self._add_outer_product(layer, keys, -1.0)

    def _add_outer_product(self, layer: int, keys: torch.Tensor, sign: float) -> None:
        key_cache = self.key_cache[layer]
        entry = self.basis_cache.get(layer)
        up_to_date = entry is not None and entry.matches(key_cache)
        # Everything that allocates comes first, so a failure leaves C and Bᵀ C B untouched.
        keys = keys.to(device=key_cache.device, dtype=key_cache.dtype)
        if up_to_date:
            basis = self.null_bases[layer]
            basis_keys = (basis.T @ keys.to(device=basis.device, dtype=basis.dtype)).to(entry.matrix.dtype)
        key_cache.addmm_(keys, keys.T, alpha=sign)  # in place: no d_ff × d_ff temporary
        if up_to_date:
            entry.matrix.addmm_(basis_keys, basis_keys.T, alpha=sign)
            entry.source_version = key_cache._version

    def reset(self) -> None:
        """Forget all edits (C, counters); corpus statistics, null-space bases and prefixes stay valid."""
        for layer, c in self.key_cache.items():
            self.key_cache[layer] = torch.zeros_like(c)
        self.num_edits = 0
        self.kept_neurons = {layer: 0 for layer in self.layers}
        self.timings = {}
        self.readout.clear()
        self.basis_cache.clear()
        self.last_edit = None
        self.last_edit_info = {}

    def save(self, directory: Union[str, Path]) -> None:
        """Write the state to ``directory`` (safetensors + JSON).

        The last edit's undo record (``rollback_if_restored``: for an editor that writes
        the pre-edit weights back) is not saved, so save once the weights are final.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for layer, b in self.null_bases.items():
            tensors[f"null_basis.{layer}"] = b.detach().cpu().contiguous()
        for layer, m in self.key_moments.items():
            tensors[f"key_moment.{layer}"] = m.detach().cpu().contiguous()
        for layer, c in self.key_cache.items():
            tensors[f"key_cache.{layer}"] = c.detach().cpu().contiguous()
        save_file(tensors, str(directory / "nmke_state.safetensors"))
        meta = {
            "version": STATE_VERSION,
            "layers": self.layers,
            "context_templates": self.context_templates,
            "null_space_settings": self.null_space_settings,
            "num_edits": self.num_edits,
            "kept_neurons": {str(k): v for k, v in self.kept_neurons.items()},
            "timings": self.timings,
        }
        (directory / "nmke_state.json").write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, directory: Union[str, Path], device: Union[str, torch.device] = "cpu") -> "NMKEState":
        directory = Path(directory)
        meta_path, tensor_path = directory / "nmke_state.json", directory / "nmke_state.safetensors"
        if not meta_path.is_file() or not tensor_path.is_file():
            raise FileNotFoundError(f"no NMKE state in {directory}")
        meta: Dict[str, Any] = json.loads(meta_path.read_text())
        if meta.get("version") not in (1, STATE_VERSION):
            raise ValueError(f"NMKE state version {meta.get('version')} is not supported (need 1 or {STATE_VERSION})")
        tensors = load_file(str(tensor_path), device=str(device))
        state = cls(layers=[int(x) for x in meta["layers"]])
        attributes = {"null_basis": "null_bases", "key_cache": "key_cache", "key_moment": "key_moments"}
        for name, tensor in tensors.items():
            kind, _, layer = name.rpartition(".")
            if kind == "projector":  # version 1
                kind, tensor = "null_basis", _basis_of_projector(tensor)
            if kind not in attributes or not layer.isdigit():
                raise ValueError(f"{tensor_path} holds an unexpected tensor {name!r}; it is not an NMKE state")
            getattr(state, attributes[kind])[int(layer)] = tensor
        templates = list(meta["context_templates"])
        if templates and templates[0] != "{}":
            # z and its first-layer residual are read off the bare prompt, the first template.
            raise ValueError(f"{meta_path}: the first context template must be '{{}}', got {templates[0]!r}")
        state.context_templates = templates
        state.null_space_settings = dict(meta.get("null_space_settings", {}))  # absent before 2026-11-24
        state.num_edits = int(meta["num_edits"])
        state.kept_neurons = {int(k): int(v) for k, v in meta.get("kept_neurons", {}).items()}
        state.timings = {k: float(v) for k, v in meta.get("timings", {}).items()}
        return state

    def add_time(self, phase: str, seconds: float) -> None:
        self.timings[phase] = self.timings.get(phase, 0.0) + seconds


def _basis_of_projector(projector: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of range(P) for an orthogonal projector P: the null space of I − P."""
    identity = torch.eye(projector.shape[0], dtype=projector.dtype, device=projector.device)
    return null_space_basis(identity - projector, 0.5)  # eigenvalues of I − P are 0 or 1


def get_state(model: nn.Module) -> Optional[NMKEState]:
    return model.__dict__.get(STATE_ATTRIBUTE)


def attach_state(model: nn.Module, state: NMKEState) -> NMKEState:
    # A plain attribute (not a submodule or buffer): it must not enter state_dict or .to().
    model.__dict__[STATE_ATTRIBUTE] = state
    return state


def detach_nmke_state(model: nn.Module) -> Optional[NMKEState]:
    """Take the lifelong state off ``model`` and return it; the weights keep their edits, and the
    next edit builds a new state (e.g. for other edit layers)."""
    return model.__dict__.pop(STATE_ATTRIBUTE, None)


def state_layers_match(state: NMKEState, layers: List[int]) -> Tuple[bool, str]:
    if list(state.layers) != list(layers):
        return False, f"NMKE state was built for layers {state.layers}, hparams edit layers {layers}"
    return True, ""
