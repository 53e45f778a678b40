"""Gemma's norm between the FFN and the residual add: NMKE's update and attribution through it."""
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


def test_output_change_gives_the_reachable_contribution_closest_to_the_wanted_one():
    """Any wanted change: no other output (random ones near the answer) gets the FFN's contribution
    closer to the wanted one, and a change applied as if there were no norm does worse.  Coordinates
    where the gain is zero (Gemma-3-270m has them) stay finite and get nothing."""
    _, norm = _gemma_norm()
    with torch.no_grad():
        norm.weight[:3] = -1.0  # gain 1 + w = 0
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
        for _ in range(200):
            other = y + change + 0.05 * y.norm(dim=1, keepdim=True) / 8 * torch.randn(4, 64, generator=gen)
            assert ((norm(other) - target).norm(dim=1) >= best - 1e-4).all()
        torch.testing.assert_close(norm(y + change)[:, :3], torch.zeros(4, 3))


def test_linearised_writes_are_the_norm_jacobian_up_to_the_output_direction():
    """(m_i / rms(y)) (g ⊙ v_i) equals J·(m_i v_i) except for a component along g ⊙ y (J: the norm's Jacobian)."""
    model, norm = _gemma_norm()
    down = down_weight(nethook.get_module(model, "model.layers.1.mlp.down_proj")).detach()  # [d, d_ff]
    activations = torch.randn(2, down.shape[1], generator=torch.Generator().manual_seed(3))
    writes, scaled = linearised_ffn_writes(norm, down, activations)
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
    assert linearised_ffn_writes(None, down, activations) == (down, activations)


def test_gemma_edit_keeps_the_readout_cache_of_the_write_vectors_exact(tokenizer, corpus_file, tmp_path):
    """After edits the cached readout is U·diag(g_final)·(g_post ⊙ V) of the edited weights, as recomputed."""
    model = tiny_model("gemma3", len(tokenizer))
    with torch.no_grad():
        for layer in (1, 2):
            post_ffn_norm(model, f"model.layers.{layer}").weight.normal_(0, 0.3)
    hp = tiny_hparams("gemma3", corpus_file, tmp_path)
    for request in REQUESTS[:2]:
        apply_nmke_to_model(model, tokenizer, [request], hp)
    state = get_state(model)
    unembed, _ = unembedding(model)
    for layer in hp.layers:
        module = nethook.get_module(model, hp.rewrite_module_tmp.format(layer))
        writes, _ = linearised_ffn_writes(post_ffn_norm(model, f"model.layers.{layer}"), down_weight(module).detach())
        fresh = readout_product(unembed.detach(), writes.float(), _readout_norm(model, hp))
        torch.testing.assert_close(state.readout[layer].matrix, fresh, rtol=1e-4, atol=1e-4)
