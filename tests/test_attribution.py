"""Tests for NMKE's fused neuron attribution (torch, materialised and Triton paths).

Every fast path is checked against the brute-force loop (one norm + unembedding
forward per amplified neuron); the end-to-end tests build the brute force from a
real tiny Llama / GPT-2's own final norm and lm head.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Tuple

import pytest
import torch

from easyedit_nmke.models.nmke import attribution as attr
from easyedit_nmke.models.nmke.attribution import ReadoutNorm, neuron_attribution_scores, readout_product

RTOL = 1e-4
ATOL = 1e-4


def _problem(
    n_prompts: int,
    d: int,
    d_ff: int,
    vocab: int,
    kind: str,
    norm_bias: bool,
    seed: int = 0,
    logit_scale: float = 1.0,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, ReadoutNorm, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n_prompts, d, generator=gen)
    acts = torch.randn(n_prompts, d_ff, generator=gen) * 0.5
    down = torch.randn(d, d_ff, generator=gen) * 0.3
    unembed = torch.randn(vocab, d, generator=gen) * logit_scale
    gain = torch.rand(d, generator=gen) + 0.5
    bias = torch.randn(d, generator=gen) * 0.2 if norm_bias else None
    norm = ReadoutNorm(kind, gain, bias, eps=1e-5)
    tokens = torch.randint(0, vocab, (n_prompts,), generator=gen)
    return hidden, acts, down, unembed, norm, tokens


SHAPES = [  # (P, d, d_ff, vocab): small, and non-multiples of every tile size
    (1, 8, 5, 7),
    (3, 24, 70, 517),
    (4, 32, 96, 300),
    (2, 16, 130, 1031),
]
# (norm kind, norm bias, lm-head bias): RMS and LayerNorm, each with and without biases.
NORMS = [("rms", False, False), ("rms", False, True), ("layer", True, False), ("layer", False, True)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind,norm_bias,with_lm_bias", NORMS)
def test_fast_paths_match_loop(shape, kind, norm_bias, with_lm_bias):
    P, d, d_ff, vocab = shape
    hidden, acts, down, unembed, norm, tokens = _problem(P, d, d_ff, vocab, kind, norm_bias, seed=sum(shape))
    lm_bias = torch.randn(vocab, generator=torch.Generator().manual_seed(vocab)) if with_lm_bias else None
    args = (hidden, acts, down, unembed, norm, tokens)
    ref = neuron_attribution_scores(*args, unembed_bias=lm_bias, backend="loop")
    assert ref.shape == (P, d_ff) and ref.dtype == torch.float32 and torch.isfinite(ref).all()
    assert ref.abs().max() > 0.1  # the comparison is not vacuous

    runs = {
        "materialised": dict(backend="materialised"),
        "torch": dict(backend="torch"),
        # A small budget: several W blocks, neuron chunks and partial vocabulary tiles.
        "torch-medium": dict(backend="torch", max_chunk_bytes=8 * d_ff * 37),
        "torch-readout": dict(backend="torch", readout=readout_product(unembed, down, norm)),
        "auto": dict(backend="auto"),
    }
    if vocab <= 300:  # a tiny budget: one-row blocks and tiles, chunked neurons (slow, so small shapes only)
        runs["torch-tiny"] = dict(backend="torch", max_chunk_bytes=2048)
    for name, kw in runs.items():
        out = neuron_attribution_scores(*args, unembed_bias=lm_bias, **kw)
        assert out.dtype == torch.float32, name
        torch.testing.assert_close(out, ref, rtol=RTOL, atol=ATOL, msg=lambda m: f"{name}: {m}")


def test_readout_product_matches_definition():
    hidden, acts, down, unembed, norm, tokens = _problem(2, 16, 40, 90, "layer", True)
    w = readout_product(unembed, down, norm)
    centred = down - down.mean(0, keepdim=True)
    torch.testing.assert_close(w, unembed @ torch.diag(norm.gain) @ centred, rtol=1e-5, atol=1e-5)
    rms = ReadoutNorm("rms", norm.gain)
    torch.testing.assert_close(readout_product(unembed, down, rms), unembed @ torch.diag(norm.gain) @ down)
    # Low-precision U goes through the chunked path and gives the same product.
    torch.testing.assert_close(
        readout_product(unembed.bfloat16(), down, rms),
        unembed.bfloat16().float() @ torch.diag(norm.gain) @ down,
        rtol=1e-5,
        atol=1e-5,
    )


def test_readout_reuse_skips_matmul(monkeypatch):
    hidden, acts, down, unembed, norm, tokens = _problem(3, 24, 70, 517, "rms", False)
    w = readout_product(unembed, down, norm)
    expected = neuron_attribution_scores(hidden, acts, down, unembed, norm, tokens, backend="torch")

    def forbidden(*_a, **_k):
        raise AssertionError("readout block recomputed although a readout was given")

    monkeypatch.setattr(attr, "_readout_block", forbidden)
    out = neuron_attribution_scores(hidden, acts, down, unembed, norm, tokens, backend="torch", readout=w)
    torch.testing.assert_close(out, expected, rtol=RTOL, atol=ATOL)
    # The given readout really is what is used.
    other = neuron_attribution_scores(hidden, acts, down, unembed, norm, tokens, backend="torch", readout=w * 1.5)
    assert not torch.allclose(other, expected, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(dtype):
    hidden, acts, down, unembed, norm, tokens = _problem(3, 32, 96, 300, "rms", False)
    low = [t.to(dtype) for t in (hidden, acts, down, unembed)]
    norm_low = ReadoutNorm("rms", norm.gain.to(dtype), eps=norm.eps)
    ref = neuron_attribution_scores(*low, norm_low, tokens, backend="loop")
    for kw in (dict(backend="torch"), dict(backend="torch", max_chunk_bytes=4096), dict(backend="materialised")):
        out = neuron_attribution_scores(*low, norm_low, tokens, **kw)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, ref, rtol=RTOL, atol=ATOL)


def test_zero_activation_scores_zero_and_scale():
    hidden, acts, down, unembed, norm, tokens = _problem(2, 16, 40, 90, "rms", False)
    acts[:, :7] = 0.0
    out = neuron_attribution_scores(hidden, acts, down, unembed, norm, tokens, backend="torch")
    assert out[:, :7].abs().max() < 1e-5
    ref = neuron_attribution_scores(hidden, acts, down, unembed, norm, tokens, scale=3.0, backend="loop")
    out = neuron_attribution_scores(hidden, acts, down, unembed, norm, tokens, scale=3.0, backend="torch")
    torch.testing.assert_close(out, ref, rtol=RTOL, atol=ATOL)


def test_overflow_fallback_is_exact(monkeypatch):
    """Logits far above every candidate token trigger the exact (running-max) fallback."""
    hidden, acts, down, unembed, norm, tokens = _problem(3, 16, 50, 400, "rms", False, logit_scale=40.0)
    acts = acts * 8.0
    # Score the least likely base token so the candidates sit far below the best logits.
    base = (unembed @ (norm.gain * hidden).t()).t()
    tokens = base.argmin(1)
    calls = []
    real = attr._lse_torch

    def spy(*a, **k):
        calls.append(k.get("exact", False))
        return real(*a, **k)

    monkeypatch.setattr(attr, "_lse_torch", spy)
    ref = neuron_attribution_scores(hidden, acts, down, unembed, norm, tokens, backend="loop")
    out = neuron_attribution_scores(hidden, acts, down, unembed, norm, tokens, backend="torch", max_chunk_bytes=4096)
    assert True in calls, "the test no longer exercises the overflow fallback"
    assert torch.isfinite(out).all()
    # Logits are O(10^3) here, so compare relative to their scale.
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=2e-3)


def test_input_validation():
    hidden, acts, down, unembed, norm, tokens = _problem(2, 16, 40, 90, "rms", False)
    with pytest.raises(ValueError):
        ReadoutNorm("batch", norm.gain)
    with pytest.raises(ValueError):
        neuron_attribution_scores(hidden, acts[:, :-1], down, unembed, norm, tokens)
    with pytest.raises(ValueError):
        neuron_attribution_scores(hidden, acts, down, unembed, norm, tokens, backend="cuda-magic")
    with pytest.raises(ValueError):
        neuron_attribution_scores(hidden, acts, down, unembed, norm, tokens + 1000)


# --------------------------------------------------------------------------- Triton

# Triton picks interpreter vs compiler from TRITON_INTERPRET when ``triton.language``
# is imported and when kernels are jitted, and another test may already have
# imported it in this process, so the interpreter run happens in a fresh
# interpreter process with the variable set from the start.
_TRITON_SCRIPT = r"""
import importlib.util, json, sys
import torch
sys.path.insert(0, sys.argv[1])
spec = importlib.util.spec_from_file_location("_attribution_tests", sys.argv[2])
tests_mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tests_mod)
_problem = tests_mod._problem
from easyedit_nmke.models.nmke import attribution as attr
from easyedit_nmke.models.nmke import attribution_triton as at
from easyedit_nmke.models.nmke.attribution import neuron_attribution_scores, readout_product

