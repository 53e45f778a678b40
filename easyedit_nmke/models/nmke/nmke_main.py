"""NMKE: AlphaEdit's null-space constrained update, applied only to attributed neurons.

Per call (one batch of requests; batch size 1 in lifelong editing):
1. target vector z at the last edit layer (``compute_z``);
2. neuron attribution at every edit layer on the unedited-for-this-call model, and
   from it one neuron mask per layer (``masking.build_mask``);
3. per layer, lowest first: keys K, residual R = (z − current output) spread over the
   remaining layers, Δ = solve(P(K Kᵀ + C) + L2·I, P K Rᵀ) over the masked neurons
   only (P rebuilt for that neuron subset), W_down += Δᵀ;
4. C += K Kᵀ with the keys recomputed on the edited model (as AlphaEdit).

``mask_mode: none`` skips steps 2 and the masking: it is AlphaEdit.

Where a norm sits between the FFN and the residual add (Gemma), R is first turned into
the change of the down projection's output that the norm lets through
(``util.model_parts.ffn_output_change``), and the attribution reads each neuron through
the norm's linearisation (``linearised_ffn_writes`` / ``_activations``).
"""
from __future__ import annotations

import copy as copy_module
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from ...compat import weights_copy_for_easyeditor
from ...util import nethook
from ...util.corpus import sampled_continuations, seeded_rng
from ...util.model_parts import (
    ArchitectureError,
    check_module_templates,
    down_weight,
    down_weight_param_shape_update,
    ffn_output_change,
    linearised_ffn_activations,
    linearised_ffn_writes,
    norm_parameters,
    num_layers,
    post_ffn_norm,
    unembedding,
)
from ...util.requests import EditRequest, normalise_requests
from .attribution import ReadoutNorm, hidden_readout, neuron_attribution_scores, readout_product
from .compute_ks import (
    AttributionInputs,
    SubjectReadout,
    collect_attribution_inputs,
    compute_ks,
    layer_output_at_subject,
)
from .compute_z import compute_z
from .masking import NeuronMask, build_mask
from .nmke_hparams import NMKEHyperParams
from .nullspace import (
    cache_in_basis,
    key_second_moments,
    null_space_basis,
    occupied_directions,
    solve_in_null_space,
)
from .state import (
    NMKEState,
    ReadoutCache,
    UndoRecord,
    attach_state,
    get_state,
    state_layers_match,
)

_CONTEXT_SEEDS = ("The", "Therefore", "Because", "I", "You")


class EditError(RuntimeError):
    """The edit could not be computed; the model was left unchanged."""


def generate_context_templates(
    model: nn.Module, tok: PreTrainedTokenizerBase, length_params: Sequence[Sequence[int]], seed: int = 0
) -> List[str]:
    """"{}" plus short model-written prefixes (AlphaEdit's context templates), seeded for reproducibility."""
    templates = ["{}"]
    with seeded_rng(seed, next(model.parameters()).device):
        for length, count in length_params:
            if count == 0:
                continue
            seeds = [_CONTEXT_SEEDS[i % len(_CONTEXT_SEEDS)] for i in range(count)]
            for text in sampled_continuations(model, tok, seeds, length, top_k=5):
                text = text.replace("{", " ").replace("}", " ").replace("\n", " ").strip()
                templates.append(text + ". {}")
    return templates


def null_space_settings(hparams: NMKEHyperParams) -> Dict[str, Any]:
    """The hparams a state's corpus moments and null spaces were built from."""
    return {
        "mom2_dataset": hparams.mom2_dataset,
        "mom2_n_samples": hparams.mom2_n_samples,
        "mom2_max_length": hparams.mom2_max_length,
        "mom2_dtype": hparams.mom2_dtype,
        "nullspace_threshold": hparams.nullspace_threshold,
    }


