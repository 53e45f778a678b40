"""Lifelong (sequential) editing runs: edit one fact at a time, evaluate at checkpoints.

At each checkpoint T the current model is evaluated on all T edits so far (the
lifelong protocol of the NMKE/AlphaEdit/WISE papers).  ``immediate`` numbers —
each edit evaluated right after it was applied, EasyEdit's default report — are
recorded beside them when asked for, because the two are easily confused.

A run with a ``work_dir`` is resumable: at every checkpoint the edited weights,
the method's lifelong state, the locality references and the results so far are
saved, and a restarted run continues from the last checkpoint.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import resource
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from ..methods import MethodSpec
from ..util import nethook
from ..util.requests import RequestError
from . import metrics
from .records import EditRecord

RESULT_KEYS = ("T", "rel", "gen", "loc", "avg", "sec_per_edit", "peak_rss_mb")


def peak_rss_mb() -> float:
    # ru_maxrss is KiB on Linux, bytes on macOS.
    scale = 1.0 / 1024 if sys.platform != "darwin" else 1.0 / (1024 * 1024)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def environment(device: Optional[torch.device] = None) -> Dict[str, Any]:
    """Versions and the machine a run used; ``device`` is the model's (default: CPU)."""
    import transformers

    device = torch.device(device or "cpu")
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
        "device": f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else device.type,
    }


@dataclass
class RunConfig:
    eval_at: List[int]
    metric: str = "accuracy"  # "accuracy" (ZsRE/CounterFact) or "perplexity" (hallucination)
    immediate: bool = False  # also evaluate each edit right after applying it
    batch_size: int = 16
    progress: bool = True
    # Keep per-input figures a method reports (MicroEdit: every ARD) in the checkpoint rows.
    record_distances: bool = False
    # With a work dir, also save the run every this many edits between evaluation
    # checkpoints (0: only at them), so a killed long run loses at most that many edits.
    save_every: int = 25


@dataclass
class RunResult:
    alg: str
    model: str
    data: List[str]
    hparams: Dict[str, Any]
    env: Dict[str, Any]
    runs: List[Dict[str, Any]] = field(default_factory=list)
    immediate: Optional[Dict[str, Any]] = None
    extra: Dict[str, Any] = field(default_factory=dict)
    # Per-edit "right after the edit" scores behind ``immediate`` (checkpointed, not in the JSON).
    immediate_raw: Dict[str, List[float]] = field(default_factory=lambda: {"rel": [], "gen": [], "loc": []})

    def to_dict(self) -> Dict[str, Any]:
        out = {
            "alg": self.alg,
            "model": self.model,
            "data": self.data,
            "hparams": self.hparams,
            "env": self.env,
            "runs": self.runs,
        }
        if self.immediate is not None:
            out["immediate"] = self.immediate
        out.update(self.extra)
        return out


def locality_indices(records: Sequence[EditRecord]) -> List[int]:
    """Positions of the records that have a locality pair, in the order of ``evaluation_groups``' "loc"."""
    return [i for i, r in enumerate(records) if r.locality_prompt and r.locality_answer]


def evaluation_groups(records: Sequence[EditRecord]) -> Dict[str, List[Tuple[str, str]]]:
    """The (prompt, answer) pairs behind Rel, Gen and Loc."""
    return {
        "edit": [(r.prompt, r.target) for r in records],
        "gen": [(r.rephrase, r.target) for r in records if r.rephrase],
        "loc": [(records[i].locality_prompt, records[i].locality_answer) for i in locality_indices(records)],
    }


