"""A small compatibility layer between this plugin and EasyEdit (``easyeditor``).

Two EasyEdit flavours exist:

* ``"pypi"``: the PyPI release ``easyeditor==0.0.1.dev0`` (a 2023 snapshot).
  ``BaseEditor.edit(..., keep_original_weight=False, ...)``.
* ``"upstream"``: GitHub ``zjunlp/EasyEdit`` main.
  ``BaseEditor.edit(..., sequential_edit=False, ...)``.

What easyeditor (mainly the PyPI flavour) needs on torch 2.x / transformers 5.x
without a GPU, and what :func:`install_shims` does about it (nothing in
site-packages is edited):

1. **Import-time dependencies that are not installed.**  ``import easyeditor``
   imports, at module level, packages that only some of its methods use:
   ``higher`` (MEND/FT trainers), ``omegaconf`` and ``hydra`` (trainers,
   MEND/SERAC), ``sentence_transformers`` (IKE) and ``openai`` (FT-Api);
   upstream adds ``sklearn``, ``rouge`` and ``zhipuai``.  For each one that is
   *not installed*, a stub module is served, and only to ``import`` statements
   in ``easyeditor``'s own code, never to ``importlib.util.find_spec`` probes
   (a meta-path finder at the end of ``sys.meta_path`` that checks the
   importing frame).  Stub attributes are
   placeholder classes: defining code that merely names them works; calling one
   raises ``ImportError`` naming the missing package.  The stubs are taken out
   of ``sys.modules`` again once ``import easyeditor`` has finished, so
   availability probes elsewhere (transformers checks ``openai``) still see the
   truth.
2. **Multimodal code.**  ``easyeditor.trainer.blip2_models`` (BLIP-2/MiniGPT-4)
   imports ``torchvision``, ``timm``, ``iopath``, ``fairscale`` and helpers that
   transformers 5 removed from ``transformers.modeling_utils``;
   ``easyeditor.dataset.processor.blip_processors`` imports ``torchvision``
   (upstream also has ``llavaov_processors``/``qwen2vl_processors``, which need
   ``av``, ``cv2`` and ``qwen_vl_utils``).
   Rather than faking ``torchvision``/``timm`` process-wide (transformers probes
   them to decide which image code paths to take), these two *easyeditor*
   modules are replaced by stubs when their dependencies are missing, so only
   EasyEdit's multimodal editing is unavailable.
3. **Hard-coded CUDA.**  PyPI ``BaseEditor`` and its evaluation helpers move
   things with ``.to(f"cuda:{hparams.device}")`` (model, tokenised batches,
   restored weights), so ``hparams.device = "cpu"`` becomes ``"cuda:cpu"``.
   ``BaseEditor.__init__``, ``edit``, ``batch_edit``, ``edit_requests`` and
   ``edit_dataset`` are wrapped: when ``hparams.device`` is CPU, the call runs
   inside :func:`cuda_spec_redirect`, which maps the (always invalid) device
   string ``"cuda:cpu"`` to ``"cpu"`` in ``Tensor.to``, ``Module.to`` and
   ``BatchEncoding.to`` for the duration of the call.  Nothing else changes, and
   a CUDA device (an int) is left alone.  Not covered: IKE's ``icl_lm_eval``
   (``torch.device("cuda:...")``) and ``MultimodalEditor``.  Upstream EasyEdit
   normalises devices itself, so the wrapping is applied only when the editor
   source contains the ``cuda:{`` pattern.

:func:`easyeditor_base_hparams` must stay cheap because
``easyedit_nmke.util.hparams`` calls it at import time, while a full ``import
easyeditor`` takes seconds and has side effects (``logging.basicConfig``; upstream
also seeds the RNGs).  It loads only ``easyeditor/util/hparams.py`` (stdlib and
yaml imports only) under its real module name ``easyeditor.util.hparams``; when
``easyeditor`` is imported later, ``easyeditor.util`` picks that module up from
``sys.modules``, so the class is the very one EasyEdit uses.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import inspect
import sys
import threading
import types
import typing
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

__all__ = [
    "cuda_spec_redirect",
    "easyeditor_base_hparams",
    "easyeditor_flavour",
    "import_easyeditor",
    "install_shims",
    "is_easyeditor_installed",
    "loaded_easyeditor_flavour",
    "weights_copy_for_easyeditor",
    "when_imported",
]

EASYEDITOR = "easyeditor"
_HPARAMS_MODULE = "easyeditor.util.hparams"
_EDITOR_MODULE = "easyeditor.editors.editor"

# Third-party packages imported at module level by easyeditor code that this plugin
# never uses, with what needs them.  Stubbed only when not installed.
_THIRD_PARTY_STUBS: Dict[str, str] = {
    "higher": "EasyEdit's MEND/FT trainers",
    "omegaconf": "EasyEdit's trainers",
    "hydra": "EasyEdit's MEND/SERAC",
    "sentence_transformers": "EasyEdit's IKE",
    "openai": "EasyEdit's FT-Api",
    # upstream (GitHub main) only:
    "sklearn": "EasyEdit's F1 metric (GRACE) and EAMET",
    "rouge": "EasyEdit's CKnowEdit/unstructured evaluation",
    "zhipuai": "EasyEdit's DeepEdit-Api",
}
# Real objects some stubs must expose because easyeditor uses them at import time
# (``MEND.py`` annotates with ``higher.patch._torch.nn.Module`` etc.).
_STUB_ATTRS: Dict[str, Dict[str, Callable[[], Any]]] = {
    "higher.patch": {
        "_torch": lambda: importlib.import_module("torch"),
        "_typing": lambda: typing,
    },
}
# easyeditor's multimodal modules: (names they export, packages they need, whether they
# need the helpers transformers 5 removed from ``transformers.modeling_utils``).
_MULTIMODAL_STUBS: Dict[str, Tuple[List[str], Tuple[str, ...], bool]] = {
    "easyeditor.trainer.blip2_models": (
        ["Blip2OPT", "MiniGPT4"], ("torchvision", "timm", "iopath", "fairscale", "omegaconf"), True
    ),
    "easyeditor.dataset.processor.blip_processors": (
        ["BlipImageEvalProcessor"], ("torchvision", "omegaconf"), False
    ),
    # upstream only:
    "easyeditor.dataset.processor.llavaov_processors": (["LLaVAOneVisionProcessor"], ("av", "cv2"), False),
    "easyeditor.dataset.processor.qwen2vl_processors": (
        ["Qwen2VLProcessor"], ("av", "cv2", "qwen_vl_utils"), False
    ),
}
_MULTIMODAL_TRANSFORMERS_HELPERS = (
    "apply_chunking_to_forward",
    "find_pruneable_heads_and_indices",
    "prune_linear_layer",
)
_CPU_WRAPPED_METHODS = ("__init__", "edit", "batch_edit", "edit_requests", "edit_dataset")

# Process-wide on purpose (like the Tensor.to redirect's counters below): what these
# record (finders on sys.meta_path, hooks on imported modules, patched methods) is itself
# process-wide, so per-model state could not describe it.  The plugin's editing state
# lives on NMKEState / MicroEditState, attached to the edited model.
_LOCK = threading.RLock()
_SHIMS_INSTALLED = False
_POST_IMPORT_HOOKS: Dict[str, List[Callable[[types.ModuleType], None]]] = {}
_MULTIMODAL_STUB_NEEDED: Dict[str, bool] = {}


# ----------------------------------------------------------------------------------
# Discovery
# ----------------------------------------------------------------------------------
def is_easyeditor_installed() -> bool:
    """Whether ``easyeditor`` can be found, without importing it."""
    if EASYEDITOR in sys.modules:
        return True
    try:
        return importlib.util.find_spec(EASYEDITOR) is not None
    except (ImportError, ValueError):
        return False


def _package_dirs() -> List[Path]:
    module = sys.modules.get(EASYEDITOR)
    if module is not None:
        return [Path(p) for p in getattr(module, "__path__", [])]
    spec = importlib.util.find_spec(EASYEDITOR)
    if spec is None or not spec.submodule_search_locations:
        return []
    return [Path(p) for p in spec.submodule_search_locations]


def easyeditor_base_hparams() -> Optional[type]:
    """EasyEdit's ``HyperParams`` class, or ``None`` when easyeditor is absent.

    Never raises.  Does not import the ``easyeditor`` package (see the module
    docstring); the class returned is the one EasyEdit itself uses.
    """
    try:
        module = sys.modules.get(_HPARAMS_MODULE)
        if module is None:
            module = _load_hparams_module()
        cls = getattr(module, "HyperParams", None) if module is not None else None
        return cls if isinstance(cls, type) else None
    except Exception:  # pragma: no cover - defensive: must never raise
        return None


def _load_hparams_module() -> Optional[types.ModuleType]:
    if not is_easyeditor_installed():
        return None
    with _LOCK:
        if _HPARAMS_MODULE in sys.modules:
            return sys.modules[_HPARAMS_MODULE]
        for directory in _package_dirs():
            path = directory / "util" / "hparams.py"
            if not path.is_file():
                continue
            spec = importlib.util.spec_from_file_location(_HPARAMS_MODULE, path)
            if spec is None or spec.loader is None:
                continue
            module = importlib.util.module_from_spec(spec)
            sys.modules[_HPARAMS_MODULE] = module  # dataclasses look the module up
            try:
                spec.loader.exec_module(module)
            except Exception:
                sys.modules.pop(_HPARAMS_MODULE, None)
                raise
            return module
    # Unusual layout: fall back to the full (slow) import.
    import_easyeditor()
    return sys.modules.get(_HPARAMS_MODULE)


# ----------------------------------------------------------------------------------
# Stubs
# ----------------------------------------------------------------------------------
class _MissingMeta(type):
    """Metaclass of placeholders: attribute access gives more placeholders, calls raise."""

    def __getattr__(cls, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return _placeholder(f"{cls.__qualname__}.{name}", cls.__module__, cls._ee_reason)

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        raise ImportError(cls._ee_reason)

    def __getitem__(cls, item: Any) -> "_MissingMeta":
        return cls

    def __repr__(cls) -> str:
        return f"<easyedit_nmke stub {cls.__module__}.{cls.__qualname__}>"


def _placeholder(qualname: str, module: str, reason: str) -> type:
    return _MissingMeta(
        qualname.rsplit(".", 1)[-1],
        (),
        {"_ee_reason": reason, "__qualname__": qualname, "__module__": module},
    )


class _StubModule(types.ModuleType):
    """A module whose unknown public attributes are placeholders."""

    __easyedit_nmke_stub__ = True

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        value = _placeholder(name, self.__name__, self.__dict__["_ee_reason"])
        setattr(self, name, value)
        return value


class _StubLoader(importlib.abc.Loader):
    def __init__(self, reason: str, names: Optional[List[str]] = None) -> None:
        self.reason = reason
        self.names = names

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = _StubModule(spec.name)
        module.__dict__["_ee_reason"] = self.reason
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        module.__path__ = []  # a package, so submodules resolve to stubs as well
        for name, factory in _STUB_ATTRS.get(module.__name__, {}).items():
            setattr(module, name, factory())
        if self.names is not None:
            for name in self.names:
                getattr(module, name)
            module.__all__ = list(self.names)


class _HookedLoader(importlib.abc.Loader):
    """Runs post-import hooks after the real loader executed the module."""

    def __init__(self, loader: Any, fullname: str) -> None:
        self._loader = loader
        self._fullname = fullname

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Optional[types.ModuleType]:
        return self._loader.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        try:
            self._loader.exec_module(module)
        finally:
            if self._fullname == EASYEDITOR:
                _drop_third_party_stubs()
        _run_post_import_hooks(self._fullname, module)

    def __getattr__(self, name: str) -> Any:  # get_source, get_code, is_package, ...
        return getattr(self._loader, name)


def _imported_from_easyeditor() -> bool:
    """Whether the module being looked up is imported (not probed) by easyeditor code."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_globals.get("__name__", "") or ""
        if name == "importlib.util" and frame.f_code.co_name == "find_spec":
            return False  # an availability probe: let it see the truth
        if not (name.startswith(("importlib", "_frozen_importlib")) or name == __name__):
            return name == EASYEDITOR or name.startswith(EASYEDITOR + ".")
        frame = frame.f_back
    return False


