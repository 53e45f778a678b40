"""Keys (FFN hidden activations at the subject's last token) and current layer outputs."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from ...util import nethook
from ...util.model_parts import logits_at, mlp_residual_contribution_module, recorded_input, replay_blocks
from ...util.requests import EditRequest, encode, encode_target, pad_batch, pad_id, subject_last_index
from .nmke_hparams import NMKEHyperParams


def _forward_capture(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    texts: Sequence[str],
    module_names: Sequence[str],
    inputs: bool,
    last_block: str,
):
    """Run the prompts only up to ``last_block`` and record the named modules."""
    device = next(model.parameters()).device
    ids, mask = pad_batch([encode(tok, t) for t in texts], pad_id(tok))
    with torch.no_grad(), nethook.capture(model, list(module_names), inputs=inputs) as record:
        with nethook.stop_after(model, last_block):
            model.base_model(input_ids=ids.to(device), attention_mask=mask.to(device))
    return record


def compute_ks(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    request: EditRequest,
    hparams: NMKEHyperParams,
    layers: Sequence[int],
    context_templates: List[str],
) -> Dict[int, torch.Tensor]:
    """Key per layer: down-projection input at the subject's last token, averaged over context prefixes."""
    texts = [t.format(request.prompt) for t in context_templates]
    index = torch.tensor([subject_last_index(tok, t, request.subject) for t in texts])
    names = {layer: hparams.rewrite_module_tmp.format(layer) for layer in layers}
    record = _forward_capture(
        model, tok, texts, list(names.values()), True, hparams.layer_module_tmp.format(max(layers))
    )
    rows = torch.arange(len(texts))
    return {layer: record[name][rows, index.to(record[name].device)].float().mean(0) for layer, name in names.items()}


def layer_output_at_subject(
    model: nn.Module, tok: PreTrainedTokenizerBase, request: EditRequest, hparams: NMKEHyperParams, layer: int
) -> torch.Tensor:
    """Current output of decoder block ``layer`` at the subject's last token of the bare prompt."""
    name = hparams.layer_module_tmp.format(layer)
    record = _forward_capture(model, tok, [request.prompt], [name], False, name)
    return record[name][0, subject_last_index(tok, request.prompt, request.subject)].float()


@dataclass
class AttributionInputs:
    hidden: Dict[int, torch.Tensor]  # layer -> [P, d] post-attention residual at the last token
    activations: Dict[int, torch.Tensor]  # layer -> [P, d_ff] neuron activations at the last token
    token_ids: torch.Tensor  # [P] token whose log-prob the attribution measures


def collect_attribution_inputs(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    request: EditRequest,
    hparams: NMKEHyperParams,
    context_templates: List[str],
) -> AttributionInputs:
    """One forward over the edit prompt under every context prefix, reading each edit layer."""
    device = next(model.parameters()).device
    texts = [t.format(request.prompt) for t in context_templates]
    ids, mask = pad_batch([encode(tok, t) for t in texts], pad_id(tok))
    ids, mask = ids.to(device), mask.to(device)
    last = mask.sum(1) - 1
    rows = torch.arange(len(texts), device=device)
    block_names = {layer: hparams.layer_module_tmp.format(layer) for layer in hparams.layers}
    mlp_names = {
        layer: mlp_residual_contribution_module(model, block_names[layer], hparams.mlp_module_tmp.format(layer))
        for layer in hparams.layers
    }
    down_names = {layer: hparams.rewrite_module_tmp.format(layer) for layer in hparams.layers}
    with torch.no_grad():
        with nethook.capture(model, list(block_names.values()) + list(mlp_names.values())) as outputs, nethook.capture(
            model, list(down_names.values()), inputs=True
        ) as down_inputs:
            logits = logits_at(model, ids, mask, rows, last)
    hidden, activations = {}, {}
    for layer in hparams.layers:
        # The block output minus what the FFN wrote is the post-attention residual.
        block_out = outputs[block_names[layer]][rows, last]
        mlp_out = outputs[mlp_names[layer]][rows, last]
        hidden[layer] = (block_out - mlp_out).float()
        activations[layer] = down_inputs[down_names[layer]][rows, last].float()
    if hparams.attribution_token == "target":
        first = encode_target(tok, request.target)[0]
        token_ids = torch.full((len(texts),), first, dtype=torch.long, device=device)
    else:
        token_ids = logits.argmax(-1)
    return AttributionInputs(hidden=hidden, activations=activations, token_ids=token_ids)


