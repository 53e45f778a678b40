"""Every shipped hparams YAML, run as written on a tiny random model of its architecture.

The big-model YAMLs (Llama-3-8B, Mistral-7B, Qwen2.5-7B, GPT2-XL, Gemma-3) cannot be run
here, so each is checked two ways: its layer indices against the real model's depth, and
one edit with the YAML's own module templates, SAE source and method settings on a
4-layer model of the same transformers class.  Only what cannot fit a 4-layer, 64-wide
model is shrunk: layer indices, corpus and SAE sizes, step counts.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Tuple

import pytest
import torch
import yaml
from safetensors.torch import save_file

from conftest import REPO, REQUESTS, tiny_model

# YAML stem -> (tiny architecture in conftest, the real model's number of decoder blocks).
# A new YAML needs a row here, so that it is tested too.
ARCHITECTURES: Dict[str, Tuple[str, int]] = {
    "smollm2-135m": ("llama", 30),
    "smollm2-135m-sae16k": ("llama", 30),
    "gemma3-270m": ("gemma3", 18),
    "llama3-8b": ("llama", 32),
    "mistral-7b": ("mistral", 32),
    "qwen2.5-7b": ("qwen2", 28),
    "gpt2-xl": ("gpt2", 48),
}
TINY_DEPTH = 4  # conftest.tiny_model
TINY_WIDTH = 64


def _yamls(method: str):
    return sorted((REPO / "hparams" / method).glob("*.yaml"))


def _ids(paths):
    return [p.stem for p in paths]


def _config(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _parameters(model) -> Dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _changed(model, before: Dict[str, torch.Tensor]):
    """Names of the model's own parameters (those in ``before``) that differ from it."""
    now = dict(model.named_parameters())
    return {name for name, value in before.items() if not torch.equal(now[name].detach(), value)}


# --------------------------------------------------------------------------- real-model facts


@pytest.mark.parametrize("method", ["NMKE", "MicroEdit"])
def test_both_methods_ship_yamls_for_the_supported_models(method):
    names = set(_ids(_yamls(method)))
    assert {"smollm2-135m", "llama3-8b", "mistral-7b", "qwen2.5-7b", "gpt2-xl"} <= names


