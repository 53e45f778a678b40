"""Target residual vector z for one edit (the ROME/MEMIT/AlphaEdit ``compute_z`` step).

A delta is added to the output of the last edit layer at the subject's last token
and optimised so the model predicts ``target`` after the prompt under each context
prefix, while a KL term keeps the prediction on "<subject> is a" close to the
unedited model and weight decay plus a norm clamp keep the delta small.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase

from ...util import nethook
from ...util.model_parts import (
    SuffixReplay,
    check_replay,
    forward_with_states,
    head_logits,
    logits_at,
    mlp_residual_contribution_module,
    num_layers,
)
from ...util.requests import EditRequest, RequestError, encode, encode_target, pad_batch, pad_id, subject_last_index
from .compute_ks import AttributionInputs
from .nmke_hparams import NMKEHyperParams


@dataclass
class TargetVector:
    z: torch.Tensor  # [d] wanted output of the last edit layer at the subject's last token
    initial: torch.Tensor  # [d] its value before the edit
    steps: int
    target_prob: float  # mean per-token target probability reached
    prob_history: List[float]  # target_prob at each step, for diagnostics
    # Read off the first (unchanged-model) forward by the fast path, for the later phases:
    keys: Dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [d_ff] key (compute_ks)
    attribution: Optional[AttributionInputs] = None  # collect_attribution_inputs' result
    fast: bool = False  # computed by the truncated forward


@dataclass
class RewriteBatch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    lookup: torch.Tensor  # [batch] subject-last-token index per row
    target_rows: torch.Tensor  # positions whose next token is a target token
    target_cols: torch.Tensor
    target_ids: torch.Tensor
    n_rewrite: int  # rows before the KL rows
    prompt_last: torch.Tensor  # [n_rewrite] position of each rewrite row's last prompt token


def build_rewrite_batch(
    tok: PreTrainedTokenizerBase, request: EditRequest, context_templates: List[str]
) -> RewriteBatch:
    target_ids = encode_target(tok, request.target)
    sequences, lookups, rows, cols, tgt, prompt_last = [], [], [], [], [], []
    for row, template in enumerate(context_templates):
        text = template.format(request.prompt)
        prompt_ids = encode(tok, text)
        sequences.append(prompt_ids + target_ids[:-1])
        prompt_last.append(len(prompt_ids) - 1)
        lookups.append(subject_last_index(tok, text, request.subject))
        for j, token in enumerate(target_ids):
            rows.append(row)
            cols.append(len(prompt_ids) - 1 + j)
            tgt.append(token)
    kl_ids = encode(tok, request.kl_prompt)
    sequences.append(kl_ids)
    lookups.append(subject_last_index(tok, request.kl_prompt, request.subject))
    input_ids, attention_mask = pad_batch(sequences, pad_id(tok))
    return RewriteBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        lookup=torch.tensor(lookups),
        target_rows=torch.tensor(rows),
        target_cols=torch.tensor(cols),
        target_ids=torch.tensor(tgt),
        n_rewrite=len(context_templates),
        prompt_last=torch.tensor(prompt_last),
    )


def compute_z(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    request: EditRequest,
    hparams: NMKEHyperParams,
    layer: int,
    context_templates: List[str],
    key_layers: Sequence[int] = (),
    attribution: bool = False,
) -> TargetVector:
    """Optimise the target vector at block ``layer``.

    With ``hparams.fast_path`` each step runs only the blocks above ``layer`` on the
    positions from each row's subject token on (``SuffixReplay``); the first, full
    forward also yields the unedited keys at ``key_layers`` and, with ``attribution``,
    the attribution inputs, which the caller would otherwise compute with forwards of
    their own.  Should the truncated forward not reproduce the full model's logits at
    the first step (an architecture it does not fit), the reference path runs instead.
    """
    if hparams.fast_path:
        try:
            return _optimise(model, tok, request, hparams, layer, context_templates, key_layers, attribution, True)
        except (RequestError, torch.cuda.OutOfMemoryError, MemoryError):
            raise  # bad input, or no memory: the full forward would not help
        except Exception as exc:  # an architecture the truncated forward does not fit
            warnings.warn(f"fast_path: {exc}; using the full forward for the z optimisation")
    return _optimise(model, tok, request, hparams, layer, context_templates, (), False, False)


class _FastForward:
    """One full forward of the rewrite batch, then the truncated forward for each step."""

    def __init__(self, model, hparams, batch, layer, rows, cols, key_layers, attribution):
        device = batch.input_ids.device
        n_layers = num_layers(model)
        block_names = [hparams.layer_module_tmp.format(i) for i in range(n_layers)]
        edit_block = block_names[layer]
        out_names = {edit_block}
        in_names = {hparams.rewrite_module_tmp.format(l) for l in key_layers}
        if attribution:
            for l in hparams.layers:
                out_names.add(block_names[l])
                out_names.add(
                    mlp_residual_contribution_module(model, block_names[l], hparams.mlp_module_tmp.format(l))
                )
                in_names.add(hparams.rewrite_module_tmp.format(l))
        lookup = batch.lookup.to(device)
        with torch.no_grad():
            with nethook.capture(model, sorted(out_names)) as outputs, nethook.capture(
                model, sorted(in_names), inputs=True
            ) as inputs:
                last_hidden, states = forward_with_states(model, batch.input_ids, batch.attention_mask)
            self.full_logits = head_logits(model, last_hidden[rows, cols]).float()
            self.initial = outputs[edit_block][0, lookup[0]].clone()
            self.replay = SuffixReplay.build(
                model,
                batch.input_ids,
                batch.attention_mask,
                lookup,
                states,
                block_names,
                layer + 1,
                hparams.ln_f_module,
            )
        self.rows = rows
        self.cols = cols - lookup[rows]
        context_rows = torch.arange(batch.n_rewrite, device=device)
        self.keys = {
            l: inputs[hparams.rewrite_module_tmp.format(l)][context_rows, lookup[: batch.n_rewrite]].float().mean(0)
            for l in key_layers
        }
        self.attribution = None
        if attribution:
            last = batch.prompt_last.to(device)
            hidden, activations = {}, {}
            for l in hparams.layers:
                mlp = mlp_residual_contribution_module(model, block_names[l], hparams.mlp_module_tmp.format(l))
                hidden[l] = (outputs[block_names[l]][context_rows, last] - outputs[mlp][context_rows, last]).float()
                activations[l] = inputs[hparams.rewrite_module_tmp.format(l)][context_rows, last].float()
            if hparams.attribution_token == "target":
                token_ids = batch.target_ids[:1].to(device).expand(batch.n_rewrite).clone()
            else:
                # The first target position of a row is its last prompt token.
                first = torch.stack([((rows == r) & (cols == last[r])).nonzero()[0, 0] for r in range(batch.n_rewrite)])
                token_ids = self.full_logits[first].argmax(-1)
            self.attribution = AttributionInputs(hidden=hidden, activations=activations, token_ids=token_ids)

    def logits(self, delta: torch.Tensor) -> torch.Tensor:
        hidden = self.replay.hidden
        # Every row's subject token is suffix position 0.
        shifted = torch.cat([hidden[:, :1] + delta.to(hidden.dtype).view(1, 1, -1), hidden[:, 1:]], dim=1)
        return self.replay.logits(shifted, self.rows, self.cols)

    def check(self, logits: torch.Tensor) -> None:
        """The step-1 logits (zero delta) must be the full forward's up to rounding."""
        check_replay(logits, self.full_logits, self.replay.hidden.dtype, "truncated forward")


