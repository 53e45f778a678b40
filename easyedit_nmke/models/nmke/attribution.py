r"""Fused neuron attribution for NMKE.

NMKE scores every FFN neuron ``i`` of an edit layer, for every prompt ``p``, by
how much amplifying that neuron's contribution to the residual stream changes the
log-probability of a token ``w_p`` read out through the model's final norm and
unembedding:

.. math::

    s_{p,i} = \log\mathrm{softmax}\big(U\,\mathrm{norm}(h_p + c_{p,i} v_i) + b_U\big)_{w_p}
            - \log\mathrm{softmax}\big(U\,\mathrm{norm}(h_p) + b_U\big)_{w_p},
    \qquad c_{p,i} = \lambda\, m_{p,i}

with ``h_p`` [d] the residual stream at the readout position, ``m_{p,i}`` the
neuron activation (input of the down projection), ``v_i`` [d] column ``i`` of the
down-projection weight, ``U`` [vocab, d] the unembedding, ``b_U`` an optional
lm-head bias and ``λ`` the amplification scale.

Derivation
----------
**RMSNorm** (Llama, Mistral, Qwen, Gemma with gain ``1 + w``):
``norm(x) = g ⊙ x / rms(x) + b`` (``b = 0`` for real RMSNorms),
``rms(x) = sqrt(mean(x²) + eps)``.  For ``x = h + c v_i``:

* ``rms_i² = (|h|² + 2 c h·v_i + c² |v_i|²) / d + eps``  — three dot products
  per prompt (``h·V`` is one [d]×[d, d_ff] product, ``|v_i|²`` is shared);
* ``U (g ⊙ x) = U(g ⊙ h) + c · U(g ⊙ v_i) = a + c W[:, i]`` with
  ``a = U(g ⊙ h)`` [vocab] per prompt and ``W = U diag(g) V`` [vocab, d_ff]
  shared by *all* prompts (and all edits until the layer's down projection or
  the unembedding change);

so the amplified logits are ``z_{p,i,k} = (a_{p,k} + c_{p,i} W_{k,i}) / rms_{p,i} + β_k``
with ``β = U b + b_U``.

**LayerNorm** (GPT-2): ``norm(x) = g ⊙ (x − mean(x)) / σ(x) + b``,
``σ(x)² = var(x) + eps`` (population variance).  Centring is linear, so with
``h̃ = h − mean(h)`` and ``ṽ_i = v_i − mean(v_i)`` the centred amplified vector is
``h̃ + c ṽ_i`` and

* ``σ_i² = (|h̃|² + 2 c h̃·ṽ_i + c² |ṽ_i|²) / d + eps
  = var(h) + 2 c cov(h, v_i) + c² var(v_i) + eps``;
* logits ``z = (ã + c W̃[:, i]) / σ_i + β`` with ``ã = U(g ⊙ h̃)``,
  ``W̃ = U diag(g) Ṽ`` (Ṽ: column-centred V) and ``β = U b + b_U``.

RMSNorm is exactly the LayerNorm formula without centring, so one code path
serves both.  The unamplified baseline is the ``c = 0`` case.

Each score is then ``z_{p,i,w_p} − logsumexp_k z_{p,i,k} − base_p``.  The target
logit needs a single row of ``W``; the log-sum-exp needs all of it, which is the
expensive part: ``P × vocab × d_ff`` exponentials (4.5·10⁸ on SmolLM2-135M for 6
prompts).  It is computed by streaming ``W`` in vocabulary blocks (never holding a
``[d_ff, vocab]`` logit matrix per prompt, as the straightforward "materialise the
amplified hidden states and run the lm head" approach does) and accumulating an
fp32 log-sum-exp per (prompt, neuron).

Numerics of the CPU/torch path: exponentials are taken in base 2 (``exp2`` is
~4× faster than ``exp`` on x86 CPUs), relative to a per-(prompt, neuron)
reference ``R`` = the largest amplified logit among a few candidate tokens
(target and top base tokens).  Because ``R`` is one of the summed terms the sum
is ≥ 1 and cannot underflow; it can only overflow if some token lies more than
~77 nats above every candidate — those (rare) columns are detected (non-finite
sum) and recomputed with an exact online max.  Avoiding the running max saves
a full pass over every tile.  The Triton kernel (CUDA) uses a classic online
max/sum instead, since there a fused single pass is cheap.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["ReadoutNorm", "readout_product", "neuron_attribution_scores", "hidden_readout"]

_LOG2E = 1.0 / math.log(2.0)
_LN2 = math.log(2.0)
# Candidate tokens per prompt used as the exp2 reference (besides the target).
_N_REFERENCE_TOKENS = 4
ATTRIBUTION_BACKENDS = ("auto", "torch", "triton", "materialised", "loop")


@dataclass(frozen=True, eq=False)  # eq=False: comparing tensor fields has no single truth value
class ReadoutNorm:
    """The model's final norm, as needed to read the residual stream out.

    Attributes:
        kind: ``"rms"`` (RMSNorm) or ``"layer"`` (LayerNorm).
        gain: [d] effective multiplicative gain.  Gemma-style norms that compute
            ``x * (1 + w)`` must pass ``1 + w``.
        bias: [d] additive bias (LayerNorm); ``None`` means zero.
        eps: the epsilon added to the mean square / variance.
    """

    kind: str
    gain: Tensor
    bias: Optional[Tensor] = None
    eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.kind not in ("rms", "layer"):
            raise ValueError(f"ReadoutNorm.kind must be 'rms' or 'layer', got {self.kind!r}")
        if self.gain.dim() != 1:
            raise ValueError(f"ReadoutNorm.gain must be 1-D, got shape {tuple(self.gain.shape)}")
        if self.bias is not None and self.bias.shape != self.gain.shape:
            raise ValueError("ReadoutNorm.bias must have the same shape as gain")

    @property
    def centred(self) -> bool:
        return self.kind == "layer"

    def apply(self, x: Tensor) -> Tensor:
        """Apply the norm to ``x`` [..., d] in fp32 (reference implementation)."""
        x = x.float()
        g = self.gain.to(device=x.device, dtype=torch.float32)
        if self.centred:
            x = x - x.mean(-1, keepdim=True)
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * g
        if self.bias is not None:
            y = y + self.bias.to(device=x.device, dtype=torch.float32)
        return y


# --------------------------------------------------------------------------- helpers


def _default_budget(device: torch.device) -> int:
    """Working-memory budget (bytes) for streamed buffers when the caller gives none."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(min(free // 4, 1 << 30))
    try:
        import psutil

        avail = psutil.virtual_memory().available
    except Exception:  # pragma: no cover - psutil is a dependency, but stay robust
        avail = 4 << 30
    # Bigger blocks buy nothing on CPU once the matmul block is a few hundred rows.
    return int(max(1 << 20, min(avail // 8, 64 << 20)))


def _prepared_down(down_weight: Tensor, centred: bool) -> Tensor:
    """V [d, d_ff] in fp32, column-centred for LayerNorm (copies only when needed)."""
    v = down_weight.float()
    if centred:
        v = v - v.mean(0, keepdim=True)
    return v


def _row_blocks(n_rows: int, rows_per_block: int) -> Iterator[Tuple[int, int]]:
    rows_per_block = max(1, int(rows_per_block))
    for k0 in range(0, n_rows, rows_per_block):
        yield k0, min(n_rows, k0 + rows_per_block)


def _unembed_times(unembed: Tensor, rhs: Tensor, budget: int) -> Tensor:
    """``U.float() @ rhs`` ([vocab, k]) without an fp32 copy of a low-precision U."""
    if unembed.dtype == torch.float32:
        return unembed @ rhs
    rows = max(1, budget // max(1, 4 * unembed.shape[1]))
    out = torch.empty(unembed.shape[0], rhs.shape[1], device=rhs.device, dtype=torch.float32)
    for k0, k1 in _row_blocks(unembed.shape[0], rows):
        torch.mm(unembed[k0:k1].float(), rhs, out=out[k0:k1])
    return out


def _readout_block(unembed: Tensor, gain: Tensor, v: Tensor, k0: int, k1: int) -> Tensor:
    # Scale the (small) U block by g rather than keeping a g-scaled copy of V.
    return (unembed[k0:k1].float() * gain) @ v


def readout_product(unembed: Tensor, down_weight: Tensor, norm: ReadoutNorm) -> Tensor:
    """Return ``W = U · diag(g) · V`` ([vocab, d_ff], fp32).

    For LayerNorm ``V`` is column-centred first (``W̃`` in the module docstring).
    ``W`` is shared by all prompts and all calls until the layer's down projection
    or the unembedding changes; callers may cache it and pass it as ``readout=`` to
    :func:`neuron_attribution_scores`.  After a low-rank update ``ΔV = B Aᵀ`` of the
    down projection, ``W`` changes by ``(U diag(g) ΔṼ)`` — cheap to apply in place
    instead of recomputing.

    Args:
        unembed: U [vocab, d].
        down_weight: V [d, d_ff] (column ``i`` is neuron ``i``'s output direction).
        norm: the final norm (its gain and kind are used).
    """
    if unembed.dim() != 2 or down_weight.dim() != 2 or unembed.shape[1] != down_weight.shape[0]:
        raise ValueError(
            f"shape mismatch: unembed {tuple(unembed.shape)} vs down_weight {tuple(down_weight.shape)}"
        )
    device = unembed.device
    g = norm.gain.to(device=device, dtype=torch.float32)
    v = _prepared_down(down_weight.to(device), norm.centred)
    # Row blocks: no full-size g-scaled (or fp32) copy of U next to the [vocab, d_ff] result.
    rows = max(1, _default_budget(device) // max(1, 8 * unembed.shape[1]))
    out = torch.empty(unembed.shape[0], v.shape[1], device=device, dtype=torch.float32)
    for k0, k1 in _row_blocks(unembed.shape[0], rows):
        torch.mm(unembed[k0:k1].float() * g, v, out=out[k0:k1])
    return out


def hidden_readout(hiddens: Sequence[Tensor], unembed: Tensor, norm: ReadoutNorm) -> List[Tensor]:
    """``U·(g ⊙ h̃)`` ([P_j, vocab], fp32) for each of several [P_j, d] hidden-state batches.

    One pass over the unembedding for all of them (it is read from memory once instead
    of once per call); pass each result as ``hidden_logits`` to
    :func:`neuron_attribution_scores` with the same ``hidden``.
    """
    device = unembed.device
    g = norm.gain.to(device=device, dtype=torch.float32)
    parts = []
    for hidden in hiddens:
        h = hidden.to(device=device, dtype=torch.float32)
        if norm.centred:
            h = h - h.mean(1, keepdim=True)
        parts.append(h * g)
    sizes = [p.shape[0] for p in parts]
    with torch.no_grad():
        a = _unembed_times(unembed, torch.cat(parts).t().contiguous(), _default_budget(device)).t()
    return [x.contiguous() for x in a.split(sizes)]


@dataclass
class _Problem:
    """Per-call small tensors shared by the fused backends (all fp32)."""

    a: Tensor  # [P, vocab]  U(g ⊙ h̃)
    beta: Optional[Tensor]  # [vocab]  U b + b_U, or None when zero
    c: Tensor  # [P, n]  λ m
    inv_r: Tensor  # [P, n]  1 / rms_i  (or 1 / σ_i)
    target_logit: Tensor  # [P, n]  amplified logit of w_p (nats)
    base_logprob: Tensor  # [P]  log softmax(c = 0)[w_p]
    ref_logit: Tensor  # [P, n]  max amplified logit over candidate tokens (nats)
    block: Callable[[int, int], Tensor]  # rows k0:k1 of W as fp32 [k1-k0, n]
    readout: Optional[Tensor]  # the caller's cached W (any dtype), if given


def _prepare(
    hidden: Tensor,
    activations: Tensor,
    down_weight: Tensor,
    unembed: Tensor,
    norm: ReadoutNorm,
    token_ids: Tensor,
    scale: float,
    unembed_bias: Optional[Tensor],
    readout: Optional[Tensor],
    budget: int,
    hidden_logits: Optional[Tensor] = None,
) -> _Problem:
    device = unembed.device
    d = unembed.shape[1]
    vocab = unembed.shape[0]
    g = norm.gain.to(device=device, dtype=torch.float32)
    h = hidden.to(device=device, dtype=torch.float32)
    if norm.centred:
        h = h - h.mean(1, keepdim=True)
    v = _prepared_down(down_weight.to(device), norm.centred)  # [d, n]
    c = activations.to(device=device, dtype=torch.float32) * float(scale)

    # rms_i² · d = |h|² + 2c h·v + c²|v|²  (clamped: rounding could make it dip below 0)
    hh = (h * h).sum(1, keepdim=True)  # [P, 1]
    hv = h @ v  # [P, n]
    vv = torch.linalg.vector_norm(v, dim=0).square_()  # [n]; no [d, n] temporary
    sq = torch.addcmul(hh, c, hv, value=2.0).addcmul_(c * c, vv.expand_as(c)).clamp_min_(0.0)
    inv_r = torch.rsqrt(sq.div_(d).add_(norm.eps))
    inv_r0 = torch.rsqrt(hh / d + norm.eps)  # [P, 1] baseline (c = 0)

    if hidden_logits is not None:
        a = hidden_logits.to(device=device, dtype=torch.float32).contiguous()
    else:
        a = _unembed_times(unembed, (h * g).t().contiguous(), budget).t().contiguous()  # [P, vocab]
    beta: Optional[Tensor] = None
    if norm.bias is not None:
        beta = _unembed_times(unembed, norm.bias.to(device=device, dtype=torch.float32)[:, None], budget)[:, 0]
    if unembed_bias is not None:
        ub = unembed_bias.to(device=device, dtype=torch.float32)
        beta = ub.clone() if beta is None else beta + ub

    tok = token_ids.to(device=device, dtype=torch.long)
    base = a * inv_r0
    if beta is not None:
        base = base + beta
    base_logprob = base.gather(1, tok[:, None])[:, 0] - torch.logsumexp(base, 1)

    if readout is not None:
        w_full = readout.to(device)

        def block(k0: int, k1: int) -> Tensor:
            return w_full[k0:k1].float()

        def rows_of(idx: Tensor) -> Tensor:
            return w_full.index_select(0, idx).float()

    else:

        def block(k0: int, k1: int) -> Tensor:
            return _readout_block(unembed, g, v, k0, k1)

        def rows_of(idx: Tensor) -> Tensor:
            return (unembed.index_select(0, idx).float() * g) @ v

    # Candidate tokens: each prompt's target and its top base tokens.  Their amplified
    # logits are exact (one row of W each) and give the exp2 reference.
    k_top = min(_N_REFERENCE_TOKENS, vocab)
    cand = torch.cat([tok[:, None], base.topk(k_top, dim=1).indices], 1)  # [P, 1 + k_top]
    uniq, inverse = torch.unique(cand, return_inverse=True)
    w_c = rows_of(uniq)[inverse]  # [P, K, n]
    z_c = torch.addcmul(a.gather(1, cand)[:, :, None], c[:, None, :], w_c).mul_(inv_r[:, None, :])
    if beta is not None:
        z_c.add_(beta[cand][:, :, None])
    return _Problem(
        a=a,
        beta=beta,
        c=c,
        inv_r=inv_r,
        target_logit=z_c[:, 0, :].contiguous(),
        base_logprob=base_logprob,
        ref_logit=z_c.amax(1),
        block=block,
        readout=None if readout is None else w_full,
    )


# Elements per [P, rows, neurons] tile on CPU (each tile is swept four times, so it should
# stay cache-sized); `benchmarks/bench_solve_tiles.py` times other sizes.
CPU_TILE_ELEMENTS = 1 << 20


def _tile_shape(n_prompts: int, n: int, budget: int, on_cpu: bool) -> Tuple[int, int, int]:
    """(W block rows, tile vocab rows, tile neurons) for a memory budget in bytes.

    Half the budget holds a block of W; the other half (capped to stay cache-sized
    on CPU, where each tile is swept four times) holds the [P, rows, neurons] tile.
    """
    elems = max(1, budget // 8)  # fp32 elements per half
    block_rows = max(1, elems // n)
    tile_elems = min(elems, CPU_TILE_ELEMENTS if on_cpu else (64 << 20))
    min_rows = min(block_rows, 32)
    tile_n = max(1, min(n, tile_elems // (n_prompts * min_rows)))
    tile_rows = max(1, min(block_rows, tile_elems // (n_prompts * tile_n)))
    return block_rows, tile_rows, tile_n


def _lse_torch(pb: _Problem, vocab: int, budget: int, cols: Optional[Tensor] = None, exact: bool = False) -> Tensor:
    """log-sum-exp over the vocabulary of the amplified logits, [P, n] (nats).

    Streams W in row blocks and [P, rows, neurons] tiles.  With ``exact=False`` the
    exponentials are taken relative to the fixed candidate reference (one pass
    less per tile); ``exact=True`` keeps a running max (used for the overflow
    fallback).  ``cols`` restricts the computation to a subset of neurons.
    """
    c, inv_r, ref = pb.c, pb.inv_r, pb.ref_logit
    if cols is not None:
        c, inv_r, ref = c[:, cols], inv_r[:, cols], ref[:, cols]
    n_prompts, n = c.shape
    device = c.device
    # Work in log2 units: z₂ = z·log2(e), so that exp2 can be used.
    irl = inv_r * _LOG2E
    neg_ref = ref * -_LOG2E
    betal = pb.beta * _LOG2E if pb.beta is not None else None
    block_rows, tile_rows, tile_n = _tile_shape(n_prompts, n, budget, device.type == "cpu")
    acc = torch.zeros(n_prompts, n, device=device, dtype=torch.float32)
    run_max = torch.full_like(acc, -math.inf) if exact else None
    buf = torch.empty(n_prompts, tile_rows, tile_n, device=device, dtype=torch.float32)
    partial = torch.empty(n_prompts, tile_n, device=device, dtype=torch.float32)
    for k0, k1 in _row_blocks(vocab, block_rows):
        w_blk = pb.block(k0, k1)
        if cols is not None:
            w_blk = w_blk[:, cols]
        for j0, j1 in _row_blocks(n, tile_n):
            c_j = c[:, None, j0:j1]
            irl_j = irl[:, None, j0:j1]
            for t0, t1 in _row_blocks(k1 - k0, tile_rows):
                z = buf[:, : t1 - t0, : j1 - j0]
                # y = a + c·W, then y·(log2e / rms) − R, then 2^(...), then Σ_k.
                torch.addcmul(pb.a[:, k0 + t0 : k0 + t1, None], w_blk[None, t0:t1, j0:j1], c_j, out=z)
                if exact:
                    z.mul_(irl_j)
                    if betal is not None:
                        z.add_(betal[None, k0 + t0 : k0 + t1, None])
                    new_max = torch.maximum(run_max[:, j0:j1], z.amax(1))
                    acc[:, j0:j1].mul_(torch.exp2(run_max[:, j0:j1] - new_max))
                    run_max[:, j0:j1] = new_max
                    z.sub_(new_max[:, None, :])
                else:
                    torch.addcmul(neg_ref[:, None, j0:j1], z, irl_j, out=z)
                    if betal is not None:
                        z.add_(betal[None, k0 + t0 : k0 + t1, None])
                torch.exp2(z, out=z)
                p = partial[:, : j1 - j0]
                torch.sum(z, 1, out=p)
                acc[:, j0:j1].add_(p)
    if exact:
        return (run_max + torch.log2(acc)) * _LN2
    return ref + torch.log2(acc) * _LN2


def _lse_fused_torch(pb: _Problem, vocab: int, budget: int) -> Tensor:
    lse = _lse_torch(pb, vocab, budget)
    bad = ~torch.isfinite(lse)
    if bool(bad.any()):
        # Some token sits > ~77 nats above every candidate: redo those neurons exactly.
        cols = bad.any(0).nonzero()[:, 0]
        lse[:, cols] = _lse_torch(pb, vocab, budget, cols=cols, exact=True)
    return lse


def _lse_triton(pb: _Problem, vocab: int, budget: int) -> Tensor:
    from . import attribution_triton

    n_prompts, n = pb.c.shape
    row_max = torch.full((n_prompts, n), -math.inf, device=pb.c.device, dtype=torch.float32)
    row_sum = torch.zeros_like(row_max)
    if pb.readout is not None:
        # The cached readout is read in place, in its own dtype: one launch.
        blocks = [(0, vocab, pb.readout)]
    else:
        block_rows = max(1, budget // (8 * max(1, n)))
        blocks = ((k0, k1, None) for k0, k1 in _row_blocks(vocab, block_rows))
    for k0, k1, w in blocks:
        attribution_triton.lse_update(
            pb.block(k0, k1) if w is None else w,
            pb.a[:, k0:k1],
            pb.c,
            pb.inv_r,
            row_max,
            row_sum,
            bias=None if pb.beta is None else pb.beta[k0:k1],
        )
    return attribution_triton.finish_lse(row_max, row_sum)


def _scores_materialised(
    hidden: Tensor,
    activations: Tensor,
    down_weight: Tensor,
    unembed: Tensor,
    norm: ReadoutNorm,
    token_ids: Tensor,
    scale: float,
    unembed_bias: Optional[Tensor],
) -> Tensor:
    """Reference: per prompt, build all d_ff amplified hidden states and their logits at once.

    This is the straightforward approach (a [d_ff, vocab] logit matrix per prompt).
    """
    device = unembed.device
    u = unembed.float()
    v_t = down_weight.to(device).float().t()  # [n, d]
    ub = None if unembed_bias is None else unembed_bias.to(device).float()
    out = torch.empty(activations.shape, device=device, dtype=torch.float32)
    for p in range(hidden.shape[0]):
        h = hidden[p].to(device).float()
        w = int(token_ids[p])
        base = norm.apply(h[None]) @ u.t()
        if ub is not None:
            base = base + ub
        base_lp = torch.log_softmax(base, -1)[0, w]
        c = activations[p].to(device).float() * float(scale)
        x = torch.addcmul(h[None, :], c[:, None], v_t)  # [n, d]
        logits = norm.apply(x) @ u.t()  # [n, vocab]
        del x
        if ub is not None:
            logits += ub
        out[p] = logits[:, w] - torch.logsumexp(logits, 1) - base_lp
        del logits
    return out


def _scores_loop(
    hidden: Tensor,
    activations: Tensor,
    down_weight: Tensor,
    unembed: Tensor,
    norm: ReadoutNorm,
    token_ids: Tensor,
    scale: float,
    unembed_bias: Optional[Tensor],
    neurons: Optional[Tensor] = None,
) -> Tensor:
    """Ground truth: one norm + unembedding forward per (prompt, amplified neuron).

    ``neurons`` restricts the loop to a subset (for timing); other entries are NaN.
    """
    device = unembed.device
    u = unembed.float()
    v = down_weight.to(device).float()
    ub = None if unembed_bias is None else unembed_bias.to(device).float()

    def logprob(x: Tensor, w: int) -> Tensor:
        logits = u @ norm.apply(x)
        if ub is not None:
            logits = logits + ub
        return torch.log_softmax(logits, -1)[w]

    idx = range(activations.shape[1]) if neurons is None else [int(i) for i in neurons]
    out = torch.full(activations.shape, math.nan, device=device, dtype=torch.float32)
    for p in range(hidden.shape[0]):
        h = hidden[p].to(device).float()
        w = int(token_ids[p])
        base_lp = logprob(h, w)
        for i in idx:
            c = float(activations[p, i]) * float(scale)
            out[p, i] = logprob(h + c * v[:, i], w) - base_lp
    return out


def _triton_usable() -> bool:
    try:
        from . import attribution_triton
    except Exception:  # pragma: no cover - defensive
        return False
    return attribution_triton.triton_available()


def neuron_attribution_scores(
    hidden: Tensor,
    activations: Tensor,
    down_weight: Tensor,
    unembed: Tensor,
    norm: ReadoutNorm,
    token_ids: Tensor,
    scale: float = 30.0,
    unembed_bias: Optional[Tensor] = None,
    readout: Optional[Tensor] = None,
    backend: str = "auto",
    max_chunk_bytes: Optional[int] = None,
    hidden_logits: Optional[Tensor] = None,
) -> Tensor:
    """Score each neuron by the log-probability change its amplification causes.

    ``score[p, i] = log softmax(U·norm(h_p + λ m_{p,i} v_i) + b_U)[w_p]
    − log softmax(U·norm(h_p) + b_U)[w_p]`` (see the module docstring).

    Args:
        hidden: [P, d] residual stream at the readout position (post-attention).
        activations: [P, d_ff] neuron activations (input of the down projection).
        down_weight: [d, d_ff] down-projection weight; column ``i`` is ``v_i``
            (``nn.Linear.weight``; for GPT-2's ``Conv1D`` pass ``weight.T``).
        unembed: [vocab, d] unembedding (lm-head weight).
        norm: the final norm before the lm head.
        token_ids: [P] token whose log-probability is scored, per prompt.
        scale: amplification factor λ.
        unembed_bias: optional [vocab] lm-head bias.
        readout: optional precomputed :func:`readout_product` ``(unembed,
            down_weight, norm)``; reusing it skips the [vocab × d × d_ff] matmul.
        backend: ``"torch"`` (streamed, bounded memory), ``"triton"`` (CUDA, or
            CPU under ``TRITON_INTERPRET=1``), ``"materialised"`` (reference: a
            [d_ff, vocab] logit matrix per prompt), ``"loop"`` (brute force: one
            forward per neuron) or ``"auto"`` (triton on CUDA when importable,
            else torch).
        max_chunk_bytes: working-memory budget of the streamed backends; default
            from free memory (capped at 64 MiB on CPU, 1 GiB on CUDA).
        hidden_logits: optional [P, vocab] ``U·(g ⊙ h̃)`` of these prompts, from
            :func:`hidden_readout` (one pass over ``U`` for several layers' calls).

    Returns:
        [P, d_ff] float32 scores on ``unembed``'s device.  Inputs may be
        bf16/fp16; all arithmetic is fp32.
    """
    if backend not in ATTRIBUTION_BACKENDS:
        raise ValueError(f"backend must be one of {ATTRIBUTION_BACKENDS}, got {backend!r}")
    if hidden.dim() != 2 or activations.dim() != 2 or down_weight.dim() != 2 or unembed.dim() != 2:
        raise ValueError("hidden, activations, down_weight and unembed must be 2-D")
    n_prompts, d = hidden.shape
    d_ff = down_weight.shape[1]
    vocab = unembed.shape[0]
    if down_weight.shape[0] != d or unembed.shape[1] != d or norm.gain.shape[0] != d:
        raise ValueError(
            f"inconsistent d_model: hidden {d}, down_weight {tuple(down_weight.shape)}, "
            f"unembed {tuple(unembed.shape)}, gain {tuple(norm.gain.shape)}"
        )
    if activations.shape != (n_prompts, d_ff):
        raise ValueError(f"activations must be [{n_prompts}, {d_ff}], got {tuple(activations.shape)}")
    if token_ids.shape != (n_prompts,):
        raise ValueError(f"token_ids must be [{n_prompts}], got {tuple(token_ids.shape)}")
    if unembed_bias is not None and unembed_bias.shape != (vocab,):
        raise ValueError(f"unembed_bias must be [{vocab}]")
    if hidden_logits is not None and hidden_logits.shape != (n_prompts, vocab):
        raise ValueError(f"hidden_logits must be [{n_prompts}, {vocab}], got {tuple(hidden_logits.shape)}")
    if readout is not None and readout.shape != (vocab, d_ff):
        raise ValueError(f"readout must be [{vocab}, {d_ff}], got {tuple(readout.shape)}")
    if token_ids.numel() and (int(token_ids.min()) < 0 or int(token_ids.max()) >= vocab):
        raise ValueError("token_ids out of range")

    device = unembed.device
    if n_prompts == 0 or d_ff == 0:
        return torch.zeros(n_prompts, d_ff, device=device, dtype=torch.float32)

    with torch.no_grad():
        args = (hidden, activations, down_weight, unembed, norm, token_ids, scale, unembed_bias)
        if backend == "loop":
            return _scores_loop(*args)
        if backend == "materialised":
            return _scores_materialised(*args)
        if backend == "auto":
            backend = "triton" if device.type == "cuda" and _triton_usable() else "torch"
        budget = int(max_chunk_bytes) if max_chunk_bytes is not None else _default_budget(device)
        budget = max(budget, 64)
        pb = _prepare(*args, readout=readout, budget=budget, hidden_logits=hidden_logits)
        if backend == "triton":
            lse = _lse_triton(pb, vocab, budget)
        else:
            lse = _lse_fused_torch(pb, vocab, budget)
        return pb.target_logit - lse - pb.base_logprob[:, None]