@pytest.mark.parametrize("path", _yamls("NMKE") + _yamls("MicroEdit"), ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_layer_indices_fit_the_real_model(path):
    assert path.stem in ARCHITECTURES, f"add {path.stem} to ARCHITECTURES (tiny architecture, depth)"
    from easyedit_nmke.methods import load_hparams

    _, depth = ARCHITECTURES[path.stem]
    config = _config(path)
    assert load_hparams(path).alg_name == path.parent.name  # loads through the public path, all keys known
    assert all(0 <= layer < depth for layer in config["layers"]), (path.name, config["layers"], depth)
    if config["alg_name"] == "NMKE":
        assert config["v_loss_layer"] == depth - 1, "z is read out after the last block"
        assert config["layers"] == sorted(config["layers"])


def test_release_sae_ids_exist_in_sae_lens_catalogue():
    """YAMLs naming a SAE-Lens release use an id in its catalogue, for the block they hook."""
    pytest.importorskip("sae_lens")
    from sae_lens.loading.pretrained_sae_loaders import get_conversion_loader_name
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    from easyedit_nmke.models.microedit.sae_io import _SAFE_RELEASE_LOADERS

    directory = get_pretrained_saes_directory()
    seen = 0
    for path in _yamls("MicroEdit"):
        config = _config(path)
        if not config.get("sae_release"):
            continue
        seen += 1
        release = directory[config["sae_release"]]
        assert config["sae_id"] in release.saes_map, path.name
        assert get_conversion_loader_name(config["sae_release"]) in _SAFE_RELEASE_LOADERS, path.name
        # blocks.N.hook_resid_pre is the output of block N - 1
        assert config["sae_id"] == f"blocks.{config['layers'][0] + 1}.hook_resid_pre", path.name
    assert seen >= 1


# --------------------------------------------------------------------------- NMKE


@pytest.mark.parametrize("path", _yamls("NMKE"), ids=_ids(_yamls("NMKE")))
def test_nmke_yaml_edits_a_tiny_model_of_its_architecture(path, tokenizer, corpus_file, tmp_path):
    from easyedit_nmke.models.nmke import NMKEHyperParams, apply_nmke_to_model

    arch = ARCHITECTURES[path.stem][0]
    model = tiny_model(arch, len(tokenizer))
    config = _config(path)
    config.update(
        model_name=f"tiny-{arch}",
        device="cpu",
        layers=[1, 2],
        v_loss_layer=TINY_DEPTH - 1,
        v_num_grad_steps=min(8, config["v_num_grad_steps"]),
        context_template_length_params=[[4, 2]],
        mom2_dataset=str(corpus_file),
        mom2_n_samples=40,
        mom2_max_length=32,
        stats_dir=str(tmp_path / "stats"),
    )
    hparams = NMKEHyperParams.from_dict(config)
    before = _parameters(model)
    apply_nmke_to_model(model, tokenizer, [REQUESTS[0]], hparams)
    rewritten = {f"{config['rewrite_module_tmp'].format(layer)}.weight" for layer in config["layers"]}
    assert rewritten <= set(before), "rewrite_module_tmp names no weight of this architecture"
    assert _changed(model, before) == rewritten


# --------------------------------------------------------------------------- MicroEdit


def _write_sparsify_folder(folder: Path, d_in: int, d_sae: int, k: int) -> None:
    """A random EleutherAI sparsify SAE folder (cfg.json + sae.safetensors)."""
    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    decoder = torch.randn(d_sae, d_in, generator=gen)
    save_file(
        {
            "encoder.weight": torch.randn(d_sae, d_in, generator=gen) * 0.1,
            "encoder.bias": torch.zeros(d_sae),
            "W_dec": decoder / decoder.norm(dim=-1, keepdim=True),
            "b_dec": torch.zeros(d_in),
        },
        str(folder / "sae.safetensors"),
    )
    (folder / "cfg.json").write_text(json.dumps({"d_in": d_in, "k": k, "num_latents": d_sae, "activation": "topk"}))


@pytest.mark.parametrize("path", _yamls("MicroEdit"), ids=_ids(_yamls("MicroEdit")))
def test_microedit_yaml_edits_a_tiny_model_of_its_architecture(path, tokenizer, corpus_file, tmp_path, monkeypatch):
    """The YAML's SAE source (trained on first use, sparsify folder, SAE-Lens release) and
    editing settings, on a tiny model of its architecture: the SAE's decoder learns the
    edit, the model's own weights stay bitwise unchanged."""
    sae_lens = pytest.importorskip("sae_lens")
    from sae_lens.saes.sae import SAEMetadata

    from easyedit_nmke.models.microedit import MicroEditHyperParams, apply_microedit_to_model, get_state
    from easyedit_nmke.models.microedit import sae_io

    arch = ARCHITECTURES[path.stem][0]
    model = tiny_model(arch, len(tokenizer))
    config = _config(path)
    layer = 1
    d_sae = 512  # wide enough for the YAMLs' own k (up to 400)
    config.update(
        model_name=f"tiny-{arch}",
        device="cpu",
        layers=[layer],
        calibration_dataset=str(corpus_file),
        calibration_samples=16,
        calibration_max_length=32,
    )
    if config.get("sae_train_d_sae"):  # trained on first use into sae_path, with the YAML's k, lr, epochs
        config.update(
            sae_path=str(tmp_path / "trained-sae"),
            sae_train_d_sae=d_sae,
            sae_train_tokens=400,
            sae_train_heldout_tokens=100,
            sae_train_dataset=str(corpus_file),
            sae_train_context_length=32,
            sae_train_batch_tokens=64,
        )
    elif config.get("sae_format") == "sparsify":  # the folder named after sparsify's hookpoint
        folder = tmp_path / "sparsify" / f"layers.{layer}"
        _write_sparsify_folder(folder, TINY_WIDTH, d_sae, k=32)
        config["sae_path"] = str(folder)
    else:  # a SAE-Lens release: the download is replaced by a standard SAE of that shape
        assert config["sae_release"] and config["sae_id"]
        requested = []

        def fake_release(release, sae_id, device="cpu", dtype=torch.float32):
            requested.append((release, sae_id))
            torch.manual_seed(0)
            return sae_lens.StandardSAE(sae_lens.StandardSAEConfig(
                d_in=TINY_WIDTH, d_sae=d_sae,
                metadata=SAEMetadata(hook_name=f"blocks.{layer + 1}.hook_resid_pre"),
            ))

        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(sae_io, "load_pretrained", fake_release)
    hparams = MicroEditHyperParams.from_dict(config)
    before = _parameters(model)
    apply_microedit_to_model(model, tokenizer, [REQUESTS[0]], hparams)
    state = get_state(model)
    assert _changed(model, before) == set()
    assert state.sae.cfg.k == (config.get("sae_k") or config.get("sae_train_k") or 32)
    # The edit rewrote some decoder rows (at most the latents its prompt activates) and nothing else.
    fresh = sae_io.load_sae(hparams, model)
    changed_rows = (state.sae.W_dec.detach() != fresh.W_dec).any(dim=1)
    assert 0 < int(changed_rows.sum()) <= state.last_edit_info["latents"]
    for name in ("W_enc", "b_enc", "b_dec"):
        assert torch.equal(getattr(state.sae, name).detach(), getattr(fresh, name)), name
    if not config.get("sae_train_d_sae") and config.get("sae_format") != "sparsify":
        assert requested == [(_config(path)["sae_release"], _config(path)["sae_id"])] * 2
