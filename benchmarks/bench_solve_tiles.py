"""Two micro benchmarks behind benchmarks/README.md ("After solving in the null-space basis",
"The masked solve in fp32").

* ``solve``: one masked NMKE solve on SmolLM2's cached layer-6 key statistics
  (``--kept`` of the neurons kept, one key, a 200-key edit cache): AlphaEdit's projector
  form (projector products + an n x n LU) and the r x r Cholesky in the null-space
  basis with the eigendecomposition in fp64 and in fp32 (shipped), with each form's
  difference from the fp64 projector form and from the fp64 basis form (shipped
  before), and its leak into the clearly used directions (eigenvalue ≥ 1.5 × threshold).
* ``tiles``: the streamed attribution kernel on SmolLM2's shapes (3 prompts, d_ff 1536,
  vocab 49152, cached readout) for several CPU tile sizes.

    EASYEDIT_NMKE_DATA_DIR=../shared/data python benchmarks/bench_solve_tiles.py --threads 1 \\
        --out benchmarks/results/solve_and_tiles.json

Times are the best of ``--repeats`` runs; the machine may be shared, so compare rows of
one run only.  The key statistics come from the cache an NMKE run on the shipped YAML
fills (they are computed here if missing).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmark_io import command_line, emit  # noqa: E402  (this folder, after the path set-up)


def best_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def solve_timings(repeats: int, kept: float) -> dict:
    from easyedit_nmke.methods import load_hparams
    from easyedit_nmke.models.nmke.nullspace import (
        cache_in_basis,
        key_second_moments,
        null_space_basis,
        null_space_projector,
        solve_in_null_space,
    )
    from easyedit_nmke.util.model_loader import load_model_and_tokenizer

    hparams = load_hparams(REPO / "hparams/NMKE/smollm2-135m.yaml")
    model, tok = load_model_and_tokenizer(hparams.model_name)
    mom2 = key_second_moments(model, tok, hparams, [6])[6]
    generator = torch.Generator().manual_seed(0)
    n = mom2.shape[0]
    index = (torch.rand(n, generator=generator) < kept).nonzero().squeeze(1)
    keys = torch.randn(n, 1, generator=generator) * 0.5
    past = torch.randn(n, 200, generator=generator)
    cache = past @ past.T * 0.01
    moments_s, cache_s, keys_s = mom2[index][:, index], cache[index][:, index], keys[index]
    threshold, l2 = hparams.nullspace_threshold, float(hparams.L2)

    def projector_form() -> torch.Tensor:
        projector = null_space_projector(moments_s.double(), threshold)
        lhs = projector @ (keys_s @ keys_s.T + cache_s)
        lhs.diagonal().add_(l2)
        return torch.linalg.solve(lhs.double(), (projector @ keys_s).double()).float()

    def basis_form(moments: torch.Tensor) -> torch.Tensor:
        basis = null_space_basis(moments, threshold)
        return solve_in_null_space(basis, cache_in_basis(basis, cache_s), keys_s, l2)

    forms = {
        "projector_fp64": projector_form,
        "basis_fp64": lambda: basis_form(moments_s.double()),
        "basis_fp32": lambda: basis_form(moments_s),
    }
    reference = projector_form().double()
    previous = basis_form(moments_s.double()).double()  # shipped before the fp32 decomposition
    eigenvalues, eigenvectors = torch.linalg.eigh(moments_s.double())
    clearly_used = eigenvectors[:, eigenvalues >= 1.5 * threshold]
    result = {"kept_neurons": int(index.numel()), "used_directions": int((eigenvalues >= threshold).sum())}
    for name, form in forms.items():
        x = form().double()
        result[name] = {
            "seconds": best_time(form, repeats),
            "max_relative_difference": float((x - reference).abs().max() / reference.abs().max()),
            "max_relative_difference_from_basis_fp64": float((x - previous).abs().max() / previous.abs().max()),
            "leak_into_clearly_used": float((clearly_used.T @ x).norm() / x.norm()),
        }
    result["eigh_fp64_s"] = best_time(lambda: torch.linalg.eigh(moments_s.double()), repeats)
    result["eigh_fp32_s"] = best_time(lambda: torch.linalg.eigh(moments_s), repeats)
    return result


def tile_timings(repeats: int, sizes) -> dict:
    from easyedit_nmke.models.nmke import attribution

    generator = torch.Generator().manual_seed(0)
    prompts, d, d_ff, vocab = 3, 576, 1536, 49152
    unembed = torch.randn(vocab, d, generator=generator) * 0.05
    down = torch.randn(d, d_ff, generator=generator) * 0.05
    norm = attribution.ReadoutNorm(kind="rms", gain=torch.ones(d), eps=1e-5)
    hidden = torch.randn(prompts, d, generator=generator)
    activations = torch.randn(prompts, d_ff, generator=generator)
    token_ids = torch.randint(0, vocab, (prompts,), generator=generator)
    readout = attribution.readout_product(unembed, down, norm)

    def scores() -> torch.Tensor:
        return attribution.neuron_attribution_scores(
            hidden, activations, down, unembed, norm, token_ids, readout=readout, backend="torch"
        )

    shipped = attribution.CPU_TILE_ELEMENTS
    reference = scores()
    rows = {}
    try:
        for size in sizes:
            attribution.CPU_TILE_ELEMENTS = size
            rows[str(size)] = {
                "seconds": best_time(scores, repeats),
                "max_abs_difference": float((scores() - reference).abs().max()),
            }
    finally:
        attribution.CPU_TILE_ELEMENTS = shipped
    return {"shipped_tile_elements": shipped, "shape": [prompts, d_ff, vocab], "by_tile_elements": rows}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--kept", type=float, default=0.68, help="share of neurons in the mask (hybrid keeps 0.65-0.72)")
    p.add_argument("--tiles", default="65536,262144,1048576,2097152,4194304")
    p.add_argument("--no-tiles", action="store_true", help="only the solve timings")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = {
        "threads": args.threads,
        "solve": solve_timings(args.repeats, args.kept),
        "tiles": None if args.no_tiles else tile_timings(args.repeats, [int(x) for x in args.tiles.split(",")]),
        "command": command_line(),
    }
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
