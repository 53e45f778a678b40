"""Command line: ``easyedit-nmke edit`` (also ``python -m easyedit_nmke``).

Runs a lifelong (sequential) editing run and prints a results table::

    easyedit-nmke edit --num-edits 50
    easyedit-nmke edit --hparams hparams/NMKE/smollm2-135m.yaml \\
        --data ../shared/data/zsre_mend_eval_portability_gpt4.dev.json \\
        --num-edits 100 --eval-at 10,100 --set mask_mode=none --out results/none.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from .evaluate.bench import default_checkpoints  # argparse-only module, no torch import

PACKAGE_ROOT = Path(__file__).resolve().parent
DEFAULT_HPARAMS = "hparams/NMKE/smollm2-135m.yaml"


def default_hparams_path() -> Path:
    """The SmolLM2 NMKE YAML: from the working directory, else the copy installed with the package."""
    local = Path(DEFAULT_HPARAMS)
    if local.is_file():
        return local
    return PACKAGE_ROOT / "hparams" / "NMKE" / "smollm2-135m.yaml"


def parse_overrides(items: Sequence[str]) -> Dict[str, Any]:
    overrides: Dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        try:
            overrides[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or type(exc).__name__
            raise SystemExit(
                f"--set {item!r}: the value is read as YAML and is not valid YAML ({problem}); "
                f"quote it as a string, e.g. --set '{key.strip()}=\"{value}\"'"
            ) from None
    return overrides


def parse_eval_at(text: Optional[str], num_edits: int) -> List[int]:
    if not text:
        return default_checkpoints(num_edits)
    try:
        return sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise SystemExit(f"--eval-at expects comma-separated integers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="easyedit-nmke", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    edit = sub.add_parser("edit", help="lifelong sequential editing run with a results table")
    edit.add_argument("--hparams", type=Path, default=None, help=f"hparams YAML (default {DEFAULT_HPARAMS})")
    edit.add_argument(
        "--data", action="append", default=[],
        help="EasyEdit JSON: ZsRE records (src/alt/...) or prompt/target_new records (CounterFact, "
        "WISE's hallucination and temporal sets); repeatable, read in order (default: the demo set)",
    )
    edit.add_argument("--num-edits", type=int, default=None, help="number of sequential edits (default: all)")
    edit.add_argument("--eval-at", default=None, help="checkpoints T, e.g. 10,100 (the last edit is always one)")
    edit.add_argument("--out", type=Path, default=None, help="write the results JSON here")
    edit.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override an hparam")
    edit.add_argument(
        "--metric", choices=["accuracy", "perplexity"], default="accuracy",
        help="Rel/Gen as target token accuracy (default) or target perplexity (hallucination data)",
    )
    edit.add_argument("--immediate", action="store_true", help="also score each edit right after applying it")
    edit.add_argument("--work-dir", type=Path, default=None, help="checkpoint here; a rerun resumes from it")
    edit.add_argument(
        "--save-every", type=int, default=25,
        help="with --work-dir, also save every N edits between checkpoints (default 25; 0: off)",
    )
    edit.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    edit.add_argument("--no-progress", action="store_true", help="no progress bar (for logs)")
    edit.add_argument(
        "--ard-plot", type=Path, default=None, help="MicroEdit: record every ARD and plot the distributions (PNG)"
    )
    train_sae = sub.add_parser("train-sae", help="MicroEdit: train the TopK SAE for a MicroEdit hparams file")
    train_sae.add_argument("--hparams", type=Path, required=True, help="MicroEdit hparams YAML")
    train_sae.add_argument("--out", type=Path, default=None, help="save the SAE here (default: the hparams' sae_path)")
    train_sae.add_argument("--layer", type=int, default=None, help="decoder block whose output the SAE reads")
    train_sae.add_argument("--d-sae", type=int, default=None, help="number of latents (sae_train_d_sae)")
    train_sae.add_argument("--k", type=int, default=None, help="active latents per token (sae_train_k)")
    train_sae.add_argument("--tokens", type=int, default=None, help="training tokens (sae_train_tokens)")
    train_sae.add_argument("--epochs", type=int, default=None, help="passes over the training tokens")
    train_sae.add_argument("--dataset", default=None, help="text file/folder, wikitext-2 or model-generated")
    train_sae.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override an hparam")
    train_sae.add_argument("--force", action="store_true", help="replace an SAE already at the output folder")
    train_sae.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    train_sae.add_argument("--no-progress", action="store_true")
    export = sub.add_parser(
        "export-upstream",
        help="add NMKE and MicroEdit to an EasyEdit checkout (method folders, registries, hparams), as an upstream PR",
    )
    export.add_argument("easyedit_root", type=Path, help="the EasyEdit checkout (the folder holding easyeditor/)")
    export.add_argument("--dry-run", action="store_true", help="list what would change; write nothing")
    export.add_argument(
        "--hparams-dir", type=Path, default=None, help="the plugin's hparams/ folder (default: the installed package's)"
    )
    bench = sub.add_parser(
        "bench", help="lifelong benchmark: methods x datasets x checkpoints T, per-cell JSONs, table and plots"
    )
    from .evaluate.bench import add_bench_arguments  # argparse only; no torch import

    add_bench_arguments(bench)
    return parser


def run_edit(args: argparse.Namespace) -> Dict[str, Any]:
    import torch

    from .evaluate.records import DEMO_DATA, load_records
    from .evaluate.runner import RunConfig, results_table, run_lifelong
    from .methods import load_hparams, method_spec
    from .util.model_loader import load_model_and_tokenizer, run_device

    if args.threads:
        torch.set_num_threads(args.threads)
    hparams_path = args.hparams or default_hparams_path()
    hparams = load_hparams(hparams_path, parse_overrides(args.set))
    if args.ard_plot and hparams.alg_name != "MicroEdit":
        raise SystemExit(f"--ard-plot plots MicroEdit's reconstruction distances; {hparams.alg_name} has none")
    records = load_records(args.data, limit=args.num_edits)
    if args.num_edits is not None and len(records) < args.num_edits:
        print(f"[easyedit-nmke] only {len(records)} records available; running {len(records)} edits", file=sys.stderr)
    device = run_device(hparams)
    model, tok = load_model_and_tokenizer(hparams.model_name, device=device)
    spec = method_spec(hparams.alg_name)
    config = RunConfig(
        eval_at=parse_eval_at(args.eval_at, len(records)),
        metric=args.metric,
        immediate=args.immediate,
        record_distances=args.ard_plot is not None,
        progress=not args.no_progress,
        save_every=args.save_every,
    )
    result = run_lifelong(
        model,
        tok,
        hparams,
        spec,
        records,
        config,
        data_names=[str(p) for p in args.data] or [str(DEMO_DATA.name)],
        work_dir=args.work_dir,
    )
    data = result.to_dict()
    data["command"] = "easyedit-nmke " + " ".join(sys.argv[1:]) if sys.argv else ""
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(data, indent=2))
    print()
    print(results_table(data))
    if args.ard_plot:
        from .evaluate.ard_plot import plot_ard_distributions

        print(f"ARD distributions: {plot_ard_distributions(data, args.ard_plot)}")
    return data


def run_train_sae(args: argparse.Namespace, argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Train MicroEdit's SAE as the hparams describe it, save it, print the held-out metrics."""
    import torch

    from .models.microedit.microedit_hparams import MicroEditHyperParams
    from .models.microedit.sae_io import save_sae
    from .models.microedit.train_sae import train_sae
    from .util.model_loader import load_model_and_tokenizer, run_device

    if args.threads:
        torch.set_num_threads(args.threads)
    hparams = MicroEditHyperParams.from_hparams(args.hparams)
    overrides = parse_overrides(args.set)
    for key, value in (
        ("layers", None if args.layer is None else [args.layer]),
        ("sae_train_d_sae", args.d_sae),
        ("sae_train_k", args.k),
        ("sae_train_tokens", args.tokens),
        ("sae_train_epochs", args.epochs),
        ("sae_train_dataset", args.dataset),
    ):
        if value is not None:
            overrides[key] = value
    if overrides:
        hparams = hparams.replace(**overrides)
    if not hparams.can_train_sae:
        raise SystemExit(f"{args.hparams}: set sae_train_d_sae and sae_train_k (or pass --d-sae and --k)")
    changes_sae = {"layers", "sae_train_d_sae", "sae_train_k"} & set(overrides)
    if args.out is None and changes_sae:
        raise SystemExit(
            f"overriding {sorted(changes_sae)} trains a different SAE than sae_path names; give --out DIR"
        )
    out = args.out or hparams.resolved_sae_path()
    if out is None:
        raise SystemExit(f"{args.hparams} has no sae_path; give --out DIR")
    if out.exists() and not args.force:
        raise SystemExit(f"an SAE already exists at {out}; pass --force to replace it")
    device = run_device(hparams)
    model, tok = load_model_and_tokenizer(hparams.model_name, device=device)
    sae, metrics = train_sae(model, tok, hparams, progress=not args.no_progress)
    metrics["command"] = "easyedit-nmke " + " ".join(sys.argv[1:] if argv is None else argv)
    save_sae(sae, out, metrics)
    print(json.dumps(metrics, indent=2, sort_keys=True))
    print(
        f"SAE saved to {out}: held-out FVE {metrics['fve']:.3f}, mean L0 {metrics['mean_l0']:.1f}, "
        f"dead latents {metrics['dead_fraction']:.1%}, {metrics['train_tokens']} training tokens, "
        f"{metrics['seconds'] / 60:.1f} minutes"
    )
    return metrics


