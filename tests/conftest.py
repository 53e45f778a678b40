"""Shared fixtures: tiny random models of each supported architecture with SmolLM2's real tokenizer."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("EASYEDIT_NMKE_DATA_DIR", REPO.parent / "shared" / "data"))

CORPUS = (
    "The river flows through the old town and past the cathedral. "
    "Scientists measured the temperature of the lake every morning for a year. "
    "A small bakery on the corner sells bread, cakes and coffee to the neighbours. "
    "The committee approved the new budget after a long debate in the council. "
    "During the winter the mountain pass is closed because of heavy snow. "
    "Her first novel was translated into twelve languages and won several prizes. "
    "The orchestra performed a symphony by a composer from the nineteenth century. "
    "Engineers designed a bridge that could withstand strong winds and earthquakes. "
) * 6


@pytest.fixture(scope="session")
def tokenizer():
    from easyedit_nmke.util.model_loader import embedded_model_dir

    tok = AutoTokenizer.from_pretrained(str(embedded_model_dir()))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def tiny_model(arch: str, vocab_size: int, seed: int = 0, intermediate_size: int = 96) -> torch.nn.Module:
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=intermediate_size, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  initializer_range=0.1)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=True))
    elif arch == "mistral":
        model = MistralForCausalLM(MistralConfig(**common, sliding_window=None))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    elif arch == "gemma3":  # a norm between the FFN and the residual add; sliding-window layers; soft-cap
        from transformers import Gemma3ForCausalLM, Gemma3TextConfig

        model = Gemma3ForCausalLM(Gemma3TextConfig(
            **common, head_dim=16, sliding_window=6, final_logit_softcapping=30.0,
            layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        ))
    elif arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_embd=64, n_inner=intermediate_size, n_layer=4, n_head=4,
                                           n_positions=256, initializer_range=0.1))
    else:
        raise ValueError(arch)
    return model.eval()


TEMPLATES = {
    "llama": dict(
        rewrite_module_tmp="model.layers.{}.mlp.down_proj",
        layer_module_tmp="model.layers.{}",
        mlp_module_tmp="model.layers.{}.mlp",
        attn_module_tmp="model.layers.{}.self_attn",
        ln_f_module="model.norm",
        lm_head_module="lm_head",
    ),
    "gpt2": dict(
        rewrite_module_tmp="transformer.h.{}.mlp.c_proj",
        layer_module_tmp="transformer.h.{}",
        mlp_module_tmp="transformer.h.{}.mlp",
        attn_module_tmp="transformer.h.{}.attn",
        ln_f_module="transformer.ln_f",
        lm_head_module="lm_head",
    ),
}
TEMPLATES["mistral"] = TEMPLATES["qwen2"] = TEMPLATES["gemma3"] = TEMPLATES["llama"]


@pytest.fixture
def corpus_file(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(CORPUS)
    return path


def write_sparsify_folder(
    root: Path, name: str = "layers.1", d_in: int = 64, expansion: int = 2, k: int = 7, bias_shift: float = -6.0
):
    """A random EleutherAI sparsify SAE folder (cfg.json + sae.safetensors): (folder, tensors, k).

    The default negative encoder bias leaves small inputs with fewer than k positive
    pre-activations; ``bias_shift=0`` makes most latents fire.
    """
    import json

    from safetensors.torch import save_file

    torch.manual_seed(1)
    d_sae = d_in * expansion
    folder = root / name
    folder.mkdir(parents=True)
    cfg = {"expansion_factor": expansion, "normalize_decoder": True, "num_latents": 0, "k": k, "signed": False,
           "d_in": d_in}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    w_dec = torch.randn(d_sae, d_in)
    tensors = {
        "encoder.weight": torch.randn(d_sae, d_in) * 0.2,
        "encoder.bias": torch.randn(d_sae) + bias_shift,
        "W_dec": w_dec / w_dec.norm(dim=1, keepdim=True),
        "b_dec": torch.randn(d_in),
    }
    save_file(tensors, str(folder / "sae.safetensors"))
    return folder, tensors, k


def tiny_hparams(arch: str, corpus: Path, stats_dir: Path, **overrides):
    from easyedit_nmke.models.nmke import NMKEHyperParams

    config = dict(
        alg_name="NMKE",
        model_name=f"tiny-{arch}",
        device="cpu",
        layers=[1, 2],
        v_num_grad_steps=8,
        v_lr=0.5,
        v_weight_decay=1e-3,
        clamp_norm_factor=4.0,
        context_template_length_params=[[4, 2]],
        mom2_dataset=str(corpus),
        mom2_n_samples=40,
        mom2_max_length=32,
        stats_dir=str(stats_dir),
        nullspace_threshold=2e-2,
        **TEMPLATES[arch],
    )
    config.update(overrides)
    return NMKEHyperParams.from_dict(config)


REQUESTS = [
    {"prompt": "The capital city of Norway is", "subject": "Norway", "target_new": "Bergen"},
    {"prompt": "The Eiffel Tower is located in", "subject": "Eiffel Tower", "target_new": "Rome"},
    {"prompt": "Beethoven's instrument was the", "subject": "Beethoven", "target_new": "guitar"},
]


def interrupted_on_call(monkeypatch, module, name: str, call: int):
    """Context manager: ``module.name`` raises KeyboardInterrupt on its ``call``-th call (a killed run)."""
    import contextlib

    real = getattr(module, name)
    calls = {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    @contextlib.contextmanager
    def patched():
        monkeypatch.setattr(module, name, dying)
        try:
            with pytest.raises(KeyboardInterrupt):
                yield
        finally:
            monkeypatch.setattr(module, name, real)

    return patched()


def smollm2_zsre_run(method: str, num_edits: int = 10, needs_wikitext: bool = False):
    """(hparams, model, last result row) of ``num_edits`` sequential ZsRE dev edits on SmolLM2
    with the method's shipped YAML; skips the test when the shared data is missing."""
    data = SHARED_DATA / "zsre_mend_eval_portability_gpt4.dev.json"
    if not data.is_file() or (needs_wikitext and not (SHARED_DATA / "wikitext-2").is_dir()):
        pytest.skip(f"ZsRE dev data or WikiText-2 not under {SHARED_DATA} (set EASYEDIT_NMKE_DATA_DIR)")
    from easyedit_nmke.evaluate.records import load_records
    from easyedit_nmke.evaluate.runner import RunConfig, run_lifelong
    from easyedit_nmke.methods import load_hparams, method_spec
    from easyedit_nmke.util.model_loader import load_model_and_tokenizer

    hparams = load_hparams(REPO / f"hparams/{method}/smollm2-135m.yaml")
    model, tok = load_model_and_tokenizer(hparams.model_name)
    records = load_records([data], limit=num_edits)
    config = RunConfig(eval_at=[num_edits], progress=False)
    result = run_lifelong(model, tok, hparams, method_spec(method), records, config)
    return hparams, model, result.runs[-1]


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A 2-layer random Llama with a Llama-style (Metaspace BPE) tokenizer.

    The directory name contains 'llama' because BaseEditor picks the model and
    tokenizer classes from substrings of ``model_name``.  The tokenizer is built
    so that ``LlamaTokenizer`` (what PyPI BaseEditor uses for 'llama') rebuilds
    the very same pipeline.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [
        "The capital of France is Paris.",
        "The Eiffel Tower is in Paris.",
        "Danielle Darrieux's mother tongue is French.",
        "Who is the president of the United States? Joe Biden.",
        "English German French Italian Spanish Japanese.",
        "The mother tongue of Thomas Joannes Stieltjes is Dutch.",
    ] * 10
    backend = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=False)
    backend.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    backend.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=420, special_tokens=specials))
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id,
    )
    model = LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("models") / "tiny-llama"
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path