errors = {}
P, d, d_ff, vocab = 3, 24, 70, 517  # not multiples of the 64x64 kernel tiles
for kind, norm_bias, lm in (("rms", False, False), ("layer", True, True)):
    hidden, acts, down, unembed, norm, tokens = _problem(P, d, d_ff, vocab, kind, norm_bias, seed=7)
    lm_bias = torch.randn(vocab, generator=torch.Generator().manual_seed(1)) if lm else None
    args = (hidden, acts, down, unembed, norm, tokens)
    ref = neuron_attribution_scores(*args, unembed_bias=lm_bias, backend="loop")
    # whole vocabulary in one launch, then streamed in three W blocks of <= 200 rows
    for tag, kw in (("one-launch", {}), ("streamed", {"max_chunk_bytes": 8 * d_ff * 200})):
        out = neuron_attribution_scores(*args, unembed_bias=lm_bias, backend="triton", **kw)
        errors[f"{kind}-{tag}"] = ((out - ref).abs() - 1e-4 * ref.abs()).max().item()
    # a bf16 readout operand is accepted (fp32 accumulation): compare with the torch path on it
    w16 = readout_product(unembed, down, norm).bfloat16()
    out = neuron_attribution_scores(*args, unembed_bias=lm_bias, backend="triton", readout=w16)
    ref16 = neuron_attribution_scores(*args, unembed_bias=lm_bias, backend="torch", readout=w16)
    errors[f"{kind}-bf16-readout"] = ((out - ref16).abs() - 1e-4 * ref16.abs()).max().item()

