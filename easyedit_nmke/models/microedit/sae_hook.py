"""The SAE in the residual stream and MicroEdit's ARD switch.

A forward hook on decoder block ``l`` computes the SAE reconstruction ẑ of the block
output z for every input of a batch and its reconstruction distance

    ARD = (1 / (α · S)) · Σ_s ‖ẑ_s − z_s‖²   over the S ordinary positions of the input,

then uses ẑ in place of z (at ordinary positions) only for inputs with ARD ≤ τ; other
inputs pass unchanged.  Massive-norm positions (see ``activations.py``) never go
through the SAE and do not count in S.

Padding is excluded with the ``attention_mask`` the model was called with, read by a
pre-hook on the model itself (decoder blocks do not receive the 2-D mask).  During
incremental decoding with a KV cache each forward call sees only the new positions,
so the decision is taken per call on those positions.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, List, Optional

import torch
from torch import nn

from ...util import nethook
from .activations import ordinary_positions

SWITCH_MODES = ("switch", "always", "off")


# Input normalisations under which ẑ stays linear in W_dec: none, or SAE-Lens'
# per-token "constant_norm_rescale" (x·√d/‖x‖ in, the inverse factor out), which the
# Mistral-7B release the paper uses applies.
LINEAR_NORMALISATIONS = ("none", "constant_norm_rescale")


def linear_decoder_check(sae: nn.Module) -> None:
    """MicroEdit needs ẑ = s(z)·(ĥ·W_dec + b_dec) with an encoder that does not read W_dec."""
    cfg = sae.cfg
    problems = []
    if getattr(cfg, "normalize_activations", "none") not in LINEAR_NORMALISATIONS:
        problems.append(f"normalize_activations={cfg.normalize_activations!r}")
    if getattr(cfg, "rescale_acts_by_decoder_norm", False):
        problems.append("rescale_acts_by_decoder_norm=True (the encoder would change with W_dec)")
    if getattr(cfg, "reshape_activations", "none") != "none":
        problems.append(f"reshape_activations={cfg.reshape_activations!r}")
    if problems:
        raise ValueError("MicroEdit needs a plain TopK SAE in the residual stream; this one has " + ", ".join(problems))


def decoder_output_scale(sae: nn.Module, hidden: torch.Tensor) -> Optional[torch.Tensor]:
    """Per-position factor s(z) the SAE applies to ĥ·W_dec + b_dec ([..., 1]); None when 1."""
    if getattr(sae.cfg, "normalize_activations", "none") == "constant_norm_rescale":
        return hidden.norm(dim=-1, keepdim=True) / (sae.cfg.d_in**0.5)
    return None


def sae_reconstruction(sae: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """ẑ for ``hidden`` [..., d_in], in ``hidden``'s dtype."""
    dtype = sae.W_dec.dtype
    return sae.decode(sae.encode(hidden.to(dtype))).to(hidden.dtype)


def reconstruction_distance(
    hidden: torch.Tensor, reconstruction: torch.Tensor, ordinary: torch.Tensor, alpha: float
) -> torch.Tensor:
    """ARD per input: [batch]; ``inf`` for an input without ordinary positions."""
    sq = (reconstruction.float() - hidden.float()).pow(2).sum(-1) * ordinary  # [batch, seq]
    count = ordinary.sum(-1)
    ard = sq.sum(-1) / (alpha * count.clamp(min=1))
    return torch.where(count > 0, ard, torch.full_like(ard, float("inf")))


@dataclass
class RoutingRecord:
    """ARD and routing decision of each input seen while recording."""

    ard: List[float] = field(default_factory=list)
    routed: List[bool] = field(default_factory=list)


class SAESwitch:
    """Hooks an SAE into the output of one decoder block, with MicroEdit's ARD switch.

    ``mode``: ``"switch"`` (route when ARD ≤ τ, the method), ``"always"`` (route every
    input), ``"off"`` (SAE bypassed: the model computes exactly as without the hook).
    """

    def __init__(self, sae: nn.Module, threshold: float, alpha: float, massive_norm_factor: float):
        linear_decoder_check(sae)
        self.sae = sae
        self.threshold = float(threshold)
        self.alpha = float(alpha)
        self.massive_norm_factor = float(massive_norm_factor)
        self.mode = "switch"
        self._attention_mask: Optional[torch.Tensor] = None
        self._handles: List[torch.utils.hooks.RemovableHandle] = []
        self._record: Optional[RoutingRecord] = None

    # --- installation ----------------------------------------------------------
    @property
    def installed(self) -> bool:
        return bool(self._handles)

    def install(self, model: nn.Module, layer_name: str) -> None:
        if self.installed:
            raise RuntimeError("SAESwitch is already installed; remove() it first")
        block = nethook.get_module(model, layer_name)
        # The decoder stack (``base_model``) receives the 2-D mask both from the
        # model's own forward and from callers that run the stack directly.
        stack = getattr(model, "base_model", model)
        self._handles = [
            stack.register_forward_pre_hook(self._remember_mask, with_kwargs=True),
            stack.register_forward_hook(self._forget_mask),
            block.register_forward_hook(self._block_hook),
        ]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._attention_mask = None

    # --- hooks ---------------------------------------------------------------------
    def _remember_mask(self, module, args, kwargs):
        # HF causal-LM heads call their decoder stack with keyword arguments only.
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dtype not in (torch.bool, torch.long, torch.int32, torch.int64):
            mask = None  # a float additive mask is not a padding mask
        self._attention_mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        return None

    def _forget_mask(self, module, args, output):
        self._attention_mask = None
        return None

    def _block_hook(self, module, args, output):
        if self.mode == "off":
            return None
        hidden = nethook.hidden_of(output)
        routed_hidden = self.route(hidden, self._current_mask(hidden))
        return nethook.replace_hidden(output, routed_hidden)

    def _current_mask(self, hidden: torch.Tensor) -> Optional[torch.Tensor]:
        mask = self._attention_mask
        if mask is None or mask.shape[0] != hidden.shape[0]:
            return None
        # With a KV cache the mask covers past + current positions; the block sees the current ones.
        return mask[:, -hidden.shape[1] :].to(hidden.device)

    # --- the switch ----------------------------------------------------------------
    def route(self, hidden: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``hidden`` [batch, seq, d] with routed inputs replaced by ẑ at ordinary positions."""
        ordinary = ordinary_positions(hidden, self.massive_norm_factor, attention_mask)
        with torch.no_grad():
            recon = sae_reconstruction(self.sae, hidden)
            ard = reconstruction_distance(hidden, recon, ordinary, self.alpha)
        routed = torch.ones_like(ard, dtype=torch.bool) if self.mode == "always" else ard <= self.threshold
        if self._record is not None:
            self._record.ard.extend(ard.tolist())
            self._record.routed.extend(routed.tolist())
        replace = (ordinary & routed.view(-1, 1)).unsqueeze(-1)
        return torch.where(replace, recon, hidden)

    @contextlib.contextmanager
    def recording(self) -> Iterator[RoutingRecord]:
        """Collect the ARD and routing decision of every input seen inside the block."""
        previous = self._record
        self._record = RoutingRecord()
        try:
            yield self._record
        finally:
            self._record = previous

    @contextlib.contextmanager
    def mode_set(self, mode: str) -> Iterator[None]:
        if mode not in SWITCH_MODES:
            raise ValueError(f"switch mode must be one of {SWITCH_MODES}, got {mode!r}")
        previous, self.mode = self.mode, mode
        try:
            yield
        finally:
            self.mode = previous
