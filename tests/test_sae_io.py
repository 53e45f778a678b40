"""MicroEdit's SAE plumbing: sparsify conversion, SAE-Lens save/load, checks, training and caching."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("sae_lens")

from sae_lens import StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig  # noqa: E402
from sae_lens.saes.sae import SAEMetadata  # noqa: E402

from easyedit_nmke.models.microedit import train_sae as train_module  # noqa: E402
from easyedit_nmke.models.microedit.microedit_hparams import MicroEditHyperParams  # noqa: E402
from easyedit_nmke.models.microedit.sae_io import SAEError, load_sae, read_metrics, save_sae  # noqa: E402
from easyedit_nmke.models.microedit.train_sae import collect_activations, ensure_sae, train_sae  # noqa: E402

from conftest import tiny_model, write_sparsify_folder  # noqa: E402

D_IN = 64  # the tiny models' hidden size


def hparams(**overrides) -> MicroEditHyperParams:
    config = dict(
        alg_name="MicroEdit",
        model_name="tiny-llama",
        layers=[1],
        layer_module_tmp="model.layers.{}",
        sae_path="/nonexistent/sae",
    )
    config.update(overrides)
    return MicroEditHyperParams.from_dict(config)


def random_topk_sae(d_in: int = D_IN, d_sae: int = 96, k: int = 6, layer: int = 1, seed: int = 0, **cfg) -> TopKSAE:
    torch.manual_seed(seed)
    sae = TopKSAE(
        TopKSAEConfig(
            d_in=d_in, d_sae=d_sae, k=k, metadata=SAEMetadata(hook_name=f"blocks.{layer}.hook_resid_post"), **cfg
        )
    )
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(0, 0.3)
    return sae


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls gain nothing from a second thread, and on a busy machine waiting for it costs 10x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_model("llama", len(tokenizer))


# --------------------------------------------------------------------------- sparsify


def sparsify_formula(x, tensors, k):
    """sparsify's SparseCoder: top_k(relu(encoder(x - b_dec))), decoded as sum act_i W_dec[i] + b_dec."""
    pre = torch.relu((x - tensors["b_dec"]) @ tensors["encoder.weight"].T + tensors["encoder.bias"])
    values, indices = pre.topk(k, dim=-1)
    dense = torch.zeros_like(pre).scatter(-1, indices, values)
    recon = (values.unsqueeze(-1) * tensors["W_dec"][indices]).sum(-2) + tensors["b_dec"]
    return dense, recon


def test_sparsify_folder_converts_to_an_equivalent_topk_sae(tmp_path, model):
    folder, tensors, k = write_sparsify_folder(tmp_path)
    sae = load_sae(hparams(sae_path=str(folder)), model)
    assert isinstance(sae, TopKSAE) and sae.cfg.k == k and sae.cfg.d_sae == 2 * D_IN
    x = torch.randn(50, D_IN) * torch.linspace(0.5, 4.0, 50).unsqueeze(1)
    dense, recon = sparsify_formula(x, tensors, k)
    active = (dense > 0).sum(-1)
    assert (active < k).any() and (active == k).any()  # also where ReLU-then-top-k vs top-k-then-ReLU could differ
    torch.testing.assert_close(sae.encode(x), dense, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sae.decode(sae.encode(x)), recon, atol=1e-4, rtol=1e-5)
    # sae_k overrides the SAE's own k
    assert load_sae(hparams(sae_path=str(folder), sae_format="sparsify", sae_k=3), model).cfg.k == 3


def test_sparsify_folder_for_another_layer_is_refused(tmp_path, model):
    folder, _, _ = write_sparsify_folder(tmp_path, name="layers.2")
    with pytest.raises(SAEError, match=r"output of decoder block 2.*layers: \[2\]"):
        load_sae(hparams(sae_path=str(folder)), model)


# --------------------------------------------------------------------------- SAE-Lens folders


def test_save_and_load_round_trip(tmp_path, model):
    sae = random_topk_sae()
    directory = save_sae(sae, tmp_path / "sae", {"fve": 0.9})
    assert read_metrics(directory) == {"fve": 0.9}
    loaded = load_sae(hparams(sae_path=str(directory)), model)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(loaded, name), getattr(sae, name))
    x = torch.randn(10, D_IN)
    torch.testing.assert_close(loaded.decode(loaded.encode(x)), sae.decode(sae.encode(x)))
    # overwriting an existing folder works and leaves no .partial behind
    save_sae(sae, directory, {"fve": 0.8})
    assert read_metrics(directory) == {"fve": 0.8} and not (tmp_path / "sae.partial").exists()


