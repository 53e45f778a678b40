"""Gemma's norm between the FFN and the residual add: NMKE's update and attribution through it."""
import math

import pytest
import torch
from conftest import REQUESTS, tiny_hparams, tiny_model

from easyedit_nmke.models.nmke import apply_nmke_to_model
from easyedit_nmke.models.nmke.attribution import readout_product
from easyedit_nmke.models.nmke.nmke_main import _readout_norm
from easyedit_nmke.models.nmke.state import get_state
from easyedit_nmke.util import nethook
from easyedit_nmke.util.model_parts import (
    down_weight,
    ffn_output_change,
    linearised_ffn_activations,
    linearised_ffn_writes,
    post_ffn_norm,
    unembedding,
)


def _gemma_norm(seed: int = 0):
    """A tiny Gemma-3's post-FFN norm of layer 1, with a non-trivial gain."""
    model = tiny_model("gemma3", 300)
    norm = post_ffn_norm(model, "model.layers.1")
    with torch.no_grad():
        norm.weight.copy_(torch.randn(norm.weight.shape, generator=torch.Generator().manual_seed(seed)) * 0.3)
    return model, norm


def test_only_gemma_blocks_have_a_post_ffn_norm():
    assert post_ffn_norm(tiny_model("llama", 300), "model.layers.1") is None
    assert post_ffn_norm(tiny_model("gemma3", 300), "model.layers.1") is not None


def test_output_change_is_the_residual_change_without_a_norm():
    change = torch.randn(64, 3)
    assert ffn_output_change(None, torch.randn(64, 3), change) is change


