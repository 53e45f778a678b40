"""Ordinary text for statistics and training, offline when needed.

Used by NMKE's null-space statistics (``mom2_dataset``) and by MicroEdit's SAE
training and calibration.  A corpus name is resolved in this order:

1. a path to a text file or a directory of ``*.txt`` files;
2. ``wikitext-2`` / ``wikipedia``: a local copy under ``$EASYEDIT_NMKE_DATA_DIR``
   (``wikitext-2/*.txt``), else the HF dataset when the network allows it;
3. ``model-generated`` (also the fallback when nothing else is reachable): text the
   model samples itself (at most ``MAX_GENERATED_TEXTS`` texts), so the methods work
   on any offline machine.

``resolve_corpus`` also returns a description of the corpus actually used (resolved
files, hub name or generated), which callers put into their cache keys.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

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


def _local_text_files(name: str) -> Optional[List[Path]]:
    path = Path(name).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        return files or None
    if name in ("wikitext-2", "wikitext", "wikipedia"):
        data_dir = os.environ.get("EASYEDIT_NMKE_DATA_DIR")
        if data_dir:
            folder = Path(data_dir).expanduser() / "wikitext-2"
            files = sorted(folder.glob("*.txt"))
            return files or None
    return None


def _hub_texts(name: str, limit: int) -> Optional[List[str]]:
    try:
        from datasets import load_dataset  # optional dependency
    except ImportError:
        return None
    try:
        if name in ("wikitext-2", "wikitext"):
            ds = load_dataset("wikitext", "wikitext-2-raw-v1", split="train")
        elif name == "wikipedia":
            ds = load_dataset("wikimedia/wikipedia", "20231101.en", split="train", streaming=True)
        else:
            ds = load_dataset(name, split="train", streaming=True)
    except Exception:  # offline or unknown dataset: fall back to the model's own text
        return None
    texts = []
    for record in ds:
        text = record.get("text", "")
        if text.strip():
            texts.append(text)
        if len(texts) >= limit:
            break
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
        texts = _hub_texts(name, n_samples) if hub_reachable(datasets=True) else None
        if texts is not None:
            return f"hub:{name}", lambda: texts
        warnings.warn(
            f"{setting} {name!r} is neither a local file nor reachable online "
            f"(set EASYEDIT_NMKE_DATA_DIR to a folder with wikitext-2/*.txt); using model-generated text"
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
