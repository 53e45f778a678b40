"""Lifelong MicroEdit state of one edited model: the hooked SAE, τ, edited rows, counters.

The SAE is a submodule of the edited model (``model.microedit_sae``): its decoder is
part of the edited model, so it follows ``model.to()`` and EasyEdit's weight restore
(``weights_copy`` names ``microedit_sae.W_dec``) works unchanged.  The state object is
a plain attribute (``model.microedit_state``) holding the switch hook, τ, the
original value of every decoder row an edit changed (for ``reset``) and counters;
``save``/``load`` persist the edited rows as safetensors + JSON.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .sae_hook import SAESwitch

STATE_ATTRIBUTE = "microedit_state"
SAE_ATTRIBUTE = "microedit_sae"
STATE_VERSION = 1


@dataclass
class MicroEditState:
    layer: int
    layer_name: str
    switch: SAESwitch
    sae_source: str  # where the SAE came from (path or release/id), for checks on load
    original_rows: Dict[int, torch.Tensor] = field(default_factory=dict)  # latent -> row before any edit
    num_edits: int = 0
    timings: Dict[str, float] = field(default_factory=dict)
    last_edit_info: Dict[str, Any] = field(default_factory=dict, repr=False)
    # False once the stage-2 replay failed its check on this model (see compute_decoder_edit):
    # later edits go straight to whole-model steps instead of retrying and warning each time.
    replay_fits: bool = True

    @property
    def sae(self) -> nn.Module:
        return self.switch.sae

    @property
    def threshold(self) -> float:
        return self.switch.threshold

    def remember_originals(self, latents: torch.Tensor) -> None:
        for index in latents.tolist():
            if index not in self.original_rows:
                self.original_rows[index] = self.sae.W_dec.detach()[index].clone()

    def edited_latents(self) -> torch.Tensor:
        return torch.tensor(sorted(self.original_rows), dtype=torch.long)

    def reset(self) -> None:
        """Write the original decoder rows back and forget the edits; τ and the hook stay."""
        if self.original_rows:
            index = self.edited_latents().to(self.sae.W_dec.device)
            originals = torch.stack([self.original_rows[i] for i in index.tolist()])
            with torch.no_grad():
                self.sae.W_dec[index] = originals.to(self.sae.W_dec.dtype)
        self.original_rows.clear()
        self.num_edits = 0
        self.timings = {}
        self.last_edit_info = {}

    def save(self, directory: Union[str, Path]) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        index = self.edited_latents()
        tensors = {"edited_latents": index}
        if index.numel():
            tensors["edited_rows"] = self.sae.W_dec.detach()[index.to(self.sae.W_dec.device)].cpu().contiguous()
            tensors["original_rows"] = torch.stack([self.original_rows[i] for i in index.tolist()]).cpu().contiguous()
        save_file(tensors, str(directory / "microedit_state.safetensors"))
        meta = {
            "version": STATE_VERSION,
            "layer": self.layer,
            "sae_source": self.sae_source,
            "threshold": self.threshold,
            "num_edits": self.num_edits,
            "timings": self.timings,
        }
        (directory / "microedit_state.json").write_text(json.dumps(meta, indent=2))

    def load(self, directory: Union[str, Path]) -> None:
        """Apply a saved state to this (freshly prepared) state's SAE."""
        directory = Path(directory)
        meta_path, tensor_path = directory / "microedit_state.json", directory / "microedit_state.safetensors"
        if not meta_path.is_file() or not tensor_path.is_file():
            raise FileNotFoundError(f"no MicroEdit state in {directory}")
        meta = json.loads(meta_path.read_text())
        if meta.get("version") != STATE_VERSION:
            raise ValueError(f"MicroEdit state version {meta.get('version')} is not supported (need {STATE_VERSION})")
        if meta["layer"] != self.layer or meta["sae_source"] != self.sae_source:
            raise ValueError(
                f"MicroEdit state in {directory} was saved for layer {meta['layer']} with SAE {meta['sae_source']!r}, "
                f"not layer {self.layer} with SAE {self.sae_source!r}"
            )
        self.reset()
        tensors = load_file(str(tensor_path))
        index = tensors["edited_latents"]
        if index.numel():
            device, dtype = self.sae.W_dec.device, self.sae.W_dec.dtype
            for i, row in zip(index.tolist(), tensors["original_rows"]):
                self.original_rows[i] = row.to(device, dtype)
            with torch.no_grad():
                self.sae.W_dec[index.to(device)] = tensors["edited_rows"].to(device, dtype)
        self.switch.threshold = float(meta["threshold"])
        self.num_edits = int(meta["num_edits"])
        self.timings = {k: float(v) for k, v in meta.get("timings", {}).items()}

    def add_time(self, phase: str, seconds: float) -> None:
        self.timings[phase] = self.timings.get(phase, 0.0) + seconds


def get_state(model: nn.Module) -> Optional[MicroEditState]:
    return model.__dict__.get(STATE_ATTRIBUTE)


def attach_state(model: nn.Module, state: MicroEditState) -> MicroEditState:
    # A plain attribute (not a submodule): the state must not enter state_dict or .to().
    model.__dict__[STATE_ATTRIBUTE] = state
    return state


def detach_microedit(model: nn.Module) -> None:
    """Remove the hook, the SAE submodule and the state: the model computes as before MicroEdit."""
    state = model.__dict__.pop(STATE_ATTRIBUTE, None)
    if state is not None:
        state.switch.remove()
    if SAE_ATTRIBUTE in model._modules:
        del model._modules[SAE_ATTRIBUTE]
