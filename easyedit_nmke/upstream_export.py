"""Write NMKE and MicroEdit into an EasyEdit checkout, as an upstream pull request would add them.

The method folders (``easyedit_nmke/models/<method>``) already follow EasyEdit's
``easyeditor/models/<method>`` layout; what they import from the rest of the plugin
(edit requests, model parts, the text corpus, the hparams loader, the plugin's hooks,
environment settings) goes to one support package, ``easyeditor/util/nmke_common``, so
nothing in the checkout imports ``easyedit_nmke``.  The checkout's registries get the
methods: ``easyeditor/models/__init__.py`` imports each method's hparams class and apply
function (by name: a star import would let the two folders' same-named helpers shadow
each other), ``ALG_DICT`` (``easyeditor/util/alg_dict.py``) gets their entries,
``BatchEditor.is_batchable_method`` (``easyeditor/editors/batch_editor.py``) the batchable
ones, and ``requirements.txt`` (when there is one) SAE-Lens.  The hparams YAMLs for hub
models go to ``hparams/<alg_name>/``; those of the plugin's embedded GGUF models are left
out (upstream ``BaseEditor`` picks a model class from the model name and knows neither).

Import lines that reach the plugin and ``easyedit_nmke.`` module paths in text are
rewritten; the rest is copied unchanged.  Every relative import of the result is
checked to resolve inside the checkout, every change is computed before anything is
written (so an unrecognised checkout is refused unchanged), and exporting twice
gives the same files.  The result targets upstream EasyEdit (GitHub main), whose
``BaseEditor`` writes ``weights_copy`` back unless ``sequential_edit`` is set.
"""
from __future__ import annotations

import ast
import io
import re
import tokenize
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Set, Tuple

import yaml

from .methods import METHODS
from .registration import BATCHABLE_METHODS
from .util.model_loader import is_embedded

__all__ = ["ExportError", "ExportPlan", "plan_export", "export_to_easyedit", "SUPPORT_PACKAGE"]

PACKAGE_ROOT = Path(__file__).resolve().parent
SUPPORT_PACKAGE = "nmke_common"  # easyeditor/util/<this>: helpers shared by the two method folders
SAE_LENS_REQUIREMENT = "sae-lens>=6"  # MicroEdit's one dependency EasyEdit does not have

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
    """The export cannot be done as asked, with the reason; nothing has been written."""


@dataclass
class ExportPlan:
    """Every file the export writes or removes, relative to the checkout root."""

    root: Path
    files: Dict[str, str] = field(default_factory=dict)  # new content, "\n" line endings
    newlines: Dict[str, str] = field(default_factory=dict)  # files kept with another line ending
    modified: List[str] = field(default_factory=list)  # existing checkout files that change
    removed: List[str] = field(default_factory=list)  # files of an earlier export no longer exported

    def _bytes(self, rel: str) -> bytes:
        return self.files[rel].replace("\n", self.newlines.get(rel, "\n")).encode("utf-8")

    def changes(self) -> List[str]:
        """The paths :meth:`write` would write or remove (content differs or file absent)."""
        written = [
            rel
            for rel in sorted(self.files)
            if not ((self.root / rel).is_file() and (self.root / rel).read_bytes() == self._bytes(rel))
        ]
        return written + list(self.removed)

    def write(self) -> List[str]:
        """Write and remove the files; return the paths that changed."""
        changed = self.changes()
        for rel in changed:
            path = self.root / rel
            if rel in self.removed:
                path.unlink()
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(self._bytes(rel))
        return changed


# --------------------------------------------------------------------------- sources


def _method_folders() -> Dict[str, Path]:
    """alg_name -> the plugin's method folder (``easyedit_nmke/models/<name>``)."""
    return {alg: PACKAGE_ROOT.joinpath(*spec.module.split(".")[1:]) for alg, spec in METHODS.items()}


def _plugin_module_path(module: str) -> Path:
    path = PACKAGE_ROOT.joinpath(*module.split(".")).with_suffix(".py")
    if not path.is_file():
        raise ExportError(f"easyedit_nmke.{module} is imported as a module but is not one ({path} missing)")
    return path


def _plugin_import_target(node: ast.ImportFrom, where: str, path: Path) -> Optional[str]:
    """The plugin module (``util``, ``util.x``, ``compat``) a relative import names, or None if local."""
    depth = {"models": 3, "util": 2}[where]  # levels that reach easyedit_nmke/
    if node.level > depth:
        raise ExportError(f"{path}: relative import beyond the plugin package (level {node.level})")
    if node.level == depth:
        if not node.module:
            raise ExportError(f"{path}: 'from {'.' * node.level} import ...' names no plugin module")
        return node.module
    if where == "util" and node.level == 1:
        return f"util.{node.module}" if node.module else "util"
    return None


