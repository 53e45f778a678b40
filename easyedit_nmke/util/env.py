"""Environment: boolean variables, the plugin's cache folder, whether the Hugging Face hub may be contacted."""
from __future__ import annotations

import os
from pathlib import Path

_TRUE_VALUES = {"1", "ON", "YES", "TRUE"}  # how huggingface_hub and Triton read boolean variables


def env_flag(name: str) -> bool:
    """True when the variable ``name`` is set to 1/on/yes/true (any case); unset or "0" is False."""
    return os.environ.get(name, "").strip().upper() in _TRUE_VALUES


def hub_reachable(datasets: bool = False) -> bool:
    """False when ``HF_HUB_OFFLINE`` (or, for datasets, ``HF_DATASETS_OFFLINE``) is set to a true value.

    ``HF_HUB_OFFLINE=0`` means online, as it does for transformers and huggingface_hub.
    """
    if env_flag("HF_HUB_OFFLINE"):
        return False
    return not (datasets and env_flag("HF_DATASETS_OFFLINE"))


def cache_root() -> Path:
    """Directory for converted models, statistics and SAEs (``$EASYEDIT_NMKE_CACHE``)."""
    env = os.environ.get("EASYEDIT_NMKE_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "easyedit_nmke"
