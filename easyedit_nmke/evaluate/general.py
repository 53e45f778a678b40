"""General capability before and after a lifelong run, and how far the weights moved.

* **MMLU** accuracy on a fixed, seeded subset of the test questions: zero-shot
  prompt (subject line, question, the four choices as ``A.``-``D.``, ``Answer:``);
  the prediction is the letter among `` A``/`` B``/`` C``/`` D`` with the highest
  next-token log-probability.  Data: the CSV layout of ``shared/data/mmlu``
  (``test/<subject>_test.csv`` with header ``question,choice0..choice3,answer``,
  answer a 0-3 index); a folder of such CSVs is also accepted.
* **WikiText-2 perplexity** over the first ``windows`` non-overlapping windows of
  ``window_tokens`` tokens of a text file (``wikitext-2/test.txt``): exp of the
  mean next-token NLL over every predicted token.
* **Weight drift** per edited parameter: ``‖W_after − W_before‖ / ‖W_before‖``
  (Frobenius) and the share of entries that changed at all.

The defaults (48 questions, 12 windows of 256 tokens) took 54 s per evaluation on
SmolLM2-135M with one CPU thread while the other core was busy (64 questions + 16
windows: 74-79 s), so before + after stay under two minutes.  48 questions only detect
large losses (standard error ~0.065 at 30 % accuracy): raise ``mmlu_n`` for finer
comparisons.
"""
from __future__ import annotations

import csv
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..util import nethook
from ..util.model_parts import logits_at
from ..util.requests import encode, pad_batch, pad_id

LETTERS = ("A", "B", "C", "D")


@dataclass
class GeneralConfig:
    mmlu_dir: Optional[str] = None  # folder with test/*.csv (or *.csv); None: skip MMLU
    mmlu_n: int = 48
    wikitext: Optional[str] = None  # a text file (wikitext-2/test.txt); None: skip perplexity
    wikitext_windows: int = 12
    window_tokens: int = 256
    seed: int = 0
    batch_size: int = 1  # 1 is fastest on CPU (no padding); raise it on a GPU

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @property
    def enabled(self) -> bool:
        return bool(self.mmlu_dir and self.mmlu_n > 0) or bool(self.wikitext and self.wikitext_windows > 0)


def default_general_config(data_dir: Optional[Union[str, Path]], **overrides: Any) -> GeneralConfig:
    """MMLU and WikiText-2 from a data folder laid out like ``shared/data`` (when present)."""
    config = GeneralConfig()
    if data_dir is not None:
        data_dir = Path(data_dir).expanduser()
        if (data_dir / "mmlu").is_dir():
            config.mmlu_dir = str(data_dir / "mmlu")
        if (data_dir / "wikitext-2" / "test.txt").is_file():
            config.wikitext = str(data_dir / "wikitext-2" / "test.txt")
    for key, value in overrides.items():
        if value is not None:
            setattr(config, key, value)
    return config


# ----------------------------------------------------------------------------------
# MMLU
# ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class MMLUItem:
    subject: str
    question: str
    choices: Tuple[str, str, str, str]
    answer: int


def _mmlu_files(folder: Path) -> List[Path]:
    test = folder / "test"
    files = sorted(test.glob("*.csv")) if test.is_dir() else []
    return files or sorted(folder.glob("*.csv"))


