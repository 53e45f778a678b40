"""The plugin's editing methods, by ``alg_name``: hparams class, apply function, lifelong state.

One table, read by the EasyEdit registration and by the runner, so a method is
declared once.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Type, Union

from .util.requests import normalise_request

if TYPE_CHECKING:  # importing torch here would slow down `import easyedit_nmke`
    from torch import nn

    from .util.hparams import PluginHyperParams


@dataclass(frozen=True)
class MethodSpec:
    alg_name: str
    module: str  # import path of the method folder
    hparams_class: str
    apply_function: str
    # Optional function(model, tok, groups, with_distances, hparams) -> dict of extra
    # per-checkpoint figures, stored in each checkpoint row under ``report_key``.
    report_function: Optional[str] = None
    report_key: Optional[str] = None

    def __post_init__(self) -> None:
        if (self.report_function is None) != (self.report_key is None):
            raise ValueError(f"{self.alg_name}: report_function and report_key are set together or not at all")

    def load(self) -> ModuleType:
        return importlib.import_module(self.module)

    @property
    def hparams_cls(self) -> "Type[PluginHyperParams]":
        return getattr(self.load(), self.hparams_class)

    @property
    def apply(self) -> Callable[..., Any]:
        return getattr(self.load(), self.apply_function)

    def edited_parameters(self, hparams: Any) -> List[str]:
        return self.load().edited_parameter_names(hparams)

    def save_state(self, model: "nn.Module", directory: Union[str, Path]) -> None:
        self.load().save_method_state(model, directory)

    def prepare(self, model: "nn.Module", tok: Any, hparams: Any) -> None:
        """One-off setup (statistics, caches) so that edit timings exclude it."""
        self.load().prepare_method(model, tok, hparams)

    def check_request(self, request: Mapping[str, Any]) -> None:
        """Raise ``RequestError`` if ``apply`` would refuse this request (subject, target, template)."""
        normalise_request(request)

    def phase_seconds(self, model: "nn.Module") -> Dict[str, float]:
        """Cumulative seconds per editing phase (z, attribution, keys, solve, ...)."""
        return self.load().phase_seconds(model)

    def load_state(self, model: "nn.Module", directory: Union[str, Path]) -> None:
        self.load().load_method_state(model, directory)

    def checkpoint_report(
        self,
        model: "nn.Module",
        tok: Any,
        groups: Dict[str, List[Any]],
        with_distances: bool = False,
        hparams: Any = None,
    ) -> Dict[str, Any]:
        """Method-specific figures at a checkpoint (MicroEdit: share of inputs routed through
        the SAE; NMKE: how much of each layer's null space earlier edits occupy)."""
        if self.report_function is None:
            return {}
        report = getattr(self.load(), self.report_function)
        return report(model, tok, groups, with_distances=with_distances, hparams=hparams)


METHODS: Dict[str, MethodSpec] = {
    "NMKE": MethodSpec(
        "NMKE",
        "easyedit_nmke.models.nmke",
        "NMKEHyperParams",
        "apply_nmke_to_model",
        report_function="null_space_report",
        report_key="null_space",
    ),
    "MicroEdit": MethodSpec(
        "MicroEdit",
        "easyedit_nmke.models.microedit",
        "MicroEditHyperParams",
        "apply_microedit_to_model",
        report_function="routing_report",
        report_key="routing",
    ),
}


def method_spec(alg_name: str) -> MethodSpec:
    try:
        return METHODS[alg_name]
    except KeyError:
        raise ValueError(f"unknown alg_name {alg_name!r}; this plugin provides {sorted(METHODS)}") from None


def load_hparams(path: Union[str, Path], overrides: Optional[Dict[str, Any]] = None) -> "PluginHyperParams":
    """Read ``alg_name`` from a YAML and build that method's hparams, with overrides applied."""
    from .util.hparams import HParamsError, read_hparams_yaml

    path, raw = read_hparams_yaml(path)
    if "alg_name" not in raw:
        raise HParamsError(f"{path}: needs an alg_name key")
    spec = method_spec(raw["alg_name"])
    hparams = spec.hparams_cls.from_dict(raw, source=str(path))
    return hparams.replace(**overrides) if overrides else hparams