def prepare_state(model: nn.Module, tok: PreTrainedTokenizerBase, hparams: NMKEHyperParams) -> NMKEState:
    """The model's lifelong state, built on first use (null spaces from corpus statistics, prefixes).

    A state built (or saved) under other corpus settings or another null-space threshold
    follows the current hparams: its moments and null spaces are rebuilt, while C (the
    earlier edits' keys, in neuron coordinates) stays valid and is kept.
    """
    state = get_state(model)
    if state is not None:
        ok, why = state_layers_match(state, hparams.layers)
        if not ok:
            raise EditError(
                why + "; use matching hparams, or detach_nmke_state(model) to start a new state (earlier "
                "edits stay in the weights but later edits no longer protect them)"
            )
    else:
        state = NMKEState(layers=list(hparams.layers))
    device = next(model.parameters()).device
    # Refuse a state from another model before changing anything in it.
    for layer in hparams.layers:
        d_ff = down_weight(nethook.get_module(model, hparams.rewrite_module_tmp.format(layer))).shape[1]
        stored_parts = (
            ("null space", state.null_bases.get(layer)),
            ("key statistics", state.key_moments.get(layer)),
            ("key cache", state.key_cache.get(layer)),
        )
        for name, stored in stored_parts:
            if stored is not None and stored.shape[0] != d_ff:
                raise EditError(
                    f"NMKE state's {name} at layer {layer} is for {stored.shape[0]} neurons, "
                    f"but {type(model).__name__} has {d_ff}; it belongs to another model"
                )
    settings = null_space_settings(hparams)
    # States saved before the settings were recorded have none: they are kept as they are.
    if state.null_space_settings and state.null_space_settings != settings:
        changed = sorted(key for key in settings if state.null_space_settings.get(key) != settings[key])
        warnings.warn(
            f"NMKE state was built with {', '.join(f'{k}={state.null_space_settings.get(k)!r}' for k in changed)}; "
            f"rebuilding its null spaces for {', '.join(f'{k}={settings[k]!r}' for k in changed)}",
            stacklevel=2,
        )
        if changed != ["nullspace_threshold"]:
            state.key_moments.clear()
        state.null_bases.clear()
        state.basis_cache.clear()
    missing_moments = [layer for layer in hparams.layers if layer not in state.key_moments]
    missing_bases = [layer for layer in hparams.layers if layer not in state.null_bases]
    if missing_moments or missing_bases:
        start = time.perf_counter()
        moments = key_second_moments(model, tok, hparams, missing_moments) if missing_moments else {}
        for layer in missing_bases:
            # Decomposed on the CPU whatever the model's device, so the bases (and every
            # edit after them) do not depend on the accelerator's eigensolver.
            source = moments[layer] if layer in moments else state.key_moments[layer].cpu()
            state.null_bases[layer] = null_space_basis(source, hparams.nullspace_threshold).to(device)
        for layer, moment in moments.items():
            state.key_moments[layer] = moment.to(device)
        state.null_space_settings = settings
        state.add_time("projector", time.perf_counter() - start)
    for layer in hparams.layers:
        # A resumed state keeps its moments; mom2_dtype sets the precision they are decomposed in.
        state.key_moments[layer] = state.key_moments[layer].to(getattr(torch, hparams.mom2_dtype))
        if layer not in state.key_cache:
            d_ff = state.null_bases[layer].shape[0]
            state.key_cache[layer] = torch.zeros(d_ff, d_ff, device=device)
        state.kept_neurons.setdefault(layer, 0)
    if not state.context_templates:
        state.context_templates = generate_context_templates(model, tok, hparams.context_template_length_params)
    return attach_state(model, state)


def _readout_norm(model: nn.Module, hparams: NMKEHyperParams) -> ReadoutNorm:
    kind, gain, bias, eps = norm_parameters(nethook.get_module(model, hparams.ln_f_module))
    return ReadoutNorm(
        kind=kind, gain=gain.detach().float(), bias=None if bias is None else bias.detach().float(), eps=eps
    )


