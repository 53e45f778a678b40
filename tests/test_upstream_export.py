"""``easyedit-nmke export-upstream``: NMKE and MicroEdit written into an EasyEdit checkout.

The exported tree must work inside EasyEdit with the plugin out of reach: the edits
below run in a subprocess where ``import easyedit_nmke`` fails.  The installed PyPI
``easyeditor`` serves as the checkout (copied to a temporary folder); set
``EASYEDIT_UPSTREAM_CHECKOUT`` to an upstream EasyEdit clone to run the same test on it.
"""
from __future__ import annotations

import ast
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict

import pytest
import yaml

from easyedit_nmke.cli import main as cli_main
from easyedit_nmke.upstream_export import SUPPORT_PACKAGE, ExportError, export_to_easyedit, plan_export

REPO = Path(__file__).resolve().parents[1]
SHIMS = REPO / "easyedit_nmke" / "compat" / "easyeditor_compat.py"


def _installed_easyeditor() -> Path:
    spec = importlib.util.find_spec("easyeditor")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("easyeditor is not installed")
    return Path(list(spec.submodule_search_locations)[0])


def _copy_tree(package: Path, root: Path) -> Path:
    shutil.copytree(package, root / "easyeditor", ignore=shutil.ignore_patterns("__pycache__"))
    return root


@pytest.fixture
def easyedit_checkout(tmp_path) -> Path:
    """A copy of the installed (PyPI) easyeditor package as a checkout root."""
    return _copy_tree(_installed_easyeditor(), tmp_path / "EasyEdit")


def _snapshot(root: Path) -> Dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------
# The written tree
# ----------------------------------------------------------------------------------
def test_every_import_of_the_exported_code_resolves_inside_the_checkout(easyedit_checkout):
    written = export_to_easyedit(easyedit_checkout)
    exported = [r for r in written if r.endswith(".py") and ("/nmke" in r or "/microedit" in r)]
    assert any(r.startswith("easyeditor/models/nmke/") for r in exported)
    assert any(r.startswith("easyeditor/models/microedit/") for r in exported)
    assert any(r.startswith(f"easyeditor/util/{SUPPORT_PACKAGE}/") for r in exported)
    for rel in exported:
        path = easyedit_checkout / rel
        package = path.parent
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                assert all(not a.name.startswith("easyedit_nmke") for a in node.names), rel
            if not isinstance(node, ast.ImportFrom):
                continue
            assert not (node.module or "").startswith("easyedit_nmke"), rel
            if node.level == 0:
                continue
            base = package
            for _ in range(node.level - 1):
                base = base.parent
            assert easyedit_checkout in base.parents, (rel, node.module)
            target = base.joinpath(*node.module.split(".")) if node.module else base
            names = [a.name for a in node.names] if node.module is None else [None]
            for name in names:
                module = target / name if name else target
                assert module.with_suffix(".py").is_file() or (module / "__init__.py").is_file(), (
                    f"{rel}: 'from {'.' * node.level}{node.module or ''} import ...' does not resolve"
                )
        assert "easyedit_nmke." not in path.read_text(), rel


def test_export_registers_the_methods_in_the_registry_files(easyedit_checkout):
    export_to_easyedit(easyedit_checkout)
    package = easyedit_checkout / "easyeditor"
    alg_dict = (package / "util" / "alg_dict.py").read_text()
    assert "from ..models.nmke import NMKEHyperParams, apply_nmke_to_model" in alg_dict
    assert '"NMKE": apply_nmke_to_model,' in alg_dict and '"MicroEdit": apply_microedit_to_model,' in alg_dict
    models_init = (package / "models" / "__init__.py").read_text()
    assert "from .microedit import MicroEditHyperParams, apply_microedit_to_model" in models_init
    batch = (package / "editors" / "batch_editor.py").read_text()
    assert "or alg_name == BatchEditor.NMKE.value" in batch and "MicroEdit" not in batch


def test_exported_hparams_are_the_hub_model_ones(easyedit_checkout):
    export_to_easyedit(easyedit_checkout)
    for method in ("NMKE", "MicroEdit"):
        exported = sorted(p.name for p in (easyedit_checkout / "hparams" / method).glob("*.yaml"))
        assert exported == ["gpt2-xl.yaml", "llama3-8b.yaml", "mistral-7b.yaml", "qwen2.5-7b.yaml"]
        for name in exported:  # copied unchanged
            assert (easyedit_checkout / "hparams" / method / name).read_bytes() == (REPO / "hparams" / method / name).read_bytes()
    # SmolLM2 / Gemma-3 name the plugin's embedded GGUF models, which upstream BaseEditor cannot load by name
    assert not (easyedit_checkout / "hparams" / "NMKE" / "smollm2-135m.yaml").exists()


