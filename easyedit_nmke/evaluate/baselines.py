"""EasyEdit's own editing methods as baselines in the plugin's lifelong runner.

:class:`BaselineSpec` wraps an ``apply_*_to_model`` from the installed
``easyeditor``'s ``ALG_DICT`` in the interface :func:`runner.run_lifelong` expects
of a :class:`~easyedit_nmke.methods.MethodSpec` (``apply``, ``edited_parameters``,
``prepare``, ``phase_seconds``, ``save_state``/``load_state``), so a baseline is
edited one request at a time and scored with exactly the plugin's protocol and
metrics.  Edits accumulate: the apply function is called with
``keep_original_weight=False`` and its ``weights_copy`` is ignored (nothing is
written back).

Which methods: FT, ROME and MEMIT from PyPI ``easyeditor`` 0.0.1.dev0; AlphaEdit,
WISE and GRACE only when the importable ``easyeditor`` is upstream EasyEdit
(GitHub main).  :func:`baseline_status` says why one cannot run.

What the runner needs from each, offline on a CPU:

* **CPU.**  PyPI's methods build devices as ``f"cuda:{hparams.device}"``: in
  ``Tensor.to`` (handled by :func:`easyedit_nmke.compat.cuda_spec_redirect`) and in
  ``torch.device(...)``, ``torch.tensor(..., device=...)`` and ``torch.zeros(...)``.
  For the latter, while a baseline runs, the ``torch`` name inside those easyeditor
  modules is a proxy that maps the always-invalid ``"cuda:cpu"`` to ``"cpu"``
  (:func:`cpu_device_strings`); nothing else changes.  Upstream normalises devices.
* **Covariance statistics** (ROME with ``mom2_adjustment``, MEMIT): easyeditor's
  ``layer_stats`` loads ``<stats_dir>/<model>/<mom2_dataset>_stats/<layer>_<dtype>_mom2_<n>.npz``
  when it exists and otherwise downloads Wikipedia/WikiText-103 through ``datasets``.
  :meth:`BaselineSpec.prepare` writes that file first, in easyeditor's own cache
  format (``runningstats.SecondMoment`` state), from the plugin's WikiText-2 second
  moment of the same layer inputs (``nullspace.key_second_moments``: ``mom2_n_samples``
  windows of ``STATS_WINDOW`` tokens, shared with NMKE's cache), so nothing is
  downloaded.  ``stats_dir`` is set to ``<plugin cache>/easyeditor_stats``.
* **AlphaEdit** (upstream) computes its projector P only for model names containing
  llama/qwen/gpt-j and saves it to ``./null_space_project.pt``; ``prepare`` computes
  P from the same statistics (eigen-directions below ``nullspace_threshold``, as
  upstream's ``get_project``), and sets the module's ``P`` and its global key cache
  ``cache_c`` (zeros for a new run); ``cache_c`` is saved at checkpoints.
* **WISE/GRACE** (upstream) put adapter modules into the model and keep their edits
  there (WISE keeps one side memory across calls only with
  ``hparams.sequential_edit = True``, which is set here).  Each of their edits runs
  with torch, numpy and ``random`` seeded by the edit's index, so a cell is
  reproducible; their adapter state is saved at checkpoints in safetensors + JSON and
  put back into a fresh adapter on resume (:mod:`.adapter_checkpoints`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import io
import sys
import types
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

from ..compat import (
    cuda_spec_redirect,
    easyeditor_flavour,
    import_easyeditor,
    is_easyeditor_installed,
    map_cuda_cpu_device,
)
from ..util.hparams import read_hparams_yaml

PYPI_BASELINES = ("FT", "ROME", "MEMIT")
UPSTREAM_BASELINES = ("AlphaEdit", "WISE", "GRACE")
BASELINES = PYPI_BASELINES + UPSTREAM_BASELINES
# Methods whose edits live in adapter modules inside the model, not in its weights.
ADAPTER_BASELINES = frozenset({"WISE", "GRACE"})
# Hyper-parameter classes whose name is not f"{alg}HyperParams".
_HPARAMS_CLASS = {"GRACE": "GraceHyperParams"}
# Required fields that one EasyEdit version has and the other lacks, with the value
# that reproduces the other version's behaviour (PyPI FT is upstream's "prompt_last").
_VERSION_DEFAULTS = {"FT": {"objective_optimization": "prompt_last"}}
# Token window of the WikiText-2 statistics written for easyeditor (as NMKE's YAML).
STATS_WINDOW = 128


# ----------------------------------------------------------------------------------
# Availability
# ----------------------------------------------------------------------------------
def baseline_status(alg_name: str) -> Tuple[bool, str]:
    """(can run, reason when not) for an EasyEdit baseline name."""
    if alg_name not in BASELINES:
        return False, f"{alg_name} is not one of the EasyEdit baselines {list(BASELINES)}"
    if not is_easyeditor_installed():
        return False, "easyeditor is not installed (pip install --no-deps easyeditor)"
    try:
        import_easyeditor()
        alg_dict = sys.modules["easyeditor.util.alg_dict"].ALG_DICT
    except Exception as exc:  # pragma: no cover - depends on the installed easyeditor
        return False, f"easyeditor cannot be imported: {exc!r}"
    if alg_name not in alg_dict:
        flavour = easyeditor_flavour() or "unknown"
        hint = " (it is in upstream EasyEdit, GitHub zjunlp/EasyEdit)" if alg_name in UPSTREAM_BASELINES else ""
        return False, f"the installed easyeditor ({flavour}) has no {alg_name}{hint}"
    return True, ""


# ----------------------------------------------------------------------------------
# CPU: "cuda:cpu" device strings inside easyeditor
# ----------------------------------------------------------------------------------
_FACTORIES = (
    "tensor", "zeros", "ones", "empty", "full", "arange", "eye", "rand", "randn", "randint",
    "zeros_like", "ones_like", "empty_like", "full_like", "as_tensor",
)


class _CpuTorch(types.ModuleType):
    """``torch`` as seen by an easyeditor module: ``"cuda:cpu"`` devices mean CPU."""

    def __init__(self, torch_module: types.ModuleType) -> None:
        super().__init__("torch")
        self.__dict__["_torch"] = torch_module

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._torch, name)
        if name == "device":
            return _device_factory(value)
        if name in _FACTORIES and callable(value):
            return _factory(value)
        return value


@functools.lru_cache(maxsize=None)
def _device_factory(device_cls):
    """``torch.device`` that maps "cuda:cpu" to "cpu" and still works in ``isinstance``."""

    class _DeviceMeta(type):
        def __instancecheck__(cls, obj):
            return isinstance(obj, device_cls)

        def __call__(cls, *args, **kwargs):
            return device_cls(
                *(map_cuda_cpu_device(a) for a in args), **{k: map_cuda_cpu_device(v) for k, v in kwargs.items()}
            )

    class device(metaclass=_DeviceMeta):
        pass

    return device


@functools.lru_cache(maxsize=None)
def _factory(function):
    @functools.wraps(function)
    def call(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = map_cuda_cpu_device(kwargs["device"])
        return function(*args, **kwargs)

    return call


def _cuda_string_modules() -> List[types.ModuleType]:
    """Loaded easyeditor modules that build ``f"cuda:{...}"`` device strings."""
    import torch

    found = []
    for name, module in list(sys.modules.items()):
        if not (name.startswith("easyeditor.") and isinstance(module, types.ModuleType)):
            continue
        if module.__dict__.get("torch") is not torch:
            continue
        try:
            source = inspect.getsource(module)
        except (OSError, TypeError):
            continue
        if "cuda:{" in source:
            found.append(module)
    return found


@contextlib.contextmanager
def cpu_device_strings() -> Iterator[None]:
    """Within the block, easyeditor's ``f"cuda:{hparams.device}"`` with device ``cpu`` works."""
    import torch

    modules = _cuda_string_modules()
    proxy = _CpuTorch(torch)
    for module in modules:
        module.torch = proxy
    try:
        with cuda_spec_redirect():
            yield
    finally:
        for module in modules:
            module.torch = torch