def _readout_matrix(
    state: NMKEState,
    layer: int,
    weight: torch.Tensor,
    weight_d_by_f: torch.Tensor,
    unembed: torch.Tensor,
    norm: ReadoutNorm,
    cache: bool,
) -> Optional[torch.Tensor]:
    if not cache:
        return None
    entry = state.readout.get(layer)
    # Any in-place write to the weight (a restore by the editor, another method) bumps its
    # version counter, so a stale product is never reused.
    if entry is None or not entry.matches(weight):
        entry = ReadoutCache(
            readout_product(unembed, weight_d_by_f.detach().float(), norm), weight._version, weight.data_ptr()
        )
        state.readout[layer] = entry
    return entry.matrix


def compute_neuron_masks(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    requests: List[EditRequest],
    hparams: NMKEHyperParams,
    state: NMKEState,
    inputs: Optional[List[AttributionInputs]] = None,
) -> Dict[int, NeuronMask]:
    """One mask per edit layer, from attribution scores pooled over the requests' prompts.

    ``inputs``: the requests' attribution inputs when already read off another forward
    (the fast path's z forward); otherwise they are computed here.
    """
    if hparams.mask_mode == "none":
        return {}
    if inputs is None:
        inputs = [collect_attribution_inputs(model, tok, r, hparams, state.context_templates) for r in requests]
    unembed, unembed_bias = unembedding(model)
    norm = _readout_norm(model, hparams)
    hidden_logits = {}
    if hparams.fast_path:
        # U·(g ⊙ h) for every layer and request in one pass over the unembedding.
        keys = [(layer, j) for layer in hparams.layers for j in range(len(inputs))]
        values = hidden_readout([inputs[j].hidden[layer] for layer, j in keys], unembed.detach(), norm)
        hidden_logits = dict(zip(keys, values))
    masks = {}
    for layer in hparams.layers:
        module = nethook.get_module(model, hparams.rewrite_module_tmp.format(layer))
        norm_after_ffn = post_ffn_norm(model, hparams.layer_module_tmp.format(layer))
        down = down_weight(module).detach()
        weight = linearised_ffn_writes(norm_after_ffn, down)
        readout = _readout_matrix(
            state, layer, module.weight, weight, unembed.detach(), norm, hparams.attribution_cache_readout
        )
        scores = torch.cat(
            [
                neuron_attribution_scores(
                    x.hidden[layer],
                    linearised_ffn_activations(norm_after_ffn, down, x.activations[layer]),
                    weight,
                    unembed.detach(),
                    norm,
                    x.token_ids,
                    scale=hparams.attribution_scale,
                    unembed_bias=None if unembed_bias is None else unembed_bias.detach(),
                    readout=readout,
                    backend=hparams.attribution_backend,
                    hidden_logits=hidden_logits.get((layer, j)),
                )
                for j, x in enumerate(inputs)
            ]
        )
        if not torch.isfinite(scores).all():
            raise EditError(f"the neuron attribution at layer {layer} is not finite (NaN/inf in its inputs)")
        masks[layer] = build_mask(scores, hparams)
    return masks


