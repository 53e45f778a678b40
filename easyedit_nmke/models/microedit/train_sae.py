"""Train MicroEdit's TopK SAE on the model itself, when no pretrained SAE exists for it.

1. Activations: residual-stream outputs of decoder block ``hparams.layer`` on windows of
   ``sae_train_context_length`` tokens from ``sae_train_dataset`` (resolved by
   ``easyedit_nmke.util.corpus``); the forward pass stops after that block.  Massive-norm
   attention-sink positions are dropped with ``ordinary_positions`` (the rule the
   editing hook uses too).  The first windows, ``sae_train_heldout_tokens`` tokens' worth,
   are held out for evaluation; the next ``sae_train_tokens`` are the training set.
2. Training: SAE-Lens' own ``TopKTrainingSAE`` and ``SAETrainer`` (Adam, AuxK loss for
   dead latents, linear warm-up and decay), fed a plain tensor iterator over the
   shuffled training set for ``sae_train_epochs`` passes.  Inputs are scaled to mean norm
   √d_in through the trainer's ``ActivationScaler`` and ``b_dec`` starts at their mean,
   so one learning rate suits any model's residual scale; both are folded back into
   the weights afterwards.
3. Result: a plain inference ``TopKSAE`` (unit-norm decoder rows, no rescaling) plus
   held-out metrics: FVE = 1 - Σ‖x - x̂‖² / Σ‖x - mean‖², mean L0, the share of latents
   never active on the held-out tokens, token counts and seconds.

``ensure_sae`` loads the configured SAE, and trains and caches it at ``sae_path`` first
when it is missing and the hparams say how to train one.
"""
from __future__ import annotations

import math
import sys
import time
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from ...util import corpus as text_corpus
from ...util import nethook
from ...util.model_parts import num_layers
from ...util.requests import pad_batch, pad_id
from .activations import ordinary_positions
from .microedit_hparams import MicroEditHyperParams
from .sae_io import check_layer, hidden_size, load_sae, save_sae

if TYPE_CHECKING:  # pragma: no cover
    from sae_lens import TopKSAE

# A latent that has not fired for this many training tokens counts as dead for the
# AuxK loss (SAE-Lens' dead_feature_window is in steps; it is derived from this).
DEAD_WINDOW_TOKENS = 100_000
# Share of the optimisation steps spent warming the learning rate up / decaying it to 0.
WARMUP_SHARE = 0.05
DECAY_SHARE = 0.2
WINDOWS_PER_FORWARD = 16


@dataclass
class ActivationSet:
    train: torch.Tensor  # [n_train, d_in], float32
    heldout: torch.Tensor  # [n_heldout, d_in], float32
    excluded_positions: int  # massive-norm positions dropped (train + held-out windows)
    windows: int
    corpus: str
    seconds: float


def _layer_output_batches(
    model: nn.Module, tok: PreTrainedTokenizerBase, windows: List[List[int]], layer_name: str, progress: bool
) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """(hidden [batch, seq, d], attention mask [batch, seq]) at the output of ``layer_name``."""
    device = next(model.parameters()).device
    for start in tqdm(
        range(0, len(windows), WINDOWS_PER_FORWARD), desc="SAE activations", unit="batch", disable=not progress
    ):
        input_ids, attention_mask = pad_batch(windows[start : start + WINDOWS_PER_FORWARD], pad_id(tok))
        attention_mask = attention_mask.to(device)
        # capture's hook is registered first, so it records before stop_after aborts the pass.
        with torch.no_grad(), nethook.capture(model, [layer_name]) as record, nethook.stop_after(model, layer_name):
            model.base_model(input_ids=input_ids.to(device), attention_mask=attention_mask)
        yield record[layer_name], attention_mask


