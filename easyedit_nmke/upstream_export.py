"""Write NMKE and MicroEdit into an EasyEdit checkout, as an upstream pull request would add them.

The method folders (``easyedit_nmke/models/<method>``) already follow EasyEdit's
``easyeditor/models/<method>`` layout; what they import from the rest of the plugin
(edit requests, model parts, the text corpus, the hparams loader, the plugin's nethook)
goes to one support package, ``easyeditor/util/nmke_common``, so nothing in the
checkout imports ``easyedit_nmke``.  The checkout's registries get the methods the
way upstream registers its own: explicit imports in ``easyeditor/models/__init__.py``,
entries in ``ALG_DICT`` (``easyeditor/util/alg_dict.py``) and, for the batchable
methods, in ``BatchEditor.is_batchable_method`` (``easyeditor/editors/batch_editor.py``).
The hparams YAMLs go to ``hparams/<alg_name>/``, with the embedded models' names
replaced by the hub repositories they were quantised from.

Only ``from ...util`` / ``from ...compat`` import lines and ``easyedit_nmke.`` module
paths in text are rewritten; everything else is copied byte for byte.  Every change
is computed before anything is written, so an unrecognised checkout is refused
unchanged, and exporting twice gives the same files.  The result targets upstream
EasyEdit (GitHub main), whose ``BaseEditor`` restores weights only when
``sequential_edit`` is false; the 2023 PyPI release is the plugin's business.
"""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Set, Tuple

import yaml

from .methods import METHODS
from .registration import BATCHABLE_METHODS
from .util.model_loader import embedded_hub_id, is_embedded

__all__ = ["ExportError", "ExportPlan", "plan_export", "export_to_easyedit", "SUPPORT_PACKAGE"]

PACKAGE_ROOT = Path(__file__).resolve().parent
SUPPORT_PACKAGE = "nmke_common"  # easyeditor/util/<this>: helpers shared by the two method folders

# The support package's compat module.  In the plugin, ``easyedit_nmke.compat`` finds
# EasyEdit's HyperParams without importing easyeditor and adapts the returned weights to
# the PyPI release; inside upstream EasyEdit both are plain.
_UPSTREAM_COMPAT = '''"""EasyEdit hooks used by NMKE and MicroEdit (upstream EasyEdit)."""
from typing import Any, Dict


def easyeditor_base_hparams() -> type:
    """EasyEdit's ``HyperParams``, the base of every method's hparams dataclass."""
    from ..hparams import HyperParams

    return HyperParams


def weights_copy_for_easyeditor(weights_copy: Dict[str, Any], keep_original_weight: bool) -> Dict[str, Any]:
    """Upstream ``BaseEditor`` restores ``weights_copy`` unless ``sequential_edit`` is set: return it as is."""
    return weights_copy
'''

_SUPPORT_INIT = '''"""Helpers shared by NMKE (``easyeditor/models/nmke``) and MicroEdit (``easyeditor/models/microedit``)."""
'''


class ExportError(ValueError):
    """The target is not an EasyEdit checkout this exporter understands, with the reason."""


@dataclass
class ExportPlan:
    """Every file the export writes, relative to the checkout root, with its new content."""

    root: Path
    files: Dict[str, str] = field(default_factory=dict)
    modified: List[str] = field(default_factory=list)  # existing registry files that change

    def write(self) -> List[str]:
        """Write the files; return the paths whose content changed."""
        changed = []
        for rel, text in sorted(self.files.items()):
            path = self.root / rel
            if path.is_file() and path.read_text(encoding="utf-8") == text:
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            changed.append(rel)
        return changed


# --------------------------------------------------------------------------- sources


def _method_folders() -> Dict[str, Path]:
    """alg_name -> the plugin's method folder (``easyedit_nmke/models/<name>``)."""
    folders = {}
    for alg_name, spec in METHODS.items():
        module = spec.module  # "easyedit_nmke.models.nmke"
        folders[alg_name] = PACKAGE_ROOT.joinpath(*module.split(".")[1:])
    return folders