def execute_nmke(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    requests: List[EditRequest],
    hparams: NMKEHyperParams,
    state: NMKEState,
) -> Dict[int, torch.Tensor]:
    """Apply the edit in place and return the pre-edit weights per layer.

    On any failure the edited weights are restored and ``EditError`` is raised, so
    a failed edit leaves the weights bitwise unchanged and the lifelong statistics as
    they were (keys already added to C are subtracted again: equal up to float rounding).
    """
    layers = hparams.layers
    modules = {layer: nethook.get_module(model, hparams.rewrite_module_tmp.format(layer)) for layer in layers}
    state.rollback_if_restored({layer: modules[layer].weight for layer in layers})
    originals = {layer: modules[layer].weight.detach().clone() for layer in layers}
    info: Dict[str, Any] = {"z_steps": [], "z_target_prob": [], "kept_fraction": {}, "kept": {}}
    # fast_path: z's first forward also yields the attribution inputs and the first
    # layer's keys; later keys come from forwards cut after the subject token.
    fast = hparams.fast_path
    edit_keys: Dict[int, torch.Tensor] = {}
    committed: List[int] = []  # layers whose C already holds this edit's keys
    try:
        start = time.perf_counter()
        vectors = []
        for request in requests:
            tv = compute_z(
                model,
                tok,
                request,
                hparams,
                layers[-1],
                state.context_templates,
                key_layers=layers[:1] if fast else (),
                attribution=fast and hparams.mask_mode != "none",
            )
            vectors.append(tv)
            info["z_steps"].append(tv.steps)
            info["z_target_prob"].append(tv.target_prob)
        zs = torch.stack([tv.z for tv in vectors], dim=1)  # [d, n]
        state.add_time("z", time.perf_counter() - start)

        start = time.perf_counter()
        shared = [tv.attribution for tv in vectors]
        masks = compute_neuron_masks(
            model, tok, requests, hparams, state, inputs=shared if all(x is not None for x in shared) else None
        )
        state.add_time("attribution", time.perf_counter() - start)

        unembed, _ = unembedding(model)
        norm = _readout_norm(model, hparams) if masks and hparams.attribution_cache_readout else None
        # fast_path: per request, the prompts cut after the subject; blocks below layers[0] run once.
        subject_readouts = [
            SubjectReadout(model, tok, r, hparams, state.context_templates, layers[0], layers[-1]) for r in requests
        ]
        pending_readout: List[Tuple[int, torch.Tensor, torch.Tensor]] = []
        with torch.no_grad():
            for i, layer in enumerate(layers):
                start = time.perf_counter()
                if fast and all(layer in tv.keys for tv in vectors):
                    # Nothing edited yet in this call: z's forward already read them.
                    keys = torch.stack([tv.keys[layer] for tv in vectors], dim=1)
                    current = torch.stack([tv.initial.float() for tv in vectors], dim=1)
                elif fast:
                    pairs = [readout([layer], layers[-1]) for readout in subject_readouts]
                    keys = torch.stack([k[layer] for k, _ in pairs], dim=1)
                    current = torch.stack([out for _, out in pairs], dim=1)
                else:
                    keys = torch.stack(
                        [compute_ks(model, tok, r, hparams, [layer], state.context_templates)[layer] for r in requests],
                        dim=1,
                    )  # [d_ff, n]
                    current = torch.stack(
                        [layer_output_at_subject(model, tok, r, hparams, layers[-1]) for r in requests], dim=1
                    )
                residual = (zs - current) / (len(layers) - i)  # [d, n]
                # What the down projection must add so that the residual stream moves by
                # `residual` (the same vector unless a norm follows the FFN, as in Gemma).
                norm_after_ffn = post_ffn_norm(model, hparams.layer_module_tmp.format(layer))
                output_change = residual
                if norm_after_ffn is not None:
                    # Linearised at the output for the averaged key, the same key the solve fits.
                    output = down_weight(modules[layer]).float() @ keys.to(modules[layer].weight.device).float()
                    output_change = ffn_output_change(norm_after_ffn, output, residual)
                state.add_time("keys", time.perf_counter() - start)

                start = time.perf_counter()
                if layer in masks and hparams.mask_application == "restricted_solve":
                    coeffs = _masked_update_coefficients(state, layer, keys, masks[layer].keep, hparams)
                else:
                    coeffs = _update_coefficients(state, layer, keys, hparams)
                if layer in masks:
                    if hparams.mask_application == "zero_update":
                        coeffs[~masks[layer].keep.to(coeffs.device)] = 0
                    info["kept_fraction"][layer] = masks[layer].kept_fraction
                    info["kept"][layer] = masks[layer].keep
                if not torch.isfinite(coeffs).all() or not torch.isfinite(output_change).all():
                    raise EditError(f"the update at layer {layer} is not finite (NaN/inf in the solve or the keys)")
                delta = output_change @ coeffs.T  # [d, d_ff]
                # The cached readout holds the write vectors as the residual stream sees them.
                readout_change = linearised_ffn_writes(norm_after_ffn, output_change)
                weight = modules[layer].weight
                update = down_weight_param_shape_update(modules[layer], delta).to(weight.dtype)
                if not torch.isfinite(update).all():  # e.g. overflow in a half-precision weight
                    raise EditError(f"the update at layer {layer} overflows the weight's dtype {weight.dtype}")
                weight.add_(update)
                entry = state.readout.get(layer)
                if entry is not None and norm is not None:
                    if fast:  # applied below, all layers at once
                        pending_readout.append((layer, readout_change, coeffs))
                    else:
                        entry.matrix.add_(readout_product(unembed.detach(), readout_change, norm) @ coeffs.T)
                        entry.weight_version = weight._version
                state.add_time("solve", time.perf_counter() - start)
            if pending_readout:
                # The cached U·diag(g)·V changes by (U·diag(g)·change)·coeffsᵀ per layer: one pass
                # over U for all layers' changes, then in-place rank-n updates (no [vocab × d_ff] temporary).
                start = time.perf_counter()
                products = readout_product(unembed.detach(), torch.cat([r for _, r, _ in pending_readout], 1), norm)
                for (layer, _, coeffs), update in zip(
                    pending_readout, products.split([r.shape[1] for _, r, _ in pending_readout], 1)
                ):
                    state.readout[layer].matrix.addmm_(update, coeffs.T)
                    state.readout[layer].weight_version = modules[layer].weight._version
                state.add_time("solve", time.perf_counter() - start)

        start = time.perf_counter()
        new_keys: Dict[int, List[torch.Tensor]] = {layer: [] for layer in layers}
        for r, readout in zip(requests, subject_readouts):
            if fast:
                edited_keys = readout(layers)[0]
            else:
                edited_keys = compute_ks(model, tok, r, hparams, layers, state.context_templates)
            for layer, k in edited_keys.items():
                new_keys[layer].append(k)
        edit_keys = {
            layer: torch.stack(new_keys[layer], dim=1).to(state.key_cache[layer].device) for layer in layers
        }
        state.add_time("keys", time.perf_counter() - start)
        changed = any(not torch.equal(modules[layer].weight, originals[layer]) for layer in layers)
        # Commit the lifelong statistics only once the whole edit succeeded; in-place
        # rank-n additions, so nothing large is allocated after the weights changed.
        record = UndoRecord(
            originals=originals,
            keys=edit_keys,
            num_edits=state.num_edits,
            kept_neurons=dict(state.kept_neurons),
            weights_changed=changed,
        )
        for layer in layers:
            state.add_edit_keys(layer, edit_keys[layer])
            committed.append(layer)
    except BaseException as exc:  # an interrupt too must not leave half an edit behind
        with torch.no_grad():
            for layer in layers:
                modules[layer].weight.copy_(originals[layer])
        for layer in layers:
            state.readout.pop(layer, None)
        for layer in committed:
            state.remove_edit_keys(layer, edit_keys[layer])
        if isinstance(exc, EditError) or not isinstance(exc, Exception):
            raise
        raise EditError(f"NMKE edit failed, model left unchanged: {exc}") from exc
    state.last_edit = record
    for layer in layers:
        if layer in masks:
            # One mask serves every request of the call: count it once per edit.
            state.kept_neurons[layer] = state.kept_neurons.get(layer, 0) + int(masks[layer].keep.sum()) * len(
                requests
            )
    state.num_edits += len(requests)
    state.last_edit_info = info
    return originals