def test_requirements_get_sae_lens_once(easyedit_checkout):
    requirements = easyedit_checkout / "requirements.txt"
    requirements.write_text("torch\nhigher\n")
    export_to_easyedit(easyedit_checkout)
    assert requirements.read_text() == "torch\nhigher\nsae-lens>=6\n"
    export_to_easyedit(easyedit_checkout)
    assert requirements.read_text().count("sae-lens") == 1


def test_export_is_idempotent(easyedit_checkout):
    first = export_to_easyedit(easyedit_checkout)
    snapshot = _snapshot(easyedit_checkout)
    assert first
    assert export_to_easyedit(easyedit_checkout) == []
    assert _snapshot(easyedit_checkout) == snapshot


def test_not_an_easyedit_checkout_is_refused_unchanged(tmp_path):
    (tmp_path / "easyeditor" / "models").mkdir(parents=True)
    (tmp_path / "easyeditor" / "models" / "__init__.py").write_text("")
    before = _snapshot(tmp_path)
    with pytest.raises(ExportError, match=r"not an EasyEdit checkout: missing easyeditor/util/alg_dict.py"):
        export_to_easyedit(tmp_path)
    assert _snapshot(tmp_path) == before


def test_unrecognised_registry_is_refused_before_anything_is_written(easyedit_checkout):
    alg_dict = easyedit_checkout / "easyeditor" / "util" / "alg_dict.py"
    alg_dict.write_text(alg_dict.read_text().replace("ALG_DICT = {", "ALG_DICT = dict({").replace("\n}\n", "\n})\n", 1))
    before = _snapshot(easyedit_checkout)
    with pytest.raises(ExportError, match=r"alg_dict.py: no 'ALG_DICT = \{ \.\.\. \}' dict literal"):
        plan_export(easyedit_checkout)
    with pytest.raises(ExportError):
        export_to_easyedit(easyedit_checkout)
    assert _snapshot(easyedit_checkout) == before


def test_cli_export_upstream(easyedit_checkout, capsys):
    before = _snapshot(easyedit_checkout)
    assert cli_main(["export-upstream", "--dry-run", str(easyedit_checkout)]) == 0
    assert "modified easyeditor/util/alg_dict.py" in capsys.readouterr().out
    assert _snapshot(easyedit_checkout) == before  # a dry run writes nothing
    assert cli_main(["export-upstream", str(easyedit_checkout)]) == 0
    out = capsys.readouterr().out
    assert "modified easyeditor/util/alg_dict.py" in out
    assert cli_main(["export-upstream", str(easyedit_checkout)]) == 0
    assert "(already exported)" in capsys.readouterr().out
    (easyedit_checkout / "easyeditor" / "models" / "nmke" / "old_module.py").write_text("x = 1\n")
    assert cli_main(["export-upstream", str(easyedit_checkout)]) == 0
    assert "removed  easyeditor/models/nmke/old_module.py\n1 of " in capsys.readouterr().out
    with pytest.raises(SystemExit, match="export-upstream: .* is not an EasyEdit checkout"):
        cli_main(["export-upstream", str(easyedit_checkout / "easyeditor")])


@pytest.mark.parametrize(
    "variant",
    ["indented closing brace", "commented-out entry", "comment after the last entry", "empty dict", "CRLF"],
)
def test_alg_dict_shapes(easyedit_checkout, variant):
    alg_dict = easyedit_checkout / "easyeditor" / "util" / "alg_dict.py"
    text = alg_dict.read_text()
    body_start = text.index("ALG_DICT = {")
    body_end = text.index("\n}\n", body_start)
    if variant == "indented closing brace":
        text = text[:body_end] + "\n    }\n" + text[body_end + 3 :]
    elif variant == "commented-out entry":
        text = text[:body_end] + '\n    # "NMKE": apply_nmke_to_model,' + text[body_end:]
    elif variant == "comment after the last entry":
        text = text[:body_end].rstrip().rstrip(",") + "  # the last one" + text[body_end:]
    elif variant == "empty dict":
        text = text[:body_start] + "ALG_DICT = {\n}\n" + text[body_end + 3 :]
    alg_dict.write_bytes(text.replace("\n", "\r\n").encode() if variant == "CRLF" else text.encode())
    export_to_easyedit(easyedit_checkout)
    raw = alg_dict.read_bytes().decode()
    if variant == "CRLF":
        assert raw.count("\n") == raw.count("\r\n")  # the file keeps its line endings
    tree = ast.parse(raw)
    (literal,) = [
        n.value for n in tree.body if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "ALG_DICT"
    ]
    keys = [k.value for k in literal.keys]
    assert keys.count("NMKE") == 1 and keys.count("MicroEdit") == 1, keys
    assert [ast.unparse(v) for v in literal.values][-2:] == ["apply_nmke_to_model", "apply_microedit_to_model"]
    assert export_to_easyedit(easyedit_checkout) == []