# ----------------------------------------------------------------------------------
# transformers 5: decoder layers return a tensor, PyPI MEMIT indexes a tuple
# ----------------------------------------------------------------------------------
def _is_block(module: Any) -> bool:
    return type(module).__name__.endswith(("DecoderLayer", "Block"))


@contextlib.contextmanager
def tuple_block_outputs() -> Iterator[None]:
    """Within the block, easyeditor's ``nethook.Trace`` shows decoder-layer outputs as tuples.

    transformers < 5 returned ``(hidden_states, ...)`` from a decoder layer; 5 returns the
    tensor.  PyPI MEMIT's ``compute_z`` edits ``cur_out[0][i, idx, :]`` and reads
    ``tr[layer].output[0]``, which on a bare tensor would index the batch.  Here an
    ``edit_output`` function of a decoder layer receives ``(tensor,)`` (its returned
    tuple is unwrapped again) and ``Trace.output`` of a decoder layer is ``(tensor,)``.
    Other modules (MLPs, projections) are untouched.
    """
    import torch

    nethook_module = sys.modules.get("easyeditor.util.nethook")
    if nethook_module is None:
        yield
        return
    base = nethook_module.Trace
    invoke = nethook_module.invoke_with_optional_args

    def tuple_edit(function):
        def edit(output, layer=None):
            if not isinstance(output, torch.Tensor):
                return invoke(function, output=output, layer=layer)
            result = invoke(function, output=(output,), layer=layer)
            return result[0] if isinstance(result, tuple) else result

        return edit

    class TupleTrace(base):  # type: ignore[misc,valid-type]
        def __init__(self, module, layer=None, retain_output=True, retain_input=False, clone=False,
                     detach=False, retain_grad=False, edit_output=None, stop=False):
            target = nethook_module.get_module(module, layer) if layer is not None else module
            self._as_tuple = _is_block(target)
            if self._as_tuple and edit_output is not None:
                edit_output = tuple_edit(edit_output)
            super().__init__(module, layer, retain_output, retain_input, clone, detach, retain_grad,
                             edit_output, stop)

        @property
        def output(self):
            value = self.__dict__["_output"]
            return (value,) if self._as_tuple and isinstance(value, torch.Tensor) else value

        @output.setter
        def output(self, value):
            self.__dict__["_output"] = value

    nethook_module.Trace = TupleTrace
    try:
        yield
    finally:
        nethook_module.Trace = base


