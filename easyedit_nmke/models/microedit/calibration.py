"""The switch threshold τ: mean ARD of the unedited SAE over ordinary text (the paper's rule),
and the latents' firing density on the same text (for ``max_latent_density``).

ARD is inversely proportional to α, so the cache (keyed by the SAE's weights, the
model, the corpus actually used, the sample count and window length and the
massive-norm factor) holds α·τ and changing α costs no recalibration.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import List, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from ...util import nethook
from ...util.corpus import corpus_windows, resolve_corpus
from ...util.model_loader import cache_root
from ...util.requests import pad_batch, pad_id
from .activations import ordinary_positions
from .microedit_hparams import MicroEditHyperParams
from .sae_hook import SAESwitch, reconstruction_distance, sae_reconstruction


def block_output_off(
    model: nn.Module, switch: SAESwitch, layer_name: str, ids: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Output of block ``layer_name`` with the SAE bypassed; the blocks above are not run."""
    with switch.mode_set("off"), nethook.capture(model, [layer_name]) as record, nethook.stop_after(model, layer_name):
        try:
            with torch.no_grad():
                model.base_model(input_ids=ids, attention_mask=mask)
        except nethook.StopForward:
            pass
    return record[layer_name]


def input_ard(
    model: nn.Module,
    switch: SAESwitch,
    layer_name: str,
    sequences: Sequence[Sequence[int]],
    pad: int,
    batch_size: int = 16,
    progress: bool = False,
) -> List[float]:
    """ARD of the SAE as it is now on each token sequence (the block output, SAE bypassed)."""
    device = switch.sae.W_dec.device
    values: List[float] = []
    starts = range(0, len(sequences), batch_size)
    for start in tqdm(starts, desc="ARD", disable=not progress, leave=False):
        ids, mask = pad_batch(sequences[start : start + batch_size], pad)
        ids, mask = ids.to(device), mask.to(device)
        hidden = block_output_off(model, switch, layer_name, ids, mask)
        ordinary = ordinary_positions(hidden, switch.massive_norm_factor, mask)
        with torch.no_grad():
            recon = sae_reconstruction(switch.sae, hidden)
        values.extend(reconstruction_distance(hidden, recon, ordinary, switch.alpha).tolist())
    return values


def _sae_digest(sae: nn.Module) -> str:
    digest = hashlib.sha1()
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        tensor = getattr(sae, name).detach().float().cpu()
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(f"{tensor.sum().item():.6e}/{tensor.abs().sum().item():.6e}".encode())
    return digest.hexdigest()


def _calibration_corpus(model: nn.Module, tok: PreTrainedTokenizerBase, switch: SAESwitch, hparams: MicroEditHyperParams):
    """The calibration corpus, its cache key (SAE, model, corpus, sample count, ...) and its windows (lazy)."""
    layer_name = hparams.layer_module_tmp.format(hparams.layer)
    description, texts = resolve_corpus(
        model,
        tok,
        hparams.calibration_dataset,
        hparams.calibration_samples,
        hparams.calibration_max_length,
        setting="calibration_dataset",
    )
    key = [
        hparams.model_name,
        _sae_digest(switch.sae),
        getattr(switch.sae.cfg, "k", None),  # sae_k changes the SAE without changing its weights
        layer_name,
        description,
        hparams.calibration_samples,
        hparams.calibration_max_length,
        switch.massive_norm_factor,
    ]

    def windows() -> List[List[int]]:
        found = corpus_windows(texts(), tok, hparams.calibration_max_length, hparams.calibration_samples)
        if not found:
            raise ValueError(f"calibration corpus {description!r} gave no text windows")
        return found

    return layer_name, key, windows


def _cache_path(key: list, suffix: str) -> Path:
    digest = hashlib.sha1(json.dumps(key).encode()).hexdigest()
    return cache_root() / "microedit_calibration" / (digest + suffix)


def calibrate_threshold(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    switch: SAESwitch,
    hparams: MicroEditHyperParams,
    progress: bool = True,
) -> float:
    """τ = mean ARD of the (unedited) SAE over ``calibration_samples`` windows of ordinary text."""
    layer_name, key, windows = _calibration_corpus(model, tok, switch, hparams)
    cache = _cache_path(key, ".json")
    if cache.is_file():
        return float(json.loads(cache.read_text())["alpha_times_threshold"]) / switch.alpha
    values = [v for v in input_ard(model, switch, layer_name, windows(), pad_id(tok), progress=progress) if v != float("inf")]
    threshold = float(sum(values) / len(values))
    cache.parent.mkdir(parents=True, exist_ok=True)
    record = {"key": key, "alpha_times_threshold": threshold * switch.alpha, "samples": len(values)}
    cache.write_text(json.dumps(record, indent=1))
    return threshold


def latent_density(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    switch: SAESwitch,
    hparams: MicroEditHyperParams,
    batch_size: int = 16,
    progress: bool = True,
) -> torch.Tensor:
    """Share of the calibration corpus' ordinary tokens on which each latent fires: [d_sae].

    Depends only on the model and the SAE encoder, neither of which an edit changes,
    so it is computed once per SAE and cached beside τ.
    """
    layer_name, key, windows = _calibration_corpus(model, tok, switch, hparams)
    cache = _cache_path(key, "-density.safetensors")
    if cache.is_file():
        return load_file(str(cache))["density"]
    sae = switch.sae
    device = sae.W_dec.device
    sequences = windows()
    fired = torch.zeros(sae.W_dec.shape[0], dtype=torch.float64)
    tokens = 0
    for start in tqdm(range(0, len(sequences), batch_size), desc="latent density", disable=not progress, leave=False):
        ids, mask = pad_batch(sequences[start : start + batch_size], pad_id(tok))
        hidden = block_output_off(model, switch, layer_name, ids.to(device), mask.to(device))
        ordinary = ordinary_positions(hidden, switch.massive_norm_factor, mask.to(device))
        with torch.no_grad():
            acts = sae.encode(hidden.to(sae.W_dec.dtype))[ordinary]
        fired += (acts != 0).sum(0).double().cpu()
        tokens += acts.shape[0]
    density = (fired / max(tokens, 1)).float()
    cache.parent.mkdir(parents=True, exist_ok=True)
    save_file({"density": density.contiguous()}, str(cache))
    return density