def _optimise(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    request: EditRequest,
    hparams: NMKEHyperParams,
    layer: int,
    context_templates: List[str],
    key_layers: Sequence[int],
    attribution: bool,
    fast: bool,
) -> TargetVector:
    device = next(model.parameters()).device
    batch = build_rewrite_batch(tok, request, context_templates)
    ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
    lookup = batch.lookup.to(device)
    kl_row = ids.shape[0] - 1
    kl_rows = torch.tensor([kl_row], device=device)
    kl_cols = lookup[kl_row:]
    rows = torch.cat([batch.target_rows.to(device), kl_rows])
    cols = torch.cat([batch.target_cols.to(device), kl_cols])
    target_ids = batch.target_ids.to(device)
    n_target = target_ids.shape[0]
    per_row_count = torch.bincount(batch.target_rows, minlength=batch.n_rewrite).to(device).float()

    hidden_size = model.get_output_embeddings().weight.shape[1]
    delta = torch.zeros(hidden_size, device=device, requires_grad=True)
    layer_name = hparams.layer_module_tmp.format(layer)
    state = {"initial": None}

    def add_delta(hidden: torch.Tensor) -> torch.Tensor:
        if state["initial"] is None:
            state["initial"] = hidden[0, lookup[0]].detach().clone()
        # Out-of-place: the block output may be reused by autograd elsewhere.
        index = lookup.view(-1, 1, 1).expand(-1, 1, hidden.shape[-1])
        return hidden.scatter_add(1, index, delta.to(hidden.dtype).view(1, 1, -1).expand(hidden.shape[0], 1, -1))

    optimizer = torch.optim.Adam([delta], lr=hparams.v_lr)
    was_training = model.training
    model.eval()
    requires_grad = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    kl_init = None
    target_prob = 0.0
    history: List[float] = []
    steps = 0
    fast_forward = None
    try:
        if fast:
            batch.input_ids, batch.attention_mask = ids, mask
            fast_forward = _FastForward(model, hparams, batch, layer, rows, cols, key_layers, attribution)
            state["initial"] = fast_forward.initial
        for steps in range(1, hparams.v_num_grad_steps + 1):
            optimizer.zero_grad()
            if fast_forward is not None:
                logits = fast_forward.logits(delta).float()
                if steps == 1:
                    fast_forward.check(logits)
            else:
                with nethook.edit_output(model, layer_name, add_delta):
                    logits = logits_at(model, ids, mask, rows, cols).float()
            log_probs = torch.log_softmax(logits, dim=-1)
            target_logp = log_probs[:n_target].gather(1, target_ids.view(-1, 1)).squeeze(1)
            per_row = torch.zeros(batch.n_rewrite, device=device).index_add(
                0, batch.target_rows.to(device), target_logp
            )
            nll = -(per_row / per_row_count).mean()
            kl_logp = log_probs[n_target:]
            if kl_init is None:
                kl_init = kl_logp.detach().clone()
            kl = hparams.kl_factor * F.kl_div(kl_logp, kl_init, log_target=True, reduction="batchmean")
            decay = hparams.v_weight_decay * (delta.norm() / state["initial"].norm() ** 2)
            target_prob = float(torch.exp(per_row.detach() / per_row_count).mean())
            history.append(target_prob)
            if target_prob >= hparams.v_stop_prob:
                break
            loss = nll + kl + decay
            loss.backward()
            optimizer.step()
            # Keep the delta inside a ball proportional to the original vector's norm.
            max_norm = hparams.clamp_norm_factor * state["initial"].norm()
            with torch.no_grad():
                norm = delta.norm()
                if norm > max_norm:
                    delta.mul_(max_norm / norm)
    finally:
        for p, flag in zip(model.parameters(), requires_grad):
            p.requires_grad_(flag)
        model.train(was_training)
    initial = state["initial"]
    result = TargetVector(
        z=initial + delta.detach(), initial=initial, steps=steps, target_prob=target_prob, prob_history=history
    )
    if fast_forward is not None:
        result.keys = fast_forward.keys
        result.attribution = fast_forward.attribution
        result.fast = True
    return result
