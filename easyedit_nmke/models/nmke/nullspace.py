"""Null-space projectors of preserved knowledge (AlphaEdit), with an offline text corpus.

For each edit layer the uncentred second moment of the FFN keys over a text corpus,
E[k kᵀ], is eigendecomposed; directions whose eigenvalue is below
``nullspace_threshold`` are ones ordinary text barely uses, and the projector P onto
them keeps updates from disturbing what the model already knows.

Corpus (``mom2_dataset``): resolved by ``easyedit_nmke.util.corpus`` (a local file or
folder, WikiText-2 under ``$EASYEDIT_NMKE_DATA_DIR`` or from the hub, else text the
model writes itself).
The second moment is cached on disk, keyed by model, layer, the corpus actually used
(resolved files, hub name or generated), sample count and (when not float32) ``mom2_dtype``.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from ...util import corpus as text_corpus
from ...util import nethook
from ...util.corpus import MAX_GENERATED_TEXTS, MODEL_GENERATED, generate_corpus  # noqa: F401  (re-exported)
from ...util.env import cache_root
from ...util.requests import pad_batch, pad_id
from .nmke_hparams import NMKEHyperParams


def stats_directory(hparams: NMKEHyperParams) -> Path:
    return Path(hparams.stats_dir).expanduser() if hparams.stats_dir else cache_root() / "stats"


def resolve_corpus(
    model: nn.Module, tok: PreTrainedTokenizerBase, hparams: NMKEHyperParams
) -> Tuple[str, Callable[[], List[str]]]:
    """(description of the corpus actually used, function returning its texts)."""
    return text_corpus.resolve_corpus(
        model, tok, hparams.mom2_dataset, hparams.mom2_n_samples, hparams.mom2_max_length, setting="mom2_dataset"
    )


def corpus_windows(texts: Sequence[str], tok: PreTrainedTokenizerBase, hparams: NMKEHyperParams) -> List[List[int]]:
    """Token windows of ``mom2_max_length`` from ``texts``, at most ``mom2_n_samples``."""
    return text_corpus.corpus_windows(texts, tok, hparams.mom2_max_length, hparams.mom2_n_samples)


def _cache_key(model: nn.Module, hparams: NMKEHyperParams, layer: int, corpus: str) -> str:
    description = {
        "model": hparams.model_name,
        "arch": type(model).__name__,
        "module": hparams.rewrite_module_tmp.format(layer),
        "corpus": corpus,
        "n": hparams.mom2_n_samples,
        "len": hparams.mom2_max_length,
    }
    if hparams.mom2_dtype != "float32":  # float32 files predate the option: their keys stay valid
        description["dtype"] = hparams.mom2_dtype
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
    for start in tqdm(range(0, len(windows), batch), desc=f"key statistics, layers {missing}", leave=False):
        input_ids, attention_mask = pad_batch(windows[start : start + batch], pad_id(tok))
        valid = attention_mask.bool().to(device)
        with torch.no_grad(), nethook.capture(model, list(names.values()), inputs=True) as record, nethook.stop_after(
            model, top_block
        ):
            model.base_model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device))
        for layer, name in names.items():
            keys = record[name][valid].float()
            # fp32 products of a few thousand tokens, summed in fp64 across batches.
            moment = (keys.T @ keys).double()
            sums[layer] = moment if sums[layer] is None else sums[layer] + moment
        count += int(valid.sum())
    for layer in missing:
        mom2 = (sums[layer] / count).to(getattr(torch, hparams.mom2_dtype)).cpu()
        path = directory / f"{_cache_key(model, hparams, layer, corpus)}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"mom2": mom2}, str(path), metadata={"tokens": str(count), "corpus": corpus[:500]})
        result[layer] = mom2
    return result


def null_space_basis(mom2: torch.Tensor, threshold: float) -> torch.Tensor:
    """Orthonormal basis [n, r] (fp32) of the eigen-directions of ``mom2`` with eigenvalue below ``threshold``.

    The eigendecomposition runs in ``mom2``'s own precision (``mom2_dtype``): an fp64
    decomposition of fp32-stored moments only resolves their rounding.  On SmolLM2
    (layer 6, a 1,032-neuron mask) the fp32 solve differs from the fp64 one by 5e-6 and
    leaks 4e-7 of the update into directions with eigenvalue ≥ 1.5 × threshold, at 0.56×
    the time (benchmarks/README.md, "The masked solve in fp32").
    """
    eigenvalues, eigenvectors = torch.linalg.eigh(mom2)
    return eigenvectors[:, eigenvalues < threshold].float()


def null_space_projector(mom2: torch.Tensor, threshold: float) -> torch.Tensor:
    """Projector onto the eigen-directions of ``mom2`` with eigenvalue below ``threshold``."""
    basis = null_space_basis(mom2, threshold).double()
    return (basis @ basis.T).float()


def cache_in_basis(basis: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
    """Bᵀ C B: the accumulated edit keys C seen in the coordinates of the null-space basis B."""
    return basis.T @ (cache @ basis)


def occupied_directions(basis_cache: torch.Tensor, l2: float) -> int:
    """Null-space directions on which earlier edits' keys outweigh the solve's ``L2``.

    ``basis_cache`` is Bᵀ C B; an eigen-direction above ``L2`` is one a new update must
    leave nearly alone for the earlier edits' sake.
    """
    return int((torch.linalg.eigvalsh(basis_cache.double()) > l2).sum())


def solve_in_null_space(basis: torch.Tensor, basis_cache: torch.Tensor, keys: torch.Tensor, l2: float) -> torch.Tensor:
    """AlphaEdit's x = (P(K Kᵀ + C) + l2·I)⁻¹ P K, solved in the coordinates of P's basis B.

    With P = B Bᵀ, x lies in range(B) (l2·x = P(K − (K Kᵀ + C)x)), so x = B y with
    (Bᵀ(K Kᵀ + C)B + l2·I) y = Bᵀ K: an r × r symmetric positive-definite system
    (Cholesky) instead of a general n × n one.  ``basis_cache`` is Bᵀ C B
    (``cache_in_basis(basis, C)``).  Returns x, [n, n_keys].
    """
    basis_keys = basis.T @ keys  # [r, n_keys]
    lhs = (basis_cache + basis_keys @ basis_keys.T).double()
    lhs.diagonal().add_(l2)
    if not torch.isfinite(lhs).all():
        raise ValueError("the null-space system is not finite (NaN/inf in the accumulated or new keys)")
    factor, info = torch.linalg.cholesky_ex(lhs)
    if int(info) == 0:
        return basis @ torch.cholesky_solve(basis_keys.double(), factor).float()
    if l2 <= 0:
        raise ValueError(
            f"the null-space system (r = {lhs.shape[0]}) is not positive definite, so the update is not "
            f"unique: L2 = {l2} with fewer independent keys than null-space directions; use L2 > 0"
        )
    # Positive definite in exact arithmetic (L2 > 0); rounding in a very large C can break
    # Cholesky, and a general solve of the symmetrised system still gives the update.
    return basis @ torch.linalg.solve((lhs + lhs.T) / 2, basis_keys.double()).float()
