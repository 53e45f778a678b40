"""Edit requests: normalisation, validation and tokenisation shared by all methods.

EasyEdit hands ``apply_*_to_model`` dicts with ``prompt`` (subject already filled
in), ``target_new`` (a string) and ``subject``; ROME-style data uses a ``{}``
placeholder and ``{"str": ...}`` targets.  Both are accepted.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Mapping, Sequence, Tuple

import torch
from transformers import PreTrainedTokenizerBase


class RequestError(ValueError):
    """An edit request that cannot be applied, with the reason."""


@dataclass(frozen=True)
class EditRequest:
    prompt: str  # subject filled in
    subject: str
    target: str  # target_new with the leading space the continuation needs

    @property
    def kl_prompt(self) -> str:
        return f"{self.subject} is a"


def _text(value: Any) -> str:
    if isinstance(value, Mapping):
        value = value.get("str")
    return value if isinstance(value, str) else ""


def normalise_request(request: Mapping[str, Any]) -> EditRequest:
    prompt = _text(request.get("prompt"))
    subject = _text(request.get("subject"))
    target = _text(request.get("target_new"))
    if not prompt.strip():
        raise RequestError(f"edit request has an empty prompt: {dict(request)!r}")
    if not subject.strip():
        raise RequestError(f"edit request has no subject: prompt {prompt!r}")
    if not target.strip():
        raise RequestError(f"edit request has an empty target_new: prompt {prompt!r}")
    # CounterFact-style templates hold one "{}" for the subject; other braces are literal text.
    placeholders = prompt.count("{}")
    if placeholders > 1:
        raise RequestError(f"prompt {prompt!r} has {placeholders} '{{}}' placeholders; a template takes one, the subject")
    prompt = prompt.replace("{}", subject)
    if subject not in prompt:
        raise RequestError(f"subject {subject!r} does not occur in prompt {prompt!r}")
    return EditRequest(prompt=prompt, subject=subject, target=continuation(target))


def normalise_requests(requests: Sequence[Mapping[str, Any]]) -> List[EditRequest]:
    if not requests:
        raise RequestError("no edit requests given")
    return [normalise_request(r) for r in requests]


def continuation(text: str) -> str:
    """Targets continue a prompt, so they start with a space (EasyEdit/ROME convention)."""
    return text if text.startswith(" ") else " " + text


def encode(tok: PreTrainedTokenizerBase, text: str) -> List[int]:
    return tok(text)["input_ids"]


def encode_target(tok: PreTrainedTokenizerBase, text: str) -> List[int]:
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise RequestError(f"target {text!r} tokenises to nothing")
    return ids


def subject_last_index(tok: PreTrainedTokenizerBase, text: str, subject: str) -> int:
    """Index of the last token of the last occurrence of ``subject`` in ``text``."""
    start = text.rfind(subject)
    if start < 0:
        raise RequestError(f"subject {subject!r} does not occur in {text!r}")
    end = start + len(subject)
    if getattr(tok, "is_fast", False):
        enc = tok(text, return_offsets_mapping=True)
        last = -1
        for i, (a, b) in enumerate(enc["offset_mapping"]):
            if b > a and a < end:
                last = i
        if last >= 0:
            return last
    return len(encode(tok, text[:end])) - 1


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists: positions computed on the unpadded ids stay valid."""
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def pad_id(tok: PreTrainedTokenizerBase) -> int:
    if tok.pad_token_id is not None:
        return int(tok.pad_token_id)
    if tok.eos_token_id is not None:
        return int(tok.eos_token_id)
    return 0

