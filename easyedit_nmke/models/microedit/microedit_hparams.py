"""Hyper-parameters of MicroEdit, in EasyEdit's dataclass style.

MicroEdit hooks a TopK sparse autoencoder into the residual stream after decoder
block ``layers[0]``, trains only the decoder rows of the latents an edit's prompt
activates, and routes an input through the SAE only when its reconstruction distance
(ARD) is at most ``ard_threshold``.

Where the SAE comes from, in order: ``sae_path`` when it exists (a local SAE-Lens
folder, or an EleutherAI ``sparsify`` folder with ``cfg.json`` + ``sae.safetensors``);
else, when ``sae_train_*`` are given, an SAE the plugin trains on the model itself and
caches at ``sae_path`` (see ``train_sae.py``); else ``sae_release``/``sae_id`` through
``sae_lens.SAE.from_pretrained`` (online).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Union

from ...util.hparams import HParamsError, PluginHyperParams
from ...util.env import cache_root

SAE_FORMATS = ("auto", "sae_lens", "sparsify")


@dataclass
class MicroEditHyperParams(PluginHyperParams):
    ALG_NAME = "MicroEdit"

    # --- model / placement -------------------------------------------------
    model_name: str
    layers: List[int]  # exactly one decoder block; the SAE reads and replaces its output
    layer_module_tmp: str  # decoder block, e.g. "model.layers.{}"
    alg_name: str = "MicroEdit"
    # The final norm (e.g. "model.norm", GPT-2 "transformer.ln_f"): with fast_path, stage-2
    # steps replay only the blocks above the SAE, then this norm and the unembedding.
    # Without it every step runs the whole model (same result, slower).
    ln_f_module: Optional[str] = None
    fast_path: bool = True
    device: Union[int, str] = "cpu"

    # --- the SAE -------------------------------------------------------------
    # Local folder; "{cache}" expands to the plugin's cache directory.
    sae_path: Optional[str] = None
    sae_format: str = "auto"
    sae_release: Optional[str] = None  # SAE-Lens release, e.g. "mistral-7b-res-wg" (online)
    sae_id: Optional[str] = None
    # Override the SAE's own k (the paper uses k=192 with the 32x Llama-3-8B SAE).
    sae_k: Optional[int] = None

    # --- training the plugin's own SAE when none exists -------------------------
    sae_train_d_sae: Optional[int] = None
    sae_train_k: Optional[int] = None
    sae_train_tokens: int = 300_000
    sae_train_heldout_tokens: int = 20_000
    # a text file/folder, "wikitext-2"/"wikipedia", an HF dataset id or "model-generated" (util/corpus.py)
    sae_train_dataset: str = "wikitext-2"
    sae_train_context_length: int = 128
    sae_train_lr: float = 4e-4
    sae_train_batch_tokens: int = 4096
    # Passes over the training activations: on a CPU the model's forward passes cost
    # most of the time, so reusing the activations is the cheap way to more steps.
    sae_train_epochs: int = 1
    sae_train_seed: int = 0

    # --- editing ---------------------------------------------------------------
    edit_lr: float = 5e-5
    # Stage 1 ("distance regularisation"): ARD only; stage 2: ARD + edit loss.
    stage1_steps: int = 10
    stage2_steps: int = 40
    # Stop stage 2 once the mean target-token probability reaches this value (and the
    # ARD is inside the margin below).
    stop_prob: float = 1.0
    # Both stages stop pulling the ARD down once it is at most this share of tau: an edit
    # that ends just under tau drifts above it when later edits move shared decoder rows
    # and is then no longer routed.  1.0 leaves the step counts alone.
    ard_margin: float = 1.0
    # Not in the paper (0 = the paper's procedure): stage 2 also keeps this many earlier
    # edits, those sharing the most decoder rows with this one, routed and predicting
    # their targets while this edit's rows are trained (see rehearsal.py).  Each adds
    # one row to the batch the blocks above the SAE replay per stage-2 step.
    rehearsal_edits: int = 0
    ard_alpha: float = 600.0
    # tau: route through the SAE when ARD <= tau.  None: calibrate on ordinary text.
    ard_threshold: Optional[float] = None
    calibration_samples: int = 1000
    calibration_dataset: str = "wikitext-2"
    calibration_max_length: int = 64
    # Residual-stream positions whose norm exceeds this multiple of the median norm of
    # their input (attention-sink tokens) are left out of the SAE: not trained on,
    # not counted in the ARD, and always passed through unchanged.
    massive_norm_factor: float = 10.0

    # --- EasyEdit bookkeeping ------------------------------------------------
    batch_size: int = 1
    max_length: int = 40
    model_parallel: bool = False

    @property
    def layer(self) -> int:
        return self.layers[0]

    def resolved_sae_path(self) -> Optional[Path]:
        if not self.sae_path:
            return None
        return Path(self.sae_path.replace("{cache}", str(cache_root()))).expanduser()

    @property
    def can_train_sae(self) -> bool:
        return self.sae_train_d_sae is not None and self.sae_train_k is not None

    def validate(self) -> None:
        if len(self.layers) != 1:
            raise HParamsError(f"MicroEdit edits exactly one layer; layers is {self.layers}")
        if self.layers[0] < 0:
            raise HParamsError(f"layer index must be >= 0, got {self.layers[0]}")
        if self.sae_format not in SAE_FORMATS:
            raise HParamsError(f"sae_format must be one of {SAE_FORMATS}, got {self.sae_format!r}")
        if not self.sae_path and not self.sae_release:
            raise HParamsError("MicroEdit needs an SAE: set sae_path (local folder) or sae_release/sae_id")
        if bool(self.sae_release) != bool(self.sae_id):
            raise HParamsError("sae_release and sae_id go together")
        if (self.sae_train_d_sae is None) != (self.sae_train_k is None):
            raise HParamsError("sae_train_d_sae and sae_train_k go together")
        if self.can_train_sae and not (0 < self.sae_train_k <= self.sae_train_d_sae):
            raise HParamsError(
                f"sae_train_k must be in [1, sae_train_d_sae]; got k={self.sae_train_k}, d_sae={self.sae_train_d_sae}"
            )
        if self.sae_train_epochs < 1 or self.sae_train_tokens < 1 or self.sae_train_heldout_tokens < 1:
            raise HParamsError("sae_train_epochs, sae_train_tokens and sae_train_heldout_tokens must be >= 1")
        if self.sae_train_batch_tokens < 1 or self.sae_train_lr <= 0:
            raise HParamsError("sae_train_batch_tokens must be >= 1 and sae_train_lr > 0")
        if self.sae_k is not None and self.sae_k < 1:
            raise HParamsError(f"sae_k must be >= 1, got {self.sae_k}")
        if self.edit_lr <= 0 or self.stage1_steps < 0 or self.stage2_steps < 1:
            raise HParamsError("edit_lr must be > 0, stage1_steps >= 0 and stage2_steps >= 1")
        if self.ard_alpha <= 0:
            raise HParamsError(f"ard_alpha must be > 0, got {self.ard_alpha}")
        if self.ard_threshold is not None and self.ard_threshold <= 0:
            raise HParamsError(f"ard_threshold must be > 0 (or null to calibrate), got {self.ard_threshold}")
        if self.massive_norm_factor <= 1:
            raise HParamsError(f"massive_norm_factor must be > 1, got {self.massive_norm_factor}")
        if not 0 < self.ard_margin <= 1:
            raise HParamsError(f"ard_margin must be in (0, 1], got {self.ard_margin}")
        if self.rehearsal_edits < 0:
            raise HParamsError(f"rehearsal_edits must be >= 0, got {self.rehearsal_edits}")
        if not 0 < self.stop_prob <= 1:
            raise HParamsError(f"stop_prob must be in (0, 1], got {self.stop_prob}")
