"""Triton kernel for NMKE's fused neuron attribution (see ``attribution.py``).

One program handles one block of neurons for one prompt and sweeps the
vocabulary in tiles, keeping an fp32 online max / sum of the amplified logits

    z[k, i] = (a[p, k] + c[p, i] · W[k, i]) / r[p, i] + β[k]

so that W — the shared [vocab, d_ff] readout product, any float dtype — is read
once per prompt and no [d_ff, vocab] logit matrix ever exists.  The (max, sum)
state is passed in and out, so callers can stream W in vocabulary blocks
(``lse_update`` once per block) when it is not cached in full.  Programs are
launched prompt-fastest so that the P programs sharing a W tile run together and
hit it in L2.

Triton is imported lazily: this module imports without it, and
``triton_available()`` says whether the kernel can be used.  Under
``TRITON_INTERPRET=1`` the kernel runs on CPU tensors through Triton's
interpreter (used by the tests); Triton reads that variable when the kernel is
built, so the build is cached per interpreter setting.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Optional

import torch
from torch import Tensor

from ...util.env import env_flag

__all__ = ["triton_available", "lse_update", "finish_lse", "fused_attribution_triton"]

_LN2 = math.log(2.0)


def triton_available() -> bool:
    """True when ``import triton`` succeeds."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def _interpreting() -> bool:
    return env_flag("TRITON_INTERPRET")


@functools.lru_cache(maxsize=2)
def _build_kernel(interpret: bool) -> Any:
    """Define (jit) the kernel; cached per interpreter mode (Triton decides at jit time)."""
    del interpret  # only part of the cache key
    import triton
    import triton.language as tl

    @triton.jit
    def _lse_update_kernel(
        w_ptr,
        a_ptr,
        beta_ptr,
        c_ptr,
        ir_ptr,
        max_ptr,
        sum_ptr,
        n_vocab,
        n_neurons,
        stride_wv,
        stride_wn,
        stride_ap,
        stride_av,
        stride_cp,
        stride_irp,
        stride_sp,
        HAS_BETA: tl.constexpr,
        BLOCK_V: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        pid_p = tl.program_id(0)
        pid_n = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n_neurons
        c = tl.load(c_ptr + pid_p * stride_cp + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        # Fold log2(e) into 1/r so that the exponentials are exp2.
        ir = tl.load(ir_ptr + pid_p * stride_irp + offs_n, mask=mask_n, other=1.0).to(tl.float32) * 1.4426950408889634
        run_max = tl.load(max_ptr + pid_p * stride_sp + offs_n, mask=mask_n, other=0.0)
        run_sum = tl.load(sum_ptr + pid_p * stride_sp + offs_n, mask=mask_n, other=0.0)
        for v0 in range(0, n_vocab, BLOCK_V):
            offs_v = v0 + tl.arange(0, BLOCK_V)
            mask_v = offs_v < n_vocab
            w = tl.load(
                w_ptr + offs_v[:, None] * stride_wv + offs_n[None, :] * stride_wn,
                mask=mask_v[:, None] & mask_n[None, :],
                other=0.0,
            ).to(tl.float32)
            a = tl.load(a_ptr + pid_p * stride_ap + offs_v * stride_av, mask=mask_v, other=0.0).to(tl.float32)
            z = (a[:, None] + c[None, :] * w) * ir[None, :]
            if HAS_BETA:
                beta = tl.load(beta_ptr + offs_v, mask=mask_v, other=0.0).to(tl.float32)
                z = z + beta[:, None] * 1.4426950408889634
            z = tl.where(mask_v[:, None], z, float("-inf"))
            new_max = tl.maximum(run_max, tl.max(z, axis=0))
            run_sum = run_sum * tl.exp2(run_max - new_max) + tl.sum(tl.exp2(z - new_max[None, :]), axis=0)
            run_max = new_max
        tl.store(max_ptr + pid_p * stride_sp + offs_n, run_max, mask=mask_n)
        tl.store(sum_ptr + pid_p * stride_sp + offs_n, run_sum, mask=mask_n)

    return _lse_update_kernel


def lse_update(
    weight: Tensor,
    base: Tensor,
    c: Tensor,
    inv_scale: Tensor,
    row_max: Tensor,
    row_sum: Tensor,
    bias: Optional[Tensor] = None,
    block_v: int = 64,
    block_n: int = 64,
) -> None:
    """Fold a vocabulary block into the running log-sum-exp state, in place.

    Args:
        weight: W block [V, N] (any float dtype, any strides).
        base: a block [P, V]: ``U(g ⊙ h)`` (centred h for LayerNorm) per prompt.
        c: [P, N] amplification ``λ·m``.
        inv_scale: [P, N] ``1/rms`` (or ``1/σ``) of each amplified vector.
        row_max: [P, N] fp32 contiguous running max, log2 units (start at -inf).
        row_sum: [P, N] fp32 contiguous running Σ 2^(z₂ − max) (start at 0).
        bias: optional [V] additive logit bias β (``U·b + lm-head bias``).
    """
    import triton

    n_vocab, n_neurons = weight.shape
    n_prompts = base.shape[0]
    if base.shape != (n_prompts, n_vocab) or c.shape != (n_prompts, n_neurons) or inv_scale.shape != c.shape:
        raise ValueError("lse_update: inconsistent shapes")
    if row_max.shape != c.shape or row_sum.shape != c.shape:
        raise ValueError("lse_update: state must be [P, N]")
    for t in (row_max, row_sum):
        if t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError("lse_update: state must be contiguous fp32")
    if row_max.stride(0) != row_sum.stride(0):
        raise ValueError("lse_update: state tensors must share strides")
    if n_vocab == 0 or n_neurons == 0 or n_prompts == 0:
        return
    c = c.contiguous()
    inv_scale = inv_scale.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    kernel = _build_kernel(_interpreting())
    grid = (n_prompts, triton.cdiv(n_neurons, block_n))
    kernel[grid](
        weight,
        base,
        bias if bias is not None else base,  # dummy pointer when HAS_BETA is False
        c,
        inv_scale,
        row_max,
        row_sum,
        n_vocab,
        n_neurons,
        weight.stride(0),
        weight.stride(1),
        base.stride(0),
        base.stride(1),
        c.stride(0),
        inv_scale.stride(0),
        row_max.stride(0),
        HAS_BETA=bias is not None,
        BLOCK_V=block_v,
        BLOCK_N=block_n,
    )


def finish_lse(row_max: Tensor, row_sum: Tensor) -> Tensor:
    """Turn the (max, sum) state of :func:`lse_update` into a log-sum-exp in nats."""
    return (row_max + torch.log2(row_sum)) * _LN2


def fused_attribution_triton(
    weight: Tensor,
    base: Tensor,
    c: Tensor,
    inv_scale: Tensor,
    target_logit: Tensor,
    base_logprob: Tensor,
    bias: Optional[Tensor] = None,
) -> Tensor:
    """Attribution scores [P, N] (fp32) from the full readout product in one launch.

    ``score = target_logit − logsumexp_k z[k] − base_logprob`` with ``z`` as in the
    module docstring; ``target_logit`` [P, N] is the amplified logit of each
    prompt's token (nats) and ``base_logprob`` [P] its unamplified log-probability.
    """
    n_prompts, n_neurons = c.shape
    row_max = torch.full((n_prompts, n_neurons), -math.inf, device=c.device, dtype=torch.float32)
    row_sum = torch.zeros_like(row_max)
    lse_update(weight, base, c, inv_scale, row_max, row_sum, bias=bias)
    return target_logit.float() - finish_lse(row_max, row_sum) - base_logprob.float()[:, None]