def _python_files(folder: Path) -> List[Path]:
    return sorted(p for p in folder.glob("*.py"))


def _support_modules(method_files: Iterable[Path]) -> List[str]:
    """Plugin modules (``util.<m>``, ``compat``) the method folders need, transitively."""
    needed: Set[str] = set()
    queue: List[Tuple[Path, str]] = [(p, "models") for p in method_files]
    while queue:
        path, where = queue.pop()
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            absolute = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                absolute = [node.module]
            if any(name.split(".")[0] == "easyedit_nmke" for name in absolute):
                raise ExportError(f"{path}: imports easyedit_nmke by name; use a relative import")
            if not isinstance(node, ast.ImportFrom):
                continue
            target = _plugin_import_target(node, where)
            if target is None:
                continue
            modules = [target] if target != "util" else [f"util.{a.name}" for a in node.names]
            for module in modules:
                known = module in needed
                needed.add(module)
                if known or module == "compat":  # compat is replaced, not copied
                    continue
                queue.append((PACKAGE_ROOT.joinpath(*module.split(".")).with_suffix(".py"), "util"))
    return sorted(needed)


def _plugin_import_target(node: ast.ImportFrom, where: str) -> Optional[str]:
    """The plugin module (``util``, ``util.x``, ``compat``) a relative import names, or None if local."""
    depth = {"models": 3, "util": 2}[where]  # levels that reach easyedit_nmke/
    if node.level == depth:
        return node.module or None
    if where == "util" and node.level == 1:
        return f"util.{node.module}" if node.module else "util"
    if node.level > depth:
        raise ExportError(f"relative import beyond the plugin package: level {node.level} {node.module!r}")
    return None


# --------------------------------------------------------------------------- rewriting

_FROM_LINE = re.compile(r"^(?P<indent>[ \t]*)from (?P<dots>\.+)(?P<module>[\w.]*) import ", re.MULTILINE)


def _rewrite_imports(text: str, where: str) -> str:
    """Point a copied module's plugin imports at ``easyeditor.util.<SUPPORT_PACKAGE>``."""

    def replace(match: "re.Match[str]") -> str:
        indent, dots, module = match["indent"], match["dots"], match["module"]
        level = len(dots)
        if where == "models" and level == 3:
            if module == "util":
                new = f"...util.{SUPPORT_PACKAGE}"
            elif module.startswith("util."):
                new = f"...util.{SUPPORT_PACKAGE}.{module[len('util.'):]}"
            elif module == "compat":
                new = f"...util.{SUPPORT_PACKAGE}.compat"
            else:
                raise ExportError(f"cannot place the plugin module {module!r} in EasyEdit")
        elif where == "util" and level == 2:
            if module != "compat":
                raise ExportError(f"cannot place the plugin module {module!r} in EasyEdit")
            new = ".compat"
        else:
            return match.group(0)
        return f"{indent}from {new} import "

    text = _FROM_LINE.sub(replace, text)
    # Module paths named in docstrings and strings (e.g. a trained SAE's metadata).
    text = text.replace("easyedit_nmke.models.", "easyeditor.models.")
    text = text.replace("easyedit_nmke.util.", f"easyeditor.util.{SUPPORT_PACKAGE}.")
    return text.replace("easyedit_nmke.compat", f"easyeditor.util.{SUPPORT_PACKAGE}.compat")


