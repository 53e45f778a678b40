"""Rehearsing earlier edits while an edit trains shared decoder rows (optional, off by default).

MicroEdit trains the decoder rows of the latents active on the current edit's input.
Most of those rows were also trained by earlier edits (on SmolLM2 94 % of an edit's
rows are shared with another of the first 100 edits), so a later edit can move an
earlier edit's reconstruction away from what that edit learned, or push its ARD above
τ so that the switch stops routing it.  With ``rehearsal_edits: n`` stage 2 adds, for
the n earlier edits sharing the most rows with this one, the same two terms the
current edit minimises (its ARD and −log P(target)), computed with the rows being
trained in place.  Only the current edit's rows are trained, as in the paper; this is
the plugin's extension, and ``0`` is the paper's procedure.

The log of earlier edits (request + active latents) lives on ``MicroEditState`` and is
saved with it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

import torch

from ...util.requests import EditRequest


@dataclass
class EditMemory:
    """One earlier edit, as rehearsal needs it."""

    request: EditRequest
    latents: torch.Tensor  # [n_active] latents whose rows that edit trained (int64, CPU)


def select_rehearsal(memory: Sequence[EditMemory], latents: torch.Tensor, count: int) -> List[EditMemory]:
    """The ``count`` earlier edits sharing the most rows with ``latents`` (ties: the most recent first).

    Edits sharing no row cannot be disturbed by this edit and are never chosen.
    """
    if count <= 0 or not memory:
        return []
    current = latents.detach().cpu()
    shared = [int(torch.isin(entry.latents, current).sum()) for entry in memory]
    order = sorted(range(len(memory)), key=lambda i: (-shared[i], -i))
    return [memory[i] for i in order[:count] if shared[i] > 0]
