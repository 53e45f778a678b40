"""Ordinary text for statistics and training, offline when needed.

Used by NMKE's null-space statistics (``mom2_dataset``) and by MicroEdit's SAE
training and calibration.  A corpus name is resolved in this order:

1. a path to a text file or a directory of ``*.txt`` files;
2. ``wikitext-2`` / ``wikitext`` / ``wikipedia``: a local copy under
   ``$EASYEDIT_NMKE_DATA_DIR`` (``wikitext-2/*.txt``), else the HF dataset when the
   network and the ``datasets`` package allow it, else (with a warning) 3.;
3. ``model-generated``: text the model samples itself (at most ``MAX_GENERATED_TEXTS``
   texts), so the methods work on any offline machine;
4. any other name is a HF hub dataset id; one that cannot be opened is an error, not
   a fallback, so a misspelt corpus never silently becomes another one.

``resolve_corpus`` also returns a description of the corpus actually used (resolved
files, hub name or generated), which callers put into their cache keys.  Hub texts
are streamed only when the returned loader is called, i.e. after the caller has missed
its cache.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import warnings
from pathlib import Path
from typing import Callable, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from .env import hub_reachable

MODEL_GENERATED = "model-generated"
_SEED_PROMPTS = ["The", "In", "A", "It", "When", "This", "He", "She", "There", "One", "After", "According to"]

# Sampling is slow on CPU: a self-generated corpus is capped (~33k tokens), enough for
# a stable d_ff × d_ff second moment on small models.
MAX_GENERATED_TEXTS = 256

# Windows shorter than this are dropped (the tail of a text).
MIN_WINDOW_TOKENS = 8


# Names the plugin knows how to find locally; offline, they fall back to model text.
WELL_KNOWN_CORPORA = ("wikitext-2", "wikitext", "wikipedia")


class CorpusError(ValueError):
    """A corpus setting names nothing that can be read."""


def _looks_like_path(name: str) -> bool:
    return name.endswith(".txt") or name.startswith(("/", ".", "~"))


def _local_text_files(name: str) -> Optional[List[Path]]:
    path = Path(name).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        return files or None
    if name in WELL_KNOWN_CORPORA:
        data_dir = os.environ.get("EASYEDIT_NMKE_DATA_DIR")
        if data_dir:
            folder = Path(data_dir).expanduser() / "wikitext-2"
            files = sorted(folder.glob("*.txt"))
            return files or None
    return None


def _open_hub_dataset(name: str) -> Iterable[dict]:
    """A streaming HF dataset: opening it reads metadata only, the texts come when iterated."""
    from datasets import load_dataset  # optional dependency

    if name in ("wikitext-2", "wikitext"):
        return load_dataset("wikitext", "wikitext-2-raw-v1", split="train", streaming=True)
    if name == "wikipedia":
        return load_dataset("wikimedia/wikipedia", "20231101.en", split="train", streaming=True)
    return load_dataset(name, split="train", streaming=True)


def _read_hub_texts(name: str, records: Iterable[dict], limit: int) -> List[str]:
    texts: List[str] = []
    try:
        for record in records:
            text = record.get("text", "")
            if text.strip():
                texts.append(text)
            if len(texts) >= limit:
                break
    except Exception as exc:  # the connection went away after the dataset opened
        raise CorpusError(f"reading hub dataset {name!r} failed after {len(texts)} texts: {exc}") from exc
    if not texts:
        raise CorpusError(f"hub dataset {name!r} has no non-empty 'text' field in its train split")
    return texts


@contextlib.contextmanager
def seeded_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch's generators for a block and give the caller's random state back afterwards.

    Forks the CPU generator and, on a CUDA model, that device's: ``manual_seed`` reseeds both.
    """
    cuda_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(seed)
        yield