# ----------------------------------------------------------------------------------
# Hyper-parameters
# ----------------------------------------------------------------------------------
def _stats_root() -> Path:
    from ..util.env import cache_root

    return cache_root() / "easyeditor_stats"


# ----------------------------------------------------------------------------------
# The adapter
# ----------------------------------------------------------------------------------
class BaselineSpec:
    """An EasyEdit baseline with the runner's MethodSpec interface."""

    report_key = None  # no method-specific checkpoint figures

    def __init__(self, alg_name: str, quiet: bool = True) -> None:
        ok, reason = baseline_status(alg_name)
        if not ok:
            raise ImportError(reason)
        self.alg_name = alg_name
        self.quiet = quiet
        easyeditor = import_easyeditor()
        self.flavour = easyeditor_flavour()
        self._apply_fn = sys.modules["easyeditor.util.alg_dict"].ALG_DICT[alg_name]
        class_name = _HPARAMS_CLASS.get(alg_name, f"{alg_name}HyperParams")
        cls = getattr(easyeditor, class_name, None)
        if cls is None:
            cls = getattr(sys.modules[self._apply_fn.__module__.rsplit(".", 1)[0]], class_name)
        self.hparams_cls = cls
        self.adapter_based = alg_name in ADAPTER_BASELINES
        self._param_names: Optional[List[str]] = None
        self._hparams: Any = None  # from prepare: GRACE/WISE checkpoints need the wrapped layer
        # Upstream WISE's retrieval over saved memories (after save_freq edits) compares a
        # per-prompt distance as one boolean, so it is scored one prompt per forward.
        self.eval_batch_size: Optional[int] = 1 if alg_name == "WISE" else None
        # WISE trains its router against unrelated text ("loc_prompt", which upstream's
        # BaseEditor adds from a training set's locality pairs); handed out in turn.
        self.loc_prompts: List[str] = []
        self._calls = 0

    # -- hparams ---------------------------------------------------------------
    def load_hparams(self, path: Union[str, Path], overrides: Optional[Dict[str, Any]] = None) -> Any:
        """The library's hparams class from a YAML in its format, plus overrides.

        The class's own ``from_hparams`` reads the YAML (WISE's turns ``act_margin`` into
        alpha/beta/gamma).  When the YAML was written for the other EasyEdit version
        (a key this one does not know, or lacks a required one), keys it does not know
        are dropped with a printed note and missing ones get ``_VERSION_DEFAULTS``.
        """
        overrides = dict(overrides or {})
        path, raw = read_hparams_yaml(path)  # a clear error for a missing or malformed file
        if raw.get("alg_name") != self.alg_name:
            raise ValueError(f"{path}: expected alg_name: {self.alg_name}")
        try:
            hparams = self.hparams_cls.from_hparams(str(path))
        except TypeError as exc:  # written for the other EasyEdit version
            hparams = self._tolerant_hparams(raw, path, exc)
        fields = {f.name for f in dataclasses.fields(self.hparams_cls)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise ValueError(f"{self.alg_name} hparams have no {unknown}")
        for key, value in overrides.items():
            setattr(hparams, key, value)
        if self.alg_name == "WISE":
            # Upstream WISE builds a fresh adapter per call unless this is set by hand.
            hparams.sequential_edit = True
        if hasattr(hparams, "stats_dir") and "stats_dir" not in overrides:
            hparams.stats_dir = str(_stats_root())
        if self.alg_name == "AlphaEdit" and "P_loc" not in overrides:
            hparams.P_loc = str(_stats_root() / "alphaedit_P" / f"{_safe(hparams.model_name)}.pt")
        return hparams

    def _tolerant_hparams(self, config: Dict[str, Any], path: Any, error: Exception):
        config = self.hparams_cls.construct_float_from_scientific_notation(dict(config))
        fields = {f.name for f in dataclasses.fields(self.hparams_cls)}
        dropped = sorted(set(config) - fields)
        config = {k: v for k, v in config.items() if k in fields}
        added = {}
        for key, value in _VERSION_DEFAULTS.get(self.alg_name, {}).items():
            if key in fields and key not in config:
                config[key] = added[key] = value
        try:
            hparams = self.hparams_cls(**config)
        except TypeError:
            raise error
        print(f"[bench] {path}: written for another easyeditor version ({error}); "
              f"dropped {dropped or 'nothing'}, added {added or 'nothing'}")
        return hparams

    # -- the MethodSpec interface ----------------------------------------------
    def edited_parameters(self, hparams: Any, model: Any = None) -> List[str]:
        """Names of the parameters the method changes (none for adapter methods)."""
        if self.adapter_based:
            return []
        if model is not None:
            self._param_names = self._names_in_model(model, hparams)
        if self._param_names is not None:
            return list(self._param_names)
        return [_weight_name(hparams.rewrite_module_tmp.format(layer)) for layer in hparams.layers]

    def _names_in_model(self, model: Any, hparams: Any) -> List[str]:
        if self.alg_name == "FT":
            # execute_ft's own rule: every parameter whose name contains the template.
            patterns = [hparams.rewrite_module_tmp.format(layer) for layer in hparams.layers]
            return [n for n, _ in model.named_parameters() if any(p in n for p in patterns)]
        return [_weight_name(hparams.rewrite_module_tmp.format(layer)) for layer in hparams.layers]

    def check_request(self, request: Mapping[str, Any]) -> None:
        """EasyEdit's methods check their own requests (some need no subject)."""

    def prepare(self, model: Any, tok: Any, hparams: Any) -> None:
        self._hparams = hparams
        if self.alg_name == "WISE":
            from .adapter_checkpoints import reset_wise_histories

            reset_wise_histories()  # module-level in upstream: another cell's edits must not leak in
        if not getattr(model.config, "_name_or_path", ""):
            # easyeditor keys its statistics by this; a model built from a config has none.
            model.config._name_or_path = str(hparams.model_name)
        self.edited_parameters(hparams, model)
        if self.alg_name == "MEMIT" or (self.alg_name == "ROME" and getattr(hparams, "mom2_adjustment", False)):
            write_easyeditor_stats(model, tok, hparams, self.flavour)
        if self.alg_name == "AlphaEdit":
            self._prepare_alphaedit(model, tok, hparams)
        self._context_templates(model, tok, hparams)

    def _context_templates(self, model: Any, tok: Any, hparams: Any) -> None:
        """Generate ROME/MEMIT/AlphaEdit/WISE's cached context prefixes now, seeded, on the unedited model.

        Their code samples them (unseeded in PyPI) at the first edit and keeps them for the
        process; here they come from seed 0 before any checkpoint is restored, so a resumed
        cell and a fresh one use the same prefixes.
        """
        import importlib

        import torch

        module_name = {
            "ROME": "easyeditor.models.rome.rome_main",
            "MEMIT": "easyeditor.models.memit.memit_main",
            "AlphaEdit": "easyeditor.models.alphaedit.AlphaEdit_main",
            "WISE": "easyeditor.models.wise.utils",
        }.get(self.alg_name)
        if module_name is None:
            return
        module = importlib.import_module(module_name)
        args: Tuple[Any, ...] = ()
        if self.alg_name == "ROME":
            args = (hparams.context_template_length_params,)
        elif self.alg_name == "WISE":  # apply_wise_to_model's own length_params
            args = ([[5, 5], [10, 5]], next(model.parameters()).device)
        cpu = self.flavour == "pypi" and _is_cpu(hparams)
        module.CONTEXT_TEMPLATES_CACHE = None
        with torch.random.fork_rng(devices=[]), contextlib.redirect_stdout(io.StringIO()), (
            cpu_device_strings() if cpu else contextlib.nullcontext()
        ):
            torch.manual_seed(0)
            module.get_context_templates(model, tok, *args)

    def apply(
        self,
        model: Any,
        tok: Any,
        requests: Sequence[Dict[str, Any]],
        hparams: Any,
        copy: bool = False,
        return_orig_weights: bool = False,
        **kwargs: Any,
    ) -> Tuple[Any, Dict[str, Any]]:
        if self.alg_name == "WISE":
            if not self.loc_prompts:
                raise ValueError("WISE needs loc_prompts (unrelated text from a training set); set spec.loc_prompts")
            requests = [
                dict(r, loc_prompt=r.get("loc_prompt") or self.loc_prompts[(self._calls + i) % len(self.loc_prompts)])
                for i, r in enumerate(requests)
            ]
        edit_index = self._calls
        self._calls += len(requests)
        # Upstream normalises devices itself; PyPI writes f"cuda:{hparams.device}".
        pypi = self.flavour == "pypi"
        device_ctx = cpu_device_strings() if pypi and _is_cpu(hparams) else contextlib.nullcontext()
        tuples = tuple_block_outputs() if pypi else contextlib.nullcontext()
        output = io.StringIO()
        # easyeditor prints every step and draws empty tqdm bars (layer_stats) on each edit.
        quiet = contextlib.redirect_stdout(output) if self.quiet else contextlib.nullcontext()
        quiet_err = contextlib.redirect_stderr(output) if self.quiet else contextlib.nullcontext()
        # WISE/GRACE draw random values and masks per edit (GRACE's cold value init, WISE's
        # gradient mask): seeded by the edit's index, so a cell is reproducible and a resumed
        # cell exact.
        seeded = _seeded_edit(edit_index, model) if self.adapter_based else contextlib.nullcontext()
        try:
            with device_ctx, tuples, quiet, quiet_err, seeded:
                result = self._apply_fn(
                    model, tok, requests, hparams, copy=copy, return_orig_weights=False, keep_original_weight=False
                )
        except BaseException:
            if self.quiet:
                sys.stdout.write(output.getvalue()[-4000:])
            raise
        edited = result[0] if isinstance(result, tuple) else result
        if self.adapter_based:
            # WISE/GRACE return a wrapper; the adapter sits inside ``model`` itself,
            # which is what the next call must get again.
            edited = model
        return edited, {}

    def phase_seconds(self, model: Any) -> Dict[str, float]:
        return {}

    def checkpoint_report(
        self, model: Any, tok: Any, groups: Any, with_distances: bool = False, hparams: Any = None
    ) -> Dict[str, Any]:
        return {}

    def save_state(self, model: Any, directory: Union[str, Path]) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.adapter_based:
            from .adapter_checkpoints import save_grace_codebook, save_wise_state

            save = save_grace_codebook if self.alg_name == "GRACE" else save_wise_state
            save(model, self._adapter_layer(), self._calls, directory)
        if self.alg_name == "AlphaEdit":
            from safetensors.torch import save_file

            module = _alphaedit_module()
            cache_c = module.cache_c.detach().cpu().contiguous()
            save_file({"cache_c": cache_c}, str(directory / "alphaedit_cache_c.safetensors"))

    def load_state(self, model: Any, directory: Union[str, Path]) -> None:
        if self.adapter_based:
            from .adapter_checkpoints import load_grace_codebook, load_wise_state

            load = load_grace_codebook if self.alg_name == "GRACE" else load_wise_state
            self._calls = load(model, self._hparams, self._adapter_layer(), directory)
        if self.alg_name == "AlphaEdit":
            from safetensors.torch import load_file

            module = _alphaedit_module()
            path = Path(directory) / "alphaedit_cache_c.safetensors"
            if not path.is_file():
                raise FileNotFoundError(
                    f"no AlphaEdit cache in {directory} (checkpoints before safetensors are not read, "
                    "to never unpickle): delete the cell's work dir to restart it"
                )
            module.cache_c = load_file(str(path))["cache_c"]
            module.cache_c_new = True

    def _adapter_layer(self) -> str:
        if self._hparams is None:
            raise RuntimeError(f"{self.alg_name}'s checkpoint needs the run's hparams: call prepare first")
        from .adapter_checkpoints import adapter_layer_name

        return adapter_layer_name(self._hparams)

    # -- AlphaEdit (upstream) ---------------------------------------------------
    def _prepare_alphaedit(self, model: Any, tok: Any, hparams: Any) -> None:
        import torch

        from ..models.nmke.nullspace import null_space_projector

        module = _alphaedit_module()
        moments = key_moments(model, tok, hparams)
        P = torch.stack([null_space_projector(moments[layer], hparams.nullspace_threshold) for layer in hparams.layers])
        Path(hparams.P_loc).parent.mkdir(parents=True, exist_ok=True)
        torch.save(P, hparams.P_loc)
        module.P = P
        module.P_loaded = True
        # A fresh key cache; a resumed run loads its saved one afterwards (load_state).
        d = P.shape[-1]
        module.cache_c = torch.zeros((len(hparams.layers), d, d))
        module.cache_c_new = True


@contextlib.contextmanager
def _seeded_edit(edit_index: int, model: Any) -> Iterator[None]:
    """torch, numpy and ``random`` seeded with ``edit_index`` for one edit (WISE draws from all
    three); the caller's states come back."""
    import random

    import numpy as np

    from ..util.corpus import seeded_rng

    numpy_state, python_state = np.random.get_state(), random.getstate()
    try:
        with seeded_rng(edit_index, next(model.parameters()).device):
            np.random.seed(edit_index)
            random.seed(edit_index)
            yield
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)