def test_output_change_moves_the_residual_stream_as_wanted_where_the_norm_can():
    """A reachable residual change (g ⊙ u with rms(u) = 1, minus the current one) is met exactly."""
    _, norm = _gemma_norm()
    with torch.no_grad():
        norm.weight[:3] = -1.0  # gain 1 + w = 0, as in Gemma-3-270m
    gen = torch.Generator().manual_seed(1)
    y = torch.randn(3, 64, generator=gen) * 5  # the down projection's current output, one row per key
    u = torch.randn(3, 64, generator=gen)
    u = u / u.pow(2).mean(1, keepdim=True).sqrt()
    gain = 1.0 + norm.weight.detach()
    with torch.no_grad():
        wanted = gain * u - norm(y)
        change = ffn_output_change(norm, y.T, wanted.T).T
        got = norm(y + change) - norm(y)
    torch.testing.assert_close(got, wanted, rtol=1e-4, atol=1e-4)
    # The output keeps its size: the norm decides the length, only the direction changes.
    torch.testing.assert_close(y.norm(dim=1), (y + change).norm(dim=1), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("gains", [(0.0, 0.5, 2.0), (0.3, 0.5, 2.0), (0.0, 0.0, 1.0)])
@pytest.mark.parametrize("seed", range(6))
def test_output_change_gives_the_closest_reachable_contribution(gains, seed):
    """In 3 dimensions, against a dense grid over everything the norm can write: no output gets
    the contribution closer to the wanted one (zero gains and the 'hard case' included)."""
    from easyedit_nmke.util.model_parts import _closest_on_norm_sphere

    gen = torch.Generator().manual_seed(seed)
    g = torch.tensor(gains, dtype=torch.float64)[:, None]
    target = torch.randn(3, 1, generator=gen, dtype=torch.float64) * (0.3 if seed % 2 else 2.0)
    hint = torch.randn(3, 1, generator=gen, dtype=torch.float64)
    v = _closest_on_norm_sphere(g, target, hint)
    torch.testing.assert_close(v.pow(2).mean(), torch.tensor(1.0, dtype=torch.float64))
    theta, phi = torch.meshgrid(
        torch.linspace(0, math.pi, 721, dtype=torch.float64), torch.linspace(0, 2 * math.pi, 1441, dtype=torch.float64),
        indexing="ij",
    )
    grid = math.sqrt(3) * torch.stack([theta.sin() * phi.cos(), theta.sin() * phi.sin(), theta.cos()]).reshape(3, -1)
    best_on_grid = (g * grid - target).norm(dim=0).min()
    assert float((g * v - target).norm()) <= float(best_on_grid) + 1e-9


def test_no_wanted_change_means_no_change():
    """R = 0 leaves the output alone, zero gains or not (the 'hard case' keeps y's own direction)."""
    _, norm = _gemma_norm()
    with torch.no_grad():
        norm.weight[:3] = -1.0
    y = torch.randn(64, 5, generator=torch.Generator().manual_seed(4))
    change = ffn_output_change(norm, y, torch.zeros_like(y))
    torch.testing.assert_close(change, torch.zeros_like(y), atol=1e-5, rtol=0)


def test_output_change_beats_ignoring_the_norm():
    _, norm = _gemma_norm()
    with torch.no_grad():
        norm.weight[:3] = -1.0
    gen = torch.Generator().manual_seed(2)
    y = torch.randn(4, 64, generator=gen)
    wanted = 0.5 * torch.randn(4, 64, generator=gen)
    with torch.no_grad():
        target = norm(y) + wanted
        change = ffn_output_change(norm, y.T, wanted.T).T
        assert torch.isfinite(change).all()
        best = (norm(y + change) - target).norm(dim=1)
        naive = (norm(y + wanted) - target).norm(dim=1)
    assert (best < naive).all()


def test_linearised_writes_are_the_norm_jacobian_up_to_the_output_direction():
    """(m_i / rms(y)) (g ⊙ v_i) equals J·(m_i v_i) except for a component along g ⊙ y (J: the norm's Jacobian)."""
    model, norm = _gemma_norm()
    down = down_weight(nethook.get_module(model, "model.layers.1.mlp.down_proj")).detach()  # [d, d_ff]
    activations = torch.randn(2, down.shape[1], generator=torch.Generator().manual_seed(3))
    writes, scaled = linearised_ffn_writes(norm, down), linearised_ffn_activations(norm, down, activations)
    gain = 1.0 + norm.weight.detach()
    for p in range(2):
        y = down @ activations[p]
        jac = torch.autograd.functional.jacobian(lambda x: norm(x[None])[0], y)  # [d, d]
        exact = jac @ (down * activations[p])  # [d, d_ff]: each neuron's first-order write
        approx = writes * scaled[p]
        along = gain * y
        along = along / along.norm()
        residual = exact - approx
        # What is left lies along g ⊙ y.
        torch.testing.assert_close(residual - along[:, None] * (along @ residual), torch.zeros_like(residual), atol=1e-5, rtol=0)
        # The kept terms add up to the FFN's actual contribution.
        torch.testing.assert_close(approx.sum(1), norm(y[None])[0], rtol=1e-4, atol=1e-5)
    assert linearised_ffn_writes(None, down) is down
    assert linearised_ffn_activations(None, down, activations) is activations


@pytest.mark.parametrize("fast_path", [True, False])
def test_gemma_edit_keeps_the_readout_cache_of_the_write_vectors_exact(fast_path, tokenizer, corpus_file, tmp_path):
    """After edits the cached readout is U·diag(g_final)·(g_post ⊙ V) of the edited weights, as recomputed."""
    model = tiny_model("gemma3", len(tokenizer))
    with torch.no_grad():
        for layer in (1, 2):
            post_ffn_norm(model, f"model.layers.{layer}").weight.normal_(0, 0.3)
    hp = tiny_hparams("gemma3", corpus_file, tmp_path, fast_path=fast_path)
    unembed, _ = unembedding(model)

    def fresh(layer):
        module = nethook.get_module(model, hp.rewrite_module_tmp.format(layer))
        writes = linearised_ffn_writes(post_ffn_norm(model, f"model.layers.{layer}"), down_weight(module).detach())
        return readout_product(unembed.detach(), writes, _readout_norm(model, hp))

    before = {layer: fresh(layer) for layer in hp.layers}
    for request in REQUESTS[:2]:
        apply_nmke_to_model(model, tokenizer, [request], hp)
    state = get_state(model)
    for layer in hp.layers:
        now = fresh(layer)
        assert float((now - before[layer]).abs().max()) > 100 * 1e-4  # the edits moved it
        torch.testing.assert_close(state.readout[layer].matrix, now, rtol=1e-4, atol=1e-4)