def test_decoder_norm_rescaling_is_folded_away(tmp_path, model):
    sae = random_topk_sae(rescale_acts_by_decoder_norm=True)
    x = torch.randn(20, D_IN)
    expected = sae.decode(sae.encode(x))
    loaded = load_sae(hparams(sae_path=str(save_sae(sae, tmp_path / "sae"))), model)
    assert not loaded.cfg.rescale_acts_by_decoder_norm
    torch.testing.assert_close(loaded.W_dec.norm(dim=-1), torch.ones(loaded.cfg.d_sae))
    torch.testing.assert_close(loaded.decode(loaded.encode(x)), expected, atol=1e-4, rtol=1e-4)


def test_missing_sae_says_how_to_get_one(tmp_path, model):
    with pytest.raises(SAEError, match="no SAE at .*easyedit-nmke train-sae"):
        load_sae(hparams(sae_path=str(tmp_path / "absent")), model)


def test_release_needs_the_network_and_a_known_id(model, monkeypatch):
    release = dict(sae_path=None, sae_release="mistral-7b-res-wg", sae_id="blocks.24.hook_resid_pre", layers=[1])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SAEError, match="HF_HUB_OFFLINE is set.*train-sae"):
        load_sae(hparams(**release), model)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(SAEError, match="not in release"):  # refused before any download
        load_sae(hparams(**{**release, "sae_id": "blocks.99.hook_resid_pre"}), model)


def test_standard_relu_sae_is_refused_unless_sae_k_is_set(tmp_path, model):
    torch.manual_seed(0)
    standard = StandardSAE(StandardSAEConfig(d_in=D_IN, d_sae=80, metadata=SAEMetadata(hook_name="blocks.1.hook_resid_post")))
    with torch.no_grad():
        standard.b_enc.normal_(0, 0.5)
    path = str(save_sae(standard, tmp_path / "standard"))
    with pytest.raises(SAEError, match="not a TopK SAE.*sae_k"):
        load_sae(hparams(sae_path=path), model)
    with pytest.raises(SAEError, match=r"sae_k must be in \[1, 80\]"):  # wider than the SAE
        load_sae(hparams(sae_path=path, sae_k=81), model)
    converted = load_sae(hparams(sae_path=path, sae_k=5), model)
    assert isinstance(converted, TopKSAE) and converted.cfg.k == 5
    x = torch.randn(8, D_IN)
    relu = standard.encode(x)
    values, indices = relu.topk(5, dim=-1)
    torch.testing.assert_close(converted.encode(x), torch.zeros_like(relu).scatter(-1, indices, values))


def test_sae_of_another_width_is_refused(tmp_path, model):
    path = str(save_sae(random_topk_sae(d_in=32), tmp_path / "narrow"))
    with pytest.raises(SAEError, match="32-dimensional.*hidden size 64 at layer 1"):
        load_sae(hparams(sae_path=path), model)


def test_layer_out_of_range_is_refused(tmp_path, model):
    path = str(save_sae(random_topk_sae(layer=7), tmp_path / "sae"))
    with pytest.raises(SAEError, match=r"layer 7 is out of range: LlamaForCausalLM has 4 layers"):
        load_sae(hparams(sae_path=path, layers=[7]), model)


# --------------------------------------------------------------------------- training


def train_hparams(corpus: Path, sae_path: Path, **overrides) -> MicroEditHyperParams:
    config = dict(
        sae_path=str(sae_path),
        sae_train_dataset=str(corpus),
        sae_train_d_sae=128,
        sae_train_k=8,
        sae_train_tokens=400,
        sae_train_heldout_tokens=100,
        sae_train_context_length=32,
        sae_train_batch_tokens=64,
        sae_train_epochs=4,
        sae_train_lr=1e-2,
    )
    config.update(overrides)
    return hparams(**config)


def test_collection_drops_massive_positions_and_holds_out_whole_windows(model, tokenizer, corpus_file, tmp_path):
    hp = train_hparams(corpus_file, tmp_path / "sae")

    def sink(module, args, output):  # an attention sink at the first position of every window
        hidden = output[0] if isinstance(output, tuple) else output
        hidden[:, 0] *= 1000.0

    handle = model.model.layers[1].register_forward_hook(sink)
    try:
        data = collect_activations(model, tokenizer, hp, progress=False)
    finally:
        handle.remove()
    assert data.train.shape == (400, D_IN)
    assert data.heldout.shape[0] >= 100 and data.heldout.shape[0] % 31 == 0  # whole windows of 32 - 1 tokens
    assert data.excluded_positions >= data.windows > 0
    typical = data.train.norm(dim=-1).median()
    assert data.train.norm(dim=-1).max() < 10 * typical and data.heldout.norm(dim=-1).max() < 10 * typical