def _alphaedit_module() -> types.ModuleType:
    import importlib

    return importlib.import_module("easyeditor.models.alphaedit.AlphaEdit_main")


def _is_cpu(hparams: Any) -> bool:
    device = getattr(hparams, "device", None)
    return isinstance(device, str) and device.strip().lower() == "cpu"


def _weight_name(module_or_param: str) -> str:
    return module_or_param if module_or_param.endswith((".weight", ".bias")) else module_or_param + ".weight"


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name))[-80:]


# ----------------------------------------------------------------------------------
# Covariance statistics in easyeditor's cache format
# ----------------------------------------------------------------------------------
def key_moments(
    model: Any, tok: Any, hparams: Any, layers: Optional[Sequence[int]] = None
) -> Dict[int, "torch.Tensor"]:
    """E[k kᵀ] of the rewrite modules' inputs over ``mom2_dataset`` (plugin cache, WikiText-2)."""
    from ..models.nmke.nullspace import key_second_moments

    rewrite = hparams.rewrite_module_tmp
    for suffix in (".weight", ".bias"):
        if rewrite.endswith(suffix):
            rewrite = rewrite[: -len(suffix)]
    stats_hparams = types.SimpleNamespace(
        model_name=str(hparams.model_name),
        mom2_dataset=str(hparams.mom2_dataset),
        mom2_n_samples=int(hparams.mom2_n_samples),
        mom2_max_length=STATS_WINDOW,
        rewrite_module_tmp=rewrite,
        layer_module_tmp=hparams.layer_module_tmp,
        stats_dir=None,  # the plugin's own cache, shared with NMKE
        mom2_dtype="float32",  # NMKE's files; write_easyeditor_stats casts to the baseline's own dtype
    )
    return key_second_moments(model, tok, stats_hparams, list(layers if layers is not None else hparams.layers))