class SubjectReadout:
    """Keys and a block's output at the subject's last token, read repeatedly during one edit.

    Both depend only on the tokens up to the subject (causal attention), so each prompt
    is cut right after it, and the bare prompt's row (template ``"{}"``) gives the block
    output.  The blocks below ``first_layer`` are not edited, so the first call runs the
    model up to ``top_layer`` and records what blocks ``first_layer..top_layer`` received;
    later calls replay only those blocks with the current weights.  The same numbers as
    ``compute_ks`` and ``layer_output_at_subject``, up to float rounding.
    """

    def __init__(
        self,
        model: nn.Module,
        tok: PreTrainedTokenizerBase,
        request: EditRequest,
        hparams: NMKEHyperParams,
        context_templates: List[str],
        first_layer: int,
        top_layer: int,
    ):
        self.model, self.hparams = model, hparams
        self.first_layer, self.top_layer = first_layer, top_layer
        device = next(model.parameters()).device
        texts = [t.format(request.prompt) for t in context_templates]
        self.n_keys = len(texts)
        self.bare = context_templates.index("{}") if "{}" in context_templates else len(texts)
        if self.bare == len(texts):
            texts.append(request.prompt)
        index = [subject_last_index(tok, t, request.subject) for t in texts]
        ids, mask = pad_batch([encode(tok, t)[: i + 1] for t, i in zip(texts, index)], pad_id(tok))
        self.ids, self.mask = ids.to(device), mask.to(device)
        self.last = self.mask.sum(1) - 1
        self.block_names = [hparams.layer_module_tmp.format(i) for i in range(first_layer, top_layer + 1)]
        self.calls = None

    def __call__(
        self, key_layers: Sequence[int], output_layer: Optional[int] = None
    ) -> Tuple[Dict[int, torch.Tensor], Optional[torch.Tensor]]:
        """(key per layer in ``key_layers``, output of block ``output_layer`` or None)."""
        needed = list(key_layers) + ([] if output_layer is None else [output_layer])
        if not needed or min(needed) < self.first_layer or max(needed) > self.top_layer:
            raise ValueError(f"layers {needed} outside {self.first_layer}..{self.top_layer}")
        key_names = {layer: self.hparams.rewrite_module_tmp.format(layer) for layer in key_layers}
        out_names = [] if output_layer is None else [self.hparams.layer_module_tmp.format(output_layer)]
        model = self.model
        with torch.no_grad(), nethook.capture(model, list(key_names.values()), inputs=True) as keys, nethook.capture(
            model, out_names
        ) as outputs:
            if self.calls is None:
                with nethook.record_calls(model, self.block_names) as calls, nethook.stop_after(
                    model, self.block_names[-1]
                ):
                    model.base_model(input_ids=self.ids, attention_mask=self.mask, use_cache=False)
                self.calls = [calls[name] for name in self.block_names]
                self.blocks = [nethook.get_module(model, name) for name in self.block_names]
            else:
                count = max(needed) - self.first_layer + 1
                replay_blocks(self.blocks[:count], self.calls[:count], recorded_input(self.calls[0]))
        rows = torch.arange(self.n_keys, device=self.ids.device)
        result = {layer: keys[name][rows, self.last[: self.n_keys]].float().mean(0) for layer, name in key_names.items()}
        output = None if output_layer is None else outputs[out_names[0]][self.bare, self.last[self.bare]].float()
        return result, output
