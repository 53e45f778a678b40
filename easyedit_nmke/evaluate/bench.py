"""Lifelong benchmark: methods × datasets, each cell one sequential run with checkpoints T.

``easyedit-nmke bench`` (and ``examples/run_lifelong.py``) runs every (method,
dataset) cell with the plugin's lifelong runner — one edit at a time, all edits so
far evaluated at each checkpoint T, and the "right after each edit" numbers beside
them — and writes, under ``--out``:

* ``cells/<dataset>-T<n>__<method>.json``: the ``edit`` command's JSON
  (``RunResult.to_dict()`` + ``command``) plus ``general`` (MMLU accuracy and
  WikiText-2 perplexity before and after the run), ``weight_drift`` and ``bench``
  (the cell's configuration and its hash);
* ``work/<cell>/``: the runner's checkpoint (a killed run resumes from it);
* ``results.md``: all cells in ``cells/`` as Markdown tables;
* ``plots/<dataset>.png``: Rel/Gen/Loc/avg against T, one line per method.

A rerun skips the cells whose JSON exists with the same configuration and resumes
the others from their last checkpoint.

Methods: the plugin's (``easyedit_nmke.methods.METHODS``; ``NMKE:<mask_mode>`` picks
a mask mode, plain ``NMKE`` is ``hybrid``, ``NMKE:none`` is AlphaEdit's update,
``NMKE:zero_update`` hybrid with the authors' mask application) and
EasyEdit's (:mod:`.baselines`).  A method that cannot run here is skipped with the
reason printed.
"""
from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple

if TYPE_CHECKING:  # pragma: no cover
    from .records import EditRecord

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = "smollm2-135m"
DEFAULT_METHODS = ("NMKE", "NMKE:none")
# Dataset names -> (files under the data folder, in order, metric).  ZsRE continues with
# the MEND train sample after the 725-record dev split when more edits are asked for.
DATASETS: Dict[str, Tuple[Tuple[str, ...], str]] = {
    "zsre": (("zsre_mend_eval_portability_gpt4.dev.json", "zsre_mend_train-1k.json"), "accuracy"),
    "counterfact": (("counterfact-edit.dev.json",), "accuracy"),
    "hallucination": (("hallucination-edit.json",), "perplexity"),
    "temporal": (("temporal-edit.json",), "accuracy"),
}
# Training-split files whose locality pairs WISE trains its router against (upstream's
# run_wise_editing.py does the same with the sets' train files).
LOC_SOURCES = {
    "zsre": "zsre_mend_train-1k.json",
    "counterfact": "counterfact-train.json",
    "hallucination": "hallucination-train.json",
    "temporal": "temporal-train.json",
}
# Plugin methods whose "NAME:VARIANT" label sets this hparam.
VARIANT_KEYS = {"NMKE": "mask_mode"}
DEFAULT_VARIANT = {"NMKE": "hybrid"}
# Variants that are not a value of VARIANT_KEYS: name -> overrides on top of the default variant.
NAMED_VARIANTS = {"NMKE": {"zero_update": {"mask_application": "zero_update"}}}  # the authors' mask application
def default_checkpoints(num_edits: int) -> List[int]:
    """Evaluation points T when none are given: 1, 10, 100, 1000 below ``num_edits``, then it."""
    return [t for t in (1, 10, 100, 1000) if t < num_edits] + [num_edits]


# (model name, device=...) -> (model, tokenizer); tests pass tiny models through it.
ModelLoader = Callable[..., Tuple[Any, Any]]


class SkipMethod(Exception):
    """The method cannot run here; the message says why."""


# ----------------------------------------------------------------------------------
# Datasets and methods
# ----------------------------------------------------------------------------------
@dataclass
class Dataset:
    name: str
    paths: List[Path]
    metric: str
    loc_source: Optional[Path] = None  # unrelated text for WISE's router (a train split)


def default_data_dir() -> Optional[Path]:
    env = os.environ.get("EASYEDIT_NMKE_DATA_DIR")
    return Path(env).expanduser() if env else None


def resolve_dataset(name_or_path: str, data_dir: Optional[Path], metric: Optional[str] = None) -> Dataset:
    """A dataset by name (``zsre``, ``counterfact``, ``hallucination``, ``temporal``) or by path."""
    key = name_or_path.lower()
    if key in DATASETS:
        files, default_metric = DATASETS[key]
        if data_dir is None:
            raise SystemExit(
                f"dataset {name_or_path!r}: set EASYEDIT_NMKE_DATA_DIR or --data-dir to the folder holding {files[0]}"
            )
        paths = [Path(data_dir) / f for f in files]
        if not paths[0].is_file():
            raise SystemExit(f"dataset {name_or_path!r}: {paths[0]} not found")
        loc_source = Path(data_dir) / LOC_SOURCES[key]
        return Dataset(key, [p for p in paths if p.is_file()], metric or default_metric,
                       loc_source if loc_source.is_file() else None)
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        raise SystemExit(f"dataset {name_or_path!r} is neither one of {sorted(DATASETS)} nor a file")
    guess = "perplexity" if "hallucination" in path.name.lower() else "accuracy"
    return Dataset(path.stem, [path], metric or guess)


