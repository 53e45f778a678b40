"""Null-space projectors of preserved knowledge (AlphaEdit), with an offline text corpus.

For each edit layer the uncentred second moment of the FFN keys over a text corpus,
E[k kᵀ], is eigendecomposed; directions whose eigenvalue is below
``nullspace_threshold`` are ones ordinary text barely uses, and the projector P onto
them keeps updates from disturbing what the model already knows.

Corpus (``mom2_dataset``), resolved in this order:
1. a path to a text file or a directory of ``*.txt`` files;
2. ``wikitext-2`` / ``wikipedia``: a local copy under ``$EASYEDIT_NMKE_DATA_DIR``
   (``wikitext-2/*.txt``), else the HF dataset when the network allows it;
3. ``model-generated`` (also the fallback when nothing else is reachable): text the
   model samples itself (at most ``MAX_GENERATED_TEXTS`` texts), so the method works
   on any offline machine.
The second moment is cached on disk, keyed by model, layer, the corpus actually used
(resolved files, hub name or generated) and sample count.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from ...util import nethook
from ...util.model_loader import cache_root
from ...util.requests import pad_batch, pad_id
from .nmke_hparams import NMKEHyperParams

MODEL_GENERATED = "model-generated"
_SEED_PROMPTS = ["The", "In", "A", "It", "When", "This", "He", "She", "There", "One", "After", "According to"]


def stats_directory(hparams: NMKEHyperParams) -> Path:
    return Path(hparams.stats_dir).expanduser() if hparams.stats_dir else cache_root() / "stats"


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


def generate_corpus(
    model: nn.Module, tok: PreTrainedTokenizerBase, n_texts: int, length: int, seed: int = 0
) -> List[str]:
    """Texts sampled from the model itself (seeded), for machines with no corpus at hand."""
    device = next(model.parameters()).device
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    texts: List[str] = []
    padding_side = tok.padding_side
    tok.padding_side = "left"
    try:
        batch = 16
        for start in tqdm(range(0, n_texts, batch), desc="generating corpus", leave=False):
            prompts = [_SEED_PROMPTS[(start + i) % len(_SEED_PROMPTS)] for i in range(min(batch, n_texts - start))]
            enc = tok(prompts, return_tensors="pt", padding=True).to(device)
            with torch.no_grad():
                out = model.generate(
                    **enc,
                    do_sample=True,
                    top_k=50,
                    max_new_tokens=length,
                    pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
                )
            texts.extend(tok.batch_decode(out, skip_special_tokens=True))
    finally:
        tok.padding_side = padding_side
        torch.random.set_rng_state(generator_state)
    return texts


# Sampling is slow on CPU: a self-generated corpus is capped (~33k tokens), enough for
# a stable d_ff × d_ff second moment on small models.
MAX_GENERATED_TEXTS = 256


def _hub_reachable() -> bool:
    return not (os.environ.get("HF_HUB_OFFLINE") or os.environ.get("HF_DATASETS_OFFLINE"))


def resolve_corpus(
    model: nn.Module, tok: PreTrainedTokenizerBase, hparams: NMKEHyperParams
) -> Tuple[str, Callable[[], List[str]]]:
    """(description of the corpus actually used, function returning its texts)."""
    name = hparams.mom2_dataset
    if name != MODEL_GENERATED:
        files = _local_text_files(name)
        if files is not None:
            return "files:" + ",".join(str(f.resolve()) for f in files), lambda: [
                f.read_text(encoding="utf-8") for f in files
            ]
        texts = _hub_texts(name, hparams.mom2_n_samples) if _hub_reachable() else None
        if texts is not None:
            return f"hub:{name}", lambda: texts
        warnings.warn(
            f"mom2_dataset {name!r} is neither a local file nor reachable online "
            f"(set EASYEDIT_NMKE_DATA_DIR to a folder with wikitext-2/*.txt); using model-generated text"
        )
    n_texts = min(hparams.mom2_n_samples, MAX_GENERATED_TEXTS)
    return f"{MODEL_GENERATED}:{n_texts}", lambda: generate_corpus(model, tok, n_texts, hparams.mom2_max_length)


def corpus_windows(texts: Sequence[str], tok: PreTrainedTokenizerBase, hparams: NMKEHyperParams) -> List[List[int]]:
    """Token windows of ``mom2_max_length`` from ``texts``, at most ``mom2_n_samples``."""
    window = hparams.mom2_max_length
    windows: List[List[int]] = []
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        for start in range(0, max(len(ids) - 1, 1), window):
            chunk = ids[start : start + window]
            if len(chunk) < 8:
                continue
            windows.append(chunk)
            if len(windows) >= hparams.mom2_n_samples:
                return windows
    return windows


def _cache_key(model: nn.Module, hparams: NMKEHyperParams, layer: int, corpus: str) -> str:
    description = {
        "model": hparams.model_name,
        "arch": type(model).__name__,
        "module": hparams.rewrite_module_tmp.format(layer),
        "corpus": corpus,
        "n": hparams.mom2_n_samples,
        "len": hparams.mom2_max_length,
    }
    digest = hashlib.sha1(json.dumps(description, sort_keys=True).encode()).hexdigest()[:16]
    safe_model = "".join(c if c.isalnum() or c in "-_." else "_" for c in hparams.model_name)[-60:]
    return f"{safe_model}/layer{layer}_{digest}"


def key_second_moments(
    model: nn.Module, tok: PreTrainedTokenizerBase, hparams: NMKEHyperParams, layers: Sequence[int]
) -> Dict[int, torch.Tensor]:
    """E[k kᵀ] of the FFN keys at each layer, from the disk cache or one pass over the corpus."""
    directory = stats_directory(hparams)
    corpus, load_texts = resolve_corpus(model, tok, hparams)
    result: Dict[int, torch.Tensor] = {}
    missing = []
    for layer in layers:
        path = directory / f"{_cache_key(model, hparams, layer, corpus)}.safetensors"
        if path.is_file():
            result[layer] = load_file(str(path))["mom2"]
        else:
            missing.append(layer)
    if not missing:
        return result
    device = next(model.parameters()).device
    names = {layer: hparams.rewrite_module_tmp.format(layer) for layer in missing}
    sums = {layer: None for layer in missing}
    count = 0
    top_block = hparams.layer_module_tmp.format(max(missing))

    windows = corpus_windows(load_texts(), tok, hparams)
    if not windows:
        raise ValueError(f"mom2_dataset {hparams.mom2_dataset!r} yielded no text")
    batch = 16
    with nethook.stop_after(model, top_block):
        for start in tqdm(range(0, len(windows), batch), desc=f"key statistics, layers {missing}", leave=False):
            input_ids, attention_mask = pad_batch(windows[start : start + batch], pad_id(tok))
            valid = attention_mask.bool().to(device)
            with torch.no_grad(), nethook.capture(model, list(names.values()), inputs=True) as record:
                try:
                    model.base_model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device))
                except nethook.StopForward:
                    pass
            for layer, name in names.items():
                keys = record[name][valid].float()
                # fp32 products of a few thousand tokens, summed in fp64 across batches.
                moment = (keys.T @ keys).double()
                sums[layer] = moment if sums[layer] is None else sums[layer] + moment
            count += int(valid.sum())
    for layer in missing:
        mom2 = (sums[layer] / count).float().cpu()
        path = directory / f"{_cache_key(model, hparams, layer, corpus)}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"mom2": mom2}, str(path), metadata={"tokens": str(count), "corpus": corpus[:500]})
        result[layer] = mom2
    return result


def null_space_projector(mom2: torch.Tensor, threshold: float) -> torch.Tensor:
    """Projector onto the eigen-directions of ``mom2`` with eigenvalue below ``threshold``."""
    eigenvalues, eigenvectors = torch.linalg.eigh(mom2.double())
    basis = eigenvectors[:, eigenvalues < threshold]
    return (basis @ basis.T).float()
