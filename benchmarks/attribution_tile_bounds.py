"""Could the attribution's log-sum-exp skip vocabulary tiles?  A measurement, not a kernel.

The exponentials of the amplified logits z[k, i] = (a[k] + c_i W[k, i]) / rms_i (token k,
neuron i) are the attribution's cost.  Tokens more than ``--cut`` nats below a neuron's
largest logit add at most vocab·e^-cut to its sum, so a tile of (tokens, neurons) could
be skipped when a cheap upper bound of its logits,
``(max_k a[k] + c_i · max/min_k W[k, i]) / rms_i``, stays below that.  This script
reports (a) the share of (token, neuron) pairs that matter at all and (b) the share of
tiles the bound would let a kernel skip, for every prompt of an edit at once (the kernel
processes the prompts together), with the vocabulary in a fixed order (mean logit over
20 other ZsRE questions, so low-probability tokens share tiles).

    EASYEDIT_NMKE_DATA_DIR=../shared/data python benchmarks/attribution_tile_bounds.py \\
        --out benchmarks/results/attribution_tile_bounds.json
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Dict

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmark_io import command_line, emit, zsre_dev_file  # noqa: E402  (this folder, after the path set-up)


def main(argv=None) -> Dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=None, help="ZsRE JSON (default: the dev file in the data dir)")
    p.add_argument("--records", type=int, default=3)
    p.add_argument("--layers", default="4,6,8")
    p.add_argument("--cut", type=float, default=25.0, help="nats below the largest logit that may be dropped")
    p.add_argument("--scale", type=float, default=30.0, help="attribution amplification lambda")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from easyedit_nmke.util.model_loader import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer("smollm2-135m-instruct")
    records = json.loads(zsre_dev_file(args.data).read_text())
    unembed = model.model.embed_tokens.weight.detach().float()
    gain = model.model.norm.weight.detach().float()
    eps = model.model.norm.variance_epsilon
    prefixes = ["", "Therefore. ", "I think that "]

    def attribution_inputs(layer: int, text: str):
        block = model.model.layers[layer]
        captured = {}
        hooks = [
            block.post_attention_layernorm.register_forward_hook(
                lambda m, i, o: captured.__setitem__("h", i[0][0, -1].detach())
            ),
            block.mlp.down_proj.register_forward_hook(lambda m, i, o: captured.__setitem__("m", i[0][0, -1].detach())),
        ]
        with torch.no_grad():
            model(tok(text, return_tensors="pt").input_ids)
        for hook in hooks:
            hook.remove()
        return captured["h"].float(), captured["m"].float()

    with torch.no_grad():
        mean_logits = sum(model(tok(r["src"], return_tensors="pt").input_ids).logits[0, -1].float() for r in records[100:120])
    order = mean_logits.argsort(descending=True)
    result: Dict = {"cut_nats": args.cut, "records": args.records, "layers": {}}
    for layer in [int(x) for x in args.layers.split(",")]:
        down = model.model.layers[layer].mlp.down_proj.weight.detach().float()
        readout = ((unembed * gain) @ down)[order]  # [vocab, d_ff]
        vocab = readout.shape[0]
        per_layer: Dict = {"pairs_within_cut": [], "skippable_tiles": {}}
        for rows, cols in ((256, 1536), (256, 128), (64, 128), (64, 32)):
            blocks = math.ceil(vocab / rows)
            pad = blocks * rows - vocab
            padded = torch.cat([readout, readout[-1:].expand(pad, -1)]) if pad else readout
            w_max = padded.view(blocks, rows, -1).amax(1)
            w_min = padded.view(blocks, rows, -1).amin(1)
            shares = []
            for record in records[: args.records]:
                skippable = None
                for prefix in prefixes:
                    h, m = attribution_inputs(layer, prefix + record["src"])
                    c = args.scale * m
                    a = (unembed @ (gain * h))[order]
                    inv_rms = ((h @ h + 2 * c * (h @ down) + c * c * (down * down).sum(0)) / h.shape[0] + eps).rsqrt()
                    logits = (a[:, None] + c[None] * readout) * inv_rms
                    top = logits.amax(0)
                    if (rows, cols) == (256, 1536):
                        per_layer["pairs_within_cut"].append(float((logits > top - args.cut).float().mean()))
                    a_padded = torch.cat([a, a[-1:].expand(pad)]) if pad else a
                    bound = inv_rms * (a_padded.view(blocks, rows).amax(1)[:, None] + torch.where(c > 0, c * w_max, c * w_min))
                    below = bound < top - args.cut
                    skippable = below if skippable is None else skippable & below
                shares.append(float(skippable.view(blocks, -1, cols).all(2).float().mean()))
            per_layer["skippable_tiles"][f"{rows}x{cols}"] = shares
        result["layers"][str(layer)] = per_layer
    result["command"] = command_line()
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
