"""Lifelong MicroEdit state of one edited model: the hooked SAE, τ, edited rows, the edit log, counters.

The SAE is a submodule of the edited model (``model.microedit_sae``): its decoder is
part of the edited model, so it follows ``model.to()`` and EasyEdit's weight restore
(``weights_copy`` names ``microedit_sae.W_dec``) works unchanged.  The state object is
a plain attribute (``model.microedit_state``) holding the switch hook, τ, the
original value of every decoder row an edit changed (for ``reset``), the log of the
edits in effect (request + trained latents, for ``rehearsal_edits``) and counters;
``save``/``load`` persist the edited rows and the log as safetensors + JSON.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ...util.requests import EditRequest
from .rehearsal import EditMemory
from .sae_hook import SAESwitch

STATE_ATTRIBUTE = "microedit_state"
SAE_ATTRIBUTE = "microedit_sae"
STATE_VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 1: no edit log


@dataclass
class CallRecord:
    """What one ``apply_microedit_to_model`` call changed, to notice an editor writing it back."""

    log_length: int  # edit log length before the call
    num_edits: int  # edit count before the call
    latents: torch.Tensor  # rows the call changed
    rows_before: torch.Tensor  # their values before the call


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
    edit_log: List[EditMemory] = field(default_factory=list)  # the edits in effect, in order
    last_call: Optional[CallRecord] = field(default=None, repr=False)

    @property
    def sae(self) -> nn.Module:
        return self.switch.sae

    @property
    def threshold(self) -> float:
        return self.switch.threshold

    def keep_first_rows(self, store: Dict[int, torch.Tensor], latents: torch.Tensor) -> None:
        """Copy into ``store`` the current decoder row of each latent it does not hold yet."""
        for index in latents.tolist():
            if index not in store:
                store[index] = self.sae.W_dec.detach()[index].clone()

    def remember_originals(self, latents: torch.Tensor) -> None:
        self.keep_first_rows(self.original_rows, latents)

    def log_edit(self, request: EditRequest, latents: torch.Tensor) -> None:
        self.edit_log.append(EditMemory(request, latents.detach().cpu().to(torch.long)))

    def record_call(self, log_length: int, num_edits: int, rows_before: Dict[int, torch.Tensor]) -> None:
        """Remember the rows a call changed (``rows_before``: their values before it) for ``forget_if_restored``."""
        decoder = self.sae.W_dec.detach()
        changed = sorted(i for i, row in rows_before.items() if not torch.equal(decoder[i], row))
        latents = torch.tensor(changed, dtype=torch.long)
        rows = torch.stack([rows_before[i] for i in changed]) if changed else decoder[:0].clone()
        self.last_call = CallRecord(log_length, num_edits, latents, rows)

    def forget_if_restored(self, keep_record: bool = False) -> bool:
        """Drop the last call's edits from the log when the decoder rows are back to their values before it.

        EasyEdit's non-sequential mode writes the original weights back after each call;
        the log must then not keep edits that are no longer in the model (rehearsal would
        teach them again).  The record is used up unless ``keep_record`` (a check that a
        later write-back must still be able to trigger, as in ``save``).
        """
        record = self.last_call
        if not keep_record:
            self.last_call = None
        if record is None or record.latents.numel() == 0:
            return False
        current = self.sae.W_dec.detach()[record.latents.to(self.sae.W_dec.device)]
        if not torch.equal(current, record.rows_before.to(current.device, current.dtype)):
            return False
        del self.edit_log[record.log_length :]
        self.num_edits = record.num_edits
        self.last_call = None
        return True

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
        self.edit_log.clear()
        self.last_call = None
        self.num_edits = 0
        self.timings = {}
        self.last_edit_info = {}

    def save(self, directory: Union[str, Path]) -> None:
        """Write the state to ``directory`` (safetensors + JSON); edits an editor wrote back are left out."""
        self.forget_if_restored(keep_record=True)
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        index = self.edited_latents()
        tensors = {"edited_latents": index}
        if index.numel():
            tensors["edited_rows"] = self.sae.W_dec.detach()[index.to(self.sae.W_dec.device)].cpu().contiguous()
            tensors["original_rows"] = torch.stack([self.original_rows[i] for i in index.tolist()]).cpu().contiguous()
        if self.edit_log:
            tensors["log_latents"] = torch.cat([entry.latents for entry in self.edit_log]).contiguous()
            tensors["log_counts"] = torch.tensor([entry.latents.numel() for entry in self.edit_log], dtype=torch.long)
        save_file(tensors, str(directory / "microedit_state.safetensors"))
        meta = {
            "version": STATE_VERSION,
            "layer": self.layer,
            "sae_source": self.sae_source,
            "threshold": self.threshold,
            # τ is in units of this ARD (1/α, the massive-norm cut) and the rows are this SAE's.
            "sae_settings": self.sae_settings(),
            "num_edits": self.num_edits,
            "timings": self.timings,
            "edit_log": [
                {"prompt": e.request.prompt, "subject": e.request.subject, "target": e.request.target}
                for e in self.edit_log
            ],
        }
        (directory / "microedit_state.json").write_text(json.dumps(meta, indent=2))

    def sae_settings(self) -> Dict[str, Any]:
        """What a saved τ and saved rows are only valid for: the ARD's α and massive-norm cut, the SAE's k."""
        return {
            "ard_alpha": self.switch.alpha,
            "massive_norm_factor": self.switch.massive_norm_factor,
            "sae_k": getattr(self.sae.cfg, "k", None),
        }

    def load(self, directory: Union[str, Path]) -> None:
        """Apply a saved state to this (freshly prepared) state's SAE."""
        directory = Path(directory)
        meta_path, tensor_path = directory / "microedit_state.json", directory / "microedit_state.safetensors"
        if not meta_path.is_file() or not tensor_path.is_file():
            raise FileNotFoundError(f"no MicroEdit state in {directory}")
        meta = json.loads(meta_path.read_text())
        if meta.get("version") not in READABLE_VERSIONS:
            raise ValueError(
                f"MicroEdit state version {meta.get('version')} is not supported (readable: {READABLE_VERSIONS})"
            )
        try:
            self._check_and_apply(directory, meta, load_file(str(tensor_path)))
        except (KeyError, TypeError, RuntimeError) as exc:  # a missing entry or sizes that do not add up
            raise ValueError(f"MicroEdit state in {directory} is malformed: {exc!r}") from exc

    def _check_and_apply(self, directory: Path, meta: Dict[str, Any], tensors: Dict[str, torch.Tensor]) -> None:
        if meta["layer"] != self.layer or meta["sae_source"] != self.sae_source:
            raise ValueError(
                f"MicroEdit state in {directory} was saved for layer {meta['layer']} with SAE {meta['sae_source']!r}, "
                f"not layer {self.layer} with SAE {self.sae_source!r}"
            )
        saved_settings = meta.get("sae_settings")  # absent before 2026-11-24
        if saved_settings is not None and saved_settings != self.sae_settings():
            raise ValueError(
                f"MicroEdit state in {directory} was saved with {saved_settings}, this SAE is hooked with "
                f"{self.sae_settings()}: its threshold and rows do not apply"
            )
        index = tensors["edited_latents"]
        d_sae, d_model = self.sae.W_dec.shape

        def fits(latents: torch.Tensor) -> bool:
            return latents.numel() == 0 or (int(latents.min()) >= 0 and int(latents.max()) < d_sae)

        # Read and check everything against this SAE before changing anything.
        if not fits(index):
            raise ValueError(
                f"MicroEdit state in {directory} edits latents outside 0..{d_sae - 1}: "
                f"it was saved for another SAE (this one has {d_sae} latents)"
            )
        if index.numel():
            for name in ("edited_rows", "original_rows"):
                if tuple(tensors[name].shape) != (index.numel(), d_model):
                    raise ValueError(
                        f"MicroEdit state in {directory}: {name} has shape {tuple(tensors[name].shape)}, "
                        f"expected ({index.numel()}, {d_model}) for this SAE"
                    )
            # The saved pre-edit rows must be this SAE's own: same path, same weights.
            unedited = self.sae.W_dec.detach()[index.to(self.sae.W_dec.device)].clone()
            for j, i in enumerate(index.tolist()):
                if i in self.original_rows:
                    unedited[j] = self.original_rows[i]
            saved = tensors["original_rows"].to(unedited.device, unedited.dtype)
            if not torch.equal(saved, unedited):
                raise ValueError(
                    f"MicroEdit state in {directory} was saved for an SAE with other weights at {self.sae_source!r} "
                    "(its unedited decoder rows differ from this SAE's)"
                )
        logged = meta.get("edit_log", [])
        log_latents = tensors["log_latents"].split(tensors["log_counts"].tolist()) if logged else []
        if len(log_latents) != len(logged) or not all(fits(x) for x in log_latents):
            raise ValueError(f"MicroEdit state in {directory}: the edit log does not fit this SAE")
        try:
            edit_log = [EditMemory(EditRequest(**entry), latents) for entry, latents in zip(logged, log_latents)]
            threshold, num_edits = float(meta["threshold"]), int(meta["num_edits"])
            timings = {k: float(v) for k, v in meta.get("timings", {}).items()}
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"MicroEdit state in {directory} is malformed: {exc!r}") from exc
        self.reset()
        if index.numel():
            device, dtype = self.sae.W_dec.device, self.sae.W_dec.dtype
            for i, row in zip(index.tolist(), tensors["original_rows"]):
                self.original_rows[i] = row.to(device, dtype)
            with torch.no_grad():
                self.sae.W_dec[index.to(device)] = tensors["edited_rows"].to(device, dtype)
        self.edit_log = edit_log
        self.switch.threshold = threshold
        self.num_edits = num_edits
        self.timings = timings

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
