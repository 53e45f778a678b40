"""Null-space projector and the corpus it is estimated from."""
from __future__ import annotations

import pytest
import torch

from easyedit_nmke.models.nmke.nullspace import (
    key_second_moments,
    cache_in_basis,
    null_space_basis,
    null_space_projector,
    resolve_corpus,
    solve_in_null_space,
)

from conftest import tiny_hparams, tiny_model


def test_projector_keeps_exactly_the_small_eigen_directions():
    torch.manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(8, 8))
    eigenvalues = torch.tensor([5.0, 3.0, 1.0, 0.5, 0.01, 0.005, 0.001, 0.0])
    mom2 = basis @ torch.diag(eigenvalues) @ basis.T
    p = null_space_projector(mom2, threshold=0.02)
    torch.testing.assert_close(p @ p, p, atol=1e-5, rtol=0)  # a projector
    assert round(float(p.trace())) == 4
    torch.testing.assert_close(p @ basis[:, :4], torch.zeros(8, 4), atol=1e-5, rtol=0)  # used directions removed
    torch.testing.assert_close(p @ basis[:, 4:], basis[:, 4:], atol=1e-5, rtol=0)


@pytest.mark.parametrize("l2", [1.0, 0.1])
def test_solve_in_null_space_matches_alphaedit_closed_form(l2):
    # The reduced r x r system must give AlphaEdit's (P(K Kᵀ + C) + l2·I)⁻¹ P K.  (Both are
    # formed from fp32 inputs, so l2 is kept where the system's condition number is < 1e4.)
    torch.manual_seed(1)
    n, n_keys = 40, 3
    corpus = torch.randn(n, 25) * torch.linspace(0.05, 3.0, 25)
    mom2 = corpus @ corpus.T / 25
    past = torch.randn(n, 6)
    cache, keys = past @ past.T, torch.randn(n, n_keys)
    p = null_space_projector(mom2, 0.02).double()
    lhs = p @ (keys.double() @ keys.double().T + cache.double()) + l2 * torch.eye(n, dtype=torch.float64)
    expected = torch.linalg.solve(lhs, p @ keys.double()).float()
    basis = null_space_basis(mom2, 0.02)
    assert 0 < basis.shape[1] < n
    got = solve_in_null_space(basis, cache_in_basis(basis, cache), keys, l2)
    torch.testing.assert_close(got, expected, atol=1e-5 * float(expected.abs().max()), rtol=1e-4)
    torch.testing.assert_close(p.float() @ got, got, atol=1e-5, rtol=0)  # lies in the null space


def test_solve_without_l2_and_too_few_keys_is_a_clear_error():
    # L2 = 0 and one key against an 8-dimensional null space: the update is not unique.
    torch.manual_seed(2)
    mom2 = torch.diag(torch.tensor([5.0] * 4 + [0.0] * 8))
    basis = null_space_basis(mom2, 0.02)
    assert basis.shape[1] == 8
    with pytest.raises(ValueError, match="not positive definite.*L2 > 0"):
        solve_in_null_space(basis, cache_in_basis(basis, torch.zeros(12, 12)), torch.randn(12, 1), 0.0)


def test_solve_falls_back_when_rounding_breaks_cholesky():
    # With L2 > 0 the system is positive definite in exact arithmetic; if rounding in a
    # huge C breaks the factorisation, a general solve must still give the update.
    torch.manual_seed(3)
    basis = null_space_basis(torch.diag(torch.tensor([5.0] * 2 + [0.0] * 6)), 0.02)
    keys = torch.randn(8, 2)
    indefinite = -3.0 * torch.eye(6)  # stands in for a C whose rounding went negative
    got = solve_in_null_space(basis, indefinite, keys, 1.0)
    basis_keys = (basis.T @ keys).double()
    lhs = indefinite.double() + basis_keys @ basis_keys.T + torch.eye(6, dtype=torch.float64)
    torch.testing.assert_close(got, basis @ torch.linalg.solve(lhs, basis_keys).float(), atol=1e-5, rtol=1e-5)


def test_local_corpus_statistics_are_cached(tokenizer, corpus_file, tmp_path):
    model = tiny_model("llama", len(tokenizer))
    hp = tiny_hparams("llama", corpus_file, tmp_path)
    first = key_second_moments(model, tokenizer, hp, hp.layers)
    files = list(tmp_path.rglob("*.safetensors"))
    assert len(files) == len(hp.layers)
    second = key_second_moments(model, tokenizer, hp, hp.layers)
    for layer in hp.layers:
        assert torch.equal(first[layer], second[layer])
        assert torch.allclose(first[layer], first[layer].T, atol=1e-6)
        assert torch.linalg.eigvalsh(first[layer].double()).min() > -1e-6  # positive semi-definite


def test_mom2_dtype_sets_the_stored_and_decomposed_precision(tokenizer, corpus_file, tmp_path):
    from easyedit_nmke.util.hparams import HParamsError

    model = tiny_model("llama", len(tokenizer))
    single = key_second_moments(model, tokenizer, tiny_hparams("llama", corpus_file, tmp_path), [1])[1]
    double = key_second_moments(
        model, tokenizer, tiny_hparams("llama", corpus_file, tmp_path, mom2_dtype="float64"), [1]
    )[1]
    assert single.dtype == torch.float32 and double.dtype == torch.float64
    assert len(list(tmp_path.rglob("*.safetensors"))) == 2  # one cache file per precision
    torch.testing.assert_close(double.float(), single, atol=1e-6, rtol=1e-5)
    # Both precisions find the same null space up to directions at the threshold itself.
    b32, b64 = null_space_basis(single, 0.02).double(), null_space_basis(double, 0.02).double()
    assert b32.shape == b64.shape
    eigenvalues, eigenvectors = torch.linalg.eigh(double)
    clearly_used = eigenvectors[:, eigenvalues >= 0.04]
    assert (clearly_used.T @ b32).abs().max() < 1e-4
    with pytest.raises(HParamsError, match="mom2_dtype must be one of"):
        tiny_hparams("llama", corpus_file, tmp_path, mom2_dtype="bfloat16")


def test_unreachable_corpus_falls_back_to_model_text(tokenizer, corpus_file, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("EASYEDIT_NMKE_DATA_DIR", raising=False)
    model = tiny_model("llama", len(tokenizer))
    hp = tiny_hparams("llama", corpus_file, tmp_path, mom2_dataset="wikitext-2", mom2_n_samples=4, mom2_max_length=12)
    with pytest.warns(UserWarning, match="model-generated"):
        description, load = resolve_corpus(model, tokenizer, hp)
    assert description == "model-generated:4"
    texts = load()
    assert len(texts) == 4 and all(isinstance(t, str) and t for t in texts)


@pytest.mark.parametrize(
    "env, reachable, datasets_reachable",
    [({}, True, True), ({"HF_HUB_OFFLINE": "1"}, False, False), ({"HF_HUB_OFFLINE": "0"}, True, True),
     ({"HF_HUB_OFFLINE": "true"}, False, False), ({"HF_DATASETS_OFFLINE": "1"}, True, False)],
)
def test_hub_reachable_reads_offline_flags_like_huggingface_hub(monkeypatch, env, reachable, datasets_reachable):
    from easyedit_nmke.util.env import hub_reachable

    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert hub_reachable() is reachable
    assert hub_reachable(datasets=True) is datasets_reachable
