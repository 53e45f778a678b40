"""How much an edit can touch that it should not: two measurements behind README figures.

``nullspace``: for NMKE's edit layers, the share of key energy that lies in the
null-space basis the update is confined to (eigen-directions of the corpus second
moment below ``nullspace_threshold``).  An update in that basis leaves a key k unchanged
only as far as ‖Bᵀk‖² / ‖k‖² is small, so this is the exposure of
(a) the corpus keys themselves, trace(BᵀΣB) / trace(Σ), and
(b) the keys of the ZsRE locality questions (every position of prompt + answer, as the
Loc metric feeds them).

``sae-rows``: for MicroEdit, the decoder rows each edit trains (the latents active on
its prompt + target) and how much two edits' row sets overlap — rows shared by edits
are retrained by the later one.

``capacity``: from saved lifelong NMKE states (a run's ``--work-dir``/checkpoint/state),
how much of each layer's null space the accumulated edit keys already occupy: the
eigenvalues of BᵀCB (C = Σ K Kᵀ of all edits so far) above ``L2`` (of ``--hparams``:
the state does not record the run's) are directions the solve must leave (nearly)
alone for earlier edits' sake.

``masked-dims``: the real thing for the first ``--records`` ZsRE edits on the unedited
model: each edit's hybrid mask per layer and the null-space size of its kept neurons
(eigen-directions of Σ_SS below ``nullspace_threshold``), the space a masked update lives in.

    EASYEDIT_NMKE_DATA_DIR=../shared/data python benchmarks/edit_footprint.py nullspace \\
        --records 100 --out benchmarks/results/nullspace_energy.json
    EASYEDIT_NMKE_DATA_DIR=../shared/data python benchmarks/edit_footprint.py sae-rows \\
        --records 100 --out benchmarks/results/microedit_row_overlap.json
    python benchmarks/edit_footprint.py capacity --state runs/bench/work/zsre-T1000__NMKE/checkpoint/state \\
        --state runs/bench/work/zsre-T1000__NMKE-none/checkpoint/state --out benchmarks/results/nullspace_capacity.json
    EASYEDIT_NMKE_DATA_DIR=../shared/data python benchmarks/edit_footprint.py masked-dims \\
        --records 50 --out benchmarks/results/masked_null_space_dims.json
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path
from typing import Dict, List, Union

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmark_io import command_line, emit, zsre_dev_file  # noqa: E402  (this folder, after the path set-up)


def _records(args) -> list:
    from easyedit_nmke.evaluate.records import load_records

    data = zsre_dev_file(args.data)
    return load_records([data], limit=args.records)


def nullspace_energy(args) -> Dict:
    from easyedit_nmke.methods import load_hparams
    from easyedit_nmke.models.nmke.nullspace import key_second_moments, null_space_basis
    from easyedit_nmke.util import nethook
    from easyedit_nmke.util.model_loader import load_model_and_tokenizer
    from easyedit_nmke.util.requests import continuation, encode, encode_target

    hparams = load_hparams(args.hparams, args.overrides)
    model, tok = load_model_and_tokenizer(hparams.model_name)
    layers = list(hparams.layers)
    moments = key_second_moments(model, tok, hparams, layers)
    bases = {layer: null_space_basis(moments[layer], hparams.nullspace_threshold) for layer in layers}
    names = {layer: hparams.rewrite_module_tmp.format(layer) for layer in layers}
    question_total = {layer: 0.0 for layer in layers}
    question_kept = {layer: 0.0 for layer in layers}
    records = [r for r in _records(args) if r.locality_prompt and r.locality_answer]
    for record in records:
        ids = encode(tok, record.locality_prompt) + encode_target(tok, continuation(record.locality_answer))
        input_ids = torch.tensor([ids])
        with torch.no_grad(), nethook.capture(model, list(names.values()), inputs=True) as captured:
            model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
        for layer, name in names.items():
            keys = captured[name][0].float()  # [seq, d_ff]
            question_total[layer] += float((keys**2).sum())
            question_kept[layer] += float(((keys @ bases[layer]) ** 2).sum())
    per_layer = {}
    for layer in layers:
        basis, mom2 = bases[layer], moments[layer].float()
        per_layer[str(layer)] = {
            "null_space_dims": basis.shape[1],
            "key_dims": basis.shape[0],
            "corpus_energy_in_null_space": float((basis.T @ mom2 @ basis).trace() / mom2.trace()),
            "locality_question_energy_in_null_space": question_kept[layer] / question_total[layer],
        }
    return {
        "hparams": str(args.hparams),
        "nullspace_threshold": hparams.nullspace_threshold,
        "mom2_dataset": hparams.mom2_dataset,
        "overrides": args.overrides,
        "locality_questions": len(records),
        "layers": per_layer,
    }


def sae_row_overlap(args) -> Dict:
    from easyedit_nmke.methods import METHODS, load_hparams
    from easyedit_nmke.models.microedit.compute_decoder_edit import edit_input
    from easyedit_nmke.models.microedit.state import get_state
    from easyedit_nmke.util.model_loader import load_model_and_tokenizer
    from easyedit_nmke.util.requests import normalise_request

    spec = METHODS["MicroEdit"]
    hparams = load_hparams(args.hparams, args.overrides)
    model, tok = load_model_and_tokenizer(hparams.model_name)
    spec.prepare(model, tok, hparams)
    switch = get_state(model).switch
    rows: List[set] = []
    for record in _records(args):
        request = normalise_request(record.request())
        rows.append(set(edit_input(model, tok, request, hparams, switch).latents.tolist()))
    pairs = list(itertools.combinations(range(len(rows)), 2))
    shared = [len(rows[i] & rows[j]) for i, j in pairs]
    sizes = torch.tensor([len(r) for r in rows], dtype=torch.float64)
    return {
        "hparams": str(args.hparams),
        "d_sae": int(switch.sae.W_dec.shape[0]),
        "edits": len(rows),
        "rows_per_edit": {"mean": float(sizes.mean()), "min": int(sizes.min()), "max": int(sizes.max())},
        # share of an edit's rows that another given edit also trains, averaged over ordered pairs
        "mean_pairwise_shared_share": sum(s / len(rows[i]) + s / len(rows[j]) for s, (i, j) in zip(shared, pairs))
        / (2 * len(pairs)),
        "mean_pairwise_jaccard": sum(s / len(rows[i] | rows[j]) for s, (i, j) in zip(shared, pairs)) / len(pairs),
        # rows trained by at least one other edit of the sequence
        "share_of_rows_also_trained_by_another_edit": float(
            sum(len(r & set().union(*(rows[:k] + rows[k + 1 :]))) for k, r in enumerate(rows)) / sizes.sum()
        ),
        "distinct_rows_trained": len(set().union(*rows)),
    }


def nullspace_capacity(args) -> Dict:
    from easyedit_nmke.methods import load_hparams
    from easyedit_nmke.models.nmke.nullspace import cache_in_basis, occupied_directions
    from easyedit_nmke.models.nmke.state import NMKEState

    hparams = load_hparams(args.hparams, args.overrides)
    states = {}
    for directory in args.state:
        state = NMKEState.load(directory)
        if state.num_edits == 0:
            raise SystemExit(f"{directory}: the state holds no edits")
        layers = {}
        for layer in state.layers:
            basis, cache = state.null_bases[layer], state.key_cache[layer]
            basis_cache = cache_in_basis(basis, cache)
            entry = {
                "null_space_dims": basis.shape[1],
                "edit_key_energy_in_null_space": float(torch.trace(basis_cache) / torch.trace(cache)),
                "occupied_dims": {
                    f">{f:g}xL2": occupied_directions(basis_cache, f * hparams.L2) for f in (1, 10, 100)
                },
            }
            if state.kept_neurons.get(layer):
                entry["mean_kept_neurons"] = state.kept_neurons[layer] / state.num_edits
            layers[str(layer)] = entry
        states[str(directory)] = {"edits": state.num_edits, "layers": layers}
    return {"hparams": str(args.hparams), "L2": hparams.L2, "states": states}


def masked_null_space_dims(args) -> Dict:
    from easyedit_nmke.methods import load_hparams
    from easyedit_nmke.models.nmke.nmke_main import compute_neuron_masks, masked_null_space, prepare_state
    from easyedit_nmke.util.model_loader import load_model_and_tokenizer
    from easyedit_nmke.util.requests import normalise_requests

    hparams = load_hparams(args.hparams, args.overrides)
    if hparams.mask_mode == "none":
        raise SystemExit("masked-dims needs a masked mode (mask_mode is none)")
    model, tok = load_model_and_tokenizer(hparams.model_name)
    state = prepare_state(model, tok, hparams)
    per_layer: Dict[int, Dict[str, List[int]]] = {layer: {"kept": [], "dims": []} for layer in hparams.layers}
    for record in _records(args):
        masks = compute_neuron_masks(model, tok, normalise_requests([record.request()]), hparams, state)
        for layer, mask in masks.items():
            index, basis, _ = masked_null_space(state, layer, mask.keep, hparams)
            per_layer[layer]["kept"].append(int(index.numel()))
            per_layer[layer]["dims"].append(int(basis.shape[1]))

    def summary(values: List[int]) -> Dict[str, Union[int, float]]:
        t = torch.tensor(values, dtype=torch.float64)
        return {"mean": float(t.mean()), "min": int(t.min()), "max": int(t.max())}

    return {
        "hparams": str(args.hparams),
        "overrides": args.overrides,
        "edits": len(per_layer[hparams.layers[0]]["kept"]),
        "layers": {
            str(layer): {
                "null_space_dims_all_neurons": int(state.null_bases[layer].shape[1]),
                "kept_neurons": summary(counts["kept"]),
                "masked_null_space_dims": summary(counts["dims"]),
            }
            for layer, counts in per_layer.items()
        },
    }


def main(argv=None) -> Dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=["nullspace", "sae-rows", "capacity", "masked-dims"])
    p.add_argument("--state", action="append", default=[], help="capacity: a saved NMKE state directory (repeatable)")
    p.add_argument("--hparams", type=Path, default=None, help="default: the method's SmolLM2 YAML")
    p.add_argument("--data", type=Path, default=None, help="ZsRE JSON (default: the dev file in the data dir)")
    p.add_argument("--records", type=int, default=100)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override an hparam")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from easyedit_nmke.cli import parse_overrides

    args.overrides = parse_overrides(args.overrides)
    if args.hparams is None:
        method = "MicroEdit" if args.what == "sae-rows" else "NMKE"
        args.hparams = REPO / f"hparams/{method}/smollm2-135m.yaml"
    if args.what == "capacity" and not args.state:
        p.error("capacity needs at least one --state directory")
    run = {
        "nullspace": nullspace_energy,
        "sae-rows": sae_row_overlap,
        "capacity": nullspace_capacity,
        "masked-dims": masked_null_space_dims,
    }[args.what]
    result = run(args)
    result["command"] = command_line()
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
