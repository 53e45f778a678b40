"""Register the plugin's editing methods with EasyEdit (``easyeditor``).

In both EasyEdit flavours (the PyPI release and GitHub main) ``BaseEditor``
finds an algorithm only through ``easyeditor.util.alg_dict.ALG_DICT``
(``alg_name`` -> ``apply_*_to_model``); hyper-parameters are passed in by the
caller, so there is no hparams table.  ``batch_edit`` additionally asks
``BatchEditor.is_batchable_method(alg_name)``, a hard-coded chain of
comparisons, which is extended for the batchable methods below.

Registration is deferred: :func:`register` does not import easyeditor (that
takes seconds); it installs the shims and registers the methods the moment
``easyeditor.util.alg_dict`` is imported, or at once if it already is.
"""
from __future__ import annotations

import importlib
import importlib.util
import types
import warnings
from typing import Callable, Dict, Tuple

from .compat.easyeditor_compat import (
    import_easyeditor,
    install_shims,
    is_easyeditor_installed,
    when_imported,
)

from .methods import METHODS

__all__ = ["register", "BATCHABLE_METHODS"]

# Methods that accept several requests per apply call (``BaseEditor.batch_edit``).
BATCHABLE_METHODS = frozenset({"NMKE"})


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _plugin_functions() -> Dict[str, Callable]:
    found: Dict[str, Callable] = {}
    for alg_name, spec in METHODS.items():
        if not _module_exists(spec.module):
            continue
        try:
            found[alg_name] = spec.apply
        except (ImportError, AttributeError) as exc:
            warnings.warn(
                f"easyedit_nmke: {alg_name} not registered with EasyEdit: {exc!r}",
                RuntimeWarning,
                stacklevel=3,
            )
    return found


def _register_algorithms(alg_dict_module: types.ModuleType) -> None:
    table = alg_dict_module.ALG_DICT
    for alg_name, function in _plugin_functions().items():
        table[alg_name] = function


def _register_batchable(batch_editor_module: types.ModuleType) -> None:
    batch_editor = batch_editor_module.BatchEditor
    current = batch_editor.__dict__["is_batchable_method"]
    original = current.__func__ if isinstance(current, staticmethod) else current
    if getattr(original, "__easyedit_nmke__", False):
        return

    def is_batchable_method(alg_name: str) -> bool:
        return alg_name in BATCHABLE_METHODS or original(alg_name)

    is_batchable_method.__easyedit_nmke__ = True  # type: ignore[attr-defined]
    is_batchable_method.__wrapped__ = original  # type: ignore[attr-defined]
    setattr(batch_editor, "is_batchable_method", staticmethod(is_batchable_method))


def register(now: bool = False) -> bool:
    """Make ``alg_name: NMKE`` (and MicroEdit, once it exists) usable in EasyEdit.

    Idempotent.  Returns ``False`` when easyeditor is not installed, else
    ``True``.  With ``now=True`` easyeditor is imported straight away (errors
    from that import propagate); otherwise registration happens when EasyEdit
    loads ``easyeditor.util.alg_dict``.
    """
    if not is_easyeditor_installed():
        return False
    install_shims()
    when_imported("easyeditor.util.alg_dict", _register_algorithms)
    when_imported("easyeditor.editors.batch_editor", _register_batchable)
    if now:
        import_easyeditor()
    return True
