"""Where MicroEdit's lifelong reliability goes: routing versus what the edited SAE holds.

Loads the default model with its MicroEdit SAE, then a runner checkpoint (``--work-dir``
of an ``easyedit-nmke edit`` run), and scores the first ``--records`` records three ways
(without ``--work-dir`` only the unedited SAE is scored: where a new SAE puts the
questions relative to its calibrated τ, before any edit run):

* ARD of the edit, rephrase and locality inputs (prompt + teacher-forced answer, as the
  metrics feed them) with the unedited and with the edited SAE, and the share of each
  group under several multiples of τ;
* Rel/Gen with the edited SAE always applied (``mode always``): what the decoder holds
  regardless of routing;
* Loc with the SAE always applied, unedited and edited: what routing a locality
  question through the SAE would cost.

    EASYEDIT_NMKE_DATA_DIR=../shared/data python benchmarks/microedit_routing_diagnostics.py \\
        --work-dir runs/microedit-zsre100 --records 50 --out benchmarks/results/microedit_routing_T50.json
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmark_io import command_line, emit, zsre_dev_file  # noqa: E402  (this folder, after the path set-up)

TAU_MULTIPLES = (1.0, 1.1, 1.2, 1.3, 1.5)


def quantiles(values, qs=(0.1, 0.5, 0.9)):
    t = torch.tensor(values, dtype=torch.float64)
    return {f"q{int(q * 100)}": float(torch.quantile(t, q)) for q in qs}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hparams", type=Path, default=REPO / "hparams/MicroEdit/smollm2-135m.yaml")
    p.add_argument("--data", type=Path, default=None, help="ZsRE JSON (default: the dev file in the data dir)")
    p.add_argument("--work-dir", type=Path, default=None, help="work dir of the run whose checkpoint to load")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override an hparam (as in easyedit-nmke edit --set)")
    p.add_argument("--num-edits", type=int, default=100, help="--num-edits of that run (its checkpoint fingerprint)")
    p.add_argument("--records", type=int, default=50, help="score the first N records (<= edits done)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from easyedit_nmke.evaluate import metrics
    from easyedit_nmke.evaluate.records import load_records
    from easyedit_nmke.cli import parse_overrides
    from easyedit_nmke.evaluate.runner import _Checkpointer, evaluation_groups
    from easyedit_nmke.methods import METHODS, load_hparams
    from easyedit_nmke.models.microedit.state import get_state
    from easyedit_nmke.util.model_loader import load_model_and_tokenizer

    data = zsre_dev_file(args.data)
    spec = METHODS["MicroEdit"]
    hparams = load_hparams(args.hparams, parse_overrides(args.overrides))
    if hparams.alg_name != "MicroEdit":
        raise SystemExit(f"{args.hparams} is an {hparams.alg_name} YAML; this script needs a MicroEdit one")
    model, tok = load_model_and_tokenizer(hparams.model_name)
    all_records = load_records([data], limit=args.num_edits)
    records = all_records[: args.records]
    spec.prepare(model, tok, hparams)
    state = get_state(model)
    groups = evaluation_groups(records)
    edit_pairs, gen_pairs, loc_pairs = groups["edit"], groups["gen"], groups["loc"]

    with state.switch.mode_set("off"):
        loc_reference = metrics.answer_predictions(model, tok, loc_pairs, 16)
    before = spec.checkpoint_report(model, tok, groups, with_distances=True)
    with state.switch.mode_set("always"):
        loc_always_unedited = metrics.mean(metrics.locality_agreement(model, tok, loc_pairs, loc_reference))

    # (name, report, τ it was routed with): a restored checkpoint brings its own τ.
    reports = [("unedited", before, state.threshold)]
    result = {"command": command_line(), "data": str(data), "records_scored": len(records), "tau": state.threshold}
    if args.work_dir is not None:
        restored = _Checkpointer(args.work_dir, spec, hparams, all_records).restore(model, len(all_records))
        if restored is None:
            raise SystemExit(f"no checkpoint in {args.work_dir}")
        done = restored[0]["done"]
        if done < args.records:
            raise SystemExit(f"the checkpoint holds {done} edits, fewer than --records {args.records}")
        after = spec.checkpoint_report(model, tok, groups, with_distances=True)
        reports.append(("edited", after, state.threshold))
        result["checkpoint_edits"] = done
        result["tau"] = state.threshold
        result["tau_unedited"] = reports[0][2]
    with state.switch.mode_set("always"):
        always = {"loc_unedited_sae": loc_always_unedited}
        if args.work_dir is not None:
            always.update(
                rel=metrics.mean(metrics.token_accuracy(model, tok, edit_pairs)),
                gen=metrics.mean(metrics.token_accuracy(model, tok, gen_pairs)),
                loc_edited_sae=metrics.mean(metrics.locality_agreement(model, tok, loc_pairs, loc_reference)),
            )
    result["ard"] = {which: {name: quantiles(report["ard"][name]) for name in ("edit", "gen", "loc")}
                     for which, report, _ in reports}
    result["routed_share"] = {
        which: {
            f"{m:g}tau": {
                name: sum(v <= m * tau for v in report["ard"][name]) / len(report["ard"][name])
                for name in ("edit", "gen", "loc")
            }
            for m in TAU_MULTIPLES
        }
        for which, report, tau in reports
    }
    result["sae_always_on"] = always
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
