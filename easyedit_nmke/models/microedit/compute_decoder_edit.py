"""New decoder rows for one MicroEdit edit.

The LLM and the SAE encoder are frozen, so the latent activations ĥ of the edit's
input do not change while the decoder is trained: ẑ = ĥ·W_dec + b_dec is linear in
the rows of the latents active on the input (the union over its ordinary positions)
and only those rows are optimised — as a separate tensor, so every other row stays
bitwise unchanged.

Stage 1 ("distance regularisation") minimises the input's ARD, which pulls the edit
prompt under the switch threshold; stage 2 minimises ARD + L_edit, with
L_edit = −log P(target_new | prompt) when ẑ replaces the block output.  The input is
the prompt followed by the teacher-forced target tokens, the same sequence the
reliability metric feeds, so the positions whose reconstruction is trained are the
positions whose routing is later decided.

Since nothing below the hooked block changes while its rows are trained, a stage-2
step need not run the whole model: with ``fast_path`` (and ``ln_f_module`` naming the
final norm) one plain forward records the arguments of the blocks above the hook, and
each step replays only those blocks, the final norm and the unembedding at the target
positions.  The replay must reproduce the model's own logits on the unedited input;
if it does not (an architecture it does not fit), the full forward runs instead.

With ``rehearsal_edits`` > 0 (not in the paper; see ``rehearsal.py``) stage 2 also
minimises ARD + L_edit of the earlier edits sharing the most rows with this one, each
on its own input with the rows being trained in place; only this edit's rows change.
The current and the rehearsed inputs are then stacked (right-padded) into one batch, so
a step replays the blocks above the hook once for all of them instead of once each.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from ...util import nethook
from ...util.model_parts import SuffixReplay, check_replay, head_logits, logits_at, num_layers
from ...util.requests import EditRequest, encode, encode_target
from .activations import ordinary_positions
from .microedit_hparams import MicroEditHyperParams
from .rehearsal import EditMemory, select_rehearsal
from .sae_hook import SAESwitch, decoder_output_scale, reconstruction_distance


@dataclass
class DecoderEdit:
    latents: torch.Tensor  # [n_active] latent indices whose decoder rows change
    rows: torch.Tensor  # [n_active, d_in] their new decoder rows
    ard_before: float
    ard_after: float
    target_prob: float  # mean target-token probability with ẑ in place, after training
    stage1_steps: int
    stage2_steps: int
    prob_history: List[float]
    replay_failed: bool  # the replay was wanted but failed its check (stage 2 ran the whole model)
    rehearsed: int = 0  # earlier edits rehearsed in stage 2 (``rehearsal_edits``)
    rehearsed_prob: float = float("nan")  # their mean target-token probability at the last step


def block_output(model: nn.Module, layer_name: str, input_ids: torch.Tensor, switch: SAESwitch) -> torch.Tensor:
    """Output of the hooked block with the SAE bypassed (z), without running later blocks."""
    with switch.mode_set("off"), nethook.capture(model, [layer_name]) as record, nethook.stop_after(model, layer_name):
        with torch.no_grad():
            model.base_model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
    return record[layer_name]


@dataclass
class EditInput:
    """The edit's input sequence (prompt + teacher-forced target) and its SAE latents."""

    layer_name: str  # the hooked block
    input_ids: torch.Tensor  # [1, seq]
    rows: torch.Tensor  # batch index of each target position (all 0)
    cols: torch.Tensor  # positions whose next-token prediction is a target token
    targets: torch.Tensor  # [n_target] target token ids
    hidden: torch.Tensor  # [1, seq, d_in] block output z, in the SAE's dtype
    ordinary: torch.Tensor  # [1, seq] positions the switch may route (no massive-norm tokens)
    acts: torch.Tensor  # [1, seq, d_sae] latent activations ĥ
    latents: torch.Tensor  # [n_active] latents active on an ordinary position
    replay: Optional[SuffixReplay] = None  # the blocks above the hook (fast path), or None
    replay_failed: bool = False  # the replay was wanted but failed its check