def _export_yaml(text: str, source: Path) -> str:
    """An hparams YAML for upstream: embedded model names become hub repositories."""
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ExportError(f"{source}: not valid YAML ({exc})") from None
    name = config.get("model_name") if isinstance(config, dict) else None
    if not isinstance(name, str) or not is_embedded(name):
        return text
    hub_id = embedded_hub_id(name)
    line = re.compile(r"^model_name:.*$", re.MULTILINE)
    if len(line.findall(text)) != 1:
        raise ExportError(f"{source}: expected one top-level 'model_name:' line")
    note = (
        f"# model_name: the plugin loads {name!r} from its GGUF wheel (Q4 weights dequantised to fp32);\n"
        f"# in EasyEdit it is the hub model the GGUF was made from.\n"
    )
    return line.sub(lambda _: note + f"model_name: {hub_id}", text)


# --------------------------------------------------------------------------- registries


def _models_init(text: str, exports: Sequence[Tuple[str, str, str]]) -> str:
    """``easyeditor/models/__init__.py`` importing each method's hparams class and apply function."""
    lines = [f"from .{folder} import {hparams}, {apply}" for folder, hparams, apply in exports]
    missing = [line for line in lines if line not in text.splitlines()]
    if not missing:
        return text
    return text.rstrip("\n") + "\n" + "\n".join(missing) + "\n"


def _alg_dict(text: str, exports: Sequence[Tuple[str, str, str]], alg_names: Sequence[str], path: str) -> str:
    imports = [f"from ..models.{folder} import {hparams}, {apply}" for folder, hparams, apply in exports]
    entries = [f'    "{alg}": {apply},' for alg, (_, _, apply) in zip(alg_names, exports)]
    lines = text.splitlines()
    new_imports = [line for line in imports if line not in lines]
    if new_imports:
        last = max((i for i, line in enumerate(lines) if line.startswith("from ..models.")), default=None)
        if last is None:
            raise ExportError(f"{path}: no 'from ..models.' import lines to add the methods' imports after")
        lines[last + 1 : last + 1] = new_imports
    text = "\n".join(lines) + "\n"
    match = re.search(r"^ALG_DICT\s*=\s*\{(?P<body>.*?)^\}", text, re.DOTALL | re.MULTILINE)
    if match is None:
        raise ExportError(f"{path}: no 'ALG_DICT = {{ ... }}' literal closed by a '}}' line")
    body = match["body"]
    new_entries = [e for e, alg in zip(entries, alg_names) if not re.search(rf"""["']{re.escape(alg)}["']\s*:""", body)]
    if not new_entries:
        return text
    stripped = body.rstrip()
    if stripped and not stripped.endswith((",", "{")):
        stripped += ","
    body = stripped + "\n" + "\n".join(new_entries) + "\n"
    return text[: match.start("body")] + body + text[match.end("body") :]


def _batch_editor(text: str, alg_names: Sequence[str], path: str) -> str:
    for alg in alg_names:
        member = re.sub(r"\W", "_", alg).upper()
        if re.search(rf"BatchEditor\.{member}\.value", text):
            continue
        members = list(re.finditer(r"^(?P<indent>[ \t]+)\w+ = (?P<quote>['\"])[^'\"]*['\"][ \t]*$", text, re.MULTILINE))
        chain = re.search(
            r"return alg_name == BatchEditor\.\w+\.value(?:[ \t]*\\\n[ \t]*or alg_name == BatchEditor\.\w+\.value)*",
            text,
        )
        if not members or chain is None:
            raise ExportError(
                f"{path}: expected the BatchEditor enum members and an 'is_batchable_method' "
                f"'return alg_name == BatchEditor.X.value \\ or ...' chain"
            )
        indent = members[-1]["indent"]
        or_indent = re.search(r"\\\n([ \t]*)or ", chain.group(0))
        continuation = or_indent.group(1) if or_indent else indent * 3
        text = (
            text[: chain.end()]
            + f" \\\n{continuation}or alg_name == BatchEditor.{member}.value"
            + text[chain.end() :]
        )
        last = members[-1]
        quote = last["quote"]
        text = text[: last.end()] + f"\n{indent}{member} = {quote}{alg}{quote}" + text[last.end() :]
    return text


# --------------------------------------------------------------------------- plan


