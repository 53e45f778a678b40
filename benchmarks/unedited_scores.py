"""Rel of the unedited model at the benchmark's checkpoints: the reference line for a cell.

On the hallucination set Rel is the perplexity of the target text, which is not 0 or 1
before editing, so a cell's numbers need the unedited model's value over the same edits
(the mean over the first T records, as the lifelong evaluation averages them).

    EASYEDIT_NMKE_DATA_DIR=../shared/data python benchmarks/unedited_scores.py --dataset hallucination \\
        --eval-at 10,50,100 --out benchmarks/results/unedited_hallucination.json
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmark_io import add_model_arguments, command_line, emit  # noqa: E402  (this folder, after the path set-up)


def main(argv=None) -> dict:
    from easyedit_nmke.evaluate import metrics
    from easyedit_nmke.evaluate.bench import default_data_dir, resolve_dataset
    from easyedit_nmke.evaluate.records import load_records
    from easyedit_nmke.util.model_loader import load_model_and_tokenizer

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="hallucination", help="a benchmark dataset name or a file")
    p.add_argument("--eval-at", default="10,50,100")
    add_model_arguments(p)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    checkpoints = sorted(int(x) for x in args.eval_at.split(","))
    dataset = resolve_dataset(args.dataset, default_data_dir())
    records = load_records(dataset.paths, limit=checkpoints[-1])
    model, tok = load_model_and_tokenizer(args.model)
    pairs = [(r.prompt, r.target) for r in records]
    with torch.no_grad():
        if dataset.metric == "perplexity":
            scores = metrics.target_perplexity(model, tok, pairs)
        else:
            scores = metrics.token_accuracy(model, tok, pairs)
    result = {
        "dataset": dataset.name,
        "metric": dataset.metric,
        "model": args.model,
        "rel_unedited": {str(t): metrics.mean(scores[:t]) for t in checkpoints if t <= len(scores)},
        "command": command_line(),
    }
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
