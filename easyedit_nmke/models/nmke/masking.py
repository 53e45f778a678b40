"""Entropy-guided dynamic neuron masks from attribution scores.

Given S = [n_prompts × d_ff] attribution scores of one edit at one layer:

* knowledge-general score: for how many prompts a neuron's score is above that
  prompt's mean (per-prompt z-score > 0) — neurons that matter whatever the context;
* knowledge-specific score: the neuron's largest score over prompts — neurons that
  matter strongly for this fact in some context.

How many neurons each family keeps depends on how spread the attribution is.
Normalised entropies (in [0, 1]) measure that spread:
H_ge = mean_p H(softmax(α (s_p − max s_p))) and H_sp = H(clamp(max_p s, 0) / Σ).
A diffuse attribution (high entropy) means the fact is spread over many neurons, so
more are kept: ρ_ge = b_ge + a_ge·H_ge³, ρ_sp = b_sp + a_sp·H_sp².  Each family keeps
the neurons at or above the (1 − ρ) quantile of its score; ``hybrid`` takes the union.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .nmke_hparams import NMKEHyperParams


@dataclass
class NeuronMask:
    keep: torch.Tensor  # [d_ff] bool
    general_ratio: float = float("nan")
    specific_ratio: float = float("nan")
    general_entropy: float = float("nan")
    specific_entropy: float = float("nan")

    @property
    def kept_fraction(self) -> float:
        return float(self.keep.float().mean())


def _normalised_entropy(p: torch.Tensor) -> torch.Tensor:
    """Entropy of distributions along the last dim divided by log(n), so it lies in [0, 1]."""
    n = p.shape[-1]
    entropy = -(p * torch.log(p.clamp_min(1e-30))).sum(-1)
    return entropy / math.log(n)


def general_scores(scores: torch.Tensor) -> torch.Tensor:
    mean = scores.mean(dim=1, keepdim=True)
    std = scores.std(dim=1, keepdim=True).clamp_min(1e-12)
    return ((scores - mean) / std > 0).sum(0).float()


def specific_scores(scores: torch.Tensor) -> torch.Tensor:
    return scores.max(dim=0).values


def general_entropy(scores: torch.Tensor, alpha: float) -> float:
    shifted = alpha * (scores - scores.max(dim=1, keepdim=True).values)
    return float(_normalised_entropy(torch.softmax(shifted, dim=1)).mean())


def specific_entropy(scores: torch.Tensor) -> float:
    positive = specific_scores(scores).clamp_min(0.0)
    total = positive.sum()
    if total <= 0:  # nothing raises the token: treat the attribution as fully diffuse
        return 1.0
    return float(_normalised_entropy(positive / total))


def top_quantile(score: torch.Tensor, ratio: float) -> torch.Tensor:
    """Neurons at or above the (1 − ratio) quantile of ``score``.

    Ties at the threshold are all kept, so an integer score (the general family's count
    of prompts) can keep more than ``ratio`` of the neurons; ``NeuronMask.kept_fraction``
    is the share actually kept.
    """
    threshold = torch.quantile(score.float(), 1.0 - ratio)
    return score >= threshold


def build_mask(scores: torch.Tensor, hparams: NMKEHyperParams) -> NeuronMask:
    """The neuron mask for one edit at one layer, following ``hparams.mask_mode``."""
    scores = scores.float()
    d_ff = scores.shape[1]
    mode = hparams.mask_mode
    if mode == "none":
        return NeuronMask(keep=torch.ones(d_ff, dtype=torch.bool, device=scores.device))
    h_ge = general_entropy(scores, hparams.entropy_alpha)
    h_sp = specific_entropy(scores)
    if mode == "fixed":
        # The ablation without entropy guidance: both families at one constant ratio, union.
        rho_ge = rho_sp = hparams.fixed_ratio
        mode = "hybrid"
    else:
        rho_ge = hparams.general_ratio_b + hparams.general_ratio_a * h_ge**3
        rho_sp = hparams.specific_ratio_b + hparams.specific_ratio_a * h_sp**2
    keep_ge = top_quantile(general_scores(scores), rho_ge)
    keep_sp = top_quantile(specific_scores(scores), rho_sp)
    keep = {"general": keep_ge, "specific": keep_sp, "hybrid": keep_ge | keep_sp}[mode]
    return NeuronMask(
        keep=keep, general_ratio=rho_ge, specific_ratio=rho_sp, general_entropy=h_ge, specific_entropy=h_sp
    )