def edit_input(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    request: EditRequest,
    hparams: MicroEditHyperParams,
    switch: SAESwitch,
    use_replay: bool = True,
) -> EditInput:
    """Run the model to the hooked block on the edit's input and find the latents an edit trains.

    With ``use_replay`` (and ``fast_path`` / ``ln_f_module`` set) the forward also records
    the blocks above the hook for stage 2.  Call it with the model in eval mode.
    """
    sae = switch.sae
    device = sae.W_dec.device
    layer_name = hparams.layer_module_tmp.format(hparams.layer)
    prompt_ids = encode(tok, request.prompt)
    target_ids = encode_target(tok, request.target)
    input_ids = torch.tensor([prompt_ids + target_ids[:-1]], device=device)
    cols = torch.arange(len(prompt_ids) - 1, len(prompt_ids) - 1 + len(target_ids), device=device)
    wanted = use_replay and hparams.fast_path and bool(hparams.ln_f_module)
    replay = upper_blocks(model, hparams, input_ids, cols, switch) if wanted else None
    block_hidden = replay.hidden if replay is not None else block_output(model, layer_name, input_ids, switch)
    hidden = block_hidden.to(sae.W_dec.dtype)
    ordinary = ordinary_positions(hidden, hparams.massive_norm_factor)
    with torch.no_grad():
        acts = sae.encode(hidden)  # [1, seq, d_sae]; fixed: the encoder does not read W_dec
    latents = (acts[ordinary] != 0).any(0).nonzero().squeeze(1)
    if latents.numel() == 0:
        raise ValueError(f"no SAE latent is active on the edit prompt {request.prompt!r}")
    return EditInput(
        layer_name=layer_name,
        input_ids=input_ids,
        rows=torch.zeros(len(target_ids), dtype=torch.long, device=device),
        cols=cols,
        targets=torch.tensor(target_ids, device=device),
        hidden=hidden,
        ordinary=ordinary,
        acts=acts,
        latents=latents,
        replay=replay,
        replay_failed=wanted and replay is None,
    )


def upper_blocks(
    model: nn.Module,
    hparams: MicroEditHyperParams,
    input_ids: torch.Tensor,
    cols: torch.Tensor,
    switch: SAESwitch,
    attention_mask: Optional[torch.Tensor] = None,
    rows: Optional[torch.Tensor] = None,
) -> Optional[SuffixReplay]:
    """The blocks above the hooked one, ready to replay on ``input_ids``; None if the replay does not fit the model.

    ``input_ids`` is one sequence, or a right-padded batch with its ``attention_mask``;
    ``(rows, cols)`` are the positions the replay must reproduce (``rows`` default 0).
    """
    block_names = [hparams.layer_module_tmp.format(i) for i in range(num_layers(model))]
    rows = torch.zeros_like(cols) if rows is None else rows
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    try:
        with switch.mode_set("off"):
            replay = SuffixReplay.whole(
                model, input_ids, attention_mask, block_names, hparams.layer + 1, hparams.ln_f_module
            )
        with torch.no_grad():
            expected = head_logits(model, replay.last_hidden[rows, cols]).float()
            replayed = replay.logits(replay.hidden, rows, cols).float()
        check_replay(replayed, expected, replay.hidden.dtype, "replay of the blocks above the SAE")
    except (torch.cuda.OutOfMemoryError, MemoryError):
        raise  # the full model in every step would need more memory, not less
    except Exception as exc:  # an architecture the replay does not fit
        warnings.warn(f"fast_path: {exc}; MicroEdit runs the full model in every stage-2 step")
        return None
    return replay


def compute_decoder_edit(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    request: EditRequest,
    hparams: MicroEditHyperParams,
    switch: SAESwitch,
    use_replay: bool = True,
    memory: Sequence[EditMemory] = (),
) -> DecoderEdit:
    """New rows for the latents active on ``request``'s input; ``memory``: earlier edits, for rehearsal."""
    requires_grad = [p.requires_grad for p in model.parameters()]
    was_training = model.training
    # Eval mode before the first forward: dropout would make the recorded block inputs
    # and the replay check random.
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        return _train_rows(model, tok, request, hparams, switch, use_replay, memory)
    finally:
        for p, flag in zip(model.parameters(), requires_grad):
            p.requires_grad_(flag)
        model.train(was_training)