class _MissingDependencyFinder(importlib.abc.MetaPathFinder):
    """Last on ``sys.meta_path``: stubs for uninstalled packages, for easyeditor only."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None):
        top = fullname.partition(".")[0]
        if top not in _THIRD_PARTY_STUBS or not _imported_from_easyeditor():
            return None
        reason = (
            f"'{top}' is not installed; easyedit_nmke stubbed it so that easyeditor imports. "
            f"It is needed by {_THIRD_PARTY_STUBS[top]}: pip install {top.replace('_', '-')}"
        )
        return importlib.machinery.ModuleSpec(
            fullname, _StubLoader(reason), origin="easyedit_nmke stub", is_package=True
        )


class _EasyEditorFinder(importlib.abc.MetaPathFinder):
    """First on ``sys.meta_path``: multimodal stubs and post-import hooks for easyeditor."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None):
        if not (fullname == EASYEDITOR or fullname.startswith(EASYEDITOR + ".")):
            return None
        stub = _multimodal_stub(fullname)
        if stub is not None and _multimodal_stub_needed(stub[0]):
            root, stub_names = stub
            packages, helpers = _MULTIMODAL_STUBS[root][1:]
            reason = (
                f"{fullname} is EasyEdit's multimodal code, which needs {', '.join(packages)}"
                f"{' and transformers<5' if helpers else ''}; easyedit_nmke replaced it by a "
                "stub so that the text editors import."
            )
            return importlib.machinery.ModuleSpec(
                fullname, _StubLoader(reason, stub_names), origin="easyedit_nmke stub", is_package=True
            )
        if fullname not in _POST_IMPORT_HOOKS and fullname != EASYEDITOR:
            return None
        spec = self._real_spec(fullname, path, target)
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _HookedLoader(spec.loader, fullname)
        return spec

    def _real_spec(self, fullname: str, path: Any, target: Any):
        for finder in list(sys.meta_path):
            if finder is self or isinstance(finder, _EasyEditorFinder):
                continue
            find_spec = getattr(finder, "find_spec", None)
            if find_spec is None:
                continue
            spec = find_spec(fullname, path, target)
            if spec is not None:
                return spec
        return None


