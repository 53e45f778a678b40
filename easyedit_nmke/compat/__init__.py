"""Compatibility helpers for running the plugin inside EasyEdit (``easyeditor``).

Everything here is optional: the plugin works without EasyEdit, and nothing in
this package imports ``easyeditor`` (or torch) at import time.  See
:mod:`easyedit_nmke.compat.easyeditor_compat` for what the shims do and why.
"""
from .easyeditor_compat import (
    cuda_spec_redirect,
    easyeditor_base_hparams,
    easyeditor_flavour,
    import_easyeditor,
    install_shims,
    is_easyeditor_installed,
    loaded_easyeditor_flavour,
    map_cuda_cpu_device,
    weights_copy_for_easyeditor,
    when_imported,
)

__all__ = [
    "cuda_spec_redirect",
    "easyeditor_base_hparams",
    "easyeditor_flavour",
    "import_easyeditor",
    "install_shims",
    "is_easyeditor_installed",
    "loaded_easyeditor_flavour",
    "map_cuda_cpu_device",
    "weights_copy_for_easyeditor",
    "when_imported",
]