def load_mmlu(folder: Union[str, Path], n: int, seed: int = 0) -> List[MMLUItem]:
    """``n`` questions drawn with ``random.Random(seed)`` from all subjects, in file order."""
    folder = Path(folder)
    files = _mmlu_files(folder)
    if not files:
        raise FileNotFoundError(f"no MMLU CSV files in {folder} (expected test/<subject>_test.csv)")
    items: List[MMLUItem] = []
    for path in files:
        subject = path.stem
        for suffix in ("_test", "_dev", "_val"):
            if subject.endswith(suffix):
                subject = subject[: -len(suffix)]
        with open(path, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                choices = tuple(str(row[f"choice{i}"]) for i in range(4))
                items.append(MMLUItem(subject.replace("_", " "), row["question"], choices, int(row["answer"])))
    if n >= len(items):
        return items
    chosen = sorted(random.Random(seed).sample(range(len(items)), n))
    return [items[i] for i in chosen]


def mmlu_prompt(item: MMLUItem) -> str:
    lines = [f"The following is a multiple choice question about {item.subject}.", "", item.question]
    lines += [f"{letter}. {choice}" for letter, choice in zip(LETTERS, item.choices)]
    lines.append("Answer:")
    return "\n".join(lines)


def _letter_ids(tok: PreTrainedTokenizerBase) -> List[int]:
    ids = []
    for letter in LETTERS:
        pieces = tok(" " + letter, add_special_tokens=False)["input_ids"]
        ids.append(pieces[-1])
    if len(set(ids)) != len(ids):
        raise ValueError(f"the answer letters do not map to distinct tokens: {ids}")
    return ids


def mmlu_accuracy(
    model: nn.Module, tok: PreTrainedTokenizerBase, items: Sequence[MMLUItem], batch_size: int = 4
) -> Dict[str, Any]:
    letters = torch.tensor(_letter_ids(tok))
    device = next(model.parameters()).device
    correct = 0
    encoded = sorted(((encode(tok, mmlu_prompt(item)), item) for item in items), key=lambda x: len(x[0]))
    for start in range(0, len(encoded), batch_size):  # similar lengths together: little padding
        sequences = [ids for ids, _ in encoded[start : start + batch_size]]
        chunk = [item for _, item in encoded[start : start + batch_size]]
        ids, mask = pad_batch(sequences, pad_id(tok))
        rows = torch.arange(len(chunk))
        cols = torch.tensor([len(s) - 1 for s in sequences])
        with torch.no_grad():
            logits = logits_at(model, ids.to(device), mask.to(device), rows.to(device), cols.to(device)).float().cpu()
        predicted = logits[:, letters].argmax(-1)
        correct += sum(int(p) == item.answer for p, item in zip(predicted, chunk))
    return {"accuracy": correct / len(items) if items else None, "n": len(items)}


# ----------------------------------------------------------------------------------
# WikiText-2 perplexity
# ----------------------------------------------------------------------------------
def wikitext_windows(
    tok: PreTrainedTokenizerBase, path: Union[str, Path], windows: int, window_tokens: int
) -> List[List[int]]:
    text = Path(path).read_text(encoding="utf-8")
    # Tokenise only as much text as the windows need (4 characters per token is generous).
    budget = windows * window_tokens * 8
    ids = tok(text[:budget], add_special_tokens=False)["input_ids"]
    out = [ids[i : i + window_tokens] for i in range(0, len(ids) - window_tokens + 1, window_tokens)][:windows]
    if not out:
        raise ValueError(f"{path} is shorter than one window of {window_tokens} tokens")
    return out


def perplexity(
    model: nn.Module, tok: PreTrainedTokenizerBase, windows: Sequence[Sequence[int]], batch_size: int = 4
) -> Dict[str, Any]:
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        ids = torch.tensor([list(w) for w in windows[start : start + batch_size]], device=device)
        with torch.no_grad():
            logits = model(input_ids=ids).logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
        )
        nll += float(loss)
        count += ids[:, 1:].numel()
    return {"perplexity": math.exp(nll / count), "windows": len(windows), "tokens": count}


# ----------------------------------------------------------------------------------
# Both, and weight drift
# ----------------------------------------------------------------------------------
def evaluate_general(model: nn.Module, tok: PreTrainedTokenizerBase, config: GeneralConfig) -> Dict[str, Any]:
    """MMLU accuracy and WikiText-2 perplexity of ``model`` now (keys absent when not configured)."""
    start = time.perf_counter()
    out: Dict[str, Any] = {}
    if config.mmlu_dir and config.mmlu_n > 0:
        out["mmlu"] = mmlu_accuracy(model, tok, load_mmlu(config.mmlu_dir, config.mmlu_n, config.seed), config.batch_size)
    if config.wikitext and config.wikitext_windows > 0:
        windows = wikitext_windows(tok, config.wikitext, config.wikitext_windows, config.window_tokens)
        out["wikitext_ppl"] = perplexity(model, tok, windows, config.batch_size)
    out["seconds"] = time.perf_counter() - start
    return out


def snapshot(model: nn.Module, names: Iterable[str]) -> Dict[str, torch.Tensor]:
    """CPU copies of the named parameters (the reference for :func:`weight_drift`)."""
    return {name: nethook.get_parameter(model, name).detach().to("cpu", copy=True) for name in names}


def weight_drift(model: nn.Module, before: Dict[str, torch.Tensor]) -> Dict[str, Any]:
    """Per parameter: relative Frobenius change and share of changed entries; plus the total."""
    out: Dict[str, Any] = {}
    total_delta, total_norm, changed, entries = 0.0, 0.0, 0, 0
    for name, old in before.items():
        try:
            new = nethook.get_parameter(model, name).detach().to("cpu")
        except LookupError:
            out[name] = {"missing": True}  # replaced (e.g. by an adapter module)
            continue
        delta = (new.double() - old.double())
        norm = float(old.double().norm())
        delta_norm = float(delta.norm())
        n_changed = int((new != old).sum())
        out[name] = {
            "rel_norm": delta_norm / norm if norm > 0 else None,
            "changed_share": n_changed / old.numel(),
        }
        total_delta += delta_norm**2
        total_norm += norm**2
        changed += n_changed
        entries += old.numel()
    if entries:
        out["_total"] = {
            "rel_norm": math.sqrt(total_delta) / math.sqrt(total_norm) if total_norm > 0 else None,
            "changed_share": changed / entries,
        }
    return out
