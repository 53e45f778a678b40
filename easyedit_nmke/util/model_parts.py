"""Architecture-neutral access to the parts NMKE reads and writes.

Supported layouts (module templates live in the hparams YAMLs):
Llama / Mistral / Qwen2 / Gemma (``nn.Linear`` down projection, weight ``[d, d_ff]``)
and GPT-2 (``Conv1D`` ``c_proj``, weight ``[d_ff, d]``).  Everything here returns
the down projection as a ``[d, d_ff]`` matrix so the algorithm has one orientation.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from .nethook import get_module


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


def check_module_templates(model: nn.Module, layers, *templates: str) -> None:
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


def norm_parameters(norm: nn.Module) -> Tuple[str, torch.Tensor, Optional[torch.Tensor], float]:
    """(kind, effective gain, bias, eps) of a final norm module."""
    if isinstance(norm, nn.LayerNorm):
        return "layer", norm.weight, norm.bias, float(norm.eps)
    weight = getattr(norm, "weight", None)
    if weight is None:
        raise ArchitectureError(f"final norm {type(norm).__name__} has no weight")
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
    block = get_module(model, layer_module)
    if hasattr(block, "post_feedforward_layernorm"):
        return f"{layer_module}.post_feedforward_layernorm"
    return mlp_module


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
    logits = model.get_output_embeddings()(hidden[rows, cols])
    cap = final_logit_softcap(model)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits
