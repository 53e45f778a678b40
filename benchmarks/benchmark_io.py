"""What the diagnostic scripts in this folder share: common arguments, the command they record and how they write results."""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, Optional


def zsre_dev_file(data: Optional[Path]) -> Path:
    """``data``, or the ZsRE dev file in ``$EASYEDIT_NMKE_DATA_DIR``."""
    if data is not None:
        return data
    if not os.environ.get("EASYEDIT_NMKE_DATA_DIR"):
        raise SystemExit("set EASYEDIT_NMKE_DATA_DIR (ZsRE dev file and corpora) or pass --data")
    return Path(os.environ["EASYEDIT_NMKE_DATA_DIR"]) / "zsre_mend_eval_portability_gpt4.dev.json"


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model``, ``--threads`` and ``--out``: what the scripts that load one model share."""
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)


def command_line() -> str:
    """This process's command, with the data folder it read (results must say how they were made)."""
    data_dir = shlex.quote(os.environ.get("EASYEDIT_NMKE_DATA_DIR", ""))
    return f"EASYEDIT_NMKE_DATA_DIR={data_dir} python " + " ".join(shlex.quote(a) for a in sys.argv)


def emit(result: Dict[str, Any], out: Optional[Path]) -> None:
    """Print ``result`` as JSON and, with ``out``, write it there too."""
    text = json.dumps(result, indent=1)
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")


def smollm2_attribution_problem(seed: int = 0) -> SimpleNamespace:
    """Random attribution inputs at SmolLM2's shapes (3 prompts, d 576, d_ff 1,536, vocabulary
    49,152) with a cached readout, and ``scores()``: one shipped attribution call on them."""
    import torch

    from easyedit_nmke.models.nmke.attribution import ReadoutNorm, neuron_attribution_scores, readout_product

    prompts, d_model, d_ff, vocab = 3, 576, 1536, 49152
    gen = torch.Generator().manual_seed(seed)
    p = SimpleNamespace(prompts=prompts, d_model=d_model, d_ff=d_ff, vocab=vocab)
    p.unembed = torch.randn(vocab, d_model, generator=gen) * 0.05
    p.down = torch.randn(d_model, d_ff, generator=gen) * 0.05
    p.norm = ReadoutNorm("rms", torch.ones(d_model))
    p.hidden = torch.randn(prompts, d_model, generator=gen)
    p.acts = torch.randn(prompts, d_ff, generator=gen).abs() * 0.3
    p.tokens = torch.randint(0, vocab, (prompts,), generator=gen)
    p.readout = readout_product(p.unembed, p.down, p.norm)
    p.generator = gen  # for further inputs drawn after these
    p.scores = lambda: neuron_attribution_scores(
        p.hidden, p.acts, p.down, p.unembed, p.norm, p.tokens, readout=p.readout, backend="torch"
    )
    return p


def timed(fn: Any) -> float:
    """Wall-clock seconds of one call of ``fn()``."""
    import time

    start = time.perf_counter()
    fn()
    return time.perf_counter() - start
