"""Which locality tokens lifelong edits flip: Loc by the unedited model's margin.

Loc counts the locality-answer tokens whose argmax is unchanged from the unedited model.
On a small model many of those argmaxes are won by a hair, so this script splits the
tokens by the unedited model's margin (top-1 minus top-2 logit, in nats) and reports,
per margin bin, the share of tokens and how many of them a saved lifelong run left
unchanged. A run is given by its checkpoint folder (``--work-dir``/checkpoint of
``easyedit-nmke edit``, or ``$OUT/work/<cell>/checkpoint`` of a benchmark cell): its
edited weights are loaded into the unedited model and the locality prompts of its first
``done`` records are scored, as the lifelong evaluation after the last edit does. That
covers methods whose edit is the checkpoint's weights (NMKE, FT, ROME, MEMIT, AlphaEdit),
not MicroEdit, whose edit is an SAE hook this script does not rebuild.

    EASYEDIT_NMKE_DATA_DIR=../shared/data python benchmarks/locality_margins.py --dataset zsre \\
        --checkpoint runs/tune6/hybrid/checkpoint --checkpoint runs/tune6/none/checkpoint \\
        --checkpoint runs/tune6/target/checkpoint \\
        --checkpoint runs/tune5/b05/checkpoint --checkpoint runs/proto/memit_ckpt \\
        --out benchmarks/results/locality_margins.json

(``runs/proto/memit_ckpt``: a copy of the MEMIT ZsRE T=1000 cell's checkpoint after 300
edits; the cell overwrites its own every 25 edits.)
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Sequence

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmark_io import add_model_arguments, command_line, emit  # noqa: E402  (this folder, after the path set-up)

DEFAULT_BINS = (0.25, 0.5, 1.0, 2.0, 4.0)


def top2_margin(logits: torch.Tensor) -> torch.Tensor:
    """[n_tokens] top-1 minus top-2 logit."""
    top = logits.topk(2, dim=-1).values
    return top[:, 0] - top[:, 1]


def bin_table(margin: torch.Tensor, kept: torch.Tensor, edges: Sequence[float]) -> List[Dict[str, float]]:
    """Per margin bin [lo, hi): share of all tokens and share of the bin's tokens left unchanged."""
    bounds = [0.0, *edges, float("inf")]
    rows = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        inside = (margin >= lo) & (margin < hi)
        n = int(inside.sum())
        rows.append(
            {
                "margin_from": lo,
                "margin_to": hi,
                "token_share": n / max(1, margin.numel()),
                "loc": float(kept[inside].float().mean()) if n else float("nan"),
            }
        )
    return rows


def main(argv=None) -> dict:
    from easyedit_nmke.evaluate import metrics
    from easyedit_nmke.evaluate.bench import default_data_dir, resolve_dataset
    from easyedit_nmke.evaluate.records import load_records
    from easyedit_nmke.evaluate.runner import evaluation_groups, locality_indices
    from easyedit_nmke.util import nethook
    from easyedit_nmke.util.model_loader import load_model_and_tokenizer

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="zsre", help="a benchmark dataset name or a file")
    p.add_argument("--checkpoint", type=Path, action="append", required=True, help="a run's checkpoint folder (repeatable)")
    p.add_argument("--bins", default=",".join(str(b) for b in DEFAULT_BINS), help="margin bin edges in nats")
    add_model_arguments(p)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    edges = sorted(float(x) for x in args.bins.split(","))
    progress = {}
    for folder in args.checkpoint:
        path = folder / "progress.json"
        if not path.is_file() or not (folder / "edited_weights.safetensors").is_file():
            raise SystemExit(f"{folder} is not a run checkpoint (needs progress.json and edited_weights.safetensors)")
        progress[folder] = json.loads(path.read_text())
        if progress[folder].get("result", {}).get("alg") == "MicroEdit":
            raise SystemExit(f"{folder}: MicroEdit's edit is its SAE hook, which this script does not rebuild")
    dataset = resolve_dataset(args.dataset, default_data_dir())
    records = load_records(dataset.paths, limit=max(p_["done"] for p_ in progress.values()))
    model, tok = load_model_and_tokenizer(args.model)
    loc_pairs = evaluation_groups(records)["loc"]
    # Which record each locality pair belongs to, so a run sees only its first `done` records.
    owners = locality_indices(records)
    unedited = metrics.answer_logits(model, tok, loc_pairs, batch_size=16)
    reference = [logits.argmax(-1) for logits, _ in unedited]
    margin_per_pair = [top2_margin(logits) for logits, _ in unedited]

    runs = []
    originals = {}
    for folder, info in progress.items():
        weights = load_file(str(folder / "edited_weights.safetensors"))
        with torch.no_grad():
            for name, value in weights.items():
                param = nethook.get_parameter(model, name)
                originals.setdefault(name, param.detach().clone())
                param.copy_(value.to(param.device, param.dtype))
        n_pairs = sum(1 for owner in owners if owner < info["done"])
        edited = metrics.answer_predictions(model, tok, loc_pairs[:n_pairs], batch_size=16)
        with torch.no_grad():
            for name, value in originals.items():
                nethook.get_parameter(model, name).copy_(value)
        kept_per_pair = [(e == r) for e, r in zip(edited, reference[:n_pairs])]
        kept = torch.cat(kept_per_pair)
        margin = torch.cat(margin_per_pair[:n_pairs])
        result = info.get("result", {})
        runs.append(
            {
                "checkpoint": str(folder),
                "alg": result.get("alg"),
                "mask_mode": result.get("hparams", {}).get("mask_mode"),
                "edits": info["done"],
                # The runner's Loc: the mean over locality pairs of each pair's agreement.
                "loc": metrics.mean([float(k.float().mean()) for k in kept_per_pair]),
                "token_loc": float(kept.float().mean()),
                "tokens": int(kept.numel()),
                "bins": bin_table(margin, kept, edges),
            }
        )
    out = {"dataset": dataset.name, "model": args.model, "runs": runs, "command": command_line()}
    emit(out, args.out)
    return out


if __name__ == "__main__":
    main()