def _update_coefficients(
    state: NMKEState, layer: int, keys: torch.Tensor, hparams: NMKEHyperParams
) -> torch.Tensor:
    """AlphaEdit's solve, kept factored: Δ = (P(K Kᵀ + C) + L2·I)⁻¹ P K Rᵀ = coeffs · Rᵀ.

    Rank n, which lets the cached attribution readout be updated instead of recomputed.
    The state keeps Bᵀ C B up to date edit by edit, so an edit costs one r × r Cholesky.
    """
    basis = state.null_bases[layer]
    return solve_in_null_space(basis, state.key_cache_in_basis(layer), keys.to(basis.device), hparams.L2)


def masked_null_space(
    state: NMKEState, layer: int, keep: torch.Tensor, hparams: NMKEHyperParams
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(kept neuron indices S, null-space basis B_S of Σ_SS, B_Sᵀ C_SS B_S) for a neuron mask.

    Updates confined to S must leave preserved keys alone through S's coordinates
    alone, so the null space is rebuilt from the corpus second moment restricted to S,
    and earlier edits' keys are seen through the same coordinates.
    """
    device = state.key_cache[layer].device
    index = keep.nonzero().squeeze(1).to(device)
    moments = state.key_moments[layer]
    # On the CPU, like the full null spaces in prepare_state: the bases must not depend
    # on the accelerator's eigensolver.
    basis = null_space_basis(moments[index][:, index].cpu(), hparams.nullspace_threshold).to(device)
    return index, basis, cache_in_basis(basis, state.key_cache[layer][index][:, index])


def _masked_update_coefficients(
    state: NMKEState, layer: int, keys: torch.Tensor, keep: torch.Tensor, hparams: NMKEHyperParams
) -> torch.Tensor:
    """The same null-space constrained solve over the masked neurons only.

    Zeroing rows of the full solution instead (``mask_application: zero_update``) both
    breaks the null-space property and loses the share of the update carried by the
    dropped neurons.
    """
    index, basis, cache = masked_null_space(state, layer, keep.to(keys.device), hparams)
    coeffs = torch.zeros(keys.shape[0], keys.shape[1], device=keys.device)
    coeffs[index] = solve_in_null_space(basis, cache, keys[index], hparams.L2)
    return coeffs


def apply_nmke_to_model(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    requests: Sequence[Mapping[str, Any]],
    hparams: NMKEHyperParams,
    copy: bool = False,
    return_orig_weights: bool = False,
    keep_original_weight: bool = False,
    **kwargs: Any,
) -> Tuple[nn.Module, Dict[str, torch.Tensor]]:
    """EasyEdit entry point: edit ``model`` in place (or a copy) and return ``(model, weights_copy)``.

    ``weights_copy`` maps parameter names to their pre-edit values.  EasyEdit writes them
    back after the edit unless edits are to accumulate (upstream: ``sequential_edit=True``);
    ``weights_copy_for_easyeditor`` adapts it to the EasyEdit version that is calling.
    """
    hparams.validate()  # hparams built or changed in code skip from_hparams' checks
    edit_requests = normalise_requests(requests)
    check_module_templates(
        model,
        hparams.layers,
        hparams.rewrite_module_tmp,
        hparams.layer_module_tmp,
        hparams.mlp_module_tmp,
        hparams.ln_f_module,
    )
    last_block = num_layers(model) - 1
    if hparams.v_loss_layer not in (-1, last_block):
        raise ArchitectureError(
            f"v_loss_layer {hparams.v_loss_layer}: the target is fitted on the model's logits, after the "
            f"last block, so v_loss_layer must be -1 or {last_block} for {type(model).__name__}"
        )
    if copy:
        model = copy_module.deepcopy(model)
    state = prepare_state(model, tok, hparams)  # the model's attached state, else a new one
    if get_state(model) is not state:
        attach_state(model, state)
    originals = execute_nmke(model, tok, edit_requests, hparams, state)
    weights_copy: Dict[str, torch.Tensor] = {}
    if return_orig_weights:
        for layer, original in originals.items():
            weights_copy[f"{hparams.rewrite_module_tmp.format(layer)}.weight"] = original
    return model, weights_copy_for_easyeditor(weights_copy, keep_original_weight)


def reset_nmke_state(model: nn.Module) -> None:
    """Forget the edits' keys and counters; the null spaces and prefixes stay (the weights are not touched)."""
    state = get_state(model)
    if state is not None:
        state.reset()


def edited_parameter_names(hparams: NMKEHyperParams) -> List[str]:
    """Parameters an NMKE edit writes (what a resumable run must save)."""
    return [f"{hparams.rewrite_module_tmp.format(layer)}.weight" for layer in hparams.layers]


def save_method_state(model: nn.Module, directory: Union[str, Path]) -> None:
    state = get_state(model)
    if state is not None:
        state.save(directory)


def load_method_state(model: nn.Module, directory: Union[str, Path]) -> None:
    device = next(model.parameters()).device
    attach_state(model, NMKEState.load(directory, device=device))


def phase_seconds(model: nn.Module) -> Dict[str, float]:
    state = get_state(model)
    return dict(state.timings) if state is not None else {}


def null_space_report(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    groups: Mapping[str, Sequence[Any]],
    with_distances: bool = False,
    hparams: Optional[NMKEHyperParams] = None,
) -> Dict[str, Any]:
    """How much of the null space the updates must live in earlier edits already occupy.

    The solve trades a new update's fit against ``L2`` and against earlier edits' keys
    (Bᵀ C B in null-space coordinates): an eigen-direction of Bᵀ C B above ``L2`` is one
    that later updates must leave nearly alone.  Once most directions are occupied, new
    edits can only be written by disturbing earlier ones — on a small FFN this is what
    ends a long run (README, "Why hybrid runs out first").  Per layer: the layer's null
    space (``dims``, ``occupied``) and, for masked modes with the restricted solve, the
    null space of the last edit's kept neurons (``masked_dims``, ``masked_occupied``),
    which is the one a masked update lives in; ``occupied_share`` is the largest share
    over layers of whichever space the method uses.  ``groups`` and ``with_distances``
    are unused (the runner passes them to every method's report).
    """
    state = get_state(model)
    if state is None:
        return {}
    if hparams is None:
        raise ValueError("null_space_report needs the run's hparams (L2 decides what counts as occupied)")
    kept = state.last_edit_info.get("kept", {}) if hparams.mask_application == "restricted_solve" else {}
    layers: Dict[str, Dict[str, Any]] = {}
    shares = []
    for layer in state.layers:
        basis = state.null_bases[layer]
        cache = cache_in_basis(basis, state.key_cache[layer].to(basis.device))
        entry: Dict[str, Any] = {"dims": basis.shape[1], "occupied": occupied_directions(cache, hparams.L2)}
        share = entry["occupied"] / max(entry["dims"], 1)
        if layer in kept:
            _, masked_basis, masked_cache = masked_null_space(state, layer, kept[layer], hparams)
            entry["masked_dims"] = masked_basis.shape[1]
            entry["masked_occupied"] = occupied_directions(masked_cache, hparams.L2)
            share = entry["masked_occupied"] / max(entry["masked_dims"], 1)
        if state.kept_neurons.get(layer) and state.num_edits:
            entry["mean_kept_neurons"] = state.kept_neurons[layer] / state.num_edits
        layers[str(layer)] = entry
        shares.append(share)
    return {"occupied_share": max(shares, default=0.0), "layers": layers}


def prepare_method(model: nn.Module, tok: PreTrainedTokenizerBase, hparams: NMKEHyperParams) -> None:
    """One-off setup before a run (corpus statistics, null spaces, prefixes), timed apart from edits."""
    prepare_state(model, tok, hparams)