def evaluate_records(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    records: Sequence[EditRecord],
    locality_reference: Sequence[Optional[torch.Tensor]],
    config: RunConfig,
) -> Dict[str, Optional[float]]:
    """Rel/Gen/Loc of the current model over ``records``."""
    groups = evaluation_groups(records)
    edit_pairs, rephrase, loc_pairs = groups["edit"], groups["gen"], groups["loc"]
    loc_idx = locality_indices(records)
    if config.metric == "perplexity":
        rel = metrics.mean(metrics.target_perplexity(model, tok, edit_pairs, config.batch_size))
        gen = metrics.mean(metrics.target_perplexity(model, tok, rephrase, config.batch_size)) if rephrase else None
    else:
        rel = metrics.mean(metrics.token_accuracy(model, tok, edit_pairs, config.batch_size))
        gen = metrics.mean(metrics.token_accuracy(model, tok, rephrase, config.batch_size)) if rephrase else None
    loc = (
        metrics.mean(
            metrics.locality_agreement(
                model, tok, loc_pairs, [locality_reference[i] for i in loc_idx], config.batch_size
            )
        )
        if loc_pairs
        else None
    )
    return {"rel": rel, "gen": gen, "loc": loc}


def average(scores: Dict[str, Optional[float]], metric: str) -> Optional[float]:
    # Perplexity is not on the accuracy scale, so it does not enter the average.
    names = ("loc",) if metric == "perplexity" else ("rel", "gen", "loc")
    values = [scores[n] for n in names if scores.get(n) is not None]
    return float(sum(values) / len(values)) if values else None


# A run's checkpoint folders. One is complete once its progress.json exists: that file is
# written last and atomically, and deleted first when a folder is discarded. A save writes
# "checkpoint.partial", then ``recover_checkpoint`` moves "checkpoint" aside to
# "checkpoint.old", renames the partial in and discards the old one, so a kill at any
# moment leaves the newest complete checkpoint where ``recover_checkpoint`` finds it.
CHECKPOINT_NAMES = ("checkpoint", "checkpoint.partial", "checkpoint.old")


def _complete(folder: Path) -> bool:
    return (folder / "progress.json").is_file()


def _discard(folder: Path) -> None:
    """Delete a checkpoint folder; it stops counting as complete before anything else goes."""
    if folder.exists():
        (folder / "progress.json").unlink(missing_ok=True)
        shutil.rmtree(folder)


def recover_checkpoint(directory: Path) -> None:
    """Put the newest complete checkpoint of ``directory`` under "checkpoint" (after an interrupted save)."""
    final, partial, old = (directory / name for name in CHECKPOINT_NAMES)
    if _complete(partial):
        # Only the latest save leaves a complete partial (saves discard incomplete ones
        # first), so it is newer than anything else here.
        _discard(old)
        if final.exists():
            final.rename(old)
        partial.rename(final)
        _discard(old)
    elif not _complete(final) and _complete(old):
        _discard(final)
        old.rename(final)