def _train_rows(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    request: EditRequest,
    hparams: MicroEditHyperParams,
    switch: SAESwitch,
    use_replay: bool,
    memory: Sequence[EditMemory],
) -> DecoderEdit:
    sae = switch.sae
    inputs = edit_input(model, tok, request, hparams, switch, use_replay)
    hidden, ordinary, acts, latents = inputs.hidden, inputs.ordinary, inputs.acts, inputs.latents
    active_acts = acts[..., latents]
    new_rows = sae.W_dec.detach()[latents].clone().requires_grad_(True)
    b_dec = sae.b_dec.detach()
    output_scale = decoder_output_scale(sae, hidden)

    def reconstruction() -> torch.Tensor:
        out = active_acts @ new_rows + b_dec
        return out if output_scale is None else out * output_scale

    def ard() -> torch.Tensor:
        return reconstruction_distance(hidden, reconstruction(), ordinary, hparams.ard_alpha)[0]

    chosen = select_rehearsal(memory, latents, hparams.rehearsal_edits)
    rehearsed = [
        RehearsedEdit.build(edit_input(model, tok, entry.request, hparams, switch, use_replay=False), latents, sae)
        for entry in chosen
    ]
    # One replay for the current and the rehearsed inputs together; without it (no
    # replay wanted, or it does not fit the model) each input runs the full model.
    all_inputs = [inputs] + [edit.inputs for edit in rehearsed]
    batch = ReplayBatch.build(model, hparams, all_inputs, switch) if rehearsed and inputs.replay is not None else None

    optimizer = torch.optim.Adam([new_rows], lr=hparams.edit_lr)
    ard_before = float(ard().detach())
    history: List[float] = []
    stage1 = stage2 = 0
    target_prob = 0.0
    rehearsed_prob = float("nan")
    # With the default margin 1.0 the stages run their full step counts (the paper's procedure).
    ard_goal = hparams.ard_margin * switch.threshold if hparams.ard_margin < 1.0 else None

    def inside(distance: torch.Tensor) -> bool:
        return ard_goal is None or float(distance.detach()) <= ard_goal

    for stage1 in range(1, hparams.stage1_steps + 1):
        optimizer.zero_grad()
        loss = ard()
        if ard_goal is not None and float(loss.detach()) <= ard_goal:
            stage1 -= 1
            break
        loss.backward()
        optimizer.step()
    for stage2 in range(1, hparams.stage2_steps + 1):
        optimizer.zero_grad()
        recons = [reconstruction()] + [edit.reconstruction(new_rows, b_dec) for edit in rehearsed]
        if batch is not None:
            logps = batch.target_logprobs(recons)
        else:
            logps = [target_logprobs(model, each, recon, switch) for each, recon in zip(all_inputs, recons)]
        distances = [
            reconstruction_distance(each.hidden, recon, each.ordinary, hparams.ard_alpha)[0]
            for each, recon in zip(all_inputs, recons)
        ]
        probs = [float(logp.detach().exp().mean()) for logp in logps]
        target_prob = probs[0]
        history.append(target_prob)
        if rehearsed:
            rehearsed_prob = sum(probs[1:]) / len(rehearsed)
        loss = distances[0] - logps[0].mean()
        for logp, distance in zip(logps[1:], distances[1:]):
            loss = loss + distance - logp.mean()
        if all(prob >= hparams.stop_prob and inside(distance) for prob, distance in zip(probs, distances)):
            break
        loss.backward()
        optimizer.step()
    return DecoderEdit(
        latents=latents,
        rows=new_rows.detach(),
        ard_before=ard_before,
        ard_after=float(ard().detach()),
        target_prob=target_prob,
        stage1_steps=stage1,
        stage2_steps=stage2,
        prob_history=history,
        replay_failed=inputs.replay_failed,
        rehearsed=len(rehearsed),
        rehearsed_prob=rehearsed_prob,
    )


def target_logprobs(model: nn.Module, inputs: EditInput, recon: torch.Tensor, switch: SAESwitch) -> torch.Tensor:
    """log P(target token) at each target position with ``recon`` in place of the block output on ordinary positions."""
    def use_reconstruction(block_hidden: torch.Tensor) -> torch.Tensor:
        return with_reconstruction(block_hidden, recon, inputs.ordinary)

    if inputs.replay is not None:
        logits = inputs.replay.logits(use_reconstruction(inputs.replay.hidden), inputs.rows, inputs.cols).float()
    else:
        attention_mask = torch.ones_like(inputs.input_ids)
        with switch.mode_set("off"), nethook.edit_output(model, inputs.layer_name, use_reconstruction):
            logits = logits_at(model, inputs.input_ids, attention_mask, inputs.rows, inputs.cols).float()
    return token_logprobs(logits, inputs.targets)


