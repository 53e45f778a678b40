"""Whether the Hugging Face hub may be contacted, from the environment variables HF libraries honour."""
from __future__ import annotations

import os

_TRUE_VALUES = {"1", "ON", "YES", "TRUE"}  # huggingface_hub's reading of boolean variables


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in _TRUE_VALUES


def hub_reachable(datasets: bool = False) -> bool:
    """False when ``HF_HUB_OFFLINE`` (or, for datasets, ``HF_DATASETS_OFFLINE``) is set to a true value.

    ``HF_HUB_OFFLINE=0`` means online, as it does for transformers and huggingface_hub.
    """
    if _flag("HF_HUB_OFFLINE"):
        return False
    return not (datasets and _flag("HF_DATASETS_OFFLINE"))