def test_import_rewriting_handles_every_spelling(tmp_path):
    from easyedit_nmke.upstream_export import _rewrite_imports

    source = (
        "import os; from ...util.env import cache_root\n"
        "from ...util \\\n    import nethook\n"
        "if True: from ...util.requests import EditRequest\n"
        "from ...util.model_parts import (\n    num_layers,\n)\n"
        "from .local import thing\n"
        "def f():\n    from ...compat import weights_copy_for_easyeditor\n"
        "X = 'see easyedit_nmke.util.corpus'\n"
    )
    out = _rewrite_imports(source, "models", tmp_path / "m.py")
    assert "import os; from ...util.nmke_common.env import cache_root" in out
    assert "from ...util.nmke_common \\\n    import nethook" in out
    assert "if True: from ...util.nmke_common.requests import EditRequest" in out
    assert "from ...util.nmke_common.model_parts import (" in out
    assert "from .local import thing" in out
    assert "from ...util.nmke_common.compat import weights_copy_for_easyeditor" in out
    assert "easyeditor.util.nmke_common.corpus" in out and "easyedit_nmke" not in out
    with pytest.raises(ExportError, match="cannot place the plugin module 'evaluate'"):
        _rewrite_imports("from ...evaluate import runner\n", "models", tmp_path / "m.py")


def test_a_file_in_the_way_is_refused_before_anything_is_written(easyedit_checkout):
    (easyedit_checkout / "hparams").write_text("not a folder")
    before = _snapshot(easyedit_checkout)
    with pytest.raises(ExportError, match="hparams is a file"):
        export_to_easyedit(easyedit_checkout)
    assert _snapshot(easyedit_checkout) == before


def test_modules_of_an_earlier_export_that_no_longer_exist_are_removed(easyedit_checkout):
    export_to_easyedit(easyedit_checkout)
    stale = easyedit_checkout / "easyeditor" / "models" / "nmke" / "old_module.py"
    stale.write_text("x = 1\n")
    assert export_to_easyedit(easyedit_checkout) == ["easyeditor/models/nmke/old_module.py"]
    assert not stale.exists()