@dataclass
class Method:
    label: str  # as given: "NMKE:none", "MEMIT"
    alg: str
    kind: str  # "plugin" or "baseline"
    overrides: Dict[str, Any] = field(default_factory=dict)

    @property
    def safe_label(self) -> str:
        return self.label.replace(":", "-").replace("/", "_")


def parse_method(label: str) -> Method:
    from ..methods import METHODS
    from .baselines import BASELINES

    alg, _, variant = label.partition(":")
    if alg in METHODS:
        overrides: Dict[str, Any] = {}
        named = NAMED_VARIANTS.get(alg, {})
        if variant and variant not in named:
            if alg not in VARIANT_KEYS:
                raise SystemExit(f"method {label!r}: {alg} has no variants")
            overrides[VARIANT_KEYS[alg]] = variant
        elif alg in DEFAULT_VARIANT:
            overrides[VARIANT_KEYS[alg]] = DEFAULT_VARIANT[alg]
        overrides.update(named.get(variant, {}))
        return Method(label, alg, "plugin", overrides)
    if alg in BASELINES:
        if variant:
            raise SystemExit(f"method {label!r}: EasyEdit baselines have no variants")
        return Method(label, alg, "baseline")
    raise SystemExit(f"unknown method {label!r}: plugin methods {sorted(METHODS)}, EasyEdit baselines {list(BASELINES)}")


def default_hparams_root() -> Path:
    local = Path("hparams")
    return local if (local / "NMKE").is_dir() else PACKAGE_ROOT / "hparams"


def hparams_file(method: Method, model: str, hparams_dir: Optional[Path], single_method: bool) -> Path:
    """The YAML for ``method``: ``<dir>/<ALG>/<model>.yaml`` (plugin) or
    ``<dir>/baselines/<ALG>/<model>.yaml`` (EasyEdit); ``--hparams_dir`` may also name a
    YAML (EasyEdit's run scripts) or a folder of ``<model>.yaml`` when one method runs."""
    root = Path(hparams_dir).expanduser() if hparams_dir else default_hparams_root()
    if root.suffix in (".yaml", ".yml") or Path(str(root) + ".yaml").is_file():
        if not single_method:
            raise SystemExit("--hparams_dir names one YAML; give one method with it")
        return root if root.suffix else Path(str(root) + ".yaml")
    candidates = (
        [root / method.alg / f"{model}.yaml", root / "baselines" / method.alg / f"{model}.yaml"]
        if method.kind == "plugin"
        else [root / "baselines" / method.alg / f"{model}.yaml", root / method.alg / f"{model}.yaml"]
    )
    if single_method:
        candidates.append(root / f"{model}.yaml")
    for path in candidates:
        if path.is_file():
            return path
    raise SkipMethod(f"no hparams file for {method.alg} and model {model} (looked for {candidates[0]})")


# ----------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------
@dataclass
class BenchConfig:
    methods: List[str]
    datasets: List[str]
    num_edits: Optional[int]
    eval_at: List[int]
    out_dir: Path
    model: str = DEFAULT_MODEL
    data_dir: Optional[Path] = None
    hparams_dir: Optional[Path] = None
    overrides: Dict[str, Any] = field(default_factory=dict)
    metric: Optional[str] = None
    immediate: bool = True
    general: Any = None  # GeneralConfig or None
    progress: bool = True
    save_every: int = 25  # save each cell's run every N edits between checkpoints (0: only at them)
    command: str = ""