def with_reconstruction(block_hidden: torch.Tensor, recon: torch.Tensor, ordinary: torch.Tensor) -> torch.Tensor:
    """``block_hidden`` with ``recon`` on the ``ordinary`` positions (attention sinks pass unchanged)."""
    return torch.where(ordinary.unsqueeze(-1), recon.to(block_hidden.dtype), block_hidden)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[j, targets[j]] for each row j."""
    return torch.log_softmax(logits, dim=-1).gather(1, targets.view(-1, 1)).squeeze(1)


@dataclass
class ReplayBatch:
    """Several edit inputs right-padded into one batch, with one replay of the blocks above the hook.

    With right padding and causal attention a real position never attends to a pad, so
    each row's target logits are its own input's, up to float rounding.
    """

    inputs: List[EditInput]
    replay: SuffixReplay  # on the padded batch
    rows: torch.Tensor  # [n_targets] batch row of every target position, input after input
    cols: torch.Tensor  # [n_targets] its position
    targets: torch.Tensor  # [n_targets] target token ids
    counts: List[int]  # target positions per input

    @classmethod
    def build(
        cls, model: nn.Module, hparams: MicroEditHyperParams, inputs: Sequence[EditInput], switch: SAESwitch
    ) -> Optional["ReplayBatch"]:
        """None when the replay does not fit the model (``upper_blocks`` warns)."""
        width = max(each.input_ids.shape[1] for each in inputs)
        device = inputs[0].input_ids.device
        input_ids = torch.zeros(len(inputs), width, dtype=torch.long, device=device)
        attention_mask = torch.zeros_like(input_ids)
        for row, each in enumerate(inputs):
            length = each.input_ids.shape[1]
            input_ids[row, :length] = each.input_ids[0]
            attention_mask[row, :length] = 1
        rows = torch.cat([torch.full_like(each.cols, row) for row, each in enumerate(inputs)])
        cols = torch.cat([each.cols for each in inputs])
        replay = upper_blocks(model, hparams, input_ids, cols, switch, attention_mask, rows)
        if replay is None:
            return None
        return cls(
            inputs=list(inputs),
            replay=replay,
            rows=rows,
            cols=cols,
            targets=torch.cat([each.targets for each in inputs]),
            counts=[int(each.cols.numel()) for each in inputs],
        )

    def target_logprobs(self, recons: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """``target_logprobs`` of every input, ``recons[i]`` in place of input i's block output."""
        base = self.replay.hidden
        rows = []
        for row, (each, recon) in enumerate(zip(self.inputs, recons)):
            length = each.input_ids.shape[1]
            own = with_reconstruction(base[row, :length], recon[0], each.ordinary[0])
            rows.append(torch.cat([own, base[row, length:]]))
        logits = self.replay.logits(torch.stack(rows), self.rows, self.cols).float()
        return list(token_logprobs(logits, self.targets).split(self.counts))


@dataclass
class RehearsedEdit:
    """An earlier edit's input, with its reconstruction split into the part this edit trains and the rest."""

    inputs: EditInput
    trained_acts: torch.Tensor  # [1, seq, n_trained] its activations of the latents being trained
    fixed: torch.Tensor  # [1, seq, d_in] what every other latent's row contributes (no b_dec)
    output_scale: Optional[torch.Tensor]

    @classmethod
    def build(cls, inputs: EditInput, trained: torch.Tensor, sae: nn.Module) -> "RehearsedEdit":
        others = inputs.acts.clone()
        others[..., trained] = 0
        return cls(
            inputs=inputs,
            trained_acts=inputs.acts[..., trained],
            fixed=others @ sae.W_dec.detach(),
            output_scale=decoder_output_scale(sae, inputs.hidden),
        )

    def reconstruction(self, trained_rows: torch.Tensor, b_dec: torch.Tensor) -> torch.Tensor:
        out = self.fixed + self.trained_acts @ trained_rows + b_dec
        return out if self.output_scale is None else out * self.output_scale