# ----------------------------------------------------------------------------------
# The exported methods running inside EasyEdit, without the plugin
# ----------------------------------------------------------------------------------
_RUNNER = r'''
import importlib.util, json, math, sys
import torch

# PyPI easyeditor needs the plugin's import shims on today's transformers; they are one
# stdlib-only file, loaded by path so that the plugin package itself is never imported.
spec = importlib.util.spec_from_file_location("_easyeditor_shims", sys.argv[1])
shims = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = shims
spec.loader.exec_module(shims)
shims.install_shims()
sys.modules["easyedit_nmke"] = None  # any import of the plugin now fails

import sae_lens
from easyeditor.editors.batch_editor import BatchEditor
from easyeditor.editors.editor import BaseEditor
from easyeditor.models.microedit import MicroEditHyperParams, get_state as microedit_state
from easyeditor.models.nmke import NMKEHyperParams, get_state as nmke_state
from easyeditor.util.alg_dict import ALG_DICT
from easyeditor.util.hparams import HyperParams

args = json.loads(sys.argv[2])
sequential = "sequential_edit" in __import__("inspect").signature(BaseEditor.edit).parameters
report = {
    "modules": {alg: ALG_DICT[alg].__module__ for alg in ("NMKE", "MicroEdit")},
    "batchable": BatchEditor.is_batchable_method("NMKE"),
    "hparams_base": issubclass(NMKEHyperParams, HyperParams) and issubclass(MicroEditHyperParams, HyperParams),
    "flavour": "upstream" if sequential else "pypi",
}
requests = dict(
    prompts=["The capital of France is", "The Eiffel Tower is in"],
    target_new=["Rome", "Berlin"],
    ground_truth=["Paris", "Paris"],
    subject=["France", "Eiffel Tower"],
)
mode = {"sequential_edit": True} if sequential else {"keep_original_weight": True}

nmke_hparams = NMKEHyperParams.from_hparams(args["nmke_yaml"])
editor = BaseEditor(nmke_hparams)
originals = {n: p.detach().clone() for n, p in editor.model.named_parameters()}
metrics, model, _ = editor.edit(**requests, **mode)
changed = sorted(n for n, p in editor.model.named_parameters() if not torch.equal(p, originals[n]))
report["nmke"] = {
    "post_rewrite_acc": [float(m["post"]["rewrite_acc"][0]) for m in metrics],
    "changed": changed,
    "num_edits": nmke_state(editor.model).num_edits,
}
if sequential:  # upstream's default, sequential_edit=False: each edit's weights are written back
    editor = BaseEditor(nmke_hparams)
    editor.edit(**requests)
    report["nmke"]["changed_not_sequential"] = sorted(
        n for n, p in editor.model.named_parameters() if not torch.equal(p, originals[n])
    )

torch.manual_seed(0)
sae = sae_lens.TopKSAE(sae_lens.TopKSAEConfig(d_in=32, d_sae=64, k=4, dtype="float32", device="cpu"))
sae.save_model(args["sae_dir"])
micro_hparams = MicroEditHyperParams.from_hparams(args["microedit_yaml"])
editor = BaseEditor(micro_hparams)
metrics, model, _ = editor.edit(**requests, **mode)
report["microedit"] = {
    "post_rewrite_acc": [float(m["post"]["rewrite_acc"][0]) for m in metrics],
    "num_edits": microedit_state(editor.model).num_edits,
}

# The same two edits through the exported apply functions directly, on fresh models:
# the parent process repeats them with the plugin's and compares the weights.
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from easyeditor.models.microedit import apply_microedit_to_model
from easyeditor.models.nmke import apply_nmke_to_model

def fresh():
    model = AutoModelForCausalLM.from_pretrained(args["model_dir"], dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(args["model_dir"])
    tok.pad_token = tok.eos_token  # as BaseEditor sets it
    return model, tok

weights = {}
model, tok = fresh()
for request in args["requests"]:
    apply_nmke_to_model(model, tok, [request], nmke_hparams)
for layer in nmke_hparams.layers:
    weights[f"nmke.{layer}"] = model.get_parameter(nmke_hparams.rewrite_module_tmp.format(layer) + ".weight").detach().clone()
model, tok = fresh()
for request in args["requests"]:
    apply_microedit_to_model(model, tok, [request], micro_hparams)
weights["microedit.W_dec"] = microedit_state(model).sae.W_dec.detach().clone()
save_file(weights, args["weights_out"])
print("REPORT " + json.dumps(report))
'''


DIRECT_REQUESTS = [
    {"prompt": "The capital of France is", "subject": "France", "target_new": "Rome", "ground_truth": "Paris"},
    {"prompt": "The Eiffel Tower is in", "subject": "Eiffel Tower", "target_new": "Berlin", "ground_truth": "Paris"},
]


def _tiny_yamls(checkout: Path, model_dir: Path, work: Path) -> Dict[str, str]:
    """The exported Llama-3-8B YAMLs, shrunk to the 2-layer test Llama and a local corpus."""
    corpus = work / "corpus.txt"
    corpus.write_text("\n".join(f"Line {i}: the capital of France is Paris, the Eiffel Tower is in Paris." for i in range(64)))
    nmke = yaml.safe_load((checkout / "hparams" / "NMKE" / "llama3-8b.yaml").read_text())
    nmke.update(
        model_name=str(model_dir), device="cpu", layers=[0, 1], v_num_grad_steps=3, v_lr=1.0, v_loss_layer=1,
        L2=1.0, mom2_dataset=str(corpus),
        mom2_n_samples=32, mom2_max_length=32, stats_dir=str(work / "stats"),
        context_template_length_params=[[5, 2]], batch_size=1,
    )
    micro = yaml.safe_load((checkout / "hparams" / "MicroEdit" / "llama3-8b.yaml").read_text())
    micro.pop("sae_k", None)
    micro.update(
        model_name=str(model_dir), device="cpu", layers=[1], sae_path=str(work / "sae"), sae_format="sae_lens",
        ard_threshold=1e9, ard_alpha=1.0, edit_lr=5e-2, stage1_steps=2, stage2_steps=5, rehearsal_edits=1,
    )
    paths = {}
    for name, config in (("nmke_yaml", nmke), ("microedit_yaml", micro)):
        paths[name] = str(work / f"{name}.yaml")
        Path(paths[name]).write_text(yaml.safe_dump(config))
    paths["sae_dir"] = str(work / "sae")
    paths["model_dir"] = str(model_dir)
    paths["requests"] = DIRECT_REQUESTS
    paths["weights_out"] = str(work / "exported_weights.safetensors")
    return paths


