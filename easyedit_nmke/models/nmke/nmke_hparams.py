"""Hyper-parameters of NMKE, in EasyEdit's dataclass style.

The AlphaEdit fields keep AlphaEdit's names and meaning so an AlphaEdit YAML can be
turned into an NMKE YAML by changing ``alg_name`` and adding the ``mask_*`` and
``attribution_*`` keys.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Union

from ...util.hparams import HParamsError, PluginHyperParams
from .attribution import ATTRIBUTION_BACKENDS

MOM2_DTYPES = ("float32", "float64")
MASK_APPLICATIONS = ("restricted_solve", "zero_update")
MASK_MODES = ("hybrid", "general", "specific", "fixed", "none")
ATTRIBUTION_TOKENS = ("top1", "target")


@dataclass
class NMKEHyperParams(PluginHyperParams):
    ALG_NAME = "NMKE"

    # --- model / placement -------------------------------------------------
    model_name: str
    layers: List[int]
    rewrite_module_tmp: str  # FFN down projection, e.g. "model.layers.{}.mlp.down_proj"
    layer_module_tmp: str  # decoder block, e.g. "model.layers.{}"
    mlp_module_tmp: str
    ln_f_module: str
    alg_name: str = "NMKE"
    device: Union[int, str] = "cpu"
    # Accepted so AlphaEdit YAMLs load unchanged; NMKE reads the unembedding through
    # ``model.get_output_embeddings()`` (tied or not) and never needs the attention.
    attn_module_tmp: Optional[str] = None
    lm_head_module: Optional[str] = None
    layer_selection: str = "all"  # AlphaEdit's only value: every layer in ``layers``
    fact_token: str = "subject_last"

    # --- target vector (ROME/MEMIT/AlphaEdit compute_z) -----------------------
    v_num_grad_steps: int = 25
    v_lr: float = 0.5
    # The loss is always on the model's logits, as in AlphaEdit's compute_z, whose
    # v_loss_layer only names a traced block; -1 or the last block index.
    v_loss_layer: int = -1
    v_weight_decay: float = 1e-3
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    # Stop the optimisation once the mean target-token probability reaches this value.
    v_stop_prob: float = 0.98
    context_template_length_params: List[List[int]] = field(default_factory=lambda: [[10, 5]])

    # --- null-space projection (AlphaEdit) ------------------------------------
    # a text file/folder, "wikitext-2"/"wikipedia", an HF dataset id or "model-generated" (util/corpus.py)
    mom2_dataset: str = "wikipedia"
    mom2_n_samples: int = 100000
    # Precision of the stored E[k kᵀ] and of its eigendecomposition (the null spaces).
    mom2_dtype: str = "float32"
    mom2_max_length: int = 128
    nullspace_threshold: float = 2e-2
    L2: float = 10.0
    stats_dir: Optional[str] = None  # default: <cache>/stats

    # --- NMKE neuron attribution and masking ---------------------------------
    mask_mode: str = "hybrid"
    attribution_scale: float = 30.0  # lambda: activation amplification
    attribution_token: str = "top1"  # "top1": the model's own prediction; "target": target_new's first token
    attribution_backend: str = "auto"
    # Keep U·diag(g)·V per layer between edits and update it by the low-rank edit
    # instead of recomputing it (vocab × d_ff floats per layer; turn off for large models).
    attribution_cache_readout: bool = True
    entropy_alpha: float = 30.0
    general_ratio_a: float = 0.1
    general_ratio_b: float = 0.3
    specific_ratio_a: float = 0.1
    specific_ratio_b: float = 0.3
    # mode 'fixed': both families keep the neurons at or above their (1 - ratio) score
    # quantile; ties at the threshold are all kept, so a family can keep more than this
    # share (the general score is a count of prompts); masks report the share kept.
    fixed_ratio: float = 0.35
    # How a mask shapes the update: "restricted_solve" solves the null-space constrained
    # problem over the kept neurons only (null space of the corpus moment restricted to
    # them); "zero_update" solves it over all neurons and zeroes the unkept neurons'
    # columns afterwards (the authors' code; README "What was learned on the way").
    mask_application: str = "restricted_solve"

    # --- speed (no effect on the result beyond float rounding) -------------------
    # Exact shortcuts: the z optimisation runs only the blocks above the last edit
    # layer, and the forwards below it are shared between z, keys and attribution.
    # False runs the reference path (a full forward per step and per phase).
    fast_path: bool = True

    # --- EasyEdit bookkeeping ------------------------------------------------
    batch_size: int = 1
    max_length: int = 40
    model_parallel: bool = False

    def validate(self) -> None:
        if not self.layers:
            raise HParamsError("layers must name at least one layer")
        if sorted(set(self.layers)) != list(self.layers):
            raise HParamsError(f"layers must be strictly increasing, got {self.layers}")
        if self.mask_mode not in MASK_MODES:
            raise HParamsError(f"mask_mode must be one of {MASK_MODES}, got {self.mask_mode!r}")
        if self.attribution_token not in ATTRIBUTION_TOKENS:
            raise HParamsError(
                f"attribution_token must be one of {ATTRIBUTION_TOKENS}, got {self.attribution_token!r}"
            )
        if self.attribution_backend not in ATTRIBUTION_BACKENDS:
            raise HParamsError(
                f"attribution_backend must be one of {ATTRIBUTION_BACKENDS}, got {self.attribution_backend!r}"
            )
        if self.layer_selection != "all":
            raise HParamsError(f"layer_selection {self.layer_selection!r} is not supported (only 'all')")
        if self.fact_token != "subject_last":
            raise HParamsError(f"fact_token {self.fact_token!r} is not supported (only 'subject_last')")
        for name in ("general_ratio", "specific_ratio"):
            a, b = getattr(self, f"{name}_a"), getattr(self, f"{name}_b")
            if not (0.0 < b and a + b <= 1.0 and a >= 0.0):
                raise HParamsError(f"{name}_a/_b must give ratios in (0, 1]: got a={a}, b={b}")
        if not 0.0 < self.fixed_ratio <= 1.0:
            raise HParamsError(f"fixed_ratio must be in (0, 1], got {self.fixed_ratio}")
        if self.v_num_grad_steps < 1 or self.v_lr <= 0:
            raise HParamsError("v_num_grad_steps must be >= 1 and v_lr > 0")
        if self.nullspace_threshold <= 0 or self.L2 < 0:
            raise HParamsError("nullspace_threshold must be > 0 and L2 >= 0")
        if self.entropy_alpha <= 0 or self.attribution_scale <= 0:
            raise HParamsError(
                "entropy_alpha and attribution_scale must be > 0, got "
                f"{self.entropy_alpha} and {self.attribution_scale}"
            )
        if not 0.0 < self.v_stop_prob <= 1.0:
            raise HParamsError(f"v_stop_prob must be in (0, 1], got {self.v_stop_prob}")
        if self.kl_factor < 0 or self.v_weight_decay < 0 or self.clamp_norm_factor <= 0:
            raise HParamsError(
                "kl_factor and v_weight_decay must be >= 0 and clamp_norm_factor > 0, got "
                f"{self.kl_factor}, {self.v_weight_decay} and {self.clamp_norm_factor}"
            )
        if self.mom2_n_samples < 1 or self.mom2_max_length < 2:
            raise HParamsError(
                "mom2_n_samples must be >= 1 and mom2_max_length >= 2, got "
                f"{self.mom2_n_samples} and {self.mom2_max_length}"
            )
        if self.mask_application not in MASK_APPLICATIONS:
            raise HParamsError(f"mask_application must be one of {MASK_APPLICATIONS}, got {self.mask_application!r}")
        if self.mom2_dtype not in MOM2_DTYPES:
            raise HParamsError(f"mom2_dtype must be one of {MOM2_DTYPES}, got {self.mom2_dtype!r}")
        for length, count in self.context_template_length_params:
            if length < 1 or count < 0:
                raise HParamsError(
                    f"context_template_length_params entries are [length >= 1, count >= 0], got {[length, count]}"
                )
