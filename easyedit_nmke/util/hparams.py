"""Shared YAML loading for the plugin's hyper-parameter dataclasses.

EasyEdit's own ``HyperParams`` base class only offers ``from_json`` / ``to_dict``;
each method defines its own ``from_hparams``.  Here the YAML loading and the
checks (malformed YAML, unknown keys, missing keys, wrong ``alg_name``) live in
one place so every method gives the same clear messages.
"""
from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from pathlib import Path
from typing import Any, Dict, Tuple, Type, TypeVar, Union

import yaml

from ..compat import easyeditor_base_hparams

# Subclass EasyEdit's base when it is importable, so isinstance checks there pass.
_Base = easyeditor_base_hparams()

if _Base is None:

    @dataclasses.dataclass
    class _Base:  # type: ignore[no-redef]
        """Stand-in for ``easyeditor.util.hparams.HyperParams`` when EasyEdit is absent."""

        @classmethod
        def from_json(cls, fpath: Union[str, Path]) -> Any:
            with open(fpath, "r") as f:
                return cls(**json.load(f))

        def to_dict(self) -> Dict[str, Any]:
            return dataclasses.asdict(self)


HyperParamsBase = _Base

T = TypeVar("T", bound="PluginHyperParams")


# A plain decimal number as YAML 1.2 reads it (PyYAML 1.1 leaves "5e-5" a string).
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


class HParamsError(ValueError):
    """An hparams file that cannot be used, with the reason."""


def read_hparams_yaml(hparams_name_or_path: Union[str, Path]) -> Tuple[Path, Dict[str, Any]]:
    """``(path, mapping)`` of an hparams YAML (or JSON, as upstream EasyEdit accepts).

    ``.yaml`` is appended, not substituted, when the name has no such suffix:
    ``hparams/NMKE/qwen2.5-7b`` names ``qwen2.5-7b.yaml``.
    """
    path = Path(hparams_name_or_path)
    if path.suffix not in (".yaml", ".yml", ".json"):
        path = Path(f"{path}.yaml")
    if not path.is_file():
        raise HParamsError(f"hparams file not found: {path}")
    try:
        with open(path, "r") as f:
            config = json.load(f) if path.suffix == ".json" else yaml.safe_load(f)
    except json.JSONDecodeError as exc:
        raise HParamsError(f"{path}: malformed JSON: {exc}") from exc
    except yaml.YAMLError as exc:
        raise HParamsError(f"{path}: malformed YAML: {exc}") from exc
    if not isinstance(config, dict):
        raise HParamsError(f"{path}: expected a mapping of hparams, got {type(config).__name__}")
    return path, config


def _checked_value(value: Any, annotation: Any, key: str, source: str) -> Any:
    """``value`` as the field's annotated type, or a clear error naming the key.

    YAML 1.1 (PyYAML) reads ``5e-5`` (no decimal point) as a string; such strings are
    accepted for float fields, as EasyEdit's YAMLs rely on them being numbers.  An int
    in a float field stays an int: the value (and the hparams' fingerprint that resumable
    runs compare) is what the file says.
    """

    def fail() -> HParamsError:
        shown = annotation.__name__ if isinstance(annotation, type) else str(annotation).replace("typing.", "")
        return HParamsError(f"{source}: {key} must be {shown}, got {value!r} ({type(value).__name__})")

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin is Union or isinstance(annotation, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return _checked_value(value, option, key, source)
            except HParamsError:
                continue
        raise fail()
    if origin in (list, typing.List):
        if not isinstance(value, (list, tuple)):
            raise fail()
        (item_type,) = args or (Any,)
        return [_checked_value(item, item_type, key, source) for item in value]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise fail()
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise fail()
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
            return float(value)
        raise fail()
    if annotation is str:
        if isinstance(value, str):
            return value
        raise fail()
    return value


@dataclasses.dataclass
class PluginHyperParams(HyperParamsBase):  # type: ignore[misc,valid-type]
    """Base for NMKE/MicroEdit hparams: YAML loading with strict key checking."""

    @classmethod
    def from_dict(cls: Type[T], config: Dict[str, Any], source: str = "<dict>") -> T:
        expected_alg = getattr(cls, "ALG_NAME", None)
        alg = config.get("alg_name")
        if expected_alg is not None and alg != expected_alg:
            raise HParamsError(
                f"{source}: alg_name is {alg!r}, but {cls.__name__} needs alg_name: {expected_alg}"
            )
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - set(fields))
        if unknown:
            raise HParamsError(
                f"{source}: unknown key(s) {unknown} for {cls.__name__}; allowed keys: {sorted(fields)}"
            )
        missing = sorted(
            name
            for name, f in fields.items()
            if name not in config
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
        )
        if missing:
            raise HParamsError(f"{source}: missing required key(s) {missing} for {cls.__name__}")
        types = typing.get_type_hints(cls)
        config = {key: _checked_value(value, types[key], key, source) for key, value in config.items()}
        hparams = cls(**config)
        hparams.validate()
        return hparams

    @classmethod
    def from_hparams(cls: Type[T], hparams_name_or_path: Union[str, Path]) -> T:
        path, config = read_hparams_yaml(hparams_name_or_path)
        return cls.from_dict(config, source=str(path))

    def validate(self) -> None:
        """Check value ranges; subclasses extend it."""

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self: T, **changes: Any) -> T:
        """A copy with some fields changed, validated like a loaded file."""
        config = self.to_dict()
        config.update(changes)
        return type(self).from_dict(config, source="<override>")