def _multimodal_stub(fullname: str) -> Optional[Tuple[str, List[str]]]:
    """(stubbed root module, names to export) when ``fullname`` is or is inside one."""
    for name, (exported, _, _) in _MULTIMODAL_STUBS.items():
        if fullname == name:
            return name, list(exported)
        if fullname.startswith(name + "."):
            return name, []
    return None


def _multimodal_stub_needed(root: str) -> bool:
    if root not in _MULTIMODAL_STUB_NEEDED:
        _, packages, helpers = _MULTIMODAL_STUBS[root]
        needed = False
        for package in packages:
            try:
                needed = needed or importlib.util.find_spec(package) is None
            except (ImportError, ValueError):
                needed = True
        if not needed and helpers:
            try:
                modeling_utils = importlib.import_module("transformers.modeling_utils")
                needed = not all(hasattr(modeling_utils, n) for n in _MULTIMODAL_TRANSFORMERS_HELPERS)
            except Exception:
                needed = True
        _MULTIMODAL_STUB_NEEDED[root] = needed
    return _MULTIMODAL_STUB_NEEDED[root]


def _drop_third_party_stubs() -> None:
    for name in list(sys.modules):
        if name.partition(".")[0] in _THIRD_PARTY_STUBS and getattr(
            sys.modules[name], "__easyedit_nmke_stub__", False
        ):
            del sys.modules[name]


