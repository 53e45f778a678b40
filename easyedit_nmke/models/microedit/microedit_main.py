"""MicroEdit: apply edits by training SAE decoder rows, with the ARD switch at inference.

Entry point with EasyEdit's contract: ``apply_microedit_to_model(model, tok, requests,
hparams, copy=False, return_orig_weights=False, keep_original_weight=False)``.  The
first call hooks the SAE into the model (loading, or training and caching, it when
needed) and calibrates τ; later calls reuse that state, so sequential calls
accumulate edits in the SAE decoder.
"""
from __future__ import annotations

import copy as copy_module
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from ...compat import weights_copy_for_easyeditor
from ...util import nethook
from ...util.requests import EditRequest, continuation, encode, encode_target, normalise_requests, pad_id
from .calibration import calibrate_threshold, input_ard
from .compute_decoder_edit import compute_decoder_edit
from .microedit_hparams import MicroEditHyperParams
from .sae_hook import SAESwitch
from .sae_io import check_layer
from .state import SAE_ATTRIBUTE, MicroEditState, attach_state, detach_microedit, get_state
from .train_sae import ensure_sae

DECODER_PARAMETER = f"{SAE_ATTRIBUTE}.W_dec"


def sae_source(hparams: MicroEditHyperParams) -> str:
    path = hparams.resolved_sae_path()
    if path is not None and (path.exists() or hparams.can_train_sae or not hparams.sae_release):
        return str(path)
    return f"{hparams.sae_release}/{hparams.sae_id}"


def prepare_state(
    model: nn.Module, tok: PreTrainedTokenizerBase, hparams: MicroEditHyperParams, progress: bool = True
) -> MicroEditState:
    """Hook the SAE into ``model`` and calibrate τ, once; later calls return the same state."""
    source = sae_source(hparams)
    state = get_state(model)
    if state is not None:
        if state.layer != hparams.layer or state.sae_source != source:
            raise ValueError(
                f"the model already carries a MicroEdit SAE at layer {state.layer} ({state.sae_source}); "
                f"call detach_microedit(model) before using layer {hparams.layer} ({source})"
            )
        # The switch's ARD (and a calibrated τ) depend on these: training with other
        # values would optimise a distance the router does not use.
        hooked = state.sae_settings()
        wanted = {"ard_alpha": hparams.ard_alpha, "massive_norm_factor": hparams.massive_norm_factor}
        if hparams.sae_k is not None:
            wanted["sae_k"] = hparams.sae_k
        differ = [f"{key} {hooked[key]} (hparams: {value})" for key, value in wanted.items() if hooked[key] != value]
        if differ:
            raise ValueError(
                f"the model's MicroEdit SAE was hooked with {', '.join(differ)}; "
                "call detach_microedit(model) to hook it again with these hparams"
            )
        if hparams.ard_threshold is not None:
            state.switch.threshold = hparams.ard_threshold
        return state
    check_layer(model, hparams)
    layer_name = hparams.layer_module_tmp.format(hparams.layer)
    # The hooked block's device, which differs from the first parameter's when the model is split.
    device = next(nethook.get_module(model, layer_name).parameters()).device
    sae = ensure_sae(model, tok, hparams).to(device)
    sae.requires_grad_(False)
    switch = SAESwitch(sae, float("inf"), hparams.ard_alpha, hparams.massive_norm_factor)
    model.add_module(SAE_ATTRIBUTE, sae)
    switch.install(model, layer_name)
    state = attach_state(model, MicroEditState(layer=hparams.layer, layer_name=layer_name, switch=switch, sae_source=source))
    try:
        start = time.perf_counter()
        switch.threshold = (
            hparams.ard_threshold
            if hparams.ard_threshold is not None
            else calibrate_threshold(model, tok, switch, hparams, progress=progress)
        )
        state.last_edit_info["calibration_seconds"] = time.perf_counter() - start
    except BaseException:
        detach_microedit(model)
        raise
    return state


def execute_microedit(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    hparams: MicroEditHyperParams,
    state: MicroEditState,
) -> None:
    """Apply ``requests`` one after another (batch size 1, as in the paper).

    If any request fails, the rows written by the earlier ones are put back and the
    error is re-raised: a failed call leaves the model and the state as they were.
    """
    state.forget_if_restored()
    log_length, num_edits = len(state.edit_log), state.num_edits
    known_originals = set(state.original_rows)
    rows_before: Dict[int, torch.Tensor] = {}
    try:
        for request in requests:
            start = time.perf_counter()
            edit = compute_decoder_edit(
                model, tok, request, hparams, state.switch, use_replay=state.replay_fits, memory=state.edit_log
            )
            if edit.replay_failed:
                state.replay_fits = False
            if not torch.isfinite(edit.rows).all():
                raise ValueError(f"the trained decoder rows for {request.prompt!r} are not finite (NaN/inf)")
            state.remember_originals(edit.latents)
            state.keep_first_rows(rows_before, edit.latents)
            with torch.no_grad():
                state.sae.W_dec[edit.latents] = edit.rows.to(state.sae.W_dec.dtype)
            state.log_edit(request, edit.latents)
            state.num_edits += 1
            state.add_time("train", time.perf_counter() - start)
            state.last_edit_info.update(
                latents=int(edit.latents.numel()),
                ard_before=edit.ard_before,
                ard_after=edit.ard_after,
                routed=edit.ard_after <= state.threshold,
                target_prob=edit.target_prob,
                steps=[edit.stage1_steps, edit.stage2_steps],
                rehearsed=edit.rehearsed,
                rehearsed_prob=edit.rehearsed_prob,
            )
    except BaseException:
        with torch.no_grad():
            for index, row in rows_before.items():
                state.sae.W_dec[index] = row
        for index in set(state.original_rows) - known_originals:
            del state.original_rows[index]
        del state.edit_log[log_length:]
        state.num_edits = num_edits
        raise
    state.record_call(log_length, num_edits, rows_before)


