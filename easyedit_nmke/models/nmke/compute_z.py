"""Target residual vector z for one edit (the ROME/MEMIT/AlphaEdit ``compute_z`` step).

A delta is added to the output of the last edit layer at the subject's last token
and optimised so the model predicts ``target`` after the prompt under each context
prefix, while a KL term keeps the prediction on "<subject> is a" close to the
unedited model and weight decay plus a norm clamp keep the delta small.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase

from ...util import nethook
from ...util.model_parts import logits_at
from ...util.requests import EditRequest, encode, encode_target, pad_batch, pad_id, subject_last_index
from .nmke_hparams import NMKEHyperParams


@dataclass
class TargetVector:
    z: torch.Tensor  # [d] wanted output of the last edit layer at the subject's last token
    initial: torch.Tensor  # [d] its value before the edit
    steps: int
    target_prob: float  # mean per-token target probability reached
    prob_history: List[float]  # target_prob at each step, for diagnostics


@dataclass
class RewriteBatch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    lookup: torch.Tensor  # [batch] subject-last-token index per row
    target_rows: torch.Tensor  # positions whose next token is a target token
    target_cols: torch.Tensor
    target_ids: torch.Tensor
    n_rewrite: int  # rows before the KL rows


def build_rewrite_batch(
    tok: PreTrainedTokenizerBase, request: EditRequest, context_templates: List[str]
) -> RewriteBatch:
    target_ids = encode_target(tok, request.target)
    sequences, lookups, rows, cols, tgt = [], [], [], [], []
    for row, template in enumerate(context_templates):
        text = template.format(request.prompt)
        prompt_ids = encode(tok, text)
        sequences.append(prompt_ids + target_ids[:-1])
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
    )


def compute_z(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    request: EditRequest,
    hparams: NMKEHyperParams,
    layer: int,
    context_templates: List[str],
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
    try:
        for steps in range(1, hparams.v_num_grad_steps + 1):
            optimizer.zero_grad()
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
    return TargetVector(z=initial + delta.detach(), initial=initial, steps=steps, target_prob=target_prob, prob_history=history)