# ----------------------------------------------------------------------------------
# Post-import hooks
# ----------------------------------------------------------------------------------
def when_imported(module_name: str, callback: Callable[[types.ModuleType], None]) -> None:
    """Call ``callback(module)`` once ``module_name`` (an easyeditor module) is imported.

    Runs at once when it already is; a pending callback is queued once.  A
    callback that raises is reported as a warning and does not break the
    import.  Needs :func:`install_shims`.
    """
    with _LOCK:
        module = sys.modules.get(module_name)
        if module is None or _is_initializing(module):
            callbacks = _POST_IMPORT_HOOKS.setdefault(module_name, [])
            if callback not in callbacks:
                callbacks.append(callback)
            return
    _call_hook(callback, module)


def _is_initializing(module: types.ModuleType) -> bool:
    return bool(getattr(getattr(module, "__spec__", None), "_initializing", False))


def _run_post_import_hooks(fullname: str, module: types.ModuleType) -> None:
    with _LOCK:
        callbacks = _POST_IMPORT_HOOKS.pop(fullname, [])
    for callback in callbacks:
        _call_hook(callback, module)


def _call_hook(callback: Callable[[types.ModuleType], None], module: types.ModuleType) -> None:
    try:
        callback(module)
    except Exception as exc:  # never break the user's import
        warnings.warn(
            f"easyedit_nmke: hook {getattr(callback, '__name__', callback)!r} on "
            f"{module.__name__} failed: {exc!r}",
            RuntimeWarning,
            stacklevel=2,
        )