# the module's one-shot entry point
hidden, acts, down, unembed, norm, tokens = _problem(2, 16, 33, 101, "rms", False, seed=3)
pb = attr._prepare(hidden, acts, down, unembed, norm, tokens, 30.0, None, None, budget=1 << 20)
out = at.fused_attribution_triton(readout_product(unembed, down, norm), pb.a, pb.c, pb.inv_r,
                                  pb.target_logit, pb.base_logprob)
ref = neuron_attribution_scores(hidden, acts, down, unembed, norm, tokens, backend="loop")
errors["entry-point"] = ((out - ref).abs() - 1e-4 * ref.abs()).max().item()
print("RESULT " + json.dumps(errors))
"""


def test_triton_interpreter_matches_loop():
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", _TRITON_SCRIPT, str(root), str(Path(__file__).resolve())],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    errors = json.loads(line[len("RESULT ") :])
    assert len(errors) == 7
    bad = {k: v for k, v in errors.items() if not v <= 1e-4}
    assert not bad, f"Triton (interpreter) differs from the reference: {bad}"


# --------------------------------------------------------------------------- real models


def _capture(model: torch.nn.Module, input_ids: torch.Tensor, resid_module, down_module):
    """Post-attention residual (input of the MLP-side norm) and down-projection input, last position."""
    store = {}

    def grab(name):
        def hook(_mod, inputs):
            store[name] = inputs[0][:, -1].detach().clone()

        return hook

    handles = [resid_module.register_forward_pre_hook(grab("h")), down_module.register_forward_pre_hook(grab("m"))]
    try:
        with torch.no_grad():
            model(input_ids)
    finally:
        for hd in handles:
            hd.remove()
    return store["h"], store["m"]


def _brute_force(final_norm, lm_head, h, m, down, tokens, scale):
    """Actually add λ·m_i·v_i to h and run the real model's final norm + lm head."""
    out = torch.empty_like(m)
    with torch.no_grad():
        for p in range(h.shape[0]):
            w = int(tokens[p])
            base = torch.log_softmax(lm_head(final_norm(h[p][None])), -1)[0, w]
            x = h[p][None, :] + scale * m[p][:, None] * down.t()  # one amplified state per neuron
            out[p] = torch.log_softmax(lm_head(final_norm(x)), -1)[:, w] - base
    return out