def plan_export(root: Path, hparams_dir: Optional[Path] = None) -> ExportPlan:
    """Everything the export would write into the EasyEdit checkout at ``root``.

    Raises:
        ExportError: ``root`` is not an EasyEdit checkout (no ``easyeditor/models/__init__.py``,
            ``easyeditor/util/alg_dict.py``, ``easyeditor/editors/batch_editor.py``), its
            registries have an unexpected shape, or the hparams folder is missing.
    """
    root = Path(root)
    package = root / "easyeditor"
    registries = {
        "models": package / "models" / "__init__.py",
        "alg_dict": package / "util" / "alg_dict.py",
        "batch": package / "editors" / "batch_editor.py",
    }
    missing = [str(p.relative_to(root)) for p in registries.values() if not p.is_file()]
    if missing:
        raise ExportError(f"{root} is not an EasyEdit checkout: missing {', '.join(missing)}")
    hparams_dir = Path(hparams_dir) if hparams_dir is not None else PACKAGE_ROOT.parent / "hparams"

    plan = ExportPlan(root=root)
    exports: List[Tuple[str, str, str]] = []
    alg_names: List[str] = []
    method_files: List[Path] = []
    for alg_name, folder in _method_folders().items():
        spec = METHODS[alg_name]
        exports.append((folder.name, spec.hparams_class, spec.apply_function))
        alg_names.append(alg_name)
        for path in _python_files(folder):
            method_files.append(path)
            rel = f"easyeditor/models/{folder.name}/{path.name}"
            plan.files[rel] = _rewrite_imports(path.read_text(encoding="utf-8"), "models")
        yaml_dir = hparams_dir / alg_name
        if not yaml_dir.is_dir():
            raise ExportError(f"hparams folder {yaml_dir} not found (pass the plugin checkout's hparams/)")
        for path in sorted(yaml_dir.glob("*.yaml")):
            plan.files[f"hparams/{alg_name}/{path.name}"] = _export_yaml(path.read_text(encoding="utf-8"), path)

    support = f"easyeditor/util/{SUPPORT_PACKAGE}"
    plan.files[f"{support}/__init__.py"] = _SUPPORT_INIT
    for module in _support_modules(method_files):
        if module == "compat":
            plan.files[f"{support}/compat.py"] = _UPSTREAM_COMPAT
            continue
        source = PACKAGE_ROOT.joinpath(*module.split(".")).with_suffix(".py")
        plan.files[f"{support}/{module.split('.', 1)[1]}.py"] = _rewrite_imports(
            source.read_text(encoding="utf-8"), "util"
        )
    if f"{support}/compat.py" not in plan.files:  # util.hparams reaches it only via a relative import
        plan.files[f"{support}/compat.py"] = _UPSTREAM_COMPAT

    batchable = [alg for alg in alg_names if alg in BATCHABLE_METHODS]
    for key, path in registries.items():
        rel = str(path.relative_to(root))
        text = path.read_text(encoding="utf-8")
        if key == "models":
            new = _models_init(text, exports)
        elif key == "alg_dict":
            new = _alg_dict(text, exports, alg_names, rel)
        else:
            new = _batch_editor(text, batchable, rel)
        if new != text:
            plan.modified.append(rel)
        plan.files[rel] = new
    for rel, text in plan.files.items():
        if rel.endswith(".py"):
            try:
                ast.parse(text, filename=rel)
            except SyntaxError as exc:  # a registry with a shape the edits above got wrong
                raise ExportError(f"{rel}: the exported file would not parse ({exc.msg}, line {exc.lineno})") from None
    return plan


def export_to_easyedit(root: Path, hparams_dir: Optional[Path] = None) -> List[str]:
    """Add NMKE and MicroEdit to the EasyEdit checkout at ``root``; return the files written.

    Idempotent: a second export writes nothing.  See :func:`plan_export` for the errors.
    """
    return plan_export(root, hparams_dir).write()
