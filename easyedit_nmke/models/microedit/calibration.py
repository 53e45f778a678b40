"""The switch threshold τ: mean ARD of the unedited SAE over ordinary text (the paper's rule).

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
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from ...util import nethook
from ...util.corpus import corpus_windows, resolve_corpus
from ...util.env import cache_root
from ...util.requests import pad_batch, pad_id
from .activations import ordinary_positions
from .microedit_hparams import MicroEditHyperParams
from .sae_hook import SAESwitch, reconstruction_distance, sae_reconstruction


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
        with switch.mode_set("off"), nethook.capture(model, [layer_name]) as record, nethook.stop_after(
            model, layer_name
        ):
            with torch.no_grad():
                model.base_model(input_ids=ids, attention_mask=mask)
        hidden = record[layer_name]
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


def calibrate_threshold(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    switch: SAESwitch,
    hparams: MicroEditHyperParams,
    progress: bool = True,
) -> float:
    """τ = mean ARD of the (unedited) SAE over ``calibration_samples`` windows of ordinary text."""
    layer_name = hparams.layer_module_tmp.format(hparams.layer)
    description, texts = resolve_corpus(
        model,
        tok,
        hparams.calibration_dataset,
        hparams.calibration_samples,
        hparams.calibration_max_length,
        setting="calibration_dataset",
    )
    key = json.dumps(
        [
            hparams.model_name,
            _sae_digest(switch.sae),
            getattr(switch.sae.cfg, "k", None),  # sae_k changes the SAE without changing its weights
            layer_name,
            description,
            hparams.calibration_samples,
            hparams.calibration_max_length,
            switch.massive_norm_factor,
        ]
    )
    cache = cache_root() / "microedit_calibration" / (hashlib.sha1(key.encode()).hexdigest() + ".json")
    if cache.is_file():
        return float(json.loads(cache.read_text())["alpha_times_threshold"]) / switch.alpha
    windows = corpus_windows(texts(), tok, hparams.calibration_max_length, hparams.calibration_samples)
    if not windows:
        raise ValueError(f"calibration corpus {description!r} gave no text windows")
    values = [v for v in input_ard(model, switch, layer_name, windows, pad_id(tok), progress=progress) if v != float("inf")]
    if not values:
        raise ValueError(
            f"every calibration window's ARD is infinite (massive activations at every position, "
            f"massive_norm_factor {switch.massive_norm_factor}): set ard_threshold in the hparams or raise the factor"
        )
    threshold = float(sum(values) / len(values))
    cache.parent.mkdir(parents=True, exist_ok=True)
    record = {"key": json.loads(key), "alpha_times_threshold": threshold * switch.alpha, "samples": len(values)}
    cache.write_text(json.dumps(record, indent=1))
    return threshold