# ----------------------------------------------------------------------------------
# CPU support for PyPI BaseEditor
# ----------------------------------------------------------------------------------
_CUDA_CPU = "cuda:cpu"
_REDIRECT_DEPTH = 0
_REDIRECT_SAVED: Dict[str, Any] = {}


def map_cuda_cpu_device(value: Any) -> Any:
    """PyPI easyeditor builds ``f"cuda:{hparams.device}"``: with ``device: cpu`` that means ``"cpu"``."""
    if isinstance(value, str) and value.strip().lower() == _CUDA_CPU:
        return "cpu"
    return value


def _redirecting(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def to(self: Any, *args: Any, **kwargs: Any) -> Any:
        if args:
            args = tuple(map_cuda_cpu_device(a) for a in args)
        if "device" in kwargs:
            kwargs["device"] = map_cuda_cpu_device(kwargs["device"])
        return method(self, *args, **kwargs)

    return to


@contextlib.contextmanager
def cuda_spec_redirect() -> Iterator[None]:
    """Within the block, ``.to("cuda:cpu")`` means ``.to("cpu")``.

    Covers ``torch.Tensor.to``, ``torch.nn.Module.to`` and
    ``transformers.BatchEncoding.to``.  ``"cuda:cpu"`` is what
    ``f"cuda:{hparams.device}"`` gives for ``device="cpu"``; it is never a valid
    device, so the mapping only turns an error into the intended move.
    Re-entrant and thread-safe (patched while any block is open).
    """
    global _REDIRECT_DEPTH
    import torch
    from transformers.tokenization_utils_base import BatchEncoding

    targets = {"tensor": torch.Tensor, "module": torch.nn.Module, "batch": BatchEncoding}
    with _LOCK:
        if _REDIRECT_DEPTH == 0:
            for key, cls in targets.items():
                _REDIRECT_SAVED[key] = cls.__dict__.get("to", None)
                cls.to = _redirecting(cls.to)
        _REDIRECT_DEPTH += 1
    try:
        yield
    finally:
        with _LOCK:
            _REDIRECT_DEPTH -= 1
            if _REDIRECT_DEPTH == 0:
                for key, cls in targets.items():
                    saved = _REDIRECT_SAVED.pop(key)
                    if saved is None:
                        del cls.to  # the method lives on a base class (torch.Tensor)
                    else:
                        cls.to = saved


def _is_cpu_device(device: Any) -> bool:
    if isinstance(device, str):
        return device.strip().lower() == "cpu"
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(device, torch.device) and device.type == "cpu"


def _hardcodes_cuda(editor_module: types.ModuleType) -> bool:
    try:
        return "cuda:{" in inspect.getsource(editor_module)
    except (OSError, TypeError):
        return "keep_original_weight" in inspect.signature(editor_module.BaseEditor.edit).parameters


def _cpu_aware(method: Callable[..., Any], is_init: bool) -> Callable[..., Any]:
    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        if is_init:
            hparams = args[0] if args else kwargs.get("hparams")
        else:
            hparams = getattr(self, "hparams", None)
        if _is_cpu_device(getattr(hparams, "device", None)):
            with cuda_spec_redirect():
                return method(self, *args, **kwargs)
        return method(self, *args, **kwargs)

    wrapper.__easyedit_nmke_cpu_aware__ = True  # type: ignore[attr-defined]
    return wrapper


def _patch_base_editor(editor_module: types.ModuleType) -> None:
    base = getattr(editor_module, "BaseEditor", None)
    if base is None or base.__dict__.get("_easyedit_nmke_cpu_patched", False):
        return
    if _hardcodes_cuda(editor_module):
        for name in _CPU_WRAPPED_METHODS:
            method = base.__dict__.get(name)
            if callable(method) and not getattr(method, "__easyedit_nmke_cpu_aware__", False):
                setattr(base, name, _cpu_aware(method, is_init=(name == "__init__")))
    base._easyedit_nmke_cpu_patched = True


def _after_easyeditor(package: types.ModuleType) -> None:
    # easyeditor.util picked up a pre-loaded easyeditor.util.hparams from sys.modules,
    # which skips binding the submodule as an attribute; bind it.
    util = sys.modules.get("easyeditor.util")
    hparams_module = sys.modules.get(_HPARAMS_MODULE)
    if util is not None and hparams_module is not None and not isinstance(
        util.__dict__.get("hparams"), types.ModuleType
    ):
        util.hparams = hparams_module


# ----------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------
def install_shims() -> None:
    """Make ``import easyeditor`` work here and ``BaseEditor`` usable on CPU.

    Idempotent and cheap (imports nothing heavy).  Installs the two meta-path
    finders described in the module docstring and arranges for ``BaseEditor`` to
    be patched as soon as ``easyeditor.editors.editor`` is imported (at once if
    it already is).
    """
    global _SHIMS_INSTALLED
    with _LOCK:
        if _SHIMS_INSTALLED:
            return
        if not any(isinstance(f, _EasyEditorFinder) for f in sys.meta_path):
            sys.meta_path.insert(0, _EasyEditorFinder())
        if not any(isinstance(f, _MissingDependencyFinder) for f in sys.meta_path):
            sys.meta_path.append(_MissingDependencyFinder())
        _SHIMS_INSTALLED = True
    when_imported(EASYEDITOR, _after_easyeditor)
    when_imported(_EDITOR_MODULE, _patch_base_editor)


def import_easyeditor() -> types.ModuleType:
    """``import easyeditor`` after :func:`install_shims`; returns the package.

    Raises ``ImportError`` when easyeditor is not installed or cannot be imported.
    """
    install_shims()
    module = importlib.import_module(EASYEDITOR)
    _drop_third_party_stubs()
    return module


def loaded_easyeditor_flavour() -> Optional[str]:
    """Like :func:`easyeditor_flavour`, but ``None`` unless easyeditor is already imported.

    Cheap (no import); meant for code running inside an EasyEdit call.
    """
    editor = sys.modules.get(_EDITOR_MODULE)
    if editor is None or _is_initializing(editor):
        return None
    return easyeditor_flavour()


def weights_copy_for_easyeditor(weights_copy: Dict[str, Any], keep_original_weight: bool) -> Dict[str, Any]:
    """What an ``apply_*_to_model`` should return as ``weights_copy``.

    ``weights_copy`` holds the original value of every changed parameter (taken
    when ``return_orig_weights`` is true).  Both EasyEdit flavours call
    ``apply_algo(..., return_orig_weights=True, keep_original_weight=...)`` and
    write the returned tensors back into the model after evaluating an edit, but:

    * upstream restores only when ``sequential_edit=False`` and always passes
      ``keep_original_weight=False``; its ROME/MEMIT/AlphaEdit return the
      originals regardless, so ``weights_copy`` is returned unchanged;
    * the PyPI release restores unconditionally and leaves the choice to
      ``keep_original_weight`` (its ROME/MEMIT return ``{}`` when it is false,
      which makes edits accumulate), so that is mirrored when the PyPI
      ``BaseEditor`` is the one loaded.
    """
    if not keep_original_weight and loaded_easyeditor_flavour() == "pypi":
        return {}
    return weights_copy


def easyeditor_flavour() -> Optional[str]:
    """``"upstream"``, ``"pypi"``, or ``None`` (absent, not importable, unrecognised).

    Decided from ``BaseEditor.edit``'s parameters: upstream has ``sequential_edit``,
    the PyPI release has ``keep_original_weight``.  Imports easyeditor if needed.
    """
    try:
        editor = sys.modules.get(_EDITOR_MODULE)
        if editor is None or _is_initializing(editor):
            if not is_easyeditor_installed():
                return None
            import_easyeditor()
            editor = sys.modules[_EDITOR_MODULE]
        params = inspect.signature(editor.BaseEditor.edit).parameters
    except Exception:
        return None
    if "sequential_edit" in params:
        return "upstream"
    if "keep_original_weight" in params:
        return "pypi"
    return None