def sampled_continuations(
    model: nn.Module, tok: PreTrainedTokenizerBase, prompts: Sequence[str], max_new_tokens: int, top_k: int
) -> List[str]:
    """Top-k sampled continuations of ``prompts`` (decoded with the prompt); seed with ``seeded_rng``."""
    device = next(model.parameters()).device
    padding_side = tok.padding_side
    tok.padding_side = "left"  # generation continues after the last position
    try:
        enc = tok(list(prompts), return_tensors="pt", padding=True).to(device)
        with torch.no_grad():
            out = model.generate(
                **enc,
                do_sample=True,
                top_k=top_k,
                max_new_tokens=max_new_tokens,
                pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
            )
    finally:
        tok.padding_side = padding_side
    return tok.batch_decode(out, skip_special_tokens=True)


def generate_corpus(
    model: nn.Module, tok: PreTrainedTokenizerBase, n_texts: int, length: int, seed: int = 0
) -> List[str]:
    """Texts sampled from the model itself (seeded), for machines with no corpus at hand."""
    texts: List[str] = []
    batch = 16
    with seeded_rng(seed, next(model.parameters()).device):
        for start in tqdm(range(0, n_texts, batch), desc="generating corpus", leave=False):
            prompts = [_SEED_PROMPTS[(start + i) % len(_SEED_PROMPTS)] for i in range(min(batch, n_texts - start))]
            texts.extend(sampled_continuations(model, tok, prompts, length, top_k=50))
    return texts


def _hub_unavailable() -> Optional[str]:
    """Why the hub cannot be asked for ``name`` (None when it can be)."""
    if not hub_reachable(datasets=True):
        return "the hub is switched off (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)"
    if importlib.util.find_spec("datasets") is None:
        return "the `datasets` package is not installed"
    return None


def resolve_corpus(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    name: str,
    n_samples: int,
    max_length: int,
    setting: str = "dataset",
) -> Tuple[str, Callable[[], List[str]]]:
    """(description of the corpus actually used, function returning its texts).

    ``n_samples`` caps the texts read from the hub and the texts generated (at most
    ``MAX_GENERATED_TEXTS``); ``max_length`` is the length of a generated text in
    tokens.  ``setting`` names the hparams key in the fallback warning.
    """
    if name != MODEL_GENERATED:
        files = _local_text_files(name)
        if files is not None:
            return "files:" + ",".join(str(f.resolve()) for f in files), lambda: [
                f.read_text(encoding="utf-8") for f in files
            ]
        well_known = name in WELL_KNOWN_CORPORA
        if _looks_like_path(name):
            raise CorpusError(f"{setting} {name!r}: no such text file, or a folder without *.txt files")
        reason = _hub_unavailable()
        if reason is None:
            try:
                records = _open_hub_dataset(name)
            except Exception as exc:  # offline, or no such dataset
                reason = f"the HF hub could not open it ({type(exc).__name__}: {exc})"
            else:
                return f"hub:{name}", lambda: _read_hub_texts(name, records, n_samples)
        if not well_known:
            raise CorpusError(
                f"{setting} {name!r} is not a local file or folder, nor a usable hub dataset: {reason}"
            )
        warnings.warn(
            f"{setting} {name!r} has no local copy (set EASYEDIT_NMKE_DATA_DIR to a folder with "
            f"wikitext-2/*.txt) and {reason}; using model-generated text"
        )
    n_texts = min(n_samples, MAX_GENERATED_TEXTS)
    return f"{MODEL_GENERATED}:{n_texts}", lambda: generate_corpus(model, tok, n_texts, max_length)


def corpus_windows(
    texts: Sequence[str], tok: PreTrainedTokenizerBase, window: int, n_samples: int
) -> List[List[int]]:
    """Consecutive token windows of ``window`` tokens from ``texts``, at most ``n_samples``."""
    windows: List[List[int]] = []
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        for start in range(0, max(len(ids) - 1, 1), window):
            chunk = ids[start : start + window]
            if len(chunk) < MIN_WINDOW_TOKENS:
                continue
            windows.append(chunk)
            if len(windows) >= n_samples:
                return windows
    return windows
