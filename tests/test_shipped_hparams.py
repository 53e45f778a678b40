"""Every shipped hparams YAML, run as written on a tiny random model of its architecture.

Most YAMLs name models that cannot run here (Llama-3-8B, Mistral-7B, Qwen2.5-7B,
GPT2-XL), so each YAML is checked two ways: its layer indices against the real model's
depth, and one edit with the YAML's own module templates, SAE source and method
settings on a 4-layer model of the same transformers class.  Only what cannot fit that
model, or would make the test slow, is shrunk: layer indices, corpus and SAE sizes,
optimisation step counts.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Tuple

import pytest
import torch
import yaml

from conftest import REPO, REQUESTS, tiny_model, write_sparsify_folder
from easyedit_nmke.util.nethook import get_module

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


def _yamls(method: str):
    return sorted((REPO / "hparams" / method).glob("*.yaml"))


def _ids(paths):
    return [p.stem for p in paths]


def _config(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _parameters(model) -> Dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _check_module_names(model, config: dict) -> None:
    """Every module template / module name of the YAML names a module of the model."""
    for key, value in config.items():
        if key.endswith("_module_tmp"):
            for layer in config["layers"]:
                get_module(model, value.format(layer))
        elif key.endswith("_module"):
            get_module(model, value)


def _changed(model, before: Dict[str, torch.Tensor]):
    """Names of the model's own parameters (those in ``before``) that differ from it."""
    now = dict(model.named_parameters())
    return {name for name, value in before.items() if not torch.equal(now[name].detach(), value)}


# --------------------------------------------------------------------------- real-model facts


@pytest.mark.parametrize("method", ["NMKE", "MicroEdit"])
def test_both_methods_ship_yamls_for_the_supported_models(method):
    names = set(_ids(_yamls(method)))
    assert {"smollm2-135m", "llama3-8b", "mistral-7b", "qwen2.5-7b", "gpt2-xl"} <= names


def test_every_architecture_row_belongs_to_a_shipped_yaml():
    assert set(ARCHITECTURES) == set(_ids(_yamls("NMKE") + _yamls("MicroEdit")))


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
    if config.get("sae_format") == "sparsify":  # sparsify names a layer's folder after its hookpoint
        assert Path(config["sae_path"]).name == f"layers.{config['layers'][0]}", path.name


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
        v_loss_layer=model.config.num_hidden_layers - 1,
        v_num_grad_steps=min(8, config["v_num_grad_steps"]),
        context_template_length_params=[[4, 2]],
        mom2_dataset=str(corpus_file),
        mom2_n_samples=40,
        mom2_max_length=32,
        stats_dir=str(tmp_path / "stats"),
    )
    hparams = NMKEHyperParams.from_dict(config)
    _check_module_names(model, config)
    before = _parameters(model)
    apply_nmke_to_model(model, tokenizer, [REQUESTS[0]], hparams)
    rewritten = {f"{config['rewrite_module_tmp'].format(layer)}.weight" for layer in config["layers"]}
    assert rewritten <= set(before), "rewrite_module_tmp names no weight of this architecture"
    assert _changed(model, before) == rewritten


# --------------------------------------------------------------------------- MicroEdit


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
    width = model.config.hidden_size
    d_sae = 512  # wide enough for the YAMLs' own k (up to 400)
    yaml_release = (config.get("sae_release"), config.get("sae_id"))
    config.update(
        model_name=f"tiny-{arch}",
        device="cpu",
        layers=[layer],
        stage1_steps=min(5, config.get("stage1_steps", 5)),
        stage2_steps=min(10, config.get("stage2_steps", 10)),
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
        folder, _, _ = write_sparsify_folder(
            tmp_path / "sparsify", name=f"layers.{layer}", d_in=width, expansion=d_sae // width, k=32, bias_shift=0.0
        )
        config["sae_path"] = str(folder)
    else:  # a SAE-Lens release: the download is replaced by a standard SAE of that shape
        assert config["sae_release"] and config["sae_id"]
        requested = []

        def fake_release(release, sae_id, device="cpu", dtype=torch.float32):
            requested.append((release, sae_id))
            torch.manual_seed(0)
            return sae_lens.StandardSAE(sae_lens.StandardSAEConfig(
                d_in=width, d_sae=d_sae,
                metadata=SAEMetadata(hook_name=f"blocks.{layer + 1}.hook_resid_pre"),
            ))

        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(sae_io, "load_pretrained", fake_release)
    hparams = MicroEditHyperParams.from_dict(config)
    _check_module_names(model, config)
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
        assert requested == [yaml_release] * 2