def _hash(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _general_fingerprint(general: Any) -> Optional[Dict[str, Any]]:
    if general is None:
        return None
    data = general.to_dict()
    for key in ("mmlu_dir", "wikitext"):
        if data.get(key):
            data[key] = Path(data[key]).name  # where the data lives does not change results
    return data


# ----------------------------------------------------------------------------------
# One cell
# ----------------------------------------------------------------------------------
def cell_name(dataset: Dataset, n: int, method: Method) -> str:
    return f"{dataset.name}-T{n}__{method.safe_label}"


def _load_method(
    method: Method, dataset: "Dataset", config: BenchConfig, single_method: bool, records: Sequence["EditRecord"] = ()
):
    """(spec, hparams, hparams path), or SkipMethod saying why the method cannot run."""
    overrides = dict(method.overrides)
    if method.kind == "plugin":
        from ..methods import METHODS, load_hparams

        spec = METHODS[method.alg]
        try:
            spec.hparams_cls
        except (ImportError, AttributeError) as exc:
            raise SkipMethod(f"{method.alg} is not importable here: {exc!r}") from exc
        path = hparams_file(method, config.model, config.hparams_dir, single_method)
        fields = set(spec.hparams_cls.__dataclass_fields__)
        overrides.update({k: v for k, v in config.overrides.items() if k in fields})
        hparams = load_hparams(path, overrides)
        return spec, hparams, path
    from .baselines import BaselineSpec, baseline_status

    ok, reason = baseline_status(method.alg)
    if not ok:
        raise SkipMethod(reason)
    path = hparams_file(method, config.model, config.hparams_dir, single_method)
    spec = BaselineSpec(method.alg, quiet=True)
    if method.alg == "WISE":
        from .records import locality_texts

        if dataset.loc_source is None:
            raise SkipMethod(f"WISE needs a training split's locality pairs for {dataset.name} (none known)")
        # ZsRE's train split is also edited beyond the dev file: keep its scored questions out.
        spec.loc_prompts = locality_texts(dataset.loc_source, {r.locality_prompt for r in records if r.locality_prompt})
        if not spec.loc_prompts:
            raise SkipMethod(
                f"WISE needs unrelated text: {dataset.loc_source} has no locality pairs besides those this run scores"
            )
    fields = set(spec.hparams_cls.__dataclass_fields__)
    overrides.update({k: v for k, v in config.overrides.items() if k in fields})
    hparams = spec.load_hparams(path, overrides)
    return spec, hparams, path


def _has_parameter(model: Any, name: str) -> bool:
    from ..util import nethook

    try:
        nethook.get_parameter(model, name)
        return True
    except LookupError:
        return False


class _SnapshotAfterPrepare:
    """The method spec, with the named parameters copied as soon as ``prepare`` made them."""

    def __init__(self, spec: Any, names: List[str], into: Dict[str, Any]) -> None:
        self._spec, self._names, self._into = spec, names, into

    def __getattr__(self, name: str) -> Any:
        return getattr(self._spec, name)

    def prepare(self, model: Any, tok: Any, hparams: Any) -> None:
        from .general import snapshot

        self._spec.prepare(model, tok, hparams)
        missing = [n for n in self._names if n not in self._into and _has_parameter(model, n)]
        self._into.update(snapshot(model, missing))


def _write_json(path: Path, data: Dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)


def run_cell(method: Method, dataset: Dataset, config: BenchConfig, single_method: bool = False,
             model_loader: Optional[ModelLoader] = None) -> Optional[Dict[str, Any]]:
    """Run (or skip, or resume) one cell; returns its JSON, or None when skipped."""
    from .general import evaluate_general, snapshot, weight_drift
    from .records import load_records
    from .runner import RunConfig, hparams_dict, results_table, run_lifelong

    records = load_records(dataset.paths, limit=config.num_edits)
    spec, hparams, hparams_path = _load_method(method, dataset, config, single_method, records)
    n = len(records)
    if config.num_edits is not None and n < config.num_edits:
        print(f"[bench] {dataset.name}: only {n} records; running {n} edits", file=sys.stderr)
    eval_at = sorted({t for t in config.eval_at if 0 < t <= n} | {n})
    name = cell_name(dataset, n, method)
    out_path = config.out_dir / "cells" / f"{name}.json"
    work = config.out_dir / "work" / name
    adapter_based = getattr(spec, "adapter_based", False)
    fingerprint = {
        "method": method.label,
        "dataset": dataset.name,
        "files": [p.name for p in dataset.paths],
        "num_edits": n,
        "eval_at": eval_at,
        "metric": dataset.metric,
        "immediate": config.immediate,
        "hparams": hparams_dict(hparams),
        "general": _general_fingerprint(config.general),
    }
    config_hash = _hash(fingerprint)
    if out_path.is_file():
        try:
            previous = json.loads(out_path.read_text())
        except ValueError:
            previous = {}
        if previous.get("bench", {}).get("config_hash") == config_hash:
            print(f"[bench] {name}: finished earlier ({out_path}); skipped")
            return previous
        print(f"[bench] {name}: {out_path} has another configuration; running again")

    print(f"[bench] {name}: {method.label} ({hparams_path}) on {dataset.name}, {n} edits, checkpoints {eval_at}")
    from ..util.model_loader import run_device

    device = run_device(hparams, caller="bench")
    if model_loader is None:
        from ..util.model_loader import load_model_and_tokenizer as model_loader
    model, tok = model_loader(hparams.model_name, device=device)
    work.mkdir(parents=True, exist_ok=True)

    # General capability of the unedited model: measured once per cell, kept for resumes.
    general_before = None
    if config.general is not None and config.general.enabled:
        before_path = work / "general_before.json"
        general_key = _hash(_general_fingerprint(config.general))
        if before_path.is_file():
            saved = json.loads(before_path.read_text())
            if saved.get("key") == general_key:
                general_before = saved["value"]
        if general_before is None:
            general_before = evaluate_general(model, tok, config.general)
            _write_json(before_path, {"key": general_key, "value": general_before})

    # Weight drift reference: the unedited values of the parameters the method edits.
    if adapter_based:
        edited_names: List[str] = []
    elif hasattr(spec, "adapter_based"):
        edited_names = spec.edited_parameters(hparams, model)
    else:
        edited_names = spec.edited_parameters(hparams)
    originals = snapshot(model, [n for n in edited_names if _has_parameter(model, n)])
    # Parameters a method adds in prepare (MicroEdit's SAE decoder) are taken right after it,
    # which the runner calls before restoring a checkpoint.
    spec = _SnapshotAfterPrepare(spec, [n for n in edited_names if n not in originals], originals)

    try:
        result = run_lifelong(
            model, tok, hparams, spec, records,
            RunConfig(
                eval_at=eval_at,
                metric=dataset.metric,
                immediate=config.immediate,
                progress=config.progress,
                save_every=config.save_every,
                batch_size=getattr(spec, "eval_batch_size", None) or RunConfig.batch_size,
            ),
            data_names=[str(p) for p in dataset.paths],
            work_dir=work,
        )
    except ValueError as exc:
        if "belongs to another run" not in str(exc):
            raise
        from .runner import move_checkpoints

        stale = move_checkpoints(work, work.with_name(f"{work.name}.stale-{time.strftime('%Y%m%d-%H%M%S')}"))
        print(f"[bench] {name}: the checkpoint in {work} is from another configuration; moved to {stale}")
        model = None
        gc.collect()
        return run_cell(method, dataset, config, single_method, model_loader)

    data = result.to_dict()
    data["command"] = config.command
    general_after = evaluate_general(model, tok, config.general) if general_before is not None else None
    data["general"] = {
        "before": general_before,
        "after": general_after,
        "config": config.general.to_dict() if config.general is not None else None,
    }
    data["weight_drift"] = (
        weight_drift(model, originals)
        if not adapter_based
        else {"note": f"{method.alg} edits adapter modules it adds to the model, not the model's weights"}
    )
    data["bench"] = {
        "method": method.label,
        "dataset": dataset.name,
        "num_edits": n,
        "eval_at": eval_at,
        "metric": dataset.metric,
        "hparams_file": str(hparams_path),
        "work_dir": str(work),
        "resumable": True,
        "config_hash": config_hash,
    }
    _write_json(out_path, data)
    print(results_table(data))
    print(f"[bench] {name}: written {out_path}")
    del model
    gc.collect()
    return data


# ----------------------------------------------------------------------------------
# The whole matrix
# ----------------------------------------------------------------------------------
def run_bench(config: BenchConfig, model_loader: Optional[ModelLoader] = None) -> Dict[str, Any]:
    """Run every cell (skipping finished ones), then write results.md and the plots."""
    datasets = [resolve_dataset(d, config.data_dir, config.metric) for d in config.datasets]
    methods = [parse_method(m) for m in config.methods]
    single = len(methods) == 1
    skipped: Dict[str, str] = {}
    for dataset in datasets:
        for method in methods:
            try:
                run_cell(method, dataset, config, single, model_loader)
            except SkipMethod as exc:
                skipped[f"{method.label} on {dataset.name}"] = str(exc)
                print(f"[bench] skipping {method.label} on {dataset.name}: {exc}")
    # Remembered across invocations (scripts/run_benchmarks.sh runs one cell per process).
    _record_skips(config.out_dir, skipped)
    report = write_report(config.out_dir)
    return {"skipped": skipped, **report}


def _record_skips(out_dir: Path, skipped: Dict[str, str]) -> None:
    path = Path(out_dir) / "skipped.json"
    known = json.loads(path.read_text()) if path.is_file() else {}
    known.update(skipped)
    if known:
        _write_json(path, known)


def load_cells(out_dir: Path) -> List[Dict[str, Any]]:
    cells = []
    for path in sorted((Path(out_dir) / "cells").glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except ValueError:
            continue
        if "bench" in data:
            cells.append(data)
    return cells


def write_report(out_dir: Path) -> Dict[str, Any]:
    """``results.md`` and ``plots/<dataset>.png`` from every cell JSON under ``out_dir``."""
    out_dir = Path(out_dir)
    cells = load_cells(out_dir)
    skip_file = out_dir / "skipped.json"
    skipped = json.loads(skip_file.read_text()) if skip_file.is_file() else {}
    finished = {f"{c['bench']['method']} on {c['bench']['dataset']}" for c in cells}
    skipped = {k: v for k, v in skipped.items() if k not in finished}
    markdown = markdown_report(cells, skipped)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.md").write_text(markdown)
    plots = write_plots(cells, out_dir / "plots")
    print(f"[bench] report: {out_dir / 'results.md'}" + (f", plots: {', '.join(map(str, plots))}" if plots else ""))
    return {"markdown": out_dir / "results.md", "plots": plots}


def _planned_edits(cell: str) -> Optional[int]:
    """``n`` from a cell name ``<dataset>-T<n>__<method>`` (see :func:`cell_name`)."""
    head = cell.rsplit("__", 1)[0]
    number = head.rsplit("-T", 1)[-1]
    return int(number) if number.isdigit() else None


def cell_status(out_dir: Path) -> List[Dict[str, Any]]:
    """Where each cell under ``out_dir`` stands: finished, or how far its last checkpoint got.

    One row per cell: ``cell``, ``state`` ("finished", "in progress" or "no checkpoint"),
    ``done`` and ``of`` (edits), ``last`` (the latest lifelong evaluation row, or None),
    ``sec_per_edit`` (edit time so far over edits done) and ``edit_hours_left`` (the
    remaining edits at that rate; evaluations and general-capability runs come on top).
    """
    from .runner import read_newest_progress

    out_dir = Path(out_dir)
    cells_dir, work_dir = out_dir / "cells", out_dir / "work"
    names = {path.stem for path in cells_dir.glob("*.json")}
    if work_dir.is_dir():
        names |= {path.name for path in work_dir.iterdir() if path.is_dir() and ".stale-" not in path.name}
    rows = []
    for name in sorted(names):
        cell_file = cells_dir / f"{name}.json"
        if cell_file.is_file():
            cell = json.loads(cell_file.read_text())
            runs = cell.get("runs") or []
            n = cell.get("bench", {}).get("num_edits", _planned_edits(name))
            rows.append({"cell": name, "state": "finished", "done": n, "of": n, "last": runs[-1] if runs else None,
                         "sec_per_edit": runs[-1].get("sec_per_edit") if runs else None, "edit_hours_left": 0.0})
            continue
        planned = _planned_edits(name)
        progress = read_newest_progress(work_dir / name)
        if progress is None:
            rows.append({"cell": name, "state": "no checkpoint", "done": 0, "of": planned, "last": None,
                         "sec_per_edit": None, "edit_hours_left": None})
            continue
        done = int(progress["done"])
        runs = progress.get("result", {}).get("runs") or []
        per_edit = float(progress["edit_seconds"]) / done if done else None
        left = (planned - done) * per_edit / 3600 if per_edit is not None and planned is not None else None
        rows.append({"cell": name, "state": "in progress", "done": done, "of": planned,
                     "last": runs[-1] if runs else None, "sec_per_edit": per_edit, "edit_hours_left": left})
    return rows


def status_table(rows: Sequence[Dict[str, Any]]) -> str:
    """:func:`cell_status` as a Markdown table."""
    lines = ["| cell | state | edits | last lifelong T: avg | s/edit | edit hours left |",
             "|---|---|--:|---|--:|--:|"]
    for row in rows:
        last = row["last"]
        last_text = f"T={last['T']}: {_f(last.get('avg'))}" if last else "-"
        lines.append(
            f"| {row['cell']} | {row['state']} | {row['done']} / {_f(row['of'])} | {last_text} "
            f"| {_f(row['sec_per_edit'], 2)} | {_f(row['edit_hours_left'], 2)} |"
        )
    if not rows:
        lines.append("| (no cells) | | | | | |")
    return "\n".join(lines)


def _f(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _by_dataset(cells: Sequence[Dict[str, Any]]) -> Dict[str, List[Dict[str, Any]]]:
    groups: Dict[str, List[Dict[str, Any]]] = {}
    for cell in cells:
        groups.setdefault(cell["bench"]["dataset"], []).append(cell)
    for group in groups.values():
        group.sort(key=lambda c: (c["bench"]["method"], c["bench"]["num_edits"]))
    return groups


def _general_value(cell: Dict[str, Any], when: str, key: str, field_name: str) -> Optional[float]:
    general = (cell.get("general") or {}).get(when) or {}
    return (general.get(key) or {}).get(field_name)


def markdown_report(cells: Sequence[Dict[str, Any]], skipped: Dict[str, str]) -> str:
    lines = [
        "# Lifelong editing benchmark",
        "",
        "**Lifelong** numbers: after the T-th sequential edit, the model is evaluated on **all T edits so far** "
        "(the protocol of the NMKE, AlphaEdit and WISE papers). **Right after each edit** numbers: each edit scored "
        "immediately after it was applied, before the next one (EasyEdit's default per-edit report), averaged over "
        "edits 1..T; they are higher and are *not* lifelong numbers.",
        "",
        "Rel/Gen = teacher-forced token accuracy of the new target after the edit prompt / its rephrase; "
        "Loc = share of locality-answer tokens predicted as by the unedited model; avg = mean of Rel, Gen, Loc. "
        "On the hallucination set Rel/Gen are the perplexity of the target (lower is better) and avg is Loc.",
    ]
    for dataset, group in _by_dataset(cells).items():
        metric = group[0]["bench"].get("metric", "accuracy")
        rel = "Rel (ppl)" if metric == "perplexity" else "Rel"
        gen = "Gen (ppl)" if metric == "perplexity" else "Gen"
        models = sorted({c.get("model", "?") for c in group})
        lines += ["", f"## {dataset} ({', '.join(models)})", ""]
        lines += [
            "Lifelong (all T edits evaluated after the T-th):",
            "",
            f"| method | run | T | {rel} | {gen} | Loc | avg | s/edit | peak RSS MB |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for cell in group:
            b = cell["bench"]
            for row in cell["runs"]:
                lines.append(
                    f"| {b['method']} | {b['num_edits']} | {row['T']} | {_f(row.get('rel'))} | {_f(row.get('gen'))} | "
                    f"{_f(row.get('loc'))} | {_f(row.get('avg'))} | {_f(row.get('sec_per_edit'), 2)} | "
                    f"{_f(row.get('peak_rss_mb'), 0)} |"
                )
        if any("immediate" in row for c in group for row in c["runs"]):
            lines += [
                "",
                "Right after each edit (EasyEdit's per-edit numbers, mean over edits 1..T; **not** lifelong):",
                "",
                f"| method | run | T | {rel} | {gen} | Loc |",
                "|---|---:|---:|---:|---:|---:|",
            ]
            for cell in group:
                b = cell["bench"]
                for row in cell["runs"]:
                    imm = row.get("immediate")
                    if imm:
                        lines.append(
                            f"| {b['method']} | {b['num_edits']} | {row['T']} | {_f(imm.get('rel'))} | "
                            f"{_f(imm.get('gen'))} | {_f(imm.get('loc'))} |"
                        )
        lines += [
            "",
            "General capability before → after the run, weight drift and cost (at the last T):",
            "",
            "| method | run | MMLU acc | WikiText-2 ppl | ‖ΔW‖/‖W‖ | changed share | setup s | s/edit | "
            "s/edit by phase | peak RSS MB |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|",
        ]
        for cell in group:
            b = cell["bench"]
            last = cell["runs"][-1] if cell["runs"] else {}
            mmlu = f"{_f(_general_value(cell, 'before', 'mmlu', 'accuracy'))} → {_f(_general_value(cell, 'after', 'mmlu', 'accuracy'))}"
            ppl = (
                f"{_f(_general_value(cell, 'before', 'wikitext_ppl', 'perplexity'), 2)} → "
                f"{_f(_general_value(cell, 'after', 'wikitext_ppl', 'perplexity'), 2)}"
            )
            total = (cell.get("weight_drift") or {}).get("_total") or {}
            phases = last.get("phase_seconds") or {}
            done = last.get("T") or 1
            phase_text = ", ".join(f"{k} {v / done:.2f}" for k, v in phases.items()) or "-"
            lines.append(
                f"| {b['method']} | {b['num_edits']} | {mmlu} | {ppl} | {_f(total.get('rel_norm'), 4)} | "
                f"{_f(total.get('changed_share'))} | {_f(cell.get('setup_seconds'), 1)} | "
                f"{_f(last.get('sec_per_edit'), 2)} | {phase_text} | {_f(last.get('peak_rss_mb'), 0)} |"
            )
        commands = sorted({c.get("command", "") for c in group if c.get("command")})
        if commands:
            lines += ["", "Command(s):", ""] + [f"    {c}" for c in commands]
    if skipped:
        lines += ["", "## Not run", ""] + [f"* {m}: {reason}" for m, reason in sorted(skipped.items())]
    if not cells:
        lines += ["", "(no finished cells yet)"]
    return "\n".join(lines) + "\n"


_PLOT_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple",
                 "tab:brown", "tab:pink", "tab:gray", "tab:olive", "tab:cyan")
_PLOT_MARKERS = ("o", "s", "^", "D")
_PLOT_DASHES = ("-", "--", ":", "-.")


def plot_line_styles(methods: Sequence[str]) -> Dict[str, Dict[str, str]]:
    """A distinct (colour, marker, line style) per method, in sorted order.

    Matplotlib's default cycle repeats its colours after ten lines, and the ZsRE matrix
    has more methods than that; each further round of colours changes marker and dash.
    """
    styles = {}
    for index, method in enumerate(sorted(set(methods))):
        round_ = index // len(_PLOT_COLOURS)
        styles[method] = {
            "color": _PLOT_COLOURS[index % len(_PLOT_COLOURS)],
            "marker": _PLOT_MARKERS[round_ % len(_PLOT_MARKERS)],
            "linestyle": _PLOT_DASHES[round_ % len(_PLOT_DASHES)],
        }
    return styles


def write_plots(cells: Sequence[Dict[str, Any]], folder: Path) -> List[Path]:
    """One PNG per dataset: Rel, Gen, Loc, avg (lifelong) against T, one line per method."""
    if not cells:
        return []
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        print(f"[bench] no plots: matplotlib is not installed ({exc})")
        return []
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for dataset, group in _by_dataset(cells).items():
        metric = group[0]["bench"].get("metric", "accuracy")
        # One line per method; a method with several runs (T=100, T=1000) merges their points,
        # the longer run winning where both have a checkpoint.
        lines: Dict[str, Dict[int, Dict[str, Any]]] = {}
        for cell in sorted(group, key=lambda c: c["bench"]["num_edits"]):
            points = lines.setdefault(cell["bench"]["method"], {})
            for row in cell["runs"]:
                points[row["T"]] = row
        panels = [("rel", "Rel"), ("gen", "Gen"), ("loc", "Loc"), ("avg", "avg")]
        styles = plot_line_styles(list(lines))
        fig, axes = plt.subplots(1, 4, figsize=(18, 3.8))
        all_t = sorted({t for points in lines.values() for t in points})
        for ax, (key, title) in zip(axes, panels):
            for method, points in sorted(lines.items()):
                ts = [t for t in sorted(points) if points[t].get(key) is not None]
                if ts:
                    ax.plot(ts, [points[t][key] for t in ts], label=method, **styles[method])
            if metric == "perplexity" and key in ("rel", "gen"):
                ax.set_title(f"{title}: target perplexity (lower is better)")
                ax.set_yscale("log")
            else:
                ax.set_title(title + (" (= Loc)" if metric == "perplexity" and key == "avg" else ""))
                ax.set_ylim(-0.02, 1.02)
            ax.set_xlabel("T (edits so far)")
            if all_t and all_t[-1] / max(all_t[0], 1) >= 20:
                ax.set_xscale("log")
            ax.grid(True, alpha=0.3)
        # One legend beside the panels: inside a panel it hides the lines it names.
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="center right", fontsize="small")
        models = ", ".join(sorted({c.get("model", "?") for c in group}))
        fig.suptitle(f"{dataset} on {models}: lifelong (all T edits evaluated after the T-th)")
        fig.tight_layout(rect=(0.0, 0.0, 0.87, 1.0))
        path = folder / f"{dataset}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


# ----------------------------------------------------------------------------------
# Command line (shared by `easyedit-nmke bench` and examples/run_lifelong.py)
# ----------------------------------------------------------------------------------
def _split(values: Sequence[str]) -> List[str]:
    return [v.strip() for value in values for v in value.split(",") if v.strip()]


def add_bench_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The bench flags; EasyEdit's run_*_editing.py spellings are accepted as aliases."""
    parser.add_argument(
        "--methods", "--method", "--editing_method", "--editing-method", dest="methods", action="append", default=[],
        help="comma-separated, repeatable: NMKE (hybrid), NMKE:general|specific|fixed|none (mask modes), "
             f"NMKE:{'|'.join(NAMED_VARIANTS['NMKE'])} (hybrid, the authors' mask application), MicroEdit, "
             f"FT, ROME, MEMIT, AlphaEdit, WISE, GRACE (default {','.join(DEFAULT_METHODS)})",
    )
    parser.add_argument(
        "--datasets", "--dataset", dest="datasets", action="append", default=[],
        help=f"comma-separated, repeatable: {', '.join(DATASETS)} or a JSON path (default zsre)",
    )
    parser.add_argument(
        "--data-dir", "--data_dir", dest="data_dir", type=Path, default=None,
        help="folder with the data files (default $EASYEDIT_NMKE_DATA_DIR); a JSON file is used as the dataset",
    )
    parser.add_argument(
        "--num-edits", "--ds_size", "--ds-size", dest="num_edits", type=int, default=None,
        help="edits per cell, the largest T (default: the largest --eval-at, else 100)",
    )
    parser.add_argument("--eval-at", default=None, help="checkpoints T, e.g. 10,100,1000 (the last edit is always one)")
    parser.add_argument(
        "--hparams-dir", "--hparams_dir", dest="hparams_dir", type=Path, default=None,
        help="hparams root with <ALG>/<model>.yaml and baselines/<ALG>/<model>.yaml (default ./hparams "
             "if it holds NMKE/, else the YAMLs installed with the package); "
             "or one YAML for a single method",
    )
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"hparams file stem (default {DEFAULT_MODEL})")
    parser.add_argument("--out", "--out-dir", dest="out", type=Path, default=Path("runs/bench"),
                        help="output folder (default runs/bench)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override an hparam in every method that has it")
    parser.add_argument("--metric", choices=["accuracy", "perplexity"], default=None,
                        help="override the dataset's metric (hallucination: perplexity)")
    parser.add_argument("--sequential_edit", "--sequential-edit", dest="sequential_edit", action="store_true",
                        help="accepted for EasyEdit compatibility: the benchmark always edits sequentially")
    parser.add_argument("--no-immediate", action="store_true", help="do not score each edit right after applying it")
    parser.add_argument("--no-general", action="store_true", help="skip MMLU / WikiText-2 before and after")
    parser.add_argument("--mmlu-n", type=int, default=None, help="MMLU questions (default 48; 0 skips MMLU)")
    parser.add_argument("--wikitext-windows", type=int, default=None, help="WikiText-2 windows (default 12; 0 skips)")
    parser.add_argument("--window-tokens", type=int, default=None, help="tokens per WikiText-2 window (default 256)")
    parser.add_argument("--mmlu-dir", type=Path, default=None, help="MMLU folder (default <data dir>/mmlu)")
    parser.add_argument("--wikitext", type=Path, default=None,
                        help="perplexity text (default <data dir>/wikitext-2/test.txt)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--save-every", type=int, default=25,
                        help="save each cell's run every N edits between checkpoints, to resume from (0: off)")
    parser.add_argument("--report-only", action="store_true", help="only rebuild results.md and plots from --out")
    parser.add_argument(
        "--status", action="store_true",
        help="only print where each cell under --out stands (finished, or edits done and time left); "
             "reads the checkpoints of running cells without touching them",
    )
    return parser


def config_from_args(args: argparse.Namespace, command: str = "") -> BenchConfig:
    from ..cli import parse_overrides
    from .general import default_general_config

    data_dir = args.data_dir
    datasets = _split(args.datasets)
    if data_dir is not None and Path(data_dir).is_file():
        datasets = datasets or [str(data_dir)]  # EasyEdit scripts pass the data file itself
        data_dir = None
    data_dir = data_dir or default_data_dir()
    eval_at = sorted({int(x) for x in _split([args.eval_at])}) if args.eval_at else []
    num_edits = args.num_edits or (max(eval_at) if eval_at else 100)
    if not eval_at:
        eval_at = default_checkpoints(num_edits)
    general = None
    if not args.no_general:
        general = default_general_config(
            data_dir,
            mmlu_n=args.mmlu_n,
            wikitext_windows=args.wikitext_windows,
            window_tokens=args.window_tokens,
        )
        if args.mmlu_dir:
            general.mmlu_dir = str(args.mmlu_dir)
        if args.wikitext:
            general.wikitext = str(args.wikitext)
        if not general.enabled:
            print("[bench] no MMLU / WikiText-2 data found (set --data-dir); general capability is not measured")
    return BenchConfig(
        methods=_split(args.methods) or list(DEFAULT_METHODS),
        datasets=datasets or ["zsre"],
        num_edits=num_edits,
        eval_at=eval_at,
        out_dir=Path(args.out),
        model=args.model,
        data_dir=Path(data_dir) if data_dir else None,
        hparams_dir=args.hparams_dir,
        overrides=parse_overrides(args.set),
        metric=args.metric,
        immediate=not args.no_immediate,
        general=general,
        progress=not args.no_progress,
        save_every=args.save_every,
        command=command,
    )


def run_from_args(args: argparse.Namespace, command: str = "") -> Dict[str, Any]:
    if args.status:
        rows = cell_status(Path(args.out))
        print(status_table(rows))
        return {"status": rows}
    if args.report_only:
        return write_report(Path(args.out))
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    return run_bench(config_from_args(args, command))


def main(argv: Optional[Sequence[str]] = None, prog: str = "run_lifelong.py") -> int:
    parser = add_bench_arguments(argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0]))
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    run_from_args(args, command=" ".join([prog] + argv))
    return 0