def collect_activations(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    hparams: MicroEditHyperParams,
    progress: bool = True,
) -> ActivationSet:
    """Held-out and training activations at the output of block ``hparams.layer`` (massive positions dropped)."""
    start_time = time.perf_counter()
    layer_name = check_layer(model, hparams)
    heldout_target, train_target = hparams.sae_train_heldout_tokens, hparams.sae_train_tokens
    window = hparams.sae_train_context_length
    # A window yields about window - 1 ordinary tokens; ask for some spare windows.
    n_windows = math.ceil((heldout_target + train_target) / max(window - 2, 1) * 1.05) + 4
    description, load_texts = text_corpus.resolve_corpus(
        model, tok, hparams.sae_train_dataset, n_windows, window, setting="sae_train_dataset"
    )
    windows = text_corpus.corpus_windows(load_texts(), tok, window, n_windows)
    if not windows:
        raise ValueError(f"sae_train_dataset {hparams.sae_train_dataset!r} yielded no text")

    device = next(model.parameters()).device
    d_in = None
    heldout_parts: List[torch.Tensor] = []
    n_heldout = 0
    train: Optional[torch.Tensor] = None
    n_train = 0
    excluded = 0
    used_windows = 0
    for hidden, mask in _layer_output_batches(model, tok, windows, layer_name, progress):
        keep = ordinary_positions(hidden, hparams.massive_norm_factor, mask)
        excluded += int((mask.bool() & ~keep).sum())
        for row in range(hidden.shape[0]):
            used_windows += 1
            acts = hidden[row][keep[row]].float()
            if n_heldout < heldout_target:  # whole windows, so no window is split across the sets
                heldout_parts.append(acts.cpu() if device.type == "cpu" else acts)
                n_heldout += acts.shape[0]
                continue
            if train is None:
                d_in = acts.shape[-1]
                train = torch.empty(train_target, d_in, dtype=torch.float32, device=device)
            take = min(acts.shape[0], train_target - n_train)
            train[n_train : n_train + take] = acts[:take]
            n_train += take
        if n_train >= train_target:
            break
    if train is None or n_train == 0:
        raise ValueError(
            f"sae_train_dataset {description[:200]!r} has only {n_heldout} ordinary tokens at this window length: "
            f"nothing left for training after the {heldout_target} held-out tokens"
        )
    if n_train < train_target:
        warnings.warn(
            f"sae_train_dataset gave only {n_train} training tokens (asked for {train_target}); training on those"
        )
    return ActivationSet(
        train=train[:n_train],
        heldout=torch.cat(heldout_parts),
        excluded_positions=excluded,
        windows=used_windows,
        corpus=description,
        seconds=time.perf_counter() - start_time,
    )


@torch.no_grad()
def evaluate_sae(sae: nn.Module, acts: torch.Tensor, batch: int = 4096) -> Dict[str, Any]:
    """FVE, mean L0 and dead latents (never active) of ``sae`` on ``acts`` [n, d_in]."""
    sq_error = 0.0
    l0_total = 0.0
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool, device=acts.device)
    mean = acts.double().mean(0)
    total_variance = float((acts.double() - mean).pow(2).sum())
    for start in range(0, acts.shape[0], batch):
        x = acts[start : start + batch].to(sae.W_dec.dtype)
        feats = sae.encode(x)
        recon = sae.decode(feats)
        sq_error += float((x.double() - recon.double()).pow(2).sum())
        active = feats != 0
        l0_total += float(active.sum())
        fired |= active.any(0)
    n = acts.shape[0]
    dead = int((~fired).sum())
    return {
        "fve": 1.0 - sq_error / total_variance if total_variance > 0 else float("nan"),
        "mean_l0": l0_total / max(n, 1),
        "dead_latents": dead,
        "dead_fraction": dead / sae.cfg.d_sae,
        "heldout_tokens": n,
    }


