"""What the diagnostic scripts in this folder share: common arguments, the command they record and how they write results."""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path
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