def _support_modules(method_files: Iterable[Path]) -> List[str]:
    """Plugin modules (``util.<m>``, ``compat``) the method folders need, transitively."""
    needed: Set[str] = set()
    queue: List[Tuple[Path, str]] = [(p, "models") for p in method_files]
    while queue:
        path, where = queue.pop()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            absolute = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                absolute = [node.module]
            if any(name.split(".")[0] == "easyedit_nmke" for name in absolute):
                raise ExportError(f"{path}: imports easyedit_nmke by name; use a relative import")
            if not isinstance(node, ast.ImportFrom):
                continue
            target = _plugin_import_target(node, where, path)
            if target is None:
                continue
            modules = [target] if target != "util" else [f"util.{a.name}" for a in node.names]
            for module in modules:
                if module in needed:
                    continue
                needed.add(module)
                if module != "compat":  # compat is replaced, not copied
                    queue.append((_plugin_module_path(module), "util"))
    return sorted(needed)


# --------------------------------------------------------------------------- rewriting


def _line_offsets(text: str) -> List[int]:
    offsets = [0]
    for line in text.splitlines(keepends=True):
        offsets.append(offsets[-1] + len(line))
    return offsets


def _rewrite_imports(text: str, where: str, path: Path) -> str:
    """Point a copied module's plugin imports at ``easyeditor.util.<SUPPORT_PACKAGE>``.

    Works on the tokens, so continuation lines, ``;`` and one-line ``if`` bodies are
    handled like any other ``from ... import``.
    """
    tokens = list(tokenize.generate_tokens(io.StringIO(text).readline))
    offsets = _line_offsets(text)

    def at(position: Tuple[int, int]) -> int:
        return offsets[position[0] - 1] + position[1]

    edits: List[Tuple[int, int, str]] = []
    for i, token in enumerate(tokens):
        if token.type != tokenize.NAME or token.string != "from":
            continue
        j, dots = i + 1, 0
        while j < len(tokens) and tokens[j].type == tokenize.OP and set(tokens[j].string) == {"."}:
            dots += len(tokens[j].string)
            j += 1
        if dots == 0:
            continue
        names = []
        k = j
        while k < len(tokens) and not (tokens[k].type == tokenize.NAME and tokens[k].string == "import"):
            if tokens[k].type not in (tokenize.NAME, tokenize.OP, tokenize.NL) or (
                tokens[k].type == tokenize.OP and tokens[k].string != "."
            ):
                break
            if tokens[k].type == tokenize.NAME:
                names.append(tokens[k].string)
            k += 1
        module = ".".join(names)
        new = _rewritten_module(dots, module, where, path)
        if new is None:
            continue
        last = tokens[k - 1] if k > j else tokens[j - 1]  # the module's last name, or the last dot
        edits.append((at(tokens[i + 1].start), at(last.end), new))
    for start, end, new in reversed(edits):
        text = text[:start] + new + text[end:]
    # Module paths named in docstrings and strings (e.g. a trained SAE's metadata).
    text = text.replace("easyedit_nmke.models.", "easyeditor.models.")
    text = text.replace("easyedit_nmke.util.", f"easyeditor.util.{SUPPORT_PACKAGE}.")
    return text.replace("easyedit_nmke.compat", f"easyeditor.util.{SUPPORT_PACKAGE}.compat")


def _rewritten_module(level: int, module: str, where: str, path: Path) -> Optional[str]:
    """The new ``from`` target of a plugin import, or None for a local one."""
    if where == "models" and level == 3:
        if module == "util" or module.startswith("util."):
            return f"...util.{SUPPORT_PACKAGE}{module[len('util'):]}"
        if module == "compat":
            return f"...util.{SUPPORT_PACKAGE}.compat"
        raise ExportError(f"{path}: cannot place the plugin module {module or '(package root)'!r} in EasyEdit")
    if where == "util" and level == 2:
        if module != "compat":
            raise ExportError(f"{path}: cannot place the plugin module {module or '(package root)'!r} in EasyEdit")
        return ".compat"
    return None


def _check_exported_modules(plan_files: Dict[str, str], root: Path) -> None:
    """Every exported module parses, and each relative import names a module of the checkout or of the export."""

    def is_module(folder: Path) -> bool:
        rels = (f"{folder.as_posix()}.py", f"{folder.as_posix()}/__init__.py")
        return any(rel in plan_files or (root / rel).is_file() for rel in rels)

    for rel, text in plan_files.items():
        if not rel.endswith(".py"):
            continue
        try:
            tree = ast.parse(text, filename=rel)
        except SyntaxError as exc:  # a registry with a shape the edits got wrong
            raise ExportError(f"{rel}: the exported file would not parse ({exc.msg}, line {exc.lineno})") from None
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom) or node.level == 0:
                continue
            base = Path(rel).parent
            for _ in range(node.level - 1):
                base = base.parent
            statement = f"'from {'.' * node.level}{node.module or ''} import ...'"
            if not base.parts or base.parts[0] != "easyeditor":
                raise ExportError(f"{rel}: {statement} leaves the easyeditor package")
            if node.module:
                targets = [base.joinpath(*node.module.split("."))]
            else:  # from . import a, b: submodules
                targets = [base / a.name for a in node.names]
            for target in targets:
                if not is_module(target):
                    raise ExportError(f"{rel}: {statement} does not resolve inside the checkout ({target})")


