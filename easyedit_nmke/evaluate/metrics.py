"""EasyEdit's metrics, batched: teacher-forced token accuracy, locality agreement, target perplexity.

* Rel / Gen: share of ``target`` tokens that are the argmax prediction after the
  (edit / rephrased) prompt with the earlier target tokens teacher-forced.
* Loc: share of locality-answer tokens whose argmax prediction equals the unedited
  model's argmax at the same position.
* Perplexity (hallucination data): exp of the mean target-token NLL.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..util.model_parts import logits_at
from ..util.requests import continuation, encode, encode_target, pad_batch, pad_id

Pair = Tuple[str, str]  # (prompt, answer)


def _batches(items: Sequence, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def answer_logits(
    model: nn.Module, tok: PreTrainedTokenizerBase, pairs: Sequence[Pair], batch_size: int
) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Per pair: (logits at the answer positions [n_ans, vocab], answer ids [n_ans])."""
    device = next(model.parameters()).device
    out: List[Tuple[torch.Tensor, torch.Tensor]] = []
    for chunk in _batches(list(pairs), batch_size):
        sequences, rows, cols, answers = [], [], [], []
        for row, (prompt, answer) in enumerate(chunk):
            prompt_ids = encode(tok, prompt)
            answer_ids = encode_target(tok, continuation(answer))
            sequences.append(prompt_ids + answer_ids[:-1])
            rows.extend([row] * len(answer_ids))
            cols.extend(range(len(prompt_ids) - 1, len(prompt_ids) - 1 + len(answer_ids)))
            answers.append(torch.tensor(answer_ids))
        ids, mask = pad_batch(sequences, pad_id(tok))
        with torch.no_grad():
            logits = logits_at(
                model, ids.to(device), mask.to(device), torch.tensor(rows, device=device), torch.tensor(cols, device=device)
            ).float().cpu()
        offset = 0
        for answer in answers:
            out.append((logits[offset : offset + len(answer)], answer))
            offset += len(answer)
    return out


def token_accuracy(
    model: nn.Module, tok: PreTrainedTokenizerBase, pairs: Sequence[Pair], batch_size: int = 16
) -> List[float]:
    return [float((logits.argmax(-1) == answer).float().mean()) for logits, answer in answer_logits(model, tok, pairs, batch_size)]


def answer_predictions(
    model: nn.Module, tok: PreTrainedTokenizerBase, pairs: Sequence[Pair], batch_size: int = 16
) -> List[torch.Tensor]:
    """Argmax token at each answer position (for locality against the unedited model)."""
    return [logits.argmax(-1) for logits, _ in answer_logits(model, tok, pairs, batch_size)]


def locality_agreement(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    pairs: Sequence[Pair],
    reference: Sequence[torch.Tensor],
    batch_size: int = 16,
) -> List[float]:
    current = answer_predictions(model, tok, pairs, batch_size)
    return [float((c == r).float().mean()) for c, r in zip(current, reference)]


def target_perplexity(
    model: nn.Module, tok: PreTrainedTokenizerBase, pairs: Sequence[Pair], batch_size: int = 8
) -> List[float]:
    result = []
    for logits, answer in answer_logits(model, tok, pairs, batch_size):
        nll = torch.nn.functional.cross_entropy(logits, answer)
        result.append(float(math.exp(min(float(nll), 50.0))))
    return result


def mean(values: Sequence[float]) -> Optional[float]:
    return float(sum(values) / len(values)) if values else None
