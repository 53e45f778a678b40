"""Which text a corpus setting resolves to, and when the hub is read."""
from __future__ import annotations

import pytest
import torch

from easyedit_nmke.models.nmke.nullspace import key_second_moments
from easyedit_nmke.util import corpus as text_corpus
from easyedit_nmke.util.corpus import CorpusError, resolve_corpus

from conftest import CORPUS, tiny_hparams, tiny_model


class CountingDataset:
    """Stands in for a streaming HF dataset: counts the records handed out."""

    def __init__(self, texts):
        self.texts = list(texts)
        self.records_read = 0

    def __iter__(self):
        for text in self.texts:
            self.records_read += 1
            yield {"text": text}


@pytest.fixture
def fake_hub(monkeypatch):
    dataset = CountingDataset(sentence + "." for sentence in CORPUS.split(". ") if sentence.strip())
    opened = []

    def open_hub_dataset(name):
        if name != "someone/corpus":
            raise FileNotFoundError(f"Dataset '{name}' doesn't exist on the Hub")
        opened.append(name)
        return dataset

    monkeypatch.setattr(text_corpus, "_hub_unavailable", lambda: None)
    monkeypatch.setattr(text_corpus, "_open_hub_dataset", open_hub_dataset)
    return dataset, opened


def test_hub_texts_are_read_only_when_the_cache_misses(fake_hub, tokenizer, corpus_file, tmp_path):
    dataset, opened = fake_hub
    model = tiny_model("llama", len(tokenizer))
    hp = tiny_hparams("llama", corpus_file, tmp_path, mom2_dataset="someone/corpus", mom2_n_samples=5)
    description, load = resolve_corpus(model, tokenizer, "someone/corpus", 5, 16)
    assert description == "hub:someone/corpus" and dataset.records_read == 0
    assert len(load()) == 5

    first = key_second_moments(model, tokenizer, hp, [1])
    read_for_statistics = dataset.records_read
    assert read_for_statistics > 5  # load() above plus the statistics pass
    again = key_second_moments(model, tokenizer, hp, [1])
    assert dataset.records_read == read_for_statistics  # served from the disk cache, nothing streamed
    torch.testing.assert_close(first[1], again[1], atol=0, rtol=0)
    assert opened == ["someone/corpus"] * 3


def test_a_misspelt_hub_dataset_is_an_error_not_a_fallback(fake_hub, tokenizer):
    model = tiny_model("llama", len(tokenizer))
    with pytest.raises(CorpusError, match=r"mom2_dataset 'someone/corpsu' .*doesn't exist on the Hub"):
        resolve_corpus(model, tokenizer, "someone/corpsu", 5, 16, setting="mom2_dataset")


def test_a_missing_text_file_is_an_error(tokenizer, tmp_path):
    model = tiny_model("llama", len(tokenizer))
    for name in (str(tmp_path / "corpus.txt"), "./no_such_folder", "~/no_such_corpus.txt"):
        with pytest.raises(CorpusError, match="sae_train_dataset .*no such text file"):
            resolve_corpus(model, tokenizer, name, 5, 16, setting="sae_train_dataset")


def test_an_unknown_name_offline_is_an_error_but_wikitext_falls_back(tokenizer, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("EASYEDIT_NMKE_DATA_DIR", raising=False)
    model = tiny_model("llama", len(tokenizer))
    with pytest.raises(CorpusError, match=r"calibration_dataset 'wikitxt-2' .*HF_HUB_OFFLINE"):
        resolve_corpus(model, tokenizer, "wikitxt-2", 4, 12, setting="calibration_dataset")
    with pytest.warns(UserWarning, match="'wikipedia' has no local copy .*model-generated"):
        description, _ = resolve_corpus(model, tokenizer, "wikipedia", 4, 12)
    assert description == "model-generated:4"