def test_train_sae_gives_sane_metrics(model, tokenizer, corpus_file, tmp_path):
    sae, metrics = train_sae(model, tokenizer, train_hparams(corpus_file, tmp_path / "sae"), progress=False)
    assert isinstance(sae, TopKSAE) and sae.cfg.d_in == D_IN and sae.cfg.k == 8
    assert not sae.cfg.rescale_acts_by_decoder_norm and sae.cfg.normalize_activations == "none"
    assert sae.cfg.metadata.hook_name == "blocks.1.hook_resid_post"
    assert 0.2 < metrics["fve"] <= 1.0  # 400 tokens of a random tiny model: well above the mean's 0
    assert 0 < metrics["mean_l0"] <= 8
    assert 0.0 <= metrics["dead_fraction"] <= 1.0
    assert metrics["train_tokens"] == 400 and metrics["heldout_tokens"] >= 100
    assert metrics["excluded_massive_positions"] >= 0 and metrics["steps"] == 4 * (400 // 64)
    json.dumps(metrics)  # serialisable as it is


def test_sae_training_is_seeded_and_leaves_the_callers_random_state(model, tokenizer, corpus_file, tmp_path):
    hp = train_hparams(corpus_file, tmp_path / "sae", sae_train_epochs=1)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first, _ = train_sae(model, tokenizer, hp, progress=False)
    torch.testing.assert_close(torch.rand(3), expected_next, atol=0, rtol=0)  # caller's stream untouched
    torch.manual_seed(7)  # another caller state: same SAE, since training seeds itself
    second, _ = train_sae(model, tokenizer, hp, progress=False)
    assert torch.equal(first.W_dec, second.W_dec) and torch.equal(first.W_enc, second.W_enc)


def test_ensure_sae_trains_once_then_reuses(model, tokenizer, corpus_file, tmp_path, monkeypatch, capsys):
    hp = train_hparams(corpus_file, tmp_path / "cache" / "sae", sae_train_epochs=1)
    first = ensure_sae(model, tokenizer, hp, progress=False)
    assert "no SAE at" in capsys.readouterr().err
    assert (tmp_path / "cache" / "sae" / "sae_weights.safetensors").is_file()
    assert read_metrics(tmp_path / "cache" / "sae")["train_tokens"] == 400

    def no_training(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr(train_module, "train_sae", no_training)
    second = ensure_sae(model, tokenizer, hp, progress=False)
    assert "training" not in capsys.readouterr().err
    assert torch.equal(first.W_dec, second.W_dec) and torch.equal(first.W_enc, second.W_enc)


# --------------------------------------------------------------------------- CLI and shipped hparams


def test_train_sae_command_saves_the_sae_and_its_metrics(model, tokenizer, corpus_file, tmp_path, capsys):
    import yaml

    from easyedit_nmke.cli import main

    model_dir = tmp_path / "tiny-llama"
    model.save_pretrained(str(model_dir))
    tokenizer.save_pretrained(str(model_dir))
    config = dict(alg_name="MicroEdit", model_name=str(model_dir), layers=[1], layer_module_tmp="model.layers.{}",
                  sae_path=str(tmp_path / "default"), sae_train_d_sae=64, sae_train_k=4, sae_train_tokens=300,
                  sae_train_heldout_tokens=100, sae_train_context_length=32, sae_train_batch_tokens=100)
    yaml_path = tmp_path / "microedit.yaml"
    yaml_path.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit, match="give --out"):
        main(["train-sae", "--hparams", str(yaml_path), "--k", "8"])
    out = tmp_path / "out"
    assert main(["train-sae", "--hparams", str(yaml_path), "--out", str(out), "--k", "8", "--epochs", "2",
                 "--dataset", str(corpus_file), "--no-progress"]) == 0
    metrics = read_metrics(out)
    assert metrics["k"] == 8 and metrics["epochs"] == 2 and "train-sae" in metrics["command"]
    assert "held-out FVE" in capsys.readouterr().out
    assert load_sae(hparams(sae_path=str(out)), model).cfg.k == 8
    with pytest.raises(SystemExit, match="already exists"):
        main(["train-sae", "--hparams", str(yaml_path), "--out", str(out), "--dataset", str(corpus_file)])


def test_resid_pre_sae_belongs_to_the_block_before():
    from conftest import REPO

    from easyedit_nmke.models.microedit.sae_io import check_sae

    hp = MicroEditHyperParams.from_hparams(REPO / "hparams" / "MicroEdit" / "mistral-7b.yaml")
    sae = random_topk_sae(d_in=8, d_sae=16, k=2)
    sae.cfg.metadata.hook_name = hp.sae_id  # blocks.24.hook_resid_pre: the output of block 23
    check_sae(sae, hp)
    with pytest.raises(SAEError, match="output of decoder block 23"):
        check_sae(sae, hp.replace(layers=[24]))