def easyeditor_stats_path(model: Any, hparams: Any, layer: int, flavour: Optional[str]) -> Path:
    """Where easyeditor's ``layer_stats`` looks for the cached second moment of ``layer``."""
    name_or_path = model.config._name_or_path
    model_key = name_or_path.rsplit("/")[-1] if flavour == "upstream" else name_or_path.replace("/", "_")
    layer_name = hparams.rewrite_module_tmp.format(layer)
    size = "" if hparams.mom2_n_samples is None else f"_{hparams.mom2_n_samples}"
    # One string joined once, exactly as layer_stats does (mom2_dataset may be a path).
    return Path(hparams.stats_dir) / (
        f"{model_key}/{hparams.mom2_dataset}_stats/{layer_name}_{hparams.mom2_dtype}_mom2{size}.npz"
    )


def write_easyeditor_stats(model: Any, tok: Any, hparams: Any, flavour: Optional[str]) -> List[Path]:
    """Write easyeditor's covariance cache files for every edit layer (skips existing ones)."""
    import numpy as np

    paths = {layer: easyeditor_stats_path(model, hparams, layer, flavour) for layer in hparams.layers}
    missing = [layer for layer, path in paths.items() if not path.is_file()]
    if missing:
        moments = key_moments(model, tok, hparams, missing)
        for layer in missing:
            path = paths[layer]
            path.parent.mkdir(parents=True, exist_ok=True)
            mom2 = moments[layer].to(getattr(__import__("torch"), hparams.mom2_dtype)).numpy()
            # runningstats.SecondMoment's state: moment() = mom2 / count; the plugin stores
            # the mean already, so count is 1.  sample_size is what tally() checks.
            tmp = path.with_name(path.name + ".partial.npz")
            np.savez(
                tmp,
                **{
                    "mom2.constructor": np.array("easyeditor.util.runningstats.SecondMoment()"),
                    "mom2.count": np.array(1),
                    "mom2.mom2": mom2,
                    "sample_size": np.array(hparams.mom2_n_samples),
                },
            )
            tmp.rename(path)
    return list(paths.values())
