"""Three ways to cut hybrid's own work per edit, timed against what ships (none was built).

At SmolLM2's shapes (3 prompts, vocabulary 49,152, d_ff 1,536, a cached readout ``W``):

* **tiles**: the attribution call with CPU tiles of 1 M (shipped), 256 K, 128 K and 64 K
  elements, interleaved round by round so that both states of the machine's ``exp2``
  throughput (``exp2_throughput_states.py``) hit every size alike;
* **compiled**: the tile loop's arithmetic as one ``torch.compile``d expression (no tile
  buffer, one pass), against the shipped call; compilation time reported separately;
* **eigh**: the five per-edit eigendecompositions of the kept neurons' moment (sizes of
  layers 4-8's mean masks), in sequence with two OpenMP threads, with one, and two at a
  time in two Python threads of one OpenMP thread each.

    python benchmarks/attribution_alternatives.py --out benchmarks/results/attribution_alternatives.json
"""
from __future__ import annotations

import argparse
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchmark_io import command_line, emit, smollm2_attribution_problem, timed  # noqa: E402
from easyedit_nmke.models.nmke import attribution  # noqa: E402

KEPT_NEURONS = (846, 799, 808, 803, 772)  # benchmarks/results/masked_null_space_dims.json, layers 4-8


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    p = smollm2_attribution_problem()
    call = p.scores

    # Tiles, interleaved.
    shipped = attribution.CPU_TILE_ELEMENTS
    sizes = [shipped, 1 << 18, 1 << 17, 1 << 16]
    tile_times: Dict[int, List[float]] = {s: [] for s in sizes}
    try:
        for _ in range(args.rounds):
            for size in sizes:
                attribution.CPU_TILE_ELEMENTS = size
                tile_times[size].append(timed(call))
    finally:
        attribution.CPU_TILE_ELEMENTS = shipped
    tiles = {
        str(size): {
            "median_s": statistics.median(times),
            "median_ratio_to_shipped": statistics.median(t / b for t, b in zip(times, tile_times[shipped])),
        }
        for size, times in tile_times.items()
    }

    # One compiled pass against the shipped call.
    problem = attribution._prepare(
        p.hidden, p.acts, p.down, p.unembed, p.norm, p.tokens, 30.0, None, p.readout,
        attribution._default_budget(torch.device("cpu")),
    )
    scale = problem.inv_r * attribution._LOG2E
    shift = problem.ref_logit * -attribution._LOG2E

    def fused(a: torch.Tensor, w: torch.Tensor, c: torch.Tensor, s: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        return torch.exp2((a[:, :, None] + c[:, None, :] * w[None]) * s[:, None, :] + r[:, None, :]).sum(1)

    compiled = torch.compile(fused, dynamic=False)
    compile_s = timed(lambda: compiled(problem.a, p.readout, problem.c, scale, shift))
    lse = problem.ref_logit + torch.log2(compiled(problem.a, p.readout, problem.c, scale, shift)) * attribution._LN2
    max_abs_diff = float((problem.target_logit - lse - problem.base_logprob[:, None] - call()).abs().max())
    pairs = [(timed(call), timed(lambda: compiled(problem.a, p.readout, problem.c, scale, shift))) for _ in range(20)]
    compiled_result = {
        "compile_and_first_call_s": compile_s,
        "shipped_median_s": statistics.median(p[0] for p in pairs),
        "compiled_median_s": statistics.median(p[1] for p in pairs),
        "max_abs_score_difference": max_abs_diff,
    }

    # Five eigendecompositions per edit.
    corpus = torch.randn(8000, p.d_ff, generator=p.generator) @ (torch.randn(p.d_ff, p.d_ff, generator=p.generator) * 0.03)
    moment = corpus.T @ corpus / corpus.shape[0]
    mats = []
    for kept in KEPT_NEURONS:
        index = torch.randperm(p.d_ff, generator=p.generator)[:kept].sort().values
        mats.append(moment[index][:, index].contiguous())

    def all_eigh() -> None:
        for m in mats:
            torch.linalg.eigh(m)

    eigh = {}
    for threads in (2, 1):
        torch.set_num_threads(threads)
        eigh[f"sequential_{threads}_threads_s"] = statistics.median(timed(all_eigh) for _ in range(5))
    with ThreadPoolExecutor(2) as pool:
        eigh["two_at_a_time_1_thread_each_s"] = statistics.median(
            timed(lambda: list(pool.map(torch.linalg.eigh, mats))) for _ in range(5)
        )
    torch.set_num_threads(2)

    result = {
        "command": command_line(),
        "shapes": {"prompts": p.prompts, "d_model": p.d_model, "d_ff": p.d_ff, "vocab": p.vocab, "kept": KEPT_NEURONS},
        "tiles": tiles,
        "compiled": compiled_result,
        "eigh": eigh,
    }
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
