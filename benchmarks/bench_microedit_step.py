"""MicroEdit's per-edit training cost with and without the replay of the blocks above the SAE.

For the first ``--records`` ZsRE dev edits, computes each edit's new decoder rows twice
from the same SAE — ``fast_path`` on (stage-2 steps run only the blocks above the hooked
one) and off (every step runs the whole model) — alternating the order per edit so both
see the same machine load, and reports seconds per edit, the stage-2 step counts and the
largest difference between the two sets of rows.  The edits are not
applied (every edit starts from the same SAE), so the timing isolates the training.

The SAE is the YAML's own when it exists at ``sae_path``; otherwise (``--random-sae``) a
random TopK SAE of the YAML's width and k: the cost per step does not depend on what the
SAE has learnt, only the number of steps does.

    EASYEDIT_NMKE_DATA_DIR=../shared/data python benchmarks/bench_microedit_step.py \\
        --records 8 --out benchmarks/results/microedit_step_speed.json
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmark_io import command_line, emit, zsre_dev_file  # noqa: E402  (this folder, after the path set-up)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hparams", type=Path, default=REPO / "hparams/MicroEdit/smollm2-135m.yaml")
    p.add_argument("--data", type=Path, default=None, help="ZsRE JSON (default: the dev file in the data dir)")
    p.add_argument("--records", type=int, default=8)
    p.add_argument("--random-sae", action="store_true", help="use a random SAE of the YAML's size")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    import dataclasses

    from easyedit_nmke.evaluate.records import load_records
    from easyedit_nmke.methods import load_hparams
    from easyedit_nmke.models.microedit.compute_decoder_edit import compute_decoder_edit
    from easyedit_nmke.models.microedit.sae_hook import SAESwitch
    from easyedit_nmke.models.microedit.sae_io import load_sae
    from easyedit_nmke.util.model_loader import load_model_and_tokenizer
    from easyedit_nmke.util.requests import normalise_request

    hparams = load_hparams(args.hparams)
    model, tok = load_model_and_tokenizer(hparams.model_name)
    if args.random_sae:
        import sae_lens

        torch.manual_seed(0)
        sae = sae_lens.TopKSAE(
            sae_lens.TopKSAEConfig(
                d_in=model.config.hidden_size, d_sae=hparams.sae_train_d_sae, k=hparams.sae_train_k,
                dtype="float32", device="cpu",
            )
        )
        sae_origin = f"random TopK SAE, {hparams.sae_train_d_sae} latents, k {hparams.sae_train_k}"
    else:
        sae = load_sae(hparams, model)
        sae_origin = str(hparams.resolved_sae_path())
    threshold = hparams.ard_threshold if hparams.ard_threshold is not None else 1.0
    switch = SAESwitch(sae, threshold, hparams.ard_alpha, hparams.massive_norm_factor)
    switch.install(model, hparams.layer_module_tmp.format(hparams.layer))
    variants = {
        "replay": dataclasses.replace(hparams, fast_path=True),
        "full": dataclasses.replace(hparams, fast_path=False),
    }
    records = load_records([zsre_dev_file(args.data)], limit=args.records)
    per_edit = []
    for i, record in enumerate(records):
        request = normalise_request(record.request())
        order = ["replay", "full"] if i % 2 == 0 else ["full", "replay"]
        row = {"prompt": request.prompt}
        rows = {}
        for name in order:
            start = time.perf_counter()
            edit = compute_decoder_edit(model, tok, request, variants[name], switch)
            row[name] = {
                "seconds": time.perf_counter() - start,
                "steps": [edit.stage1_steps, edit.stage2_steps],
                "target_prob": edit.target_prob,
            }
            rows[name] = edit.rows
        row["max_row_difference"] = float((rows["replay"] - rows["full"]).abs().max())
        per_edit.append(row)
        print(f"edit {i}: replay {row['replay']['seconds']:.2f} s {row['replay']['steps']}, "
              f"full {row['full']['seconds']:.2f} s {row['full']['steps']}", file=sys.stderr)

    summary = {
        name: {
            "sec_per_edit": sum(r[name]["seconds"] for r in per_edit) / len(per_edit),
            "stage2_steps_mean": sum(r[name]["steps"][1] for r in per_edit) / len(per_edit),
        }
        for name in variants
    }
    summary["full_over_replay"] = summary["full"]["sec_per_edit"] / summary["replay"]["sec_per_edit"]
    summary["max_row_difference"] = max(r["max_row_difference"] for r in per_edit)
    result = {
        "command": command_line(),
        "sae": sae_origin,
        "layer": hparams.layer,
        "threads": args.threads,
        "summary": summary,
        "edits": per_edit,
    }
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
