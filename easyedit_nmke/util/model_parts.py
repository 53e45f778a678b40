"""Architecture-neutral access to the parts NMKE reads and writes.

Supported layouts (module templates live in the hparams YAMLs):
Llama / Mistral / Qwen2 / Gemma (``nn.Linear`` down projection, weight ``[d, d_ff]``)
and GPT-2 (``Conv1D`` ``c_proj``, weight ``[d_ff, d]``).  Everything here returns
the down projection as a ``[d, d_ff]`` matrix so the algorithm has one orientation.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .nethook import capture, get_module, hidden_of, record_calls

if TYPE_CHECKING:
    from transformers import DynamicCache
    from transformers.cache_utils import Cache


class ArchitectureError(ValueError):
    """The model does not have the modules the hparams name."""


def num_layers(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, attr, None)
        if value is None and config is not None and hasattr(config, "get_text_config"):
            value = getattr(config.get_text_config(), attr, None)
        if isinstance(value, int):
            return value
    raise ArchitectureError(f"cannot tell the number of layers of {type(model).__name__}")


def check_module_templates(model: nn.Module, layers: Sequence[int], *templates: str) -> None:
    """Fail early, naming the problem, when a layer index or a module template does not fit the model."""
    n = num_layers(model)
    bad = [layer for layer in layers if not 0 <= layer < n]
    if bad:
        raise ArchitectureError(f"layer index {bad} out of range: {type(model).__name__} has {n} layers (0..{n - 1})")
    for template in templates:
        name = template.format(layers[0]) if "{}" in template else template
        try:
            get_module(model, name)
        except LookupError as exc:
            raise ArchitectureError(
                f"module template {template!r} does not match {type(model).__name__} "
                f"(no module {name!r}); this architecture needs its own module templates in the hparams"
            ) from exc


def _is_conv1d(module: nn.Module) -> bool:
    # transformers' GPT-2 Conv1D stores the weight as [in_features, out_features].
    return type(module).__name__ == "Conv1D"


def down_weight(module: nn.Module) -> torch.Tensor:
    """The down projection weight as a ``[d, d_ff]`` view (column i = neuron i's write vector)."""
    weight = module.weight
    return weight.T if _is_conv1d(module) else weight


def down_weight_param_shape_update(module: nn.Module, delta_d_by_f: torch.Tensor) -> torch.Tensor:
    """Turn a ``[d, d_ff]`` update into the parameter's own orientation."""
    return delta_d_by_f.T if _is_conv1d(module) else delta_d_by_f


def unembedding(model: nn.Module) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Unembedding matrix ``[vocab, d]`` and bias; handles tied embeddings (SmolLM2, GPT-2)."""
    head = model.get_output_embeddings()
    if head is None:
        raise ArchitectureError(f"{type(model).__name__} has no output embeddings")
    return head.weight, getattr(head, "bias", None)


def final_logit_softcap(model: nn.Module) -> Optional[float]:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return getattr(config, "final_logit_softcapping", None)


def norm_parameters(norm: nn.Module, role: str = "final norm") -> Tuple[str, torch.Tensor, Optional[torch.Tensor], float]:
    """(kind, effective gain, bias, eps) of a norm module (``role`` names it in errors)."""
    if isinstance(norm, nn.LayerNorm):
        return "layer", norm.weight, norm.bias, float(norm.eps)
    weight = getattr(norm, "weight", None)
    if weight is None:
        raise ArchitectureError(f"{role} {type(norm).__name__} has no weight")
    eps = getattr(norm, "variance_epsilon", None)
    if eps is None:
        eps = getattr(norm, "eps", 1e-6)
    # Gemma-style RMSNorm multiplies by (1 + weight).
    gain = 1.0 + weight if "Gemma" in type(norm).__name__ else weight
    return "rms", gain, None, float(eps)


def mlp_residual_contribution_module(model: nn.Module, layer_module: str, mlp_module: str) -> str:
    """Name of the module whose output is what the FFN adds to the residual stream.

    Gemma applies a post-feedforward norm before the residual add; elsewhere the MLP
    output itself is added.
    """
    if post_ffn_norm(model, layer_module) is not None:
        return f"{layer_module}.post_feedforward_layernorm"
    return mlp_module


def post_ffn_norm(model: nn.Module, layer_module: str) -> Optional[nn.Module]:
    """The norm between the FFN output and the residual add (Gemma), or None."""
    return getattr(get_module(model, layer_module), "post_feedforward_layernorm", None)


def _post_ffn_gain_and_eps(norm: nn.Module) -> Tuple[torch.Tensor, float]:
    kind, gain, _, eps = norm_parameters(norm, role="post-FFN norm")
    if kind != "rms":
        raise ArchitectureError(f"post-FFN norm {type(norm).__name__} is not an RMSNorm")
    return gain.detach(), eps


def _closest_on_norm_sphere(
    gain: torch.Tensor, target: torch.Tensor, hint: torch.Tensor, iterations: int = 100
) -> torch.Tensor:
    """argmin over v with mean(v²) = 1 of ‖g ⊙ v − t‖², per column (float64).

    Args:
        gain: [d, 1] g.  target: [d, n] t.  hint: [d, n] direction used where the objective
            does not care (coordinates of the smallest gain in the "hard case" below).

    The minimiser is v = g ⊙ t / (g² + μ) with μ ≥ μ₀ = −min g² (over all coordinates) and
    mean(v²) = 1; mean(v²) falls monotonically in μ > μ₀, so μ is found by bisection.  When
    t is zero on every coordinate of the smallest gain and the other coordinates at μ₀
    stay inside the sphere (the "hard case"; with Gemma's exactly-zero gains, whenever the
    wanted contribution is reachable or small), μ = μ₀ and the remaining length goes to
    those coordinates, along ``hint`` (the current output, so a zero change stays zero).
    """
    d = gain.shape[0]
    g2 = gain * gain  # [d, 1]
    gt = gain * target  # [d, n]
    active = gt != 0
    mu0 = -g2.min()
    smallest = g2 == g2.min()  # [d, 1]

    def solution(mu: torch.Tensor) -> torch.Tensor:  # mu: [n]; masked so 0/0 never happens
        return torch.where(active, gt / torch.where(active, g2 + mu, torch.ones_like(gt)), torch.zeros_like(gt))

    # Hard case: nothing to fit on the smallest-gain coordinates and room left at μ₀.
    at_mu0 = torch.where(smallest, torch.zeros_like(gt), solution(mu0.expand(gt.shape[1])))
    room = d - at_mu0.pow(2).sum(0)  # [n]
    hard = (~(active & smallest).any(0)) & (room >= 0)
    fill = torch.where(smallest, hint, torch.zeros_like(hint))
    fill_norm = fill.norm(dim=0)
    uniform = smallest.to(gt.dtype).expand_as(gt)
    fill = torch.where(fill_norm > 0, fill / fill_norm.clamp_min(1e-300), uniform / uniform.norm(dim=0))
    hard_v = at_mu0 + fill * room.clamp_min(0).sqrt()

    lower = mu0.expand(gt.shape[1]).clone()
    upper = torch.maximum(gt.norm(dim=0) / math.sqrt(d), lower)  # mean(v²) ≤ 1 from here on
    for _ in range(iterations):
        mid = (lower + upper) / 2
        too_long = solution(mid).pow(2).mean(0) > 1
        lower = torch.where(too_long, mid, lower)
        upper = torch.where(too_long, upper, mid)
    return torch.where(hard, hard_v, solution(upper))


def ffn_output_change(norm: Optional[nn.Module], output: torch.Tensor, residual_change: torch.Tensor) -> torch.Tensor:
    """The change of the down projection's output that best makes the residual stream move by ``residual_change``.

    Without a post-FFN norm the two are the same.  Gemma adds ``g ⊙ y / rms(y)`` (y the
    down projection's output), which only reaches vectors g ⊙ v with rms(v) = 1, and its
    gain g has (near-)zero coordinates.  The new output is the one whose contribution is
    closest to the wanted one, ``g ⊙ y / rms(y) + r``, among all it can reach (at y's own
    rms; the norm ignores the scale); later edit layers see the change actually made and
    make up what was out of reach.

    Args:
        norm: ``post_ffn_norm(...)`` of the layer, or None.
        output: [d, n] the down projection's current output for each key.
        residual_change: [d, n] the wanted change of what the FFN adds to the residual stream.
    """
    if norm is None:
        return residual_change
    gain, eps = _post_ffn_gain_and_eps(norm)
    g = gain.double().to(output.device)[:, None]
    y = output.double()
    mean_square = y.pow(2).mean(0, keepdim=True)
    wanted = g * y * torch.rsqrt(mean_square + eps) + residual_change.double().to(output.device)
    # At rms s the norm writes g ⊙ v · s / sqrt(s² + eps); keeping y's s, aim that much higher.
    v = _closest_on_norm_sphere(g, wanted * torch.sqrt(1 + eps / mean_square.clamp_min(1e-300)), y)
    return (v * mean_square.sqrt() - y).to(residual_change.dtype)


def linearised_ffn_writes(norm: Optional[nn.Module], down: torch.Tensor) -> torch.Tensor:
    """Neuron write vectors as the residual stream sees them: ``down`` itself, or g ⊙ v_i after a norm.

    Neuron i adds m_i·v_i to the residual stream, unless a norm follows the FFN (Gemma:
    g ⊙ y / rms(y), y = V m).  There the norm's Jacobian maps m_i·v_i to
    (m_i / rms(y)) · (g ⊙ v_i) minus a part along g ⊙ y; that part is dropped (the norm is
    scale invariant, so it sums to about zero over all neurons), which makes the kept
    terms add up exactly to the FFN's contribution g ⊙ y / rms(y), as the m_i·v_i add up
    to y without a norm.  So the attribution uses write vectors g ⊙ v_i (this function)
    and activations m / rms(y) per prompt (``linearised_ffn_activations``), in fp32.

    Args:
        norm: ``post_ffn_norm(...)`` of the layer, or None.
        down: [d, d_ff] down-projection weight (or any [d, k] change of it).
    """
    if norm is None:
        return down
    gain, _ = _post_ffn_gain_and_eps(norm)
    # fp32 whatever the model's dtype: the readout cache is fp32.
    return gain.to(device=down.device, dtype=torch.float32)[:, None] * down.float()


def linearised_ffn_activations(norm: Optional[nn.Module], down: torch.Tensor, activations: torch.Tensor) -> torch.Tensor:
    """Neuron activations to go with ``linearised_ffn_writes``: ``activations``, or m / rms(V m) per prompt.

    Args:
        norm: ``post_ffn_norm(...)`` of the layer, or None.
        down: [d, d_ff] down-projection weight.
        activations: [P, d_ff] neuron activations.
    """
    if norm is None:
        return activations
    _, eps = _post_ffn_gain_and_eps(norm)
    activations = activations.float().to(down.device)
    rms = (activations @ down.float().T).pow(2).mean(1, keepdim=True).add(eps).sqrt()  # [P, 1]
    return activations / rms


def logits_at(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
) -> torch.Tensor:
    """Next-token logits at positions ``(rows[j], cols[j])`` only.

    Running the unembedding on the few positions that matter instead of every
    position saves most of the head's cost (vocab 49k-128k) in the inner loops.
    """
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return head_logits(model, hidden[rows, cols])


# --------------------------------------------------------------------------- truncated forward
#
# In the z optimisation only the output of one block at one position per row changes
# between steps.  Everything below that block, and every position before the changed
# one, is fixed (causal attention), so a step need only run the blocks above it on each
# row's positions from the changed one on, attending to the fixed keys/values of the
# earlier positions.  The blocks are called with the very arguments (attention mask,
# position embeddings, cache object) the model's own forward built for such a cached
# continuation, recorded once with forward pre-hooks, so no architecture is special-cased.


class _RecordedUpdates:
    """Wraps ``cache.update`` to record, per layer index, the key/value states attention used."""

    def __init__(self, cache):
        self.cache = cache
        self.states: Dict[int, Tuple[torch.Tensor, torch.Tensor, int]] = {}

    def __enter__(self) -> "_RecordedUpdates":
        original = type(self.cache).update.__get__(self.cache)

        def update(key_states, value_states, layer_idx, *args, **kwargs):
            keys, values = original(key_states, value_states, layer_idx, *args, **kwargs)
            self.states[layer_idx] = (keys, values, key_states.shape[-2])
            return keys, values

        self.cache.update = update  # instance attribute shadows the method
        return self

    def __exit__(self, *exc) -> None:
        del self.cache.update


class _FixedPast:
    """Stands in for a transformers ``Cache`` in replayed block calls.

    ``update`` returns the layer's fixed past states followed by the new ones and
    stores nothing, so one object serves every replay and no autograd graph outlives
    its step.
    """

    def __init__(self, past: Dict[int, Tuple[torch.Tensor, torch.Tensor]]):
        self.past = past

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = self.past[layer_idx]
        return torch.cat([keys, key_states], dim=-2), torch.cat([values, value_states], dim=-2)


def new_cache(model: nn.Module) -> "DynamicCache":
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def forward_with_states(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> Tuple[torch.Tensor, Dict[int, Tuple[torch.Tensor, torch.Tensor]]]:
    """Plain base-model forward that also returns every attention layer's key/value states.

    Returns ``(last_hidden_state, {layer_idx: (keys, values)})``; the states are
    ``[batch, ..., seq, head_dim]`` as the model's cache holds them.
    """
    cache = new_cache(model)
    with _RecordedUpdates(cache) as rec:
        out = model.base_model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True)
    return out.last_hidden_state, {i: (k, v) for i, (k, v, _) in rec.states.items()}


def _left_aligned_prefix(states: torch.Tensor, starts: torch.Tensor, width: int) -> torch.Tensor:
    """Per row r, positions ``[0, starts[r])`` of ``states`` (seq on dim -2), right-aligned in ``width`` slots.

    Slots before a row's prefix are zero (finite) and masked out by the attention mask.
    """
    batch = states.shape[0]
    index = torch.arange(width, device=states.device).view(1, -1) - (width - starts.view(-1, 1))  # [B, width]
    valid = index >= 0
    shape = [batch] + [1] * (states.dim() - 3) + [width, 1]
    gathered = states.gather(-2, index.clamp_min(0).view(shape).expand(*states.shape[:-2], width, states.shape[-1]))
    return gathered * valid.view(shape).to(gathered.dtype)


class SuffixReplay:
    """Blocks ``first..`` of a decoder, replayed on each row's positions from ``starts[r]`` on.

    ``build`` runs the model once on the suffix positions with a cache holding the
    (fixed) states of the earlier positions, recording for every replayed block the
    arguments the model passed it and the past key/value states its attention used.
    ``hidden`` is then the output of block ``first - 1`` at the suffix positions and
    ``logits(h, rows, cols)`` runs blocks ``first..`` from a (possibly modified) ``h``
    and reads next-token logits at suffix positions ``(rows, cols)`` — the same
    numbers as the full model's at ``(rows, starts[rows] + cols)`` up to float rounding.
    """

    def __init__(
        self,
        model: nn.Module,
        blocks: List[nn.Module],
        calls: List[Tuple[Tuple[Any, ...], Dict[str, Any]]],
        past: Optional["_FixedPast"],
        norm: nn.Module,
        hidden: torch.Tensor,
        last_hidden: torch.Tensor,
        starts: torch.Tensor,
        lengths: torch.Tensor,
    ) -> None:
        """Use ``build`` or ``whole``; ``calls[i]`` is the (args, kwargs) the model gave ``blocks[i]``."""
        self.model = model
        self.blocks = blocks
        self.calls = calls
        self.past = past
        self.norm = norm
        self.hidden = hidden  # [B, Ls, d]
        self.last_hidden = last_hidden  # [B, Ls, d] the model's own final (normed) hidden states
        self.starts = starts
        self.lengths = lengths  # [B] suffix lengths

    @classmethod
    def build(
        cls,
        model: nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        starts: torch.Tensor,
        states: Dict[int, Tuple[torch.Tensor, torch.Tensor]],
        block_names: Sequence[str],
        first: int,
        norm_name: str,
    ) -> "SuffixReplay":
        """``input_ids``/``attention_mask``: the right-padded batch ``states`` came from
        (``forward_with_states``); ``block_names``: every decoder block in order; ``first``:
        index of the first block to replay (≥ 1); ``starts[r]`` < row r's length."""
        device = input_ids.device
        lengths = attention_mask.sum(1).to(device)
        starts = starts.to(device)
        if not (starts < lengths).all() or (starts < 0).any():
            raise ValueError("each start must lie inside its row")
        width = int(starts.max())
        suffix_lengths = lengths - starts
        suffix_width = int(suffix_lengths.max())
        j = torch.arange(suffix_width, device=device).view(1, -1)
        positions = (starts.view(-1, 1) + j).clamp_max(input_ids.shape[1] - 1)
        suffix_ids = input_ids.gather(1, positions)
        suffix_mask = (j < suffix_lengths.view(-1, 1)).to(attention_mask.dtype)
        prefix_mask = (torch.arange(width, device=device).view(1, -1) >= (width - starts).view(-1, 1)).to(attention_mask.dtype)
        cache = new_cache(model)
        for layer_idx in sorted(states):
            keys, values = states[layer_idx]
            cache.update(_left_aligned_prefix(keys, starts, width), _left_aligned_prefix(values, starts, width), layer_idx)
        with _RecordedUpdates(cache) as rec:
            replay = cls._recorded(
                model,
                block_names,
                first,
                norm_name,
                lambda: model.base_model(
                    input_ids=suffix_ids,
                    attention_mask=torch.cat([prefix_mask, suffix_mask], dim=1),
                    position_ids=positions,
                    past_key_values=cache,
                    use_cache=True,
                ),
                starts=starts,
                lengths=suffix_lengths,
            )
        replay.past = _FixedPast(
            {i: (k[..., : k.shape[-2] - n, :], v[..., : v.shape[-2] - n, :]) for i, (k, v, n) in rec.states.items()}
        )
        return replay

    @classmethod
    def whole(
        cls,
        model: nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        block_names: Sequence[str],
        first: int,
        norm_name: str,
    ) -> "SuffixReplay":
        """Blocks ``first..`` replayed on every position (``starts`` all 0, no cached past).

        For callers that change the output of block ``first - 1`` at any position: one
        plain forward records the blocks' arguments, ``hidden`` is block ``first - 1``'s
        output and ``last_hidden`` the model's final hidden states for that input.
        """
        return cls._recorded(
            model,
            block_names,
            first,
            norm_name,
            lambda: model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False),
            starts=torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device),
            lengths=attention_mask.sum(1),
        )

    @classmethod
    def _recorded(cls, model, block_names, first, norm_name, forward, starts, lengths) -> "SuffixReplay":
        """Run ``forward()`` recording the arguments of blocks ``first..`` and the output of block ``first - 1``."""
        if not 1 <= first <= len(block_names):
            raise ValueError(f"first block to replay must be in [1, {len(block_names)}], got {first}")
        replayed = list(block_names[first:])
        with torch.no_grad(), record_calls(model, replayed) as calls, capture(model, [block_names[first - 1]]) as outputs:
            out = forward()
        missing = [name for name in replayed if name not in calls]
        if missing:
            raise ArchitectureError(f"blocks {missing} were not called by {type(model).__name__}'s forward")
        return cls(
            model=model,
            blocks=[get_module(model, name) for name in replayed],
            calls=[calls[name] for name in replayed],
            past=None,
            norm=get_module(model, norm_name),
            hidden=outputs[block_names[first - 1]],
            last_hidden=out.last_hidden_state,
            starts=starts,
            lengths=lengths,
        )

    def run(self, hidden: torch.Tensor) -> torch.Tensor:
        """Output of the last replayed block for ``hidden`` [B, Ls, d] entering block ``first``."""
        return replay_blocks(self.blocks, self.calls, hidden, self.past)

    def logits(self, hidden: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Next-token logits at suffix positions ``(rows[j], cols[j])`` after replaying from ``hidden``."""
        return head_logits(self.model, self.norm(self.run(hidden)[rows, cols]))


class ReplayMismatch(RuntimeError):
    """A replay of recorded blocks did not reproduce the full model's logits (unsupported architecture)."""


def check_replay(replayed: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """``replayed`` logits must be the full forward's ``expected`` up to the rounding of ``dtype``."""
    scale = float(expected.abs().max()) + 1.0
    error = float((replayed.detach() - expected).abs().max())
    tolerance = (1e-3 if dtype in (torch.float32, torch.float64) else 3e-2) * scale
    if not error <= tolerance:
        raise ReplayMismatch(f"{what} differs from the full model by {error:.3g} (> {tolerance:.3g})")


def recorded_input(call: Tuple[tuple, dict]) -> torch.Tensor:
    """The hidden states a recorded block call received."""
    args, kwargs = call
    return args[0] if args else kwargs["hidden_states"]


def replay_blocks(
    blocks: Sequence[nn.Module],
    calls: Sequence[Tuple[tuple, dict]],
    hidden: torch.Tensor,
    past: Optional["Cache"] = None,
) -> torch.Tensor:
    """Call ``blocks`` in turn on ``hidden`` with their recorded arguments (``nethook.record_calls``).

    Any transformers ``Cache`` among the arguments is replaced by ``past`` (None when
    the recorded forward ran without a cache).
    """
    from transformers.cache_utils import Cache

    for block, (args, kwargs) in zip(blocks, calls):
        kwargs = {k: (past if isinstance(v, Cache) else v) for k, v in kwargs.items()}
        if args:
            args = (hidden,) + tuple(past if isinstance(a, Cache) else a for a in args[1:])
        else:
            kwargs["hidden_states"] = hidden
        hidden = hidden_of(block(*args, **kwargs))
    return hidden


def head_logits(model: nn.Module, normed: torch.Tensor) -> torch.Tensor:
    """Unembedding (and Gemma's final soft-cap) of final-normed hidden states."""
    logits = model.get_output_embeddings()(normed)
    cap = final_logit_softcap(model)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits
