"""What the diagnostic scripts in this folder share: the command they record and how they write results."""
from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any, Dict, Optional


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