def run_bench(args: argparse.Namespace, argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """``easyedit-nmke bench``: see :mod:`easyedit_nmke.evaluate.bench`."""
    from .evaluate.bench import run_from_args

    words = list(sys.argv[1:] if argv is None else argv)
    return run_from_args(args, command="easyedit-nmke " + " ".join(words))


def run_export_upstream(args: argparse.Namespace) -> List[str]:
    """``easyedit-nmke export-upstream``: see :mod:`easyedit_nmke.upstream_export`."""
    from .upstream_export import ExportError, plan_export

    try:
        plan = plan_export(args.easyedit_root, args.hparams_dir)
    except ExportError as exc:
        raise SystemExit(f"export-upstream: {exc}") from None
    written = plan.changes() if args.dry_run else plan.write()
    for rel in written:
        verb = "removed " if rel in plan.removed else "modified" if rel in plan.modified else "wrote   "
        print(f"{verb} {rel}")
    print(f"{len(written)} of {len(plan.files) + len(plan.removed)} files "
          + ("would change" if args.dry_run else "changed") + f" in {args.easyedit_root}"
          + ("" if written else " (already exported)"))
    return written


def _input_error_types() -> Tuple[type, ...]:
    """The errors that mean bad input (files, hparams, records, model/SAE mismatch), not a bug.

    Imported when needed: most of these modules import torch, which this module avoids.
    """
    from .evaluate.records import RecordError
    from .models.microedit.sae_io import SAEError
    from .util.corpus import CorpusError
    from .util.hparams import HParamsError
    from .util.model_parts import ArchitectureError
    from .util.requests import RequestError

    return (RecordError, HParamsError, RequestError, CorpusError, ArchitectureError, SAEError, FileNotFoundError)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "edit":
            run_edit(args)
        elif args.command == "train-sae":
            run_train_sae(args, argv)
        elif args.command == "bench":
            run_bench(args, argv)
        elif args.command == "export-upstream":
            run_export_upstream(args)
    except Exception as exc:
        if isinstance(exc, _input_error_types()):
            # The message names the problem; a traceback would only bury it.
            raise SystemExit(f"easyedit-nmke {args.command}: {exc}") from None
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