def _run_exported(checkout: Path, model_dir: Path, work: Path) -> dict:
    pytest.importorskip("sae_lens")
    export_to_easyedit(checkout)
    args = _tiny_yamls(checkout, model_dir, work)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(checkout), CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-c", _RUNNER, str(SHIMS), json.dumps(args)],
        cwd=work, env=env, capture_output=True, text=True, timeout=600,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("REPORT ")]
    assert result.returncode == 0 and lines, result.stdout[-3000:] + result.stderr[-6000:]
    _check_same_weights_as_the_plugin(args, work)
    return json.loads(lines[-1][len("REPORT "):])


def _check_same_weights_as_the_plugin(args: dict, work: Path) -> None:
    """The plugin's apply functions, given the same YAMLs and edits, write bitwise the same weights."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from easyedit_nmke.models.microedit import MicroEditHyperParams, apply_microedit_to_model
    from easyedit_nmke.models.microedit import get_state as microedit_state
    from easyedit_nmke.models.nmke import NMKEHyperParams, apply_nmke_to_model

    exported = load_file(args["weights_out"])

    def fresh():
        model = AutoModelForCausalLM.from_pretrained(args["model_dir"], dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(args["model_dir"])
        tok.pad_token = tok.eos_token
        return model, tok

    nmke = NMKEHyperParams.from_hparams(args["nmke_yaml"])
    nmke.stats_dir = str(work / "plugin_stats")  # computed again, not read from the exported run's cache
    model, tok = fresh()
    for request in args["requests"]:
        apply_nmke_to_model(model, tok, [request], nmke)
    for layer in nmke.layers:
        weight = model.get_parameter(nmke.rewrite_module_tmp.format(layer) + ".weight")
        original = fresh()[0].get_parameter(nmke.rewrite_module_tmp.format(layer) + ".weight")
        assert not torch.equal(weight, original)  # the edits wrote something
        assert torch.equal(weight, exported[f"nmke.{layer}"]), layer
    micro = MicroEditHyperParams.from_hparams(args["microedit_yaml"])
    model, tok = fresh()
    for request in args["requests"]:
        apply_microedit_to_model(model, tok, [request], micro)
    state = microedit_state(model)
    edited = state.edited_latents()
    assert len(edited) and not torch.equal(
        state.sae.W_dec[edited], torch.stack([state.original_rows[i] for i in edited.tolist()])
    )  # the edits moved decoder rows
    assert torch.equal(state.sae.W_dec, exported["microedit.W_dec"])


def _check_report(report: dict) -> None:
    assert report["modules"] == {
        "NMKE": "easyeditor.models.nmke.nmke_main",
        "MicroEdit": "easyeditor.models.microedit.microedit_main",
    }
    assert report["batchable"] is True and report["hparams_base"] is True
    for method in ("nmke", "microedit"):
        accs = report[method]["post_rewrite_acc"]
        assert len(accs) == 2 and all(0.0 <= a <= 1.0 for a in accs), report


def test_exported_methods_run_in_pypi_easyeditor_without_the_plugin(easyedit_checkout, tiny_llama_dir, tmp_path):
    report = _run_exported(easyedit_checkout, tiny_llama_dir, tmp_path)
    _check_report(report)
    assert report["flavour"] == "pypi"
    assert report["nmke"]["changed"] == []  # PyPI BaseEditor restores each edit's weights afterwards


@pytest.mark.skipif(not os.environ.get("EASYEDIT_UPSTREAM_CHECKOUT"), reason="EASYEDIT_UPSTREAM_CHECKOUT not set")
def test_exported_methods_run_in_upstream_easyedit_without_the_plugin(tiny_llama_dir, tmp_path):
    upstream = Path(os.environ["EASYEDIT_UPSTREAM_CHECKOUT"]) / "easyeditor"
    checkout = _copy_tree(upstream, tmp_path / "EasyEdit")
    report = _run_exported(checkout, tiny_llama_dir, tmp_path)
    _check_report(report)
    assert report["flavour"] == "upstream"
    # sequential_edit=True: both edits stay in the model and in the lifelong state
    assert report["nmke"]["changed"] == ["model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"]
    assert report["nmke"]["num_edits"] == 2 and report["microedit"]["num_edits"] == 2
    assert report["nmke"]["changed_not_sequential"] == []