def _export_yaml(text: str, source: Path) -> Optional[str]:
    """An hparams YAML for upstream, or None for one naming an embedded model (left out)."""
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ExportError(f"{source}: not valid YAML ({exc})") from None
    name = config.get("model_name") if isinstance(config, dict) else None
    if isinstance(name, str) and is_embedded(name):
        return None
    return text


# --------------------------------------------------------------------------- registries


def _models_init(text: str, exports: Sequence[Tuple[str, str, str]]) -> str:
    """``easyeditor/models/__init__.py`` importing each method's hparams class and apply function."""
    lines = [f"from .{folder} import {hparams}, {apply}" for folder, hparams, apply in exports]
    missing = [line for line in lines if line not in text.splitlines()]
    if not missing:
        return text
    return text.rstrip("\n") + "\n" + "\n".join(missing) + "\n"


def _alg_dict(text: str, exports: Sequence[Tuple[str, str, str]], alg_names: Sequence[str], path: str) -> str:
    """``alg_dict.py`` importing the apply functions and listing them in the ``ALG_DICT`` literal."""
    try:
        tree = ast.parse(text, filename=path)
    except SyntaxError as exc:
        raise ExportError(f"{path} does not parse ({exc.msg}, line {exc.lineno})") from None
    imports = [f"from ..models.{folder} import {hparams}, {apply}" for folder, hparams, apply in exports]
    new_imports = [line for line in imports if line not in text.splitlines()]
    if new_imports:
        model_imports = [
            n for n in tree.body if isinstance(n, ast.ImportFrom) and n.level == 2 and (n.module or "").startswith("models.")
        ]
        if not model_imports:
            raise ExportError(f"{path}: no 'from ..models.<method> import ...' lines to add the methods' imports after")
        end = _line_offsets(text)[model_imports[-1].end_lineno]
        text = text[:end] + "".join(line + "\n" for line in new_imports) + text[end:]
        tree = ast.parse(text, filename=path)
    literal = next(
        (
            n.value
            for n in tree.body
            if isinstance(n, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "ALG_DICT" for t in n.targets)
            and isinstance(n.value, ast.Dict)
        ),
        None,
    )
    if literal is None:
        raise ExportError(f"{path}: no 'ALG_DICT = {{ ... }}' dict literal to add the methods to")
    present = {k.value for k in literal.keys if isinstance(k, ast.Constant)}
    entries = [f'"{alg}": {apply},' for alg, (_, _, apply) in zip(alg_names, exports) if alg not in present]
    if not entries:
        return text
    offsets = _line_offsets(text)
    close = offsets[literal.end_lineno - 1] + literal.end_col_offset - 1  # the closing brace
    if literal.values:
        last = literal.values[-1]
        after_last = offsets[last.end_lineno - 1] + last.end_col_offset
        between = re.sub(r"#[^\n]*", "", text[after_last:close])
        first_key = literal.keys[0]
        indent = " " * first_key.col_offset if first_key is not None else "    "
    else:
        after_last, between, indent = close, ",", "    "
    brace_line_start = offsets[literal.end_lineno - 1]
    brace_alone = text[brace_line_start:close].strip() == ""
    block = "".join(f"{indent}{entry}\n" for entry in entries)
    if brace_alone:
        text = text[:brace_line_start] + block + text[brace_line_start:]
    else:
        text = text[:close] + "\n" + block + text[close:]
    if "," not in between:
        text = text[:after_last] + "," + text[after_last:]
    return text


def _batch_editor(text: str, alg_names: Sequence[str], path: str) -> str:
    """``batch_editor.py`` with an enum member and an ``is_batchable_method`` clause per method."""
    for alg in alg_names:
        member = re.sub(r"\W", "_", alg).upper()
        if re.search(rf"BatchEditor\.{member}\.value", text):
            continue
        members = list(
            re.finditer(r"^(?P<indent>[ \t]+)\w+ = (?P<quote>['\"])[^'\"]*['\"][ \t]*(#[^\n]*)?$", text, re.MULTILINE)
        )
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
        end = text.index("\n", last.start()) if "\n" in text[last.start() :] else len(text)
        text = text[:end] + f"\n{indent}{member} = {quote}{alg}{quote}" + text[end:]
    return text


