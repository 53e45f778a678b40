"""EasyEdit integration: shims, flavour detection, registration, BaseEditor on CPU.

Uses the installed ``easyeditor`` (PyPI 0.0.1.dev0 here) and a tiny random Llama
written to a temporary directory, so it runs offline in seconds.  The NMKE
end-to-end test skips only while ``easyedit_nmke.models.nmke`` is not importable.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import importlib.util
import math
import subprocess
import sys
import textwrap
import types
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch
import yaml

from easyedit_nmke.util.hparams import PluginHyperParams  # first: before easyeditor is imported
from easyedit_nmke import registration
from easyedit_nmke.compat import (
    cuda_spec_redirect,
    easyeditor_base_hparams,
    easyeditor_flavour,
    import_easyeditor,
    install_shims,
    is_easyeditor_installed,
)

REPO = Path(__file__).resolve().parents[1]
NMKE_YAML = REPO / "hparams" / "NMKE" / "smollm2-135m.yaml"

pytestmark = pytest.mark.skipif(not is_easyeditor_installed(), reason="easyeditor is not installed")

TOY = "ToyEdit"
TOY_WEIGHT = "model.layers.0.mlp.down_proj.weight"
TOY_CALLS: List[Dict[str, Any]] = []


def _module(name: str):
    """A loaded easyeditor module (``easyeditor.util`` the attribute is shadowed)."""
    import_easyeditor()
    return sys.modules[name]


def apply_toy_to_model(model, tok, requests, hparams, copy=False, return_orig_weights=False,
                       keep_original_weight=False, **kwargs):
    """A stand-in editing method: shifts one weight, returns its original value."""
    TOY_CALLS.append(
        {"n_requests": len(requests), "return_orig_weights": return_orig_weights,
         "keep_original_weight": keep_original_weight}
    )
    weight = model.get_parameter(TOY_WEIGHT)
    weights_copy = {TOY_WEIGHT: weight.detach().clone()} if return_orig_weights else {}
    with torch.no_grad():
        weight.add_(0.5)
    return model, weights_copy


@pytest.fixture
def toy_method(monkeypatch):
    alg_dict = _module("easyeditor.util.alg_dict").ALG_DICT
    monkeypatch.setitem(alg_dict, TOY, apply_toy_to_model)
    TOY_CALLS.clear()
    yield
    TOY_CALLS.clear()


@pytest.fixture
def no_cuda(monkeypatch):
    """Fail loudly if anything initialises CUDA."""

    def _refuse(*args, **kwargs):
        raise AssertionError("CUDA was initialised")

    monkeypatch.setattr(torch.cuda, "_lazy_init", _refuse)


def _toy_hparams(model_dir: Path, **overrides):
    base = easyeditor_base_hparams()

    @dataclasses.dataclass
    class ToyHyperParams(base):  # type: ignore[misc,valid-type]
        model_name: str
        alg_name: str = TOY
        device: Any = "cpu"
        model_parallel: bool = False
        max_length: int = 40
        batch_size: int = 1

    return ToyHyperParams(model_name=str(model_dir), **overrides)


# ----------------------------------------------------------------------------------
# Shims and flavour
# ----------------------------------------------------------------------------------
def test_shims_make_easyeditor_importable():
    install_shims()
    install_shims()  # idempotent
    import easyeditor

    assert easyeditor is import_easyeditor()
    assert hasattr(easyeditor, "BaseEditor")
    # The stubs for uninstalled packages are served to easyeditor only, and do not linger.
    for name in ("higher", "omegaconf", "hydra", "openai", "sentence_transformers"):
        module = sys.modules.get(name)
        assert module is None or not getattr(module, "__easyedit_nmke_stub__", False)
        if module is None and importlib.util.find_spec(name) is None:
            with pytest.raises(ImportError):
                importlib.import_module(name)


def test_stubbed_dependency_fails_clearly_when_used():
    import_easyeditor()
    stubs = {
        value.__name__: value
        for name, module in list(sys.modules.items())
        if name.startswith("easyeditor") and module is not None
        for value in list(vars(module).values())
        if isinstance(value, types.ModuleType) and getattr(value, "__easyedit_nmke_stub__", False)
    }
    third_party = sorted(n for n in stubs if not n.startswith("easyeditor"))
    if not third_party:
        pytest.skip("every optional dependency of easyeditor is installed")
    name = third_party[0]
    with pytest.raises(ImportError, match=name.split(".")[0]):
        stubs[name].SomeClass.create()
    with pytest.raises(ImportError, match="multimodal"):
        stubs.get("easyeditor.trainer.blip2_models", _module("easyeditor.trainer.blip2_models")).Blip2OPT()


def test_flavour():
    easyeditor = import_easyeditor()
    dist = importlib.metadata.distribution("easyeditor")
    from_pypi_release = dist.version == "0.0.1.dev0" and Path(
        dist.locate_file("easyeditor/__init__.py")
    ).resolve() == Path(easyeditor.__file__).resolve()
    flavour = easyeditor_flavour()
    if from_pypi_release:
        assert flavour == "pypi"
    else:  # e.g. a GitHub checkout on PYTHONPATH
        assert flavour in ("pypi", "upstream")


def test_base_hparams_is_easyeditors_class():
    # PluginHyperParams was defined (module import, above) before easyeditor was
    # imported; its base must be the class easyeditor itself uses.
    base = easyeditor_base_hparams()
    assert base is _module("easyeditor.util.hparams").HyperParams
    assert issubclass(PluginHyperParams, base)


def test_base_hparams_does_not_import_easyeditor():
    code = textwrap.dedent(
        """
        import sys
        import easyedit_nmke.util.hparams as h
        from easyedit_nmke.compat import easyeditor_base_hparams
        assert easyeditor_base_hparams() is h.HyperParamsBase
        assert h.HyperParamsBase.__module__ == "easyeditor.util.hparams"
        assert "easyeditor" not in sys.modules, "the easyeditor package was imported"
        """
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


def test_cuda_spec_redirect_is_scoped():
    tensor = torch.zeros(2)
    with pytest.raises(RuntimeError):
        tensor.to("cuda:cpu")
    with cuda_spec_redirect():
        with cuda_spec_redirect():  # re-entrant
            assert tensor.to("cuda:cpu").device.type == "cpu"
        assert torch.nn.Linear(2, 2).to("cuda:cpu").weight.device.type == "cpu"
    assert "to" not in torch.Tensor.__dict__
    with pytest.raises(RuntimeError):
        tensor.to("cuda:cpu")


# ----------------------------------------------------------------------------------
# Registration
# ----------------------------------------------------------------------------------
def test_register_is_idempotent_and_fills_alg_dict(tmp_path, monkeypatch):
    (tmp_path / "toy_plugin_method.py").write_text(
        "def apply_toy(model, tok, requests, hparams, **kwargs):\n    return model, {}\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    from easyedit_nmke.methods import MethodSpec

    monkeypatch.setitem(
        registration.METHODS, "ToyPlugin", MethodSpec("ToyPlugin", "toy_plugin_method", "ToyHParams", "apply_toy")
    )
    alg_dict = _module("easyeditor.util.alg_dict").ALG_DICT
    before = dict(alg_dict)
    try:
        assert registration.register() is True
        assert registration.register() is True
        assert alg_dict["ToyPlugin"] is importlib.import_module("toy_plugin_method").apply_toy
        assert "MicroEdit" not in alg_dict or importlib.util.find_spec("easyedit_nmke.models.microedit")
        assert before == {k: alg_dict[k] for k in before}  # built-in methods untouched
    finally:
        alg_dict.pop("ToyPlugin", None)
        sys.modules.pop("toy_plugin_method", None)


def test_register_makes_nmke_batchable():
    assert registration.register() is True
    batch_editor = _module("easyeditor.editors.batch_editor").BatchEditor
    assert batch_editor.is_batchable_method("NMKE")
    assert batch_editor.is_batchable_method("MEMIT")
    assert not batch_editor.is_batchable_method("ROME")
    registration.register()
    assert batch_editor.is_batchable_method.__wrapped__("MEMIT")  # wrapped once, not twice
    assert not getattr(batch_editor.is_batchable_method.__wrapped__, "__easyedit_nmke__", False)


def test_register_without_easyeditor(monkeypatch):
    monkeypatch.setattr(registration, "is_easyeditor_installed", lambda: False)
    assert registration.register() is False


# ----------------------------------------------------------------------------------
# BaseEditor on CPU
# ----------------------------------------------------------------------------------
def test_base_editor_loads_tiny_llama_on_cpu(tiny_llama_dir, toy_method, no_cuda, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # BaseEditor writes logs/run.log
    BaseEditor = _module("easyeditor.editors.editor").BaseEditor
    editor = BaseEditor.from_hparams(_toy_hparams(tiny_llama_dir))
    assert {p.device.type for p in editor.model.parameters()} == {"cpu"}
    assert editor.tok.eos_token == "</s>"
    assert editor.tok("The capital of France is")["input_ids"]
    assert "to" not in torch.Tensor.__dict__  # the redirect was undone


def test_base_editor_edit_on_cpu_restores_weights(tiny_llama_dir, toy_method, no_cuda, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    BaseEditor = _module("easyeditor.editors.editor").BaseEditor
    editor = BaseEditor(_toy_hparams(tiny_llama_dir))
    original = editor.model.get_parameter(TOY_WEIGHT).detach().clone()
    kwargs = {"keep_original_weight": True} if easyeditor_flavour() == "pypi" else {}

    metrics, edited_model, weights_copy = editor.edit(
        prompts=["The capital of France is", "Danielle Darrieux's mother tongue is"],
        target_new=["Paris", "French"],
        ground_truth=["Paris", "French"],
        rephrase_prompts=["France's capital is", "The mother tongue of Danielle Darrieux is"],
        locality_inputs={"neighborhood": {"prompt": ["The Eiffel Tower is in", "Joe Biden is"],
                                          "ground_truth": ["Paris", "president"]}},
        subject=["France", "Danielle Darrieux"],
        **kwargs,
    )
    # apply_algo is called once per request, with a one-element list.
    assert [c["n_requests"] for c in TOY_CALLS] == [1, 1]
    assert all(c["return_orig_weights"] for c in TOY_CALLS)
    assert len(metrics) == 2
    for m in metrics:
        assert 0.0 <= float(m["post"]["rewrite_acc"][0]) <= 1.0
        assert 0.0 <= float(m["post"]["rephrase_acc"][0]) <= 1.0
        assert 0.0 <= float(m["post"]["locality"]["neighborhood_acc"][0]) <= 1.0
    assert edited_model is editor.model
    assert set(weights_copy) == {TOY_WEIGHT}
    assert torch.equal(editor.model.get_parameter(TOY_WEIGHT), original)


def test_base_editor_batch_edit_on_cpu(tiny_llama_dir, toy_method, no_cuda, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(registration, "BATCHABLE_METHODS", frozenset({"NMKE", TOY}))
    registration.register()
    BaseEditor = _module("easyeditor.editors.editor").BaseEditor
    editor = BaseEditor(_toy_hparams(tiny_llama_dir, batch_size=2))
    original = editor.model.get_parameter(TOY_WEIGHT).detach().clone()
    metrics, _, _ = editor.batch_edit(
        prompts=["The capital of France is", "Danielle Darrieux's mother tongue is"],
        target_new=["Paris", "French"],
        ground_truth=["Paris", "French"],
        keep_original_weight=True,
    ) if easyeditor_flavour() == "pypi" else editor.batch_edit(
        prompts=["The capital of France is", "Danielle Darrieux's mother tongue is"],
        target_new=["Paris", "French"],
        ground_truth=["Paris", "French"],
    )
    assert [c["n_requests"] for c in TOY_CALLS] == [2]
    assert len(metrics) == 2 and all("post" in m and "pre" in m for m in metrics)
    assert torch.equal(editor.model.get_parameter(TOY_WEIGHT), original)


# ----------------------------------------------------------------------------------
# NMKE through BaseEditor (needs the NMKE implementation)
# ----------------------------------------------------------------------------------
def _nmke_module():
    try:
        module = importlib.import_module("easyedit_nmke.models.nmke")
        module.NMKEHyperParams, module.apply_nmke_to_model
    except (ImportError, AttributeError) as exc:
        pytest.skip(f"easyedit_nmke.models.nmke is not importable yet: {exc!r}")
    return module


def _tiny_nmke_hparams(model_dir: Path, tmp_path: Path):
    """hparams/NMKE/smollm2-135m.yaml, shrunk to the tiny Llama and a local text corpus."""
    nmke = _nmke_module()
    if not NMKE_YAML.is_file():
        pytest.skip(f"{NMKE_YAML} does not exist yet")
    config = yaml.safe_load(NMKE_YAML.read_text())
    corpus = tmp_path / "mom2_corpus.txt"
    corpus.write_text(
        "\n".join(
            f"Sentence {i}: the capital of France is Paris and the Eiffel Tower is in Paris."
            for i in range(64)
        )
    )
    overrides = {
        "model_name": str(model_dir),
        "layers": [0, 1],
        "device": "cpu",
        "v_num_grad_steps": 3,
        "v_loss_layer": 1,
        "mom2_dataset": str(corpus),
        "mom2_n_samples": 32,
        "mom2_max_length": 32,
        "stats_dir": str(tmp_path / "stats"),
        "context_template_length_params": [[5, 2]],
        "batch_size": 1,
    }
    fields = {f.name for f in dataclasses.fields(nmke.NMKEHyperParams)}
    config.update({k: v for k, v in overrides.items() if k in fields})
    return nmke.NMKEHyperParams.from_dict(config)


def test_nmke_is_registered():
    nmke = _nmke_module()
    assert registration.register() is True
    assert _module("easyeditor.util.alg_dict").ALG_DICT["NMKE"] is nmke.apply_nmke_to_model


def _nmke_editor(model_dir: Path, tmp_path: Path, monkeypatch):
    """(hparams, BaseEditor running NMKE on the tiny Llama, the model's original parameters)."""
    hparams = _tiny_nmke_hparams(model_dir, tmp_path)
    monkeypatch.chdir(tmp_path)  # BaseEditor writes ./logs
    assert registration.register() is True
    editor = _module("easyeditor.editors.editor").BaseEditor(hparams)
    originals = {n: p.detach().clone() for n, p in editor.model.named_parameters()}
    return hparams, editor, originals


def test_nmke_edit_through_base_editor(tiny_llama_dir, no_cuda, tmp_path, monkeypatch):
    hparams, editor, originals = _nmke_editor(tiny_llama_dir, tmp_path, monkeypatch)

    changed: List[str] = []
    apply_algo = editor.apply_algo

    def spy(model, *args, **kwargs):
        edited, weights_copy = apply_algo(model, *args, **kwargs)
        changed.extend(n for n, p in edited.named_parameters() if not torch.equal(p, originals[n]))
        return edited, weights_copy

    editor.apply_algo = spy
    kwargs = {"keep_original_weight": True} if easyeditor_flavour() == "pypi" else {}
    metrics, _, weights_copy = editor.edit(
        prompts=["The capital of France is"],
        target_new=["Paris"],
        ground_truth=["Paris"],
        rephrase_prompts=["France's capital is"],
        locality_inputs={"neighborhood": {"prompt": ["The Eiffel Tower is in"], "ground_truth": ["Paris"]}},
        subject=["France"],
        **kwargs,
    )
    post = metrics[0]["post"]
    for value in (post["rewrite_acc"][0], post["rephrase_acc"][0], post["locality"]["neighborhood_acc"][0]):
        assert math.isfinite(float(value))
    expected = {hparams.rewrite_module_tmp.format(layer) + ".weight" for layer in hparams.layers}
    assert set(changed) <= expected and changed, changed
    assert set(weights_copy) == set(changed)
    for name, value in weights_copy.items():
        assert torch.equal(value, originals[name])
    for name, param in editor.model.named_parameters():  # restored after the edit
        assert torch.equal(param, originals[name]), name


def test_nmke_sequential_edits_accumulate_through_base_editor(tiny_llama_dir, no_cuda, tmp_path, monkeypatch):
    hparams, editor, originals = _nmke_editor(tiny_llama_dir, tmp_path, monkeypatch)
    mode = {"keep_original_weight": False} if easyeditor_flavour() == "pypi" else {"sequential_edit": True}
    editor.edit(
        prompts=["The capital of France is", "The Eiffel Tower is in"],
        target_new=["Rome", "Berlin"],
        ground_truth=["Paris", "Paris"],
        subject=["France", "Eiffel Tower"],
        **mode,
    )
    changed = {n for n, p in editor.model.named_parameters() if not torch.equal(p, originals[n])}
    assert changed == {hparams.rewrite_module_tmp.format(layer) + ".weight" for layer in hparams.layers}
    state = _nmke_module().get_state(editor.model)
    assert state.num_edits == 2  # both edits kept in the lifelong statistics


# ----------------------------------------------------------------------------------
# MicroEdit through BaseEditor
# ----------------------------------------------------------------------------------
def _microedit_editor(model_dir: Path, tmp_path: Path, monkeypatch):
    """(BaseEditor running MicroEdit on the tiny Llama with a tiny TopK SAE, original model parameters)."""
    sae_lens = pytest.importorskip("sae_lens")
    from easyedit_nmke.models.microedit import MicroEditHyperParams

    torch.manual_seed(0)
    sae = sae_lens.TopKSAE(sae_lens.TopKSAEConfig(d_in=32, d_sae=64, k=4, dtype="float32", device="cpu"))
    sae.save_model(str(tmp_path / "sae"))
    hparams = MicroEditHyperParams.from_dict(
        dict(
            alg_name="MicroEdit",
            model_name=str(model_dir),
            device="cpu",
            layers=[1],
            layer_module_tmp="model.layers.{}",
            sae_path=str(tmp_path / "sae"),
            ard_threshold=1e9,
            ard_alpha=1.0,
            edit_lr=5e-2,
            stage1_steps=2,
            stage2_steps=5,
        )
    )
    monkeypatch.chdir(tmp_path)
    assert registration.register() is True
    editor = _module("easyeditor.editors.editor").BaseEditor(hparams)
    originals = {n: p.detach().clone() for n, p in editor.model.named_parameters()}
    return editor, originals


def test_microedit_is_registered():
    from easyedit_nmke.models.microedit import apply_microedit_to_model

    assert registration.register() is True
    assert _module("easyeditor.util.alg_dict").ALG_DICT["MicroEdit"] is apply_microedit_to_model


def test_microedit_edit_through_base_editor_restores_the_decoder(tiny_llama_dir, no_cuda, tmp_path, monkeypatch):
    editor, originals = _microedit_editor(tiny_llama_dir, tmp_path, monkeypatch)
    kwargs = {"keep_original_weight": True} if easyeditor_flavour() == "pypi" else {}
    metrics, _, weights_copy = editor.edit(
        prompts=["The capital of France is"],
        target_new=["Rome"],
        ground_truth=["Paris"],
        subject=["France"],
        **kwargs,
    )
    assert math.isfinite(float(metrics[0]["post"]["rewrite_acc"][0]))
    assert set(weights_copy) == {"microedit_sae.W_dec"}
    decoder = dict(editor.model.named_parameters())["microedit_sae.W_dec"]
    assert torch.equal(decoder, weights_copy["microedit_sae.W_dec"])  # restored after the edit
    for name, value in originals.items():  # the LLM itself is never written
        assert torch.equal(dict(editor.model.named_parameters())[name], value), name


def test_microedit_sequential_edits_accumulate_through_base_editor(tiny_llama_dir, no_cuda, tmp_path, monkeypatch):
    from easyedit_nmke.models.microedit import get_state

    editor, originals = _microedit_editor(tiny_llama_dir, tmp_path, monkeypatch)
    mode = {"keep_original_weight": False} if easyeditor_flavour() == "pypi" else {"sequential_edit": True}
    editor.edit(
        prompts=["The capital of France is", "The Eiffel Tower is in"],
        target_new=["Rome", "Berlin"],
        ground_truth=["Paris", "Paris"],
        subject=["France", "Eiffel Tower"],
        **mode,
    )
    state = get_state(editor.model)
    assert state.num_edits == 2
    assert state.original_rows  # decoder rows changed and were kept
    edited = state.edited_latents()
    originals_rows = torch.stack([state.original_rows[i] for i in edited.tolist()])
    assert not torch.equal(state.sae.W_dec[edited], originals_rows)