def apply_microedit_to_model(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    requests: Sequence[Mapping[str, Any]],
    hparams: MicroEditHyperParams,
    copy: bool = False,
    return_orig_weights: bool = False,
    keep_original_weight: bool = False,
    **kwargs: Any,
) -> Tuple[nn.Module, Dict[str, torch.Tensor]]:
    """EasyEdit entry point: edit ``model`` in place (or a copy) and return ``(model, weights_copy)``.

    ``weights_copy`` holds the decoder before the edit under ``microedit_sae.W_dec``,
    a parameter of the edited model, so EasyEdit's restore writes it back exactly.
    """
    edit_requests = normalise_requests(requests)
    check_layer(model, hparams)
    if copy:
        model = _copy_with_state(model)
    hooked_here = get_state(model) is None
    state = prepare_state(model, tok, hparams)
    weights_copy: Dict[str, torch.Tensor] = {}
    if return_orig_weights:
        weights_copy[DECODER_PARAMETER] = state.sae.W_dec.detach().clone()
    try:
        execute_microedit(model, tok, edit_requests, hparams, state)
    except BaseException:
        if hooked_here:
            # An SAE hooked only for this edit would route inputs through its lossy
            # reconstruction: a failed first edit must leave the model as it was.
            detach_microedit(model)
        raise
    return model, weights_copy_for_easyeditor(weights_copy, keep_original_weight)


def _copy_with_state(model: nn.Module) -> nn.Module:
    """Deep copy whose hook belongs to the copy (hook handles cannot be deep-copied)."""
    state = get_state(model)
    if state is None:
        return copy_module.deepcopy(model)
    state.switch.remove()
    try:
        copied = copy_module.deepcopy(model)
    finally:
        state.switch.install(model, state.layer_name)
    get_state(copied).switch.install(copied, state.layer_name)
    return copied


def reset_microedit_state(model: nn.Module) -> None:
    state = get_state(model)
    if state is not None:
        state.reset()


def edited_parameter_names(hparams: MicroEditHyperParams) -> List[str]:
    """Parameters a MicroEdit edit writes (what a resumable run must save)."""
    return [DECODER_PARAMETER]


def save_method_state(model: nn.Module, directory: Union[str, Path]) -> None:
    state = get_state(model)
    if state is not None:
        state.save(directory)


def load_method_state(model: nn.Module, directory: Union[str, Path]) -> None:
    state = get_state(model)
    if state is None:
        raise RuntimeError("MicroEdit state can only be loaded into a prepared model (call prepare_method first)")
    state.load(directory)


def phase_seconds(model: nn.Module) -> Dict[str, float]:
    state = get_state(model)
    return dict(state.timings) if state is not None else {}


def prepare_method(model: nn.Module, tok: PreTrainedTokenizerBase, hparams: MicroEditHyperParams) -> None:
    """One-off setup before a run (SAE, τ calibration), timed apart from edits."""
    prepare_state(model, tok, hparams)


def routing_report(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    groups: Mapping[str, Sequence[Tuple[str, str]]],
    with_distances: bool = False,
    hparams: Optional[MicroEditHyperParams] = None,
) -> Dict[str, Any]:
    """Share of inputs the switch routes through the SAE, per group of (prompt, answer) pairs.

    Inputs are built exactly as the metrics feed them (prompt + teacher-forced answer).
    ``hparams`` is unused (the state holds τ); the runner passes it to every method's report.
    """
    state = get_state(model)
    if state is None:
        return {}
    report: Dict[str, Any] = {"tau": state.threshold}
    distances: Dict[str, List[float]] = {}
    for name, pairs in groups.items():
        if not pairs:
            continue
        sequences = [encode(tok, p) + encode_target(tok, continuation(a))[:-1] for p, a in pairs]
        ard = input_ard(model, state.switch, state.layer_name, sequences, pad_id(tok))
        report[f"routed_{name}"] = sum(v <= state.threshold for v in ard) / len(ard)
        distances[name] = ard
    if with_distances:
        report["ard"] = distances
    return report
