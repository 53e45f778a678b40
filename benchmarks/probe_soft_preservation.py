"""Probe: does a soft preservation term inside the null space buy NMKE locality?

On SmolLM2 the "null space" at ``nullspace_threshold`` 0.02 still carries 22-43 % of the
corpus keys' energy (README "Why hybrid runs out first"), and a harder threshold (0.01)
lowered Loc.  This probe tries the soft alternative: MEMIT's preservation term
``mu * E[k kᵀ]`` added to AlphaEdit's solve in the null-space coordinates, i.e.

    (Bᵀ(K Kᵀ + C + mu Σ)B + L2·I) y = Bᵀ K,        x = B y

(``BᵀΣB`` is the diagonal of the kept eigenvalues, so directions ordinary text uses
more are penalised more instead of being either free or forbidden).  It is not an NMKE
option: the probe swaps the two solve functions of ``nmke_main`` for the run it starts
and otherwise is ``easyedit-nmke edit`` with the same flags.

    EASYEDIT_NMKE_DATA_DIR=../shared/data python benchmarks/probe_soft_preservation.py --mu 1000 \\
        --data ../shared/data/zsre_mend_eval_portability_gpt4.dev.json --num-edits 25 --eval-at 10,25 \\
        --threads 1 --work-dir runs/proto/mu1000 --out runs/proto/mu1000.json --no-progress

Results: ``benchmarks/results/nmke_tuning_zsre50.md`` ("Soft preservation").
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

import torch

from easyedit_nmke.cli import main as cli_main
from easyedit_nmke.models.nmke import nmke_main
from easyedit_nmke.models.nmke.nullspace import solve_in_null_space


def install_soft_preservation(mu: float) -> None:
    """Replace NMKE's unmasked and masked solves by ones with ``mu·BᵀΣB`` added to Bᵀ C B."""

    def update_coefficients(state, layer, keys, hparams):
        basis = state.null_bases[layer]
        moment = state.key_moments[layer].to(device=basis.device, dtype=torch.float32)
        cache = state.key_cache_in_basis(layer) + mu * (basis.T @ moment @ basis)
        return solve_in_null_space(basis, cache, keys.to(basis.device), hparams.L2)

    def masked_update_coefficients(state, layer, keys, keep, hparams):
        index, basis, cache = nmke_main.masked_null_space(state, layer, keep.to(keys.device), hparams)
        moment = state.key_moments[layer][index][:, index].to(device=basis.device, dtype=torch.float32)
        coeffs = torch.zeros(keys.shape[0], keys.shape[1], device=keys.device)
        coeffs[index] = solve_in_null_space(basis, cache + mu * (basis.T @ moment @ basis), keys[index], hparams.L2)
        return coeffs

    nmke_main._update_coefficients = update_coefficients
    nmke_main._masked_update_coefficients = masked_update_coefficients


def annotate_result(path: Path, mu: float, argv: List[str]) -> None:
    """Record the probe's own command line and ``mu`` in the result JSON the edit run wrote."""
    result = json.loads(path.read_text())
    result["command"] = "python benchmarks/probe_soft_preservation.py " + " ".join(argv)
    result["probe"] = {"soft_preservation_mu": mu}
    path.write_text(json.dumps(result, indent=2))


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], add_help=False)
    parser.add_argument("--mu", type=float, required=True, help="weight of E[k kᵀ] inside the null space")
    parser.add_argument("--out", type=Path, default=None, help="result JSON (as for easyedit-nmke edit)")
    argv = list(sys.argv[1:] if argv is None else argv)
    args, edit_args = parser.parse_known_args(argv)
    if args.mu < 0:
        parser.error("--mu must be >= 0")
    install_soft_preservation(args.mu)
    if args.out is not None:
        edit_args += ["--out", str(args.out)]
    status = cli_main(["edit", *edit_args])
    if status == 0 and args.out is not None and args.out.is_file():
        annotate_result(args.out, args.mu, argv)
    return status


if __name__ == "__main__":
    sys.exit(main())
