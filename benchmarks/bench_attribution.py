"""Benchmark NMKE's neuron attribution: per-neuron loop vs materialised logits vs fused streaming.

Usage (from the repository root)::

    python benchmarks/bench_attribution.py --threads 1    # both shapes (~8 min), writes benchmarks/results/attribution.json
    python benchmarks/bench_attribution.py --only smollm2 # SmolLM2 shapes only (~1.5 min), torch's default threads

``--threads 1`` gives reproducible figures on a shared 2-core machine: with two
OpenMP threads per process and another busy process, every parallel op waits for
a descheduled thread and timings swing by 10-80x.

Shapes: SmolLM2-135M (d=576, d_ff=1536, vocab=49152) and Llama-3-8B
(d=4096, d_ff=14336, vocab=128256), random fp32 inputs on CPU.

Every measurement runs in its own worker process so that one method's freed
memory cannot hide another's peak.  Memory method: the worker sets
``MALLOC_MMAP_THRESHOLD_=65536`` (every allocation ≥ 64 KiB is its own mmap, so
freed buffers leave the resident set at once instead of lingering in the malloc
heap), records the RSS after building the inputs and a warm-up call, then samples
RSS every millisecond from a thread while the timed call(s) run.  ``*_peak_mb`` is
the largest sample minus that baseline: extra memory over the inputs (and, for
``fused_readout``, over the cached readout).  Times are the best of ``repeats``
wall-clock runs (the machine is shared, so the minimum is the least noisy).

What cannot run in a reasonable time on a 2-core CPU is measured on a subset and
extrapolated linearly, and flagged in the row:

* ``loop_s``: the per-neuron loop is timed on ``loop_extrapolated_from`` neurons
  (all prompts) and scaled to d_ff (its cost is exactly linear in the neuron count);
* Llama-3-8B ``materialised_s``: timed on a neuron subset of one prompt
  (``materialised_extrapolated_from``) and scaled to d_ff × n_prompts;
  ``materialised_peak_mb`` is then computed (``materialised_peak_mb_computed``):
  the [d_ff, vocab] fp32 logits plus the same-sized temporary of ``logsumexp``,
  2·d_ff·vocab·4 bytes — validated against the measured subset peak
  (``materialised_subset_peak_mb`` vs ``materialised_subset_peak_mb_predicted``).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "attribution.json"
MB = float(1 << 20)

SHAPES: List[Dict[str, Any]] = [
    dict(
        model="SmolLM2-135M",
        key="smollm2",
        d_model=576,
        d_ff=1536,
        vocab=49152,
        n_prompts=6,
        loop_neurons=64,
        materialised_neurons=None,  # runs in full
        repeats=3,
        fused_readout=True,
    ),
    dict(
        model="Llama-3-8B",
        key="llama3-8b",
        d_model=4096,
        d_ff=14336,
        vocab=128256,
        n_prompts=6,  # the fused call is measured in full; loop and materialised are extrapolated
        loop_neurons=4,
        materialised_neurons=512,
        repeats=1,
        fused_readout=False,  # the 7.3 GB fp32 readout would cost one more 15-TFLOP matmul
    ),
]


# --------------------------------------------------------------------------- worker side


def _make_inputs(shape: Dict[str, Any], seed: int = 0):
    import torch

    from easyedit_nmke.models.nmke.attribution import ReadoutNorm

    gen = torch.Generator().manual_seed(seed)
    d, n, vocab, P = shape["d_model"], shape["d_ff"], shape["vocab"], shape["n_prompts"]
    # Magnitudes roughly like a trained model's: O(1) residual, O(0.1-1) activations.
    hidden = torch.randn(P, d, generator=gen) * 2.0
    acts = torch.randn(P, n, generator=gen) * 0.3
    down = torch.randn(d, n, generator=gen) * (1.0 / d**0.5)
    unembed = torch.randn(vocab, d, generator=gen) * (2.0 / d**0.5)
    norm = ReadoutNorm("rms", torch.rand(d, generator=gen) + 0.5, eps=1e-5)
    tokens = torch.randint(0, vocab, (P,), generator=gen)
    return hidden, acts, down, unembed, norm, tokens


class _RssSampler:
    """Max RSS of this process, sampled every millisecond from a thread."""

    def __init__(self) -> None:
        import psutil

        self._proc = psutil.Process()
        self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(0.001)

    def __enter__(self) -> "_RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def _measure(fn: Callable[[], Any], repeats: int) -> Tuple[float, float]:
    """(best wall time s, peak extra RSS MB) of ``fn``."""
    import psutil

    gc.collect()
    base = psutil.Process().memory_info().rss
    times = []
    with _RssSampler() as sampler:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return min(times), max(0.0, (sampler.peak - base) / MB)


def _worker(spec: Dict[str, Any]) -> Dict[str, Any]:
    import torch

    from easyedit_nmke.models.nmke import attribution as attr

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    shape = spec["shape"]
    hidden, acts, down, unembed, norm, tokens = _make_inputs(shape)
    method = spec["method"]
    repeats = int(spec.get("repeats", 1))
    out: Dict[str, Any] = {"threads": torch.get_num_threads()}

    # Warm-up on a small slice of the same inputs (thread pools, MKL, first-touch of
    # the input pages) so that the measured call sees a steady state.
    small = dict(hidden=hidden[:1], activations=acts[:1, :8], down_weight=down[:, :8].contiguous())
    attr.neuron_attribution_scores(
        small["hidden"], small["activations"], small["down_weight"], unembed, norm, tokens[:1], backend="torch"
    )

    if method == "loop":
        neurons = torch.arange(int(spec["neurons"]))
        t, peak = _measure(
            lambda: attr._scores_loop(hidden, acts, down, unembed, norm, tokens, 30.0, None, neurons=neurons), 1
        )
        out.update(time_s=t, peak_mb=peak)
    elif method == "materialised":
        sub = spec.get("neurons")
        if sub:
            # One prompt, a neuron subset: [sub, vocab] logits instead of [d_ff, vocab].
            h1, a1, v1, t1 = hidden[:1], acts[:1, :sub].contiguous(), down[:, :sub].contiguous(), tokens[:1]
        else:
            h1, a1, v1, t1 = hidden, acts, down, tokens
        t, peak = _measure(lambda: attr._scores_materialised(h1, a1, v1, unembed, norm, t1, 30.0, None), repeats)
        out.update(time_s=t, peak_mb=peak)
    elif method == "fused":
        res = {}

        def call() -> None:
            res["scores"] = attr.neuron_attribution_scores(hidden, acts, down, unembed, norm, tokens, backend="torch")

        t, peak = _measure(call, repeats)
        out.update(time_s=t, peak_mb=peak)
        # Sanity of the figures: the fused scores agree with the loop on a few neurons.
        idx = torch.arange(int(spec["check_neurons"]))
        ref = attr._scores_loop(hidden, acts, down, unembed, norm, tokens, 30.0, None, neurons=idx)[:, idx]
        out["max_abs_err"] = float((res["scores"][:, idx] - ref).abs().max())
    elif method == "fused_readout":
        t0 = time.perf_counter()
        readout = attr.readout_product(unembed, down, norm)
        out["readout_s"] = time.perf_counter() - t0
        t, peak = _measure(
            lambda: attr.neuron_attribution_scores(
                hidden, acts, down, unembed, norm, tokens, backend="torch", readout=readout
            ),
            repeats,
        )
        out.update(time_s=t, peak_mb=peak)
    else:
        raise ValueError(method)
    return out


# --------------------------------------------------------------------------- driver side


def _run_worker(spec: Dict[str, Any], timeout: float) -> Dict[str, Any]:
    env = dict(os.environ)
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"worker {spec['method']} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


def _bench_shape(shape: Dict[str, Any], threads: Optional[int], log: Callable[[str], None]) -> Dict[str, Any]:
    d, n, vocab, P = shape["d_model"], shape["d_ff"], shape["vocab"], shape["n_prompts"]
    common = {"shape": shape, "threads": threads}
    row: Dict[str, Any] = {
        "model": shape["model"],
        "d_model": d,
        "d_ff": n,
        "vocab": vocab,
        "n_prompts": P,
        "load_avg_1min_start": round(os.getloadavg()[0], 2),
    }

    log(f"[{shape['model']}] fused (torch streaming, readout computed inside the call) ...")
    fused = _run_worker(
        {**common, "method": "fused", "repeats": shape["repeats"], "check_neurons": min(4, n)}, timeout=1200
    )
    row["fused_s"] = round(fused["time_s"], 4)
    row["fused_peak_mb"] = round(fused["peak_mb"], 1)
    row["threads"] = fused["threads"]
    row["fused_vs_loop_max_abs_err"] = fused["max_abs_err"]

    if shape["fused_readout"]:
        log(f"[{shape['model']}] fused with a cached readout ...")
        fr = _run_worker({**common, "method": "fused_readout", "repeats": shape["repeats"]}, timeout=600)
        row["fused_readout_s"] = round(fr["time_s"], 4)
        row["fused_readout_peak_mb"] = round(fr["peak_mb"], 1)
        row["readout_product_s"] = round(fr["readout_s"], 4)

    sub = shape["materialised_neurons"]
    log(f"[{shape['model']}] materialised ({'full' if not sub else f'{sub} neurons x 1 prompt'}) ...")
    mat = _run_worker({**common, "method": "materialised", "neurons": sub, "repeats": shape["repeats"]}, timeout=900)
    if sub:
        row["materialised_s"] = round(mat["time_s"] * (n / sub) * P, 3)
        row["materialised_extrapolated_from"] = f"{sub} of {n} neurons x 1 of {P} prompts ({mat['time_s']:.3f} s)"
        full_bytes = 2 * n * vocab * 4  # logits + logsumexp temporary, fp32
        row["materialised_peak_mb"] = round(full_bytes / MB, 1)
        row["materialised_peak_mb_computed"] = True
        row["materialised_subset_peak_mb"] = round(mat["peak_mb"], 1)
        row["materialised_subset_peak_mb_predicted"] = round(2 * sub * vocab * 4 / MB, 1)
    else:
        row["materialised_s"] = round(mat["time_s"], 4)
        row["materialised_peak_mb"] = round(mat["peak_mb"], 1)
        row["materialised_peak_mb_computed"] = False
        row["materialised_peak_mb_predicted"] = round(2 * n * vocab * 4 / MB, 1)

    k = shape["loop_neurons"]
    log(f"[{shape['model']}] per-neuron loop on {k} neurons x {P} prompts ...")
    loop = _run_worker({**common, "method": "loop", "neurons": k}, timeout=900)
    row["loop_s"] = round(loop["time_s"] * n / k, 2)
    row["loop_extrapolated_from"] = f"{k} of {n} neurons x {P} prompts ({loop['time_s']:.3f} s)"

    row["fused_peak_pct_of_materialised"] = round(100.0 * row["fused_peak_mb"] / row["materialised_peak_mb"], 3)
    row["speedup_vs_materialised"] = round(row["materialised_s"] / row["fused_s"], 2)
    row["speedup_vs_loop"] = round(row["loop_s"] / row["fused_s"], 1)
    row["load_avg_1min_end"] = round(os.getloadavg()[0], 2)
    return row


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=[s["key"] for s in SHAPES], action="append")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: torch's)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print("RESULT " + json.dumps(_worker(json.loads(args.worker))), flush=True)
        return 0

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    rows = []
    t0 = time.perf_counter()
    for shape in SHAPES:
        if args.only and shape["key"] not in args.only:
            continue
        row = _bench_shape(shape, args.threads, log)
        rows.append(row)
        print(json.dumps(row, indent=1), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1) + "\n")
    log(f"wrote {args.out} in {time.perf_counter() - t0:.0f} s")
    for r in rows:
        log(
            f"{r['model']:>13}: loop {r['loop_s']:.1f} s | materialised {r['materialised_s']:.2f} s, "
            f"{r['materialised_peak_mb']:.0f} MB | fused {r['fused_s']:.3f} s, {r['fused_peak_mb']:.1f} MB "
            f"({r['fused_peak_pct_of_materialised']:.2f}% of materialised; "
            f"{r['speedup_vs_materialised']}x vs materialised, {r['speedup_vs_loop']}x vs loop)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