def test_end_to_end_tiny_llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=96,
        vocab_size=300,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
        initializer_range=0.15,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # a non-trivial final-norm gain
        model.model.norm.weight.uniform_(0.5, 1.5)
    layer = model.model.layers[1]
    ids = torch.randint(0, cfg.vocab_size, (4, 9))
    h, m = _capture(model, ids, layer.post_attention_layernorm, layer.mlp.down_proj)
    tokens = torch.randint(0, cfg.vocab_size, (4,))
    down = layer.mlp.down_proj.weight  # [d, d_ff]
    fn = model.model.norm
    eps = getattr(fn, "variance_epsilon", getattr(fn, "eps", 1e-6))
    norm = ReadoutNorm("rms", fn.weight.detach(), eps=eps)
    ref = _brute_force(fn, model.lm_head, h, m, down, tokens, 30.0)
    assert ref.abs().max() > 0.05
    for backend in ("torch", "materialised"):
        out = neuron_attribution_scores(h, m, down.detach(), model.lm_head.weight.detach(), norm, tokens, backend=backend)
        torch.testing.assert_close(out, ref, rtol=RTOL, atol=ATOL)


def test_end_to_end_tiny_gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(1)
    cfg = transformers.GPT2Config(
        n_embd=64, n_inner=96, vocab_size=300, n_layer=2, n_head=4, n_positions=64, initializer_range=0.15
    )
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        model.transformer.ln_f.weight.uniform_(0.5, 1.5)
        model.transformer.ln_f.bias.normal_(0.0, 0.2)
    block = model.transformer.h[0]
    ids = torch.randint(0, cfg.vocab_size, (3, 7))
    h, m = _capture(model, ids, block.ln_2, block.mlp.c_proj)
    tokens = torch.randint(0, cfg.vocab_size, (3,))
    down = block.mlp.c_proj.weight.detach().t()  # Conv1D stores [d_ff, d]
    ln_f = model.transformer.ln_f
    norm = ReadoutNorm("layer", ln_f.weight.detach(), ln_f.bias.detach(), eps=ln_f.eps)
    ref = _brute_force(ln_f, model.lm_head, h, m, down, tokens, 30.0)
    assert ref.abs().max() > 0.05
    unembed = model.lm_head.weight.detach()
    for kw in (dict(backend="torch"), dict(backend="materialised"), dict(backend="torch", max_chunk_bytes=3000)):
        out = neuron_attribution_scores(h, m, down, unembed, norm, tokens, **kw)
        torch.testing.assert_close(out, ref, rtol=RTOL, atol=ATOL)
