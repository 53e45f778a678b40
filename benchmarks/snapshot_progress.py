"""Commit-ready snapshot of an unfinished (resumable) lifelong run: its last checkpoint's results.

A 1000-edit cell runs for many hours and across sessions; its checkpoint under ``runs/``
(git-ignored) holds the lifelong numbers of every evaluation reached so far. This writes
them, with the command that resumes the run and how far it got, to a result JSON:

    python benchmarks/snapshot_progress.py --checkpoint runs/bench/work/zsre-T1000__MEMIT/checkpoint \\
        --of 1000 --command "OUT=runs/bench JOBS=1 THREADS=1 ONLY=MEMIT scripts/run_benchmarks.sh zsre1000" \\
        --out benchmarks/results/zsre1000_memit_partial.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmark_io import command_line, emit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="a run's checkpoint folder (progress.json)")
    parser.add_argument("--of", type=int, required=True, help="the number of edits the run is meant to reach")
    parser.add_argument("--command", required=True, help="the command that started (and resumes) the run")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    progress = json.loads((args.checkpoint / "progress.json").read_text())
    result = dict(progress["result"])
    done = int(progress["done"])
    result["command"] = args.command
    result["status"] = (
        f"partial: {done} of {args.of} edits done; the evaluations in 'runs' (T <= {done}) are final. "
        "Rerun the command to resume from the checkpoint."
    )
    result["edits_done"] = done
    result["edit_seconds_so_far"] = float(progress["edit_seconds"])
    result["snapshot_command"] = command_line()
    emit(result, args.out)


if __name__ == "__main__":
    main()