def read_newest_progress(directory: Path) -> Optional[Dict[str, Any]]:
    """``progress.json`` of the newest complete checkpoint in ``directory``, or None; only reads.

    The read-only twin of :func:`recover_checkpoint`, for looking at a run that may be saving
    at this moment: a complete "checkpoint.partial" is the newest, then "checkpoint", then
    "checkpoint.old"; a folder renamed away between the check and the read is passed over.
    """
    final, partial, old = (directory / name for name in CHECKPOINT_NAMES)
    for folder in (partial, final, old):
        try:
            return json.loads((folder / "progress.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            continue
    return None


def move_checkpoints(directory: Path, destination: Path) -> Path:
    """Move all of ``directory``'s checkpoint folders into a new folder ``destination`` (made unique)."""
    target, n = destination, 1
    while target.exists():
        target, n = destination.with_name(f"{destination.name}-{n}"), n + 1
    target.mkdir(parents=True)
    for name in CHECKPOINT_NAMES:
        if (directory / name).exists():
            (directory / name).rename(target / name)
    return target


class _Checkpointer:
    """Saves and restores everything a run needs to continue after an interruption."""

    def __init__(
        self,
        directory: Optional[Path],
        spec: MethodSpec,
        hparams: Any,
        records: Sequence[EditRecord],
        config: RunConfig,
    ):
        self.directory = directory
        self.spec = spec
        self.hparams = hparams
        # A checkpoint only fits the same records (locality pairs included: their saved
        # references) with the same hparams, metric and right-after-each-edit scoring.
        settings = json.dumps(hparams_dict(hparams), sort_keys=True, default=str).encode()
        digest = hashlib.sha1(json.dumps([dataclasses.astuple(r) for r in records]).encode())
        digest.update(settings)
        digest.update(json.dumps({"metric": config.metric, "immediate": config.immediate}).encode())
        self.fingerprint = digest.hexdigest()
        # Checkpoints written before 2026-11-24 fingerprinted prompts, targets and hparams only.
        legacy = hashlib.sha1(json.dumps([[r.prompt, r.target] for r in records]).encode())
        legacy.update(settings)
        self.legacy_fingerprint = legacy.hexdigest()

    def save(
        self,
        model: nn.Module,
        done: int,
        edit_seconds: float,
        result: RunResult,
        references: Sequence[Optional[torch.Tensor]],
    ) -> None:
        if self.directory is None:
            return
        recover_checkpoint(self.directory)
        tmp = self.directory / CHECKPOINT_NAMES[1]
        _discard(tmp)  # an incomplete partial left by an interrupted save
        tmp.mkdir(parents=True)
        weights = {
            name: nethook.get_parameter(model, name).detach().cpu().contiguous()
            for name in self.spec.edited_parameters(self.hparams)
        }
        save_file(weights, str(tmp / "edited_weights.safetensors"))
        self.spec.save_state(model, tmp / "state")
        refs = {str(i): r.cpu().contiguous() for i, r in enumerate(references) if r is not None}
        save_file(refs, str(tmp / "locality_reference.safetensors"))
        progress = {
            "done": done,
            "edit_seconds": edit_seconds,
            "records": self.fingerprint,
            "result": result.to_dict(),
            "immediate_raw": result.immediate_raw,
        }
        (tmp / "progress.json.tmp").write_text(json.dumps(progress, indent=1))
        os.replace(tmp / "progress.json.tmp", tmp / "progress.json")  # now complete
        recover_checkpoint(self.directory)  # swaps it in

    def exists(self) -> bool:
        if self.directory is None:
            return False
        recover_checkpoint(self.directory)
        return _complete(self.directory / CHECKPOINT_NAMES[0])

    def restore(
        self, model: nn.Module, n_records: int
    ) -> Optional[Tuple[Dict[str, Any], List[Optional[torch.Tensor]]]]:
        if not self.exists():
            return None
        ckpt = self.directory / "checkpoint"
        progress = json.loads((ckpt / "progress.json").read_text())
        if progress.get("records") not in (self.fingerprint, self.legacy_fingerprint):
            raise ValueError(
                f"checkpoint in {self.directory} belongs to another run (different records or hparams); "
                "use a new --work-dir"
            )
        weights = load_file(str(ckpt / "edited_weights.safetensors"))
        params = {name: nethook.get_parameter(model, name) for name in weights}
        for name, value in weights.items():
            if params[name].shape != value.shape:
                raise ValueError(
                    f"checkpoint in {self.directory}: {name} has shape {tuple(value.shape)}, "
                    f"the model's {tuple(params[name].shape)}; it was saved from another model"
                )
        # The state first: if it cannot be loaded, the model keeps its own weights.
        self.spec.load_state(model, ckpt / "state")
        with torch.no_grad():
            for name, value in weights.items():
                params[name].copy_(value.to(params[name].device, params[name].dtype))
        refs_raw = load_file(str(ckpt / "locality_reference.safetensors"))
        references = [refs_raw.get(str(i)) for i in range(n_records)]
        return progress, references


def run_lifelong(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    hparams: Any,
    spec: MethodSpec,
    records: Sequence[EditRecord],
    config: RunConfig,
    data_names: Sequence[str] = (),
    work_dir: Optional[Path] = None,
) -> RunResult:
    """Apply ``records`` one at a time with ``spec``'s method; evaluate at ``config.eval_at``."""
    n = len(records)
    checkpoints = sorted({t for t in config.eval_at if 0 < t <= n} | {n})
    result = RunResult(
        alg=spec.alg_name,
        model=hparams.model_name,
        data=list(data_names),
        hparams=hparams_dict(hparams),
        env=environment(next(model.parameters()).device),
    )
    problems = []
    for i, record in enumerate(records):
        try:
            spec.check_request(record.request())
        except RequestError as exc:
            problems.append(f"record {i}: {exc}")
    if problems:  # all at once, before a long run stops at the first of them
        shown = "; ".join(problems[:5]) + ("; ..." if len(problems) > 5 else "")
        raise RequestError(f"{len(problems)} of {n} records cannot be edited by {spec.alg_name}: {shown}")
    checkpointer = _Checkpointer(Path(work_dir) if work_dir else None, spec, hparams, records, config)
    references: List[Optional[torch.Tensor]] = [None] * n
    if not checkpointer.exists():
        # Locality is measured against the model as it came, before the method's prepare
        # step may change its outputs (MicroEdit routes some inputs through an unedited SAE).
        preds = metrics.answer_predictions(model, tok, evaluation_groups(records)["loc"], config.batch_size)
        for i, p in zip(locality_indices(records), preds):
            references[i] = p
    # Prepare before restoring: a method may add the modules its saved state goes into (MicroEdit's SAE).
    start = time.perf_counter()
    spec.prepare(model, tok, hparams)
    result.extra["setup_seconds"] = time.perf_counter() - start
    restored = checkpointer.restore(model, n)
    immediate_raw = result.immediate_raw
    if restored is not None:
        progress, references = restored
        done, edit_seconds = progress["done"], progress["edit_seconds"]
        result.runs = progress["result"]["runs"]
        before_key = f"{spec.report_key}_before"
        if spec.report_key and before_key in progress["result"]:
            result.extra[before_key] = progress["result"][before_key]
        immediate_raw.update(progress.get("immediate_raw") or {})
        print(f"[easyedit-nmke] resuming from checkpoint after {done} edits in {work_dir}")
    else:
        done, edit_seconds = 0, 0.0

    if config.record_distances and spec.report_key and done == 0:
        before = spec.checkpoint_report(model, tok, evaluation_groups(records), with_distances=True, hparams=hparams)
        if before:
            result.extra[f"{spec.report_key}_before"] = before
    bar = tqdm(total=n, initial=done, desc=f"{spec.alg_name} edits", disable=not config.progress)
    while done < n:
        record = records[done]
        start = time.perf_counter()
        model, _ = spec.apply(model, tok, [record.request()], hparams, copy=False, return_orig_weights=False)
        edit_seconds += time.perf_counter() - start
        done += 1
        bar.update(1)
        if config.immediate:
            score_immediately(model, tok, record, references[done - 1], config, immediate_raw)
        if done not in checkpoints and config.save_every > 0 and done % config.save_every == 0:
            checkpointer.save(model, done, edit_seconds, result, references)
        if done in checkpoints:
            scores = evaluate_records(model, tok, records[:done], references[:done], config)
            row = {
                "T": done,
                **scores,
                "avg": average(scores, config.metric),
                "sec_per_edit": edit_seconds / done,
                "peak_rss_mb": peak_rss_mb(),
                "phase_seconds": spec.phase_seconds(model),
            }
            report = spec.checkpoint_report(
                model, tok, evaluation_groups(records[:done]), with_distances=config.record_distances, hparams=hparams
            )
            if report and spec.report_key:
                row[spec.report_key] = report
            if config.immediate:
                row["immediate"] = immediate_summary(immediate_raw)
            result.runs = [r for r in result.runs if r["T"] != done] + [row]
            bar.write(format_row(row))
            checkpointer.save(model, done, edit_seconds, result, references)
    bar.close()
    if config.immediate and immediate_raw["rel"]:
        result.immediate = {"T": done, **immediate_summary(immediate_raw)}
    return result


def score_immediately(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    record: EditRecord,
    reference: Optional[torch.Tensor],
    config: RunConfig,
    raw: Dict[str, List[float]],
) -> None:
    """EasyEdit's per-edit numbers: the edit just applied, scored before the next one."""
    score = metrics.target_perplexity if config.metric == "perplexity" else metrics.token_accuracy
    raw.setdefault("rel", []).extend(score(model, tok, [(record.prompt, record.target)]))
    if record.rephrase:
        raw.setdefault("gen", []).extend(score(model, tok, [(record.rephrase, record.target)]))
    if reference is not None and record.locality_prompt and record.locality_answer:
        raw.setdefault("loc", []).extend(
            metrics.locality_agreement(model, tok, [(record.locality_prompt, record.locality_answer)], [reference])
        )


def immediate_summary(raw: Dict[str, List[float]]) -> Dict[str, Optional[float]]:
    """Means of the per-edit scores so far (Rel/Gen/Loc right after each edit)."""
    return {key: metrics.mean(raw.get(key, [])) for key in ("rel", "gen", "loc")}


def hparams_dict(hparams: Any) -> Dict[str, Any]:
    """``hparams.to_dict()``; EasyEdit's PyPI HyperParams has no to_dict, so asdict there."""
    to_dict = getattr(hparams, "to_dict", None)
    if callable(to_dict):
        return to_dict()
    import dataclasses

    return dataclasses.asdict(hparams)


def format_row(row: Dict[str, Any]) -> str:
    def f(v):
        return "  -  " if v is None else f"{v:.3f}"

    return (
        f"T={row['T']:>5}  Rel {f(row['rel'])}  Gen {f(row['gen'])}  Loc {f(row['loc'])}  "
        f"avg {f(row['avg'])}  {row['sec_per_edit']:.2f} s/edit  {row['peak_rss_mb']:.0f} MB"
    ) + (
        f"  routed edit {f(row['routing'].get('routed_edit'))} loc {f(row['routing'].get('routed_loc'))}"
        if "routing" in row
        else ""
    ) + (f"  null space used {f(row['null_space'].get('occupied_share'))}" if "null_space" in row else "")


def results_table(result: Dict[str, Any]) -> str:
    """Markdown table of a result JSON's checkpoints."""
    hp = result.get("hparams", {})
    mode = hp.get("mask_mode")
    title = result["alg"] + (f" ({mode})" if mode else "")
    routing = any("routing" in row for row in result["runs"])
    null_space = any("null_space" in row for row in result["runs"])
    header = "|     T |   Rel |   Gen |   Loc |   avg | s/edit | peak RSS MB |"
    rule = "|------:|------:|------:|------:|------:|-------:|------------:|"
    if routing:  # MicroEdit: share of edit / locality inputs the ARD switch sends through the SAE
        header += " routed edit | routed loc |"
        rule += "------------:|-----------:|"
    if null_space:  # NMKE: share of the fullest layer's null space that earlier edits' keys occupy
        header += " null space used |"
        rule += "----------------:|"
    lines = [f"{title} on {result['model']}", "", header, rule]

    def f(v):
        return "    -" if v is None else f"{v:.3f}"

    for row in result["runs"]:
        line = (
            f"| {row['T']:>5} | {f(row['rel'])} | {f(row['gen'])} | {f(row['loc'])} | {f(row['avg'])} | "
            f"{row['sec_per_edit']:>6.2f} | {row['peak_rss_mb']:>11.0f} |"
        )
        if routing:
            share = row.get("routing", {})
            line += f" {f(share.get('routed_edit')):>11} | {f(share.get('routed_loc')):>10} |"
        if null_space:
            line += f" {f(row.get('null_space', {}).get('occupied_share')):>15} |"
        lines.append(line)
    imm = result.get("immediate")
    if imm:
        lines.append("")
        lines.append(
            f"Right after each edit (EasyEdit's per-edit numbers, not lifelong): Rel {f(imm['rel'])}  Gen {f(imm['gen'])}"
            + (f"  Loc {f(imm['loc'])}" if "loc" in imm else "")
        )
    return "\n".join(lines)