def _requirements(text: str) -> str:
    if re.search(r"^\s*sae[-_]lens\b", text, re.MULTILINE | re.IGNORECASE):
        return text
    return text.rstrip("\n") + "\n" + SAE_LENS_REQUIREMENT + "\n"


# --------------------------------------------------------------------------- plan


def _read_keeping_newlines(path: Path) -> Tuple[str, str]:
    """(text with "\\n" line endings, the file's own line ending)."""
    raw = path.read_bytes().decode("utf-8")
    newline = "\r\n" if "\r\n" in raw else "\n"
    return raw.replace("\r\n", "\n"), newline


def plan_export(root: Path, hparams_dir: Optional[Path] = None) -> ExportPlan:
    """Everything the export would write into (or remove from) the EasyEdit checkout at ``root``.

    Raises:
        ExportError: ``root`` is not an EasyEdit checkout (no ``easyeditor/models/__init__.py``,
            ``easyeditor/util/alg_dict.py``, ``easyeditor/editors/batch_editor.py``), its
            registries have an unexpected shape, a target path is blocked by a file, or the
            hparams folder is missing.
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
    hparams_dir = Path(hparams_dir) if hparams_dir is not None else PACKAGE_ROOT / "hparams"

    plan = ExportPlan(root=root)
    exports: List[Tuple[str, str, str]] = []
    alg_names: List[str] = []
    method_files: List[Path] = []
    owned_folders = [f"easyeditor/util/{SUPPORT_PACKAGE}"]
    for alg_name, folder in _method_folders().items():
        spec = METHODS[alg_name]
        exports.append((folder.name, spec.hparams_class, spec.apply_function))
        alg_names.append(alg_name)
        owned_folders.append(f"easyeditor/models/{folder.name}")
        for path in sorted(folder.glob("*.py")):
            method_files.append(path)
            plan.files[f"easyeditor/models/{folder.name}/{path.name}"] = _rewrite_imports(
                path.read_text(encoding="utf-8"), "models", path
            )
        yaml_dir = hparams_dir / alg_name
        if not yaml_dir.is_dir():
            raise ExportError(f"hparams folder {yaml_dir} not found (--hparams-dir names the plugin's hparams/)")
        for path in sorted(yaml_dir.glob("*.yaml")):
            text = _export_yaml(path.read_text(encoding="utf-8"), path)
            if text is not None:
                plan.files[f"hparams/{alg_name}/{path.name}"] = text

    support = f"easyeditor/util/{SUPPORT_PACKAGE}"
    plan.files[f"{support}/__init__.py"] = _SUPPORT_INIT
    plan.files[f"{support}/compat.py"] = _UPSTREAM_COMPAT
    for module in _support_modules(method_files):
        if module != "compat":
            source = _plugin_module_path(module)
            plan.files[f"{support}/{module.split('.', 1)[1]}.py"] = _rewrite_imports(
                source.read_text(encoding="utf-8"), "util", source
            )

    batchable = [alg for alg in alg_names if alg in BATCHABLE_METHODS]
    edits = dict(registries)
    if (root / "requirements.txt").is_file():
        edits["requirements"] = root / "requirements.txt"
    for key, path in edits.items():
        rel = path.relative_to(root).as_posix()
        text, newline = _read_keeping_newlines(path)
        if key == "models":
            new = _models_init(text, exports)
        elif key == "alg_dict":
            new = _alg_dict(text, exports, alg_names, rel)
        elif key == "batch":
            new = _batch_editor(text, batchable, rel)
        else:
            new = _requirements(text)
        if new != text:
            plan.modified.append(rel)
        plan.files[rel] = new
        plan.newlines[rel] = newline

    _check_exported_modules(plan.files, root)
    for rel in plan.files:  # a file where a folder must go would fail half-way through writing
        for parent in Path(rel).parents:
            if parent != Path(".") and (root / parent).exists() and not (root / parent).is_dir():
                raise ExportError(f"{root / parent} is a file, but the export writes {rel} inside it")
    for folder in owned_folders:  # modules an earlier export wrote that no longer exist
        for path in sorted((root / folder).glob("*.py")) if (root / folder).is_dir() else []:
            rel = path.relative_to(root).as_posix()
            if rel not in plan.files:
                plan.removed.append(rel)
    return plan


def export_to_easyedit(root: Path, hparams_dir: Optional[Path] = None) -> List[str]:
    """Add NMKE and MicroEdit to the EasyEdit checkout at ``root``; return the files changed.

    Idempotent: a second export changes nothing.  See :func:`plan_export` for the errors.
    """
    return plan_export(root, hparams_dir).write()
