"""Seconds per NMKE edit on SmolLM2-135M-Instruct, by phase, with the exact fast path on and off.

Applies ``--num-edits`` sequential ZsRE edits (the dev file in ``$EASYEDIT_NMKE_DATA_DIR``)
to the default model.  With ``--compare`` (the default) two copies of the model are
edited side by side, one with ``fast_path: false`` (the reference path: a full
forward per z step and separate key/attribution forwards) and one with the hparams
as given; the edits alternate between the two so that load from other processes
hits both alike.  After every edit the two copies' edited weights, z steps and
masks are compared, so the table also shows that the fast path changes nothing but
float rounding.

    EASYEDIT_NMKE_DATA_DIR=../shared/data python benchmarks/bench_edit_speed.py --threads 1

The null-space statistics must come from the on-disk cache (WikiText-2 second
moments); the script stops before editing if the cache key does not match rather
than spend ~10 minutes recomputing them (``--allow-stats`` to permit it).
``--profile cprofile|torch`` profiles the fast path's edits and prints the top entries.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PHASES = ("z", "attribution", "keys", "solve")


def script_path() -> str:
    path = Path(sys.argv[0]).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else sys.argv[0]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-edits", type=int, default=10)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--hparams", type=Path, default=REPO / "hparams/NMKE/smollm2-135m.yaml")
    p.add_argument("--data", type=Path, default=None, help="ZsRE JSON (default: the dev file in the data dir)")
    p.add_argument("--skip", type=int, default=0, help="start at this record")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="hparam override (both modes)")
    p.add_argument("--no-compare", action="store_true", help="only run the hparams as given (no reference copy)")
    p.add_argument(
        "--compare-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="compare against these overrides (on top of --set) instead of fast_path=false",
    )
    p.add_argument("--eval-records", type=int, default=0, help="also time one checkpoint evaluation over this many records")
    p.add_argument("--profile", choices=["cprofile", "torch"], default=None)
    p.add_argument("--allow-stats", action="store_true", help="allow computing missing null-space statistics")
    p.add_argument("--note", default="", help="free text stored in the JSON (e.g. machine load)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks/results/edit_speed.json")
    return p.parse_args(argv)


def check_stats_cache(model, tok, hparams) -> List[str]:
    """Paths of the cached second moments the run will read; raises if any is missing."""
    from easyedit_nmke.models.nmke import nullspace

    directory = nullspace.stats_directory(hparams)
    corpus, _ = nullspace.resolve_corpus(model, tok, hparams)
    if corpus.startswith(nullspace.MODEL_GENERATED):
        raise SystemExit("the null-space corpus resolved to model-generated text: set EASYEDIT_NMKE_DATA_DIR")
    paths = [directory / f"{nullspace._cache_key(model, hparams, layer, corpus)}.safetensors" for layer in hparams.layers]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise SystemExit(f"null-space statistics not cached (key changed?): {missing}; --allow-stats to compute them")
    return [str(p) for p in paths]


def edited_weights(model, hparams) -> Dict[int, Any]:
    from easyedit_nmke.util import nethook

    return {
        layer: nethook.get_module(model, hparams.rewrite_module_tmp.format(layer)).weight.detach()
        for layer in hparams.layers
    }


class Runner:
    """One model copy edited with one hparams set, with per-edit timings."""

    def __init__(self, name, model, tok, hparams):
        from easyedit_nmke.models.nmke import nmke_main

        self.name, self.model, self.tok, self.hparams = name, model, tok, hparams
        self.main = nmke_main
        start = time.perf_counter()
        nmke_main.prepare_method(model, tok, hparams)
        self.setup_seconds = time.perf_counter() - start
        self.edits: List[Dict[str, Any]] = []

    def edit(self, record) -> Dict[str, Any]:
        weights = edited_weights(self.model, self.hparams)
        old = {layer: w.detach().clone() for layer, w in weights.items()}
        before = dict(self.main.phase_seconds(self.model))
        start = time.perf_counter()
        self.main.apply_nmke_to_model(self.model, self.tok, [record.request()], self.hparams)
        seconds = time.perf_counter() - start
        after = self.main.phase_seconds(self.model)
        info = self.main.get_state(self.model).last_edit_info
        # Neurons this edit changed (columns of the [d, d_ff] down projection).
        self.changed = {layer: (w.detach() != old[layer]).any(dim=0) for layer, w in weights.items()}
        row = {
            "seconds": seconds,
            "phases": {k: after.get(k, 0.0) - before.get(k, 0.0) for k in PHASES},
            "z_steps": info["z_steps"][0],
            "z_target_prob": info["z_target_prob"][0],
            "kept_fraction": {str(k): v for k, v in info.get("kept_fraction", {}).items()},
        }
        self.edits.append(row)
        return row


def summarise(edits: List[Dict[str, Any]]) -> Dict[str, Any]:
    n = len(edits)
    total = sum(e["seconds"] for e in edits)
    steps = sum(e["z_steps"] for e in edits)
    phases = {k: sum(e["phases"][k] for e in edits) / n for k in PHASES}
    return {
        "edits": n,
        "sec_per_edit": total / n,
        "phase_sec_per_edit": phases,
        "other_sec_per_edit": total / n - sum(phases.values()),
        "z_steps_mean": steps / n,
        "z_sec_per_step": sum(e["phases"]["z"] for e in edits) / max(steps, 1),
    }


def main(argv=None) -> Dict[str, Any]:
    args = parse_args(argv)
    os.environ.setdefault("EASYEDIT_NMKE_DATA_DIR", str(REPO.parent / "shared" / "data"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    from easyedit_nmke.cli import parse_overrides
    from easyedit_nmke.evaluate.records import load_records
    from easyedit_nmke.methods import load_hparams
    from easyedit_nmke.util.model_loader import load_model_and_tokenizer

    data = args.data or Path(os.environ["EASYEDIT_NMKE_DATA_DIR"]) / "zsre_mend_eval_portability_gpt4.dev.json"
    overrides = parse_overrides(args.set)
    hparams = load_hparams(args.hparams, overrides)
    records = load_records([data], limit=args.skip + max(args.num_edits, args.eval_records))
    edit_records = records[args.skip : args.skip + args.num_edits]

    load_at_start = os.getloadavg()
    start = time.perf_counter()
    model, tok = load_model_and_tokenizer(hparams.model_name, device="cpu")
    load_seconds = time.perf_counter() - start
    stats_files = [] if args.allow_stats else check_stats_cache(model, tok, hparams)

    runners = []
    compare_overrides = parse_overrides(args.compare_set)
    if compare_overrides and not args.no_compare:
        runners.append(Runner("variant", copy.deepcopy(model), tok, hparams.replace(**compare_overrides)))
    elif not args.no_compare:
        reference = hparams.replace(fast_path=False)
        runners.append(Runner("reference", copy.deepcopy(model), tok, reference))
    runners.append(Runner("fast" if hparams.fast_path else "as-given", model, tok, hparams))

    profiler = None
    if args.profile == "cprofile":
        import cProfile

        profiler = cProfile.Profile()
    elif args.profile == "torch":
        profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=False)
        profiler.__enter__()

    agreement: List[Dict[str, Any]] = []
    for i, record in enumerate(edit_records):
        rows = []
        for runner in runners:
            if args.profile == "cprofile" and runner is runners[-1]:
                profiler.enable()
            rows.append(runner.edit(record))
            if args.profile == "cprofile" and runner is runners[-1]:
                profiler.disable()
        line = f"edit {i + 1:>3}/{len(edit_records)}: " + "  ".join(
            f"{r.name} {row['seconds']:6.2f} s ({row['z_steps']:>2} z steps: "
            + ", ".join(f"{k} {row['phases'][k]:.2f}" for k in PHASES)
            + ")"
            for r, row in zip(runners, rows)
        )
        if len(runners) == 2:
            a, b = (edited_weights(r.model, r.hparams) for r in runners)
            diff = max(float((a[l] - b[l]).abs().max() / a[l].abs().max()) for l in a)
            same_steps = rows[0]["z_steps"] == rows[1]["z_steps"]
            flipped = sum(int((runners[0].changed[l] != runners[1].changed[l]).sum()) for l in a)
            agreement.append(
                {"edit": i + 1, "max_rel_weight_diff": diff, "same_z_steps": same_steps, "mask_neurons_differing": flipped}
            )
            line += f"  | weights rel diff {diff:.1e}, same z steps {same_steps}, mask neurons differing {flipped}"
        print(line, flush=True)

    if args.profile == "cprofile":
        import pstats

        pstats.Stats(profiler).sort_stats("cumulative").print_stats(45)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
    elif args.profile == "torch":
        profiler.__exit__(None, None, None)
        print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=40))

    eval_info = None
    if args.eval_records:
        from easyedit_nmke.evaluate import metrics
        from easyedit_nmke.evaluate.runner import RunConfig, evaluate_records

        recs = records[: args.eval_records]
        config = RunConfig(eval_at=[])
        loc = [(r.locality_prompt, r.locality_answer) for r in recs if r.locality_prompt and r.locality_answer]
        refs = iter(metrics.answer_predictions(runners[-1].model, tok, loc, config.batch_size))
        references = [next(refs) if r.locality_prompt and r.locality_answer else None for r in recs]
        start = time.perf_counter()
        evaluate_records(runners[-1].model, tok, recs, references, config)
        seconds = time.perf_counter() - start
        eval_info = {"records": len(recs), "seconds": seconds, "sec_per_record": seconds / len(recs)}
        print(f"checkpoint evaluation over {len(recs)} records: {seconds:.2f} s ({seconds / len(recs) * 1000:.1f} ms/record)")

    # The first edit also builds each layer's attribution readout cache (once per run):
    # "steady" leaves it out, which is what the per-edit cost of a long run converges to.
    summary = {r.name: summarise(r.edits) for r in runners}
    steady = {r.name: summarise(r.edits[1:]) for r in runners if len(r.edits) > 1}
    for label, table in (("all edits", summary), ("steady (edits 2..N)", steady)):
        for name, s in table.items():
            print(
                f"{label:>20} {name}: {s['sec_per_edit']:.2f} s/edit  ("
                + ", ".join(f"{k} {v:.2f}" for k, v in s["phase_sec_per_edit"].items())
                + f", other {s['other_sec_per_edit']:.2f}; {s['z_steps_mean']:.1f} z steps, {s['z_sec_per_step']:.3f} s/step)"
            )
    result = {
        "command": "python " + shlex.join([script_path()] + sys.argv[1:]),
        "env": {
            "EASYEDIT_NMKE_DATA_DIR": os.environ.get("EASYEDIT_NMKE_DATA_DIR"),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
        },
        "note": args.note,
        # 1/5/15-minute load averages of the (shared) machine: > 1 per core means contention.
        "load_average": {"start": load_at_start, "end": os.getloadavg()},
        "data": str(data),
        "skip": args.skip,
        "hparams_overrides": overrides,
        "compare_overrides": compare_overrides,
        "model_load_seconds": load_seconds,
        "setup_seconds": {r.name: r.setup_seconds for r in runners},
        "stats_files": stats_files,
        "summary": summary,
        "steady": steady,
        "agreement": agreement,
        "checkpoint_eval": eval_info,
        "edits": {r.name: r.edits for r in runners},
    }
    if "fast" in summary and "reference" in summary:
        result["speedup"] = summary["reference"]["sec_per_edit"] / summary["fast"]["sec_per_edit"]
        if "fast" in steady:
            result["speedup_steady"] = steady["reference"]["sec_per_edit"] / steady["fast"]["sec_per_edit"]
        print(f"speed-up {result['speedup']:.2f}x (steady {result.get('speedup_steady', float('nan')):.2f}x)")
    eval_seconds = 0.0
    if eval_info:
        # The runner's default checkpoints for 1000 edits (1, 10, 100, 1000), each over all T edits so far.
        eval_seconds = eval_info["sec_per_record"] * (1 + 10 + 100 + 1000)
        result["projected_eval_seconds_1000_edits"] = eval_seconds
    for name in summary:
        s = steady.get(name, summary[name])
        first = summary[name]["sec_per_edit"] * summary[name]["edits"] - s["sec_per_edit"] * s["edits"]
        seconds = first + s["sec_per_edit"] * 999 + eval_seconds if name in steady else s["sec_per_edit"] * 1000
        summary[name]["projected_hours_1000_edits"] = seconds / 3600
        print(f"{name}: projected 1000 edits (+ checkpoint evaluation {eval_seconds:.0f} s): {seconds / 3600:.2f} h")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
