"""Is a slow attribution call the exponentials or the memory?  Interleaved timings on this machine.

NMKE's attribution time per edit is bimodal on the 2-core dev VM (about 0.47 s or 0.87 s
per edit, in streaks of several edits; `edit_speed_idle_2threads_100edits.json`), while
z steps in the same edits keep their speed.  This script repeats, round after round:

* one attribution call at SmolLM2's shapes (3 prompts, vocabulary 49,152, d_ff 1,536,
  a cached readout ``W``: what each edit layer costs);
* the same number of ``exp2`` + sum sweeps over one cache-resident tile, with no
  memory traffic (the attribution's arithmetic alone);
* a few 1,024² matmuls (the kind of work z's steps are made of).

Rounds whose attribution call takes more than 1.4× the median of the fastest tenth are
"slow"; the medians of all three timings are reported for slow and normal rounds.  If the
exp2-only loop slows with the attribution while the matmuls do not, the slow state is the
machine's exponential throughput, not the kernel's memory access.

    python benchmarks/exp2_throughput_states.py --rounds 400 --threads 2 \
        --out benchmarks/results/exp2_throughput_states.json
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchmark_io import command_line, emit, smollm2_attribution_problem, timed  # noqa: E402
from easyedit_nmke.models.nmke.attribution import CPU_TILE_ELEMENTS  # noqa: E402


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=400)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    problem = smollm2_attribution_problem()
    gen = problem.generator
    prompts, d_ff, vocab = problem.prompts, problem.d_ff, problem.vocab

    # One tile of the attribution's size; as many sweeps as one call makes.
    tile_rows = CPU_TILE_ELEMENTS // (prompts * d_ff)
    tile = torch.randn(prompts, tile_rows, d_ff, generator=gen) * -3
    tile_out = torch.empty_like(tile)
    sweeps = -(-vocab // tile_rows)
    square = torch.randn(1024, 1024, generator=gen)

    def attribution() -> None:
        problem.scores()

    def exp2_only() -> None:
        for _ in range(sweeps):
            torch.exp2(tile, out=tile_out)
            tile_out.sum(1)

    def matmuls() -> None:
        for _ in range(8):
            square @ square

    attribution()  # warm-up
    rounds = [(timed(attribution), timed(exp2_only), timed(matmuls)) for _ in range(args.rounds)]
    fastest_tenth = sorted(r[0] for r in rounds)[: max(1, len(rounds) // 10)]
    cut = 1.4 * statistics.median(fastest_tenth)
    groups = {"normal": [r for r in rounds if r[0] <= cut], "slow": [r for r in rounds if r[0] > cut]}
    summary = {
        name: {
            "rounds": len(grp),
            "attribution_s": statistics.median(r[0] for r in grp) if grp else None,
            "exp2_only_s": statistics.median(r[1] for r in grp) if grp else None,
            "matmul_s": statistics.median(r[2] for r in grp) if grp else None,
        }
        for name, grp in groups.items()
    }
    result = {
        "command": command_line(),
        "threads": args.threads,
        "shapes": {"prompts": prompts, "d_model": problem.d_model, "d_ff": d_ff, "vocab": vocab},
        "slow_cut_s": cut,
        "summary": summary,
        "timeline": "".join("S" if r[0] > cut else "." for r in rounds),  # S: a slow round
        "rounds_s": [[round(x, 4) for x in r] for r in rounds],
    }
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
