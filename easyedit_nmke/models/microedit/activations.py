"""Which residual-stream positions the SAE handles.

Small Llama-style models put a few massive-norm vectors in the residual stream at
attention-sink positions (SmolLM2: norms up to ~27,000 against a median of ~325 at
the first tokens of a window).  They would dominate SAE training and every ARD, and
the SAE cannot reconstruct them, so one rule, used by training, calibration, editing
and the switch alike, leaves them out: a position is massive when its norm exceeds
``factor`` times the median norm of the positions of the same input.
"""
from __future__ import annotations

from typing import Optional

import torch


def ordinary_positions(
    hidden: torch.Tensor, factor: float, attention_mask: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Boolean [batch, seq]: True where the SAE applies (real tokens, not massive-norm)."""
    if hidden.dim() == 2:
        hidden = hidden.unsqueeze(0)
    norms = hidden.detach().float().norm(dim=-1)  # [batch, seq]
    valid = torch.ones_like(norms, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    masked = norms.masked_fill(~valid, float("nan"))
    median = masked.nanmedian(dim=-1, keepdim=True).values
    return valid & (norms <= factor * median)