def _shuffled_batches(acts: torch.Tensor, batch: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless shuffled full batches of ``acts``, a fresh permutation per pass (seeded)."""
    generator = torch.Generator().manual_seed(seed)
    n = acts.shape[0]
    while True:
        order = torch.randperm(n, generator=generator).to(acts.device)
        for start in range(0, n - batch + 1, batch):
            yield acts[order[start : start + batch]]


def _to_inference_sae(training_sae: nn.Module, scaling_factor: float) -> "TopKSAE":
    """The trained SAE as a plain ``TopKSAE`` on unscaled inputs (decoder norms and input scale folded)."""
    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

    state = {name: tensor.detach().clone() for name, tensor in training_sae.state_dict().items()}
    # SAE-Lens folds rescale_acts_by_decoder_norm here: unit-norm decoder rows, same outputs.
    training_sae.process_state_dict_for_saving_inference(state)
    cfg_dict = training_sae.cfg.get_inference_sae_cfg_dict()
    cfg_dict["rescale_acts_by_decoder_norm"] = False
    cfg_dict["normalize_activations"] = "none"
    # Trained on s·x: acts(x) = acts(s·x)/s keeps the top-k choice, and x̂ = (acts(s·x)·W_dec + b_dec)/s.
    state["b_enc"] = state["b_enc"] / scaling_factor
    state["b_dec"] = state["b_dec"] / scaling_factor
    sae = TopKSAE(TopKSAEConfig.from_dict(cfg_dict))
    sae.load_state_dict({name: state[name] for name in ("W_enc", "b_enc", "W_dec", "b_dec")}, strict=True)
    sae.eval()
    return sae


def fit_sae(
    train: torch.Tensor, hparams: MicroEditHyperParams, corpus: str = "", progress: bool = True
) -> Tuple["TopKSAE", Dict[str, Any]]:
    """Train a TopK SAE on activations ``train`` [n, d_in] with SAE-Lens' trainer; (SAE, training info).

    Seeded by ``sae_train_seed``; the caller's random state is given back afterwards (an SAE
    trained on first use inside an edit must not reseed the user's run).
    """
    with text_corpus.seeded_rng(hparams.sae_train_seed, train.device):
        return _fit_sae_seeded(train, hparams, corpus, progress)


def _fit_sae_seeded(
    train: torch.Tensor, hparams: MicroEditHyperParams, corpus: str, progress: bool
) -> Tuple["TopKSAE", Dict[str, Any]]:
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    n_train, d_in = train.shape
    batch = min(hparams.sae_train_batch_tokens, n_train)
    epochs = hparams.sae_train_epochs
    steps = max(1, epochs * (n_train // batch))
    device = train.device

    metadata = SAEMetadata(
        model_name=hparams.model_name,
        hook_name=f"blocks.{hparams.layer}.hook_resid_post",
        hf_hook_name=hparams.layer_module_tmp.format(hparams.layer),
        context_size=hparams.sae_train_context_length,
        dataset_path=corpus[:300],
        massive_norm_factor=hparams.massive_norm_factor,
        trained_by="easyedit_nmke.models.microedit.train_sae",
    )
    sae_cfg = TopKTrainingSAEConfig(
        d_in=d_in,
        d_sae=hparams.sae_train_d_sae,
        k=hparams.sae_train_k,
        dtype="float32",
        device=str(device),
        apply_b_dec_to_input=True,
        normalize_activations="none",  # the trainer's ActivationScaler scales instead (folded afterwards)
        metadata=metadata,
    )
    training_sae = TopKTrainingSAE(sae_cfg)
    scaling_factor = math.sqrt(d_in) / float(train.norm(dim=-1).mean())
    with torch.no_grad():
        training_sae.b_dec.copy_(train.mean(0) * scaling_factor)

    warmup = int(steps * WARMUP_SHARE) if steps >= 40 else 0
    decay = int(steps * DECAY_SHARE) if steps >= 10 else 0
    trainer_cfg = SAETrainerConfig(
        total_training_samples=steps * batch,
        train_batch_size_samples=batch,
        lr=hparams.sae_train_lr,
        lr_end=hparams.sae_train_lr,
        lr_scheduler_name="constant",
        lr_warm_up_steps=warmup,
        lr_decay_steps=decay,
        device=str(device),
        dead_feature_window=max(1, DEAD_WINDOW_TOKENS // batch),
        feature_sampling_window=max(1, steps),
        logger=LoggingConfig(log_to_wandb=False),
    )
    trainer = SAETrainer(trainer_cfg, training_sae, _shuffled_batches(train, batch, hparams.sae_train_seed))
    trainer.activation_scaler.scaling_factor = scaling_factor

    # SAETrainer.fit() with its public per-step seams, so the progress bar follows `progress`.
    start = time.perf_counter()
    bar = tqdm(total=steps, desc="SAE training", unit="step", disable=not progress)
    while trainer.n_training_samples < trainer_cfg.total_training_samples:
        trainer.maybe_reset_sparsity()
        output = trainer.step(next(trainer.data_provider))
        trainer.n_training_steps += 1
        if progress and (trainer.n_training_steps % 10 == 0 or trainer.n_training_steps == steps):
            with torch.no_grad():
                x = output.sae_in
                fvu = float((output.sae_out - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
            bar.set_postfix(fve=f"{1 - fvu:.3f}", dead=int(trainer.dead_neurons.sum()))
        bar.update(1)
    bar.close()
    trainer.set_final_sae_metadata()
    info = {
        "epochs": epochs,
        "steps": steps,
        "batch_tokens": batch,
        "lr": hparams.sae_train_lr,
        "seed": hparams.sae_train_seed,
        "dead_during_training": int(trainer.dead_neurons.sum()),
        "train_seconds": time.perf_counter() - start,
    }
    return _to_inference_sae(training_sae, scaling_factor), info


def train_sae(
    model: nn.Module, tok: PreTrainedTokenizerBase, hparams: MicroEditHyperParams, progress: bool = True
) -> Tuple["TopKSAE", Dict[str, Any]]:
    """Train a TopK SAE at the output of block ``hparams.layer``; (SAE, held-out metrics)."""
    if not hparams.can_train_sae:
        raise ValueError("training an SAE needs sae_train_d_sae and sae_train_k in the hparams")
    from sae_lens import __version__ as sae_lens_version

    total_start = time.perf_counter()
    data = collect_activations(model, tok, hparams, progress=progress)
    sae, info = fit_sae(data.train, hparams, corpus=data.corpus, progress=progress)
    metrics = evaluate_sae(sae, data.heldout)
    metrics.update(
        {
            "model_name": hparams.model_name,
            "layer": hparams.layer,
            "module": hparams.layer_module_tmp.format(hparams.layer),
            "model_layers": num_layers(model),
            "d_in": sae.cfg.d_in,
            "d_sae": hparams.sae_train_d_sae,
            "k": hparams.sae_train_k,
            "train_tokens": data.train.shape[0],
            "excluded_massive_positions": data.excluded_positions,
            "massive_norm_factor": hparams.massive_norm_factor,
            "windows": data.windows,
            "context_length": hparams.sae_train_context_length,
            "corpus": data.corpus[:300],
            **info,
            "collect_seconds": data.seconds,
            "seconds": time.perf_counter() - total_start,
            "torch_threads": torch.get_num_threads(),
            "device": str(data.train.device),
            "sae_lens_version": sae_lens_version,
        }
    )
    return sae, metrics


def estimated_minutes(model: nn.Module, hparams: MicroEditHyperParams) -> float:
    """Rough CPU estimate (~50 GFLOP/s per thread) of ``train_sae``'s time, for the message."""
    if not hparams.can_train_sae:
        return 0.0
    try:
        share = (hparams.layer + 1) / num_layers(model)
    except Exception:
        share = 1.0
    n_params = sum(p.numel() for p in model.parameters())
    tokens = hparams.sae_train_tokens + hparams.sae_train_heldout_tokens
    flops = 2 * n_params * share * tokens
    d_in = hidden_size(model) or 1024
    flops += 12 * hparams.sae_train_d_sae * d_in * hparams.sae_train_tokens * hparams.sae_train_epochs
    rate = 50e9 * max(1, torch.get_num_threads())
    return flops / rate / 60


def ensure_sae(
    model: nn.Module, tok: PreTrainedTokenizerBase, hparams: MicroEditHyperParams, progress: bool = True
) -> "TopKSAE":
    """The SAE ``load_sae`` finds; when ``sae_path`` does not exist and the hparams can train one,
    train it first, save it at ``sae_path`` and load that (later calls reuse it)."""
    path = hparams.resolved_sae_path()
    device = next(model.parameters()).device
    if path is not None and not path.exists() and hparams.can_train_sae:
        check_layer(model, hparams)
        print(
            f"[MicroEdit] no SAE at {path}; training one (~{max(1, round(estimated_minutes(model, hparams)))} "
            f"minutes): TopK d_sae={hparams.sae_train_d_sae}, k={hparams.sae_train_k} on "
            f"{hparams.sae_train_tokens} tokens of {hparams.sae_train_dataset} at layer {hparams.layer}",
            file=sys.stderr,
        )
        sae, metrics = train_sae(model, tok, hparams, progress=progress)
        save_sae(sae, path, metrics)
        print(
            f"[MicroEdit] SAE saved to {path}: held-out FVE {metrics['fve']:.3f}, L0 {metrics['mean_l0']:.1f}, "
            f"dead latents {metrics['dead_fraction']:.1%}, {metrics['seconds'] / 60:.1f} minutes",
            file=sys.stderr,
        )
    return load_sae(hparams, model, device=device)
