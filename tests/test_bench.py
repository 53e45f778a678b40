"""The lifelong benchmark command on tiny random models: cells, report, plots, resume.

The smoke test runs ``easyedit-nmke bench`` end to end with T = 1, 2 for NMKE
(hybrid), NMKE:none and EasyEdit's FT (PyPI easyeditor, when installed), with a
tiny MMLU folder and WikiText file, then reruns it: finished cells are skipped and
an interrupted cell resumes from its checkpoint.
"""
from __future__ import annotations

import importlib
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml

from easyedit_nmke.compat import is_easyeditor_installed
from easyedit_nmke.evaluate import bench, general

from conftest import REPO, interrupted_on_call, tiny_hparams, tiny_model

ZSRE = [
    {"subject": "Norway", "src": "What is the capital city of Norway?", "alt": "Bergen", "answers": ["Oslo"],
     "rephrase": "Which city is the capital of Norway?", "loc": "nq question: who wrote the odyssey",
     "loc_ans": "Homer"},
    {"subject": "Eiffel Tower", "src": "In which city is the Eiffel Tower?", "alt": "Rome", "answers": ["Paris"],
     "rephrase": "The Eiffel Tower stands in which city?", "loc": "nq question: who painted the mona lisa",
     "loc_ans": "Leonardo da Vinci"},
]
MMLU_ROWS = [
    ("What is 2 + 2?", "3", "4", "5", "6", 1),
    ("Which planet is known as the red planet?", "Venus", "Mars", "Jupiter", "Saturn", 1),
    ("What colour is the sky on a clear day?", "Blue", "Green", "Red", "Black", 0),
    ("How many legs does a spider have?", "Six", "Four", "Ten", "Eight", 3),
    ("Which gas do plants absorb?", "Oxygen", "Helium", "Carbon dioxide", "Neon", 2),
]
TEXT = (
    "The river flows through the old town and past the cathedral . Scientists measured the temperature "
    "of the lake every morning for a year . A small bakery on the corner sells bread , cakes and coffee . "
) * 20
FAST = ["--eval-at", "1,2", "--mmlu-n", "4", "--wikitext-windows", "2", "--window-tokens", "32", "--no-progress"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer):
    """A tiny Llama on disk, hparams for it, and a data folder laid out like shared/data."""
    root = tmp_path_factory.mktemp("bench")
    model_dir = root / "tiny-llama"
    tiny_model("llama", len(tokenizer)).save_pretrained(str(model_dir))
    tokenizer.save_pretrained(str(model_dir))

    data = root / "data"
    data.mkdir()
    (data / "zsre_mend_eval_portability_gpt4.dev.json").write_text(json.dumps(ZSRE))
    (data / "mmlu" / "test").mkdir(parents=True)
    lines = ["question,choice0,choice1,choice2,choice3,answer"] + [",".join(map(str, r)) for r in MMLU_ROWS]
    (data / "mmlu" / "test" / "general_knowledge_test.csv").write_text("\n".join(lines) + "\n")
    (data / "wikitext-2").mkdir()
    (data / "wikitext-2" / "test.txt").write_text(TEXT)

    hp_dir = root / "hparams"
    (hp_dir / "NMKE").mkdir(parents=True)
    nmke = tiny_hparams("llama", data / "wikitext-2" / "test.txt", root / "stats").to_dict()
    nmke["model_name"] = str(model_dir)
    (hp_dir / "NMKE" / "tiny.yaml").write_text(yaml.safe_dump(nmke))
    ft = yaml.safe_load((REPO / "hparams/baselines/FT/smollm2-135m.yaml").read_text())
    ft.update(model_name=str(model_dir), layers=[1], num_steps=3)
    (hp_dir / "baselines" / "FT").mkdir(parents=True)
    (hp_dir / "baselines" / "FT" / "tiny.yaml").write_text(yaml.safe_dump(ft))
    tiny = {
        "AlphaEdit": dict(layers=[1, 2], v_loss_layer=3, v_num_grad_steps=3, mom2_n_samples=20,
                          mom2_dataset=str(data / "wikitext-2" / "test.txt")),
        "WISE": dict(inner_params=["model.layers[2].mlp.down_proj.weight"], n_iter=5),
        "GRACE": dict(inner_params=["model.layers[2].mlp.down_proj.weight"], n_iter=5),
    }
    for alg, overrides in tiny.items():  # upstream EasyEdit only
        config = yaml.safe_load((REPO / f"hparams/baselines/{alg}/smollm2-135m.yaml").read_text())
        config.update(model_name=str(model_dir), **overrides)
        (hp_dir / "baselines" / alg).mkdir(parents=True)
        (hp_dir / "baselines" / alg / "tiny.yaml").write_text(yaml.safe_dump(config))
    return {"root": root, "data": data, "hparams": hp_dir}


def _bench(setup, out, methods, *extra):
    from easyedit_nmke.cli import main

    argv = ["bench", "--methods", methods, "--datasets", "zsre", "--data-dir", str(setup["data"]),
            "--hparams-dir", str(setup["hparams"]), "--model", "tiny", "--out", str(out), *FAST, *extra]
    assert main(argv) == 0


def test_bench_smoke_and_resume(setup, tmp_path, monkeypatch, capsys):
    with_ft = is_easyeditor_installed()
    methods = "NMKE,NMKE:none" + (",FT" if with_ft else "")
    out = tmp_path / "out"
    _bench(setup, out, methods)
    printed = capsys.readouterr().out

    labels = ["NMKE", "NMKE-none"] + (["FT"] if with_ft else [])
    for label in labels:
        cell = json.loads((out / "cells" / f"zsre-T2__{label}.json").read_text())
        # The edit command's schema, plus the bench fields.
        for key in ("alg", "model", "data", "hparams", "env", "runs", "immediate", "command", "general",
                    "weight_drift", "bench"):
            assert key in cell, (label, key)
        assert cell["command"].startswith("easyedit-nmke bench")
        assert [row["T"] for row in cell["runs"]] == [1, 2]
        for row in cell["runs"]:
            assert 0.0 <= row["loc"] <= 1.0 and row["sec_per_edit"] > 0 and row["peak_rss_mb"] > 0
            assert set(row["immediate"]) == {"rel", "gen", "loc"}
        for when in ("before", "after"):
            assert cell["general"][when]["mmlu"]["n"] == 4
            assert 0.0 <= cell["general"][when]["mmlu"]["accuracy"] <= 1.0
            assert cell["general"][when]["wikitext_ppl"]["perplexity"] > 1.0
        drift = cell["weight_drift"]
        assert drift["_total"]["rel_norm"] > 0 and 0 < drift["_total"]["changed_share"] <= 1
        assert cell["bench"]["method"] == label.replace("NMKE-none", "NMKE:none")
    nmke = json.loads((out / "cells" / "zsre-T2__NMKE.json").read_text())
    assert nmke["hparams"]["mask_mode"] == "hybrid"
    assert set(nmke["runs"][-1]["phase_seconds"]) >= {"z", "solve"}
    assert set(nmke["weight_drift"]) == {"model.layers.1.mlp.down_proj.weight",
                                         "model.layers.2.mlp.down_proj.weight", "_total"}
    none = json.loads((out / "cells" / "zsre-T2__NMKE-none.json").read_text())
    assert none["hparams"]["mask_mode"] == "none"
    if with_ft:
        ft = json.loads((out / "cells" / "zsre-T2__FT.json").read_text())
        assert ft["alg"] == "FT" and set(ft["weight_drift"]) == {"model.layers.1.mlp.down_proj.weight", "_total"}

    report = (out / "results.md").read_text()
    assert "Lifelong (all T edits evaluated after the T-th)" in report
    assert "Right after each edit" in report and "not** lifelong" in report
    assert "| NMKE:none | 2 | 2 |" in report and "| NMKE | 2 | 1 |" in report
    assert "MMLU acc" in report and "WikiText-2 ppl" in report and " → " in report
    png = out / "plots" / "zsre.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "written" in printed

    # Rerun: finished cells are skipped, nothing is edited.
    import easyedit_nmke.evaluate.runner as runner_module

    def no_run(*args, **kwargs):
        raise AssertionError("a finished cell ran again")

    monkeypatch.setattr(runner_module, "run_lifelong", no_run)
    _bench(setup, out, methods)
    assert capsys.readouterr().out.count("finished earlier") == len(labels)
    monkeypatch.undo()

    # A cell killed after its T=1 checkpoint resumes there: one more edit, not two.
    import easyedit_nmke.models.nmke as nmke_module

    real_apply = nmke_module.apply_nmke_to_model
    calls = {"n": 0}

    def dying_apply(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_apply(*args, **kwargs)

    killed = tmp_path / "killed"
    monkeypatch.setattr(nmke_module, "apply_nmke_to_model", dying_apply)
    with pytest.raises(KeyboardInterrupt):
        _bench(setup, killed, "NMKE:none")
    assert not (killed / "cells" / "zsre-T2__NMKE-none.json").exists()
    assert (killed / "work" / "zsre-T2__NMKE-none" / "checkpoint" / "progress.json").is_file()
    before_file = killed / "work" / "zsre-T2__NMKE-none" / "general_before.json"
    measured_before = json.loads(before_file.read_text())["value"]
    # --status reads the killed cell's checkpoint (and leaves its folder as it is).
    folder_before = sorted(p.name for p in (killed / "work" / "zsre-T2__NMKE-none").iterdir())
    capsys.readouterr()
    _bench(setup, killed, "NMKE:none", "--status")
    status = capsys.readouterr().out
    assert "| zsre-T2__NMKE-none | in progress | 1 / 2 | T=1: " in status
    assert sorted(p.name for p in (killed / "work" / "zsre-T2__NMKE-none").iterdir()) == folder_before
    (row,) = bench.cell_status(killed)
    assert row["sec_per_edit"] > 0 and row["edit_hours_left"] == pytest.approx(row["sec_per_edit"] / 3600)
    calls["n"] = -10  # no more interruptions
    _bench(setup, killed, "NMKE:none")
    assert calls["n"] == -9  # exactly one edit applied after resuming
    assert "resuming from checkpoint after 1 edits" in capsys.readouterr().out
    resumed = json.loads((killed / "cells" / "zsre-T2__NMKE-none.json").read_text())
    assert [row["T"] for row in resumed["runs"]] == [1, 2]
    assert [(r["cell"], r["state"], r["done"], r["of"]) for r in bench.cell_status(killed)] == [
        ("zsre-T2__NMKE-none", "finished", 2, 2)
    ]
    assert resumed["general"]["before"] == measured_before  # the unedited model's, kept for the resume

    # Another configuration in the same folder: the cell runs again; its old checkpoint is moved aside.
    _bench(setup, killed, "NMKE:none", "--set", "L2=2")
    assert "is from another configuration" in capsys.readouterr().out
    assert json.loads((killed / "cells" / "zsre-T2__NMKE-none.json").read_text())["hparams"]["L2"] == 2
    assert list((killed / "work").glob("zsre-T2__NMKE-none.stale-*"))


def test_datasets_and_methods(setup, tmp_path, capsys):
    data = setup["data"]
    zsre = bench.resolve_dataset("zsre", data)
    assert zsre.metric == "accuracy" and [p.name for p in zsre.paths] == ["zsre_mend_eval_portability_gpt4.dev.json"]
    (data / "zsre_mend_train-1k.json").write_text(json.dumps(ZSRE[:1]))
    try:
        zsre = bench.resolve_dataset("zsre", data)
        assert [p.name for p in zsre.paths][-1] == "zsre_mend_train-1k.json"  # ZsRE continues past the dev file
        from easyedit_nmke.evaluate.records import load_records

        assert len(load_records(zsre.paths, limit=3)) == 3
    finally:
        (data / "zsre_mend_train-1k.json").unlink()
    hallucination = tmp_path / "hallucination-edit.json"
    hallucination.write_text("[]")
    assert bench.resolve_dataset(str(hallucination), None).metric == "perplexity"
    assert bench.DATASETS["hallucination"][1] == "perplexity"
    with pytest.raises(SystemExit, match="neither"):
        bench.resolve_dataset("no-such-set", data)

    assert bench.parse_method("NMKE").overrides == {"mask_mode": "hybrid"}
    assert bench.parse_method("NMKE:fixed").overrides == {"mask_mode": "fixed"}
    assert bench.parse_method("NMKE:zero_update").overrides == {"mask_mode": "hybrid", "mask_application": "zero_update"}
    assert bench.parse_method("NMKE:zero_update").safe_label == "NMKE-zero_update"
    assert bench.parse_method("MEMIT").kind == "baseline"
    with pytest.raises(SystemExit, match="unknown method"):
        bench.parse_method("NoSuchMethod")

    # EasyEdit's run_*_editing.py flag spellings.
    parser = bench.add_bench_arguments(__import__("argparse").ArgumentParser())
    args = parser.parse_args(["--editing_method", "ROME", "--hparams_dir", "x.yaml", "--data_dir",
                              str(data / "zsre_mend_eval_portability_gpt4.dev.json"), "--ds_size", "7",
                              "--sequential_edit"])
    config = bench.config_from_args(args)
    assert config.methods == ["ROME"] and config.num_edits == 7 and config.eval_at == [1, 7]
    assert config.datasets == [str(data / "zsre_mend_eval_portability_gpt4.dev.json")]

    # A method whose library is missing is skipped with the reason printed, never silently.
    result = bench.run_bench(bench.BenchConfig(
        methods=["AlphaEdit"] if is_easyeditor_installed() else ["FT"], datasets=["zsre"], num_edits=1,
        eval_at=[1], out_dir=tmp_path / "skip", data_dir=data, hparams_dir=setup["hparams"], model="tiny",
    )) if not _upstream() else None
    if result is not None:
        assert result["skipped"]
        assert "skipping" in capsys.readouterr().out
        assert "## Not run" in (tmp_path / "skip" / "results.md").read_text()


def _upstream() -> bool:
    from easyedit_nmke.compat import easyeditor_flavour

    return is_easyeditor_installed() and easyeditor_flavour() == "upstream"


def test_general_capability_and_drift(setup, tokenizer):
    data = setup["data"]
    items = general.load_mmlu(data / "mmlu", 3, seed=0)
    assert len(items) == 3 and items == general.load_mmlu(data / "mmlu", 3, seed=0)
    assert items[0].subject == "general knowledge" and "A. " in general.mmlu_prompt(items[0])
    model = tiny_model("llama", len(tokenizer))
    config = general.GeneralConfig(mmlu_dir=str(data / "mmlu"), mmlu_n=5,
                                   wikitext=str(data / "wikitext-2" / "test.txt"), wikitext_windows=2,
                                   window_tokens=16)
    scores = general.evaluate_general(model, tokenizer, config)
    assert scores["mmlu"]["n"] == 5 and scores["wikitext_ppl"]["tokens"] == 2 * 15
    # Perplexity by hand for one window.
    window = general.wikitext_windows(tokenizer, data / "wikitext-2" / "test.txt", 1, 16)[0]
    ids = torch.tensor([window])
    with torch.no_grad():
        nll = torch.nn.functional.cross_entropy(model(ids).logits[0, :-1], ids[0, 1:])
    assert general.perplexity(model, tokenizer, [window])["perplexity"] == pytest.approx(float(nll.exp()), rel=1e-4)

    name = "model.layers.1.mlp.down_proj.weight"
    before = general.snapshot(model, [name])
    with torch.no_grad():
        model.get_parameter(name)[0].add_(1.0)
    drift = general.weight_drift(model, before)
    assert drift[name]["changed_share"] == pytest.approx(1 / model.get_parameter(name).shape[0])
    expected = 1.0 * model.get_parameter(name).shape[1] ** 0.5 / float(before[name].norm())
    assert drift[name]["rel_norm"] == pytest.approx(expected, rel=1e-4)


@pytest.mark.skipif(not is_easyeditor_installed(), reason="easyeditor is not installed")
@pytest.mark.parametrize("alg", ["ROME", "MEMIT"])
def test_covariance_baselines_run_offline_on_cpu(alg, tokenizer, tmp_path, monkeypatch, no_network):
    """ROME/MEMIT read the statistics file the plugin writes; nothing is downloaded, no CUDA."""
    from easyedit_nmke.evaluate.baselines import BaselineSpec, easyeditor_stats_path

    monkeypatch.setenv("EASYEDIT_NMKE_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    spec = BaselineSpec(alg)
    fields = set(spec.hparams_cls.__dataclass_fields__)
    overrides = dict(model_name="tiny-llama", layers=[1, 2] if alg == "MEMIT" else [1], v_loss_layer=3,
                     v_num_grad_steps=3, mom2_dataset=str(corpus), mom2_n_samples=20,
                     context_template_length_params=[[4, 5]])
    hparams = spec.load_hparams(REPO / f"hparams/baselines/{alg}/smollm2-135m.yaml",
                                {k: v for k, v in overrides.items() if k in fields})
    assert str(tmp_path / "cache") in hparams.stats_dir
    model = tiny_model("llama", len(tokenizer))
    originals = {n: p.detach().clone() for n, p in model.named_parameters()}
    spec.prepare(model, tokenizer, hparams)
    for layer in hparams.layers:
        assert easyeditor_stats_path(model, hparams, layer, spec.flavour).is_file()
    request = {"prompt": "The capital city of Norway is", "subject": "Norway", "target_new": "Bergen"}
    model, _ = spec.apply(model, tokenizer, [request], hparams)
    changed = sorted(n for n, p in model.named_parameters() if not torch.equal(p, originals[n]))
    assert changed == sorted(spec.edited_parameters(hparams))
    assert "to" not in torch.Tensor.__dict__  # the CPU redirect was undone


@pytest.fixture
def no_network(monkeypatch):
    """Fail if easyeditor tries to download its statistics corpus."""
    import datasets

    from easyedit_nmke.compat import import_easyeditor

    import_easyeditor()
    importlib.import_module("easyeditor.models.rome.layer_stats")

    def refuse(*args, **kwargs):
        raise AssertionError("tried to download a dataset")

    monkeypatch.setattr(datasets, "load_dataset", refuse)
    if "easyeditor.models.rome.layer_stats" in sys.modules:
        monkeypatch.setattr(sys.modules["easyeditor.models.rome.layer_stats"], "load_dataset", refuse)


@pytest.mark.skipif(not _upstream(), reason="needs upstream EasyEdit (AlphaEdit, WISE, GRACE)")
def test_upstream_baselines_in_bench(setup, tmp_path):
    """AlphaEdit, WISE and GRACE run in the bench and checkpoint their state."""
    data = tmp_path / "data"
    shutil.copytree(setup["data"], data)
    # WISE's unrelated text: a train split whose locality questions the run does not score
    train = [{**record, "loc": f"nq question: unrelated {i}"} for i, record in enumerate(ZSRE)]
    (data / "zsre_mend_train-1k.json").write_text(json.dumps(train))
    out = tmp_path / "out"
    from easyedit_nmke.cli import main

    assert main(["bench", "--methods", "AlphaEdit,WISE,GRACE", "--datasets", "zsre", "--data-dir", str(data),
                 "--hparams-dir", str(setup["hparams"]), "--model", "tiny", "--out", str(out), *FAST]) == 0
    for alg in ("AlphaEdit", "WISE", "GRACE"):
        cell = json.loads((out / "cells" / f"zsre-T2__{alg}.json").read_text())
        assert [row["T"] for row in cell["runs"]] == [1, 2]
        assert cell["bench"]["resumable"]
    state = out / "work" / "zsre-T2__{}" / "checkpoint" / "state"
    assert (Path(str(state).format("AlphaEdit")) / "alphaedit_cache_c.safetensors").is_file()
    assert (Path(str(state).format("GRACE")) / "grace_codebook.safetensors").is_file()
    assert (Path(str(state).format("WISE")) / "wise_state.safetensors").is_file()
    assert "note" in json.loads((out / "cells" / "zsre-T2__WISE.json").read_text())["weight_drift"]


@pytest.mark.skipif(not is_easyeditor_installed(), reason="easyeditor is not installed")
def test_baseline_cell_resumes_like_a_straight_run(tokenizer, tmp_path, monkeypatch):
    """A ROME run killed after its T=1 checkpoint ends with the same weights as an uninterrupted one."""
    from easyedit_nmke.evaluate.baselines import BaselineSpec
    from easyedit_nmke.evaluate.records import record_from_dict
    from easyedit_nmke.evaluate.runner import RunConfig, run_lifelong

    monkeypatch.setenv("EASYEDIT_NMKE_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    spec = BaselineSpec("ROME")
    hparams = spec.load_hparams(REPO / "hparams/baselines/ROME/smollm2-135m.yaml", dict(
        model_name="tiny-llama", layers=[1], v_loss_layer=3, v_num_grad_steps=3, mom2_dataset=str(corpus),
        mom2_n_samples=20, context_template_length_params=[[4, 5]]))
    records = [record_from_dict(r) for r in ZSRE]
    config = RunConfig(eval_at=[1, 2], progress=False)
    name = "model.layers.1.mlp.down_proj.weight"

    straight = tiny_model("llama", len(tokenizer))
    run_lifelong(straight, tokenizer, hparams, spec, records, config)

    with interrupted_on_call(monkeypatch, spec, "_apply_fn", 2):
        run_lifelong(tiny_model("llama", len(tokenizer)), tokenizer, hparams, spec, records, config,
                     work_dir=tmp_path / "work")
    resumed = tiny_model("llama", len(tokenizer))
    result = run_lifelong(resumed, tokenizer, hparams, spec, records, config, work_dir=tmp_path / "work")
    assert [row["T"] for row in result.runs] == [1, 2]
    assert torch.allclose(resumed.get_parameter(name), straight.get_parameter(name), atol=1e-6)
    assert not torch.equal(resumed.get_parameter(name), tiny_model("llama", len(tokenizer)).get_parameter(name))


def _adapter_state(alg, model, layer):
    from easyedit_nmke.util import nethook

    adapter = nethook.get_module(model, layer)
    if alg == "GRACE":
        return [adapter.keys, adapter.values.detach(), adapter.epsilons, *adapter.key_labels]
    return [adapter.new_weight.detach(), adapter.layer.weight, adapter.weight_mask, *adapter.memory_weight]


@pytest.mark.skipif(not _upstream(), reason="needs upstream EasyEdit (GRACE, WISE)")
@pytest.mark.parametrize("alg, overrides", [
    ("GRACE", dict(n_iter=5)),
    # save and merge every 1 and 2 edits, so the killed run's checkpoint holds a merged memory
    ("WISE", dict(n_iter=5, save_freq=1, merge_freq=2)),
])
def test_adapter_cell_resumes_like_a_straight_run(alg, overrides, tokenizer, tmp_path, monkeypatch):
    """A GRACE/WISE run killed after a checkpoint ends with the same adapter state and scores."""
    from easyedit_nmke.evaluate.baselines import BaselineSpec
    from easyedit_nmke.evaluate.records import record_from_dict
    from easyedit_nmke.evaluate.runner import RunConfig, run_lifelong

    def new_spec():
        spec = BaselineSpec(alg)
        spec.loc_prompts = ["nq question: who wrote the iliad", "nq question: where is the louvre"]
        return spec

    hparams = new_spec().load_hparams(REPO / f"hparams/baselines/{alg}/smollm2-135m.yaml", dict(
        model_name="tiny-llama", inner_params=["model.layers[2].mlp.down_proj.weight"], **overrides))
    third = {"subject": "Danube", "src": "Into which sea does the Danube flow?", "alt": "Baltic Sea",
             "answers": ["Black Sea"], "rephrase": "The Danube ends in which sea?",
             "loc": "nq question: who discovered penicillin", "loc_ans": "Alexander Fleming"}
    records = [record_from_dict(r) for r in [*ZSRE, third]]
    # The killed run's checkpoint is T=2; one prompt per forward, since upstream WISE's
    # retrieval over saved memories compares a per-prompt distance as one boolean.
    config = RunConfig(eval_at=[2, 3], progress=False, batch_size=1)
    layer = "model.layers.2.mlp.down_proj"

    straight = tiny_model("llama", len(tokenizer))
    expected = run_lifelong(straight, tokenizer, hparams, new_spec(), records, config)
    expected_state = [x.clone() for x in _adapter_state(alg, straight, layer)]

    killed = new_spec()
    torch.manual_seed(1234)  # another process state: the edits seed themselves
    with interrupted_on_call(monkeypatch, killed, "_apply_fn", 3):
        run_lifelong(tiny_model("llama", len(tokenizer)), tokenizer, hparams, killed, records, config,
                     work_dir=tmp_path / "work")
    resumed = tiny_model("llama", len(tokenizer))
    # a new spec, as in a new process (WISE's module-level histories are reset by prepare)
    result = run_lifelong(resumed, tokenizer, hparams, new_spec(), records, config, work_dir=tmp_path / "work")
    assert [(row["T"], row["rel"], row["gen"], row["loc"]) for row in result.runs] == [
        (row["T"], row["rel"], row["gen"], row["loc"]) for row in expected.runs
    ]
    state = _adapter_state(alg, resumed, layer)
    assert len(state) == len(expected_state) > 3
    for got, want in zip(state, expected_state):
        assert torch.equal(got, want)


def test_alphaedit_cache_checkpoint_is_safetensors(tmp_path, monkeypatch):
    """Upstream AlphaEdit's lifelong cache round-trips through safetensors (never a pickle)."""
    import types

    from easyedit_nmke.evaluate import baselines

    module = types.SimpleNamespace(cache_c=torch.randn(2, 4, 4), cache_c_new=False)
    monkeypatch.setattr(baselines, "_alphaedit_module", lambda: module)
    spec = object.__new__(baselines.BaselineSpec)  # no easyeditor needed for the state I/O
    spec.alg_name, spec.adapter_based, spec.resumable = "AlphaEdit", False, True
    saved = module.cache_c.clone()
    spec.save_state(None, tmp_path / "state")
    assert [p.name for p in (tmp_path / "state").iterdir()] == ["alphaedit_cache_c.safetensors"]
    module.cache_c = torch.zeros(2, 4, 4)
    spec.load_state(None, tmp_path / "state")
    assert torch.equal(module.cache_c, saved) and module.cache_c_new


def test_plot_line_styles_tell_every_method_of_the_full_matrix_apart():
    # The ZsRE matrix has 13 methods; matplotlib's default cycle repeats colours after 10.
    methods = ["AlphaEdit", "FT", "GRACE", "MEMIT", "MicroEdit", "NMKE", "NMKE:fixed", "NMKE:general",
               "NMKE:none", "NMKE:specific", "NMKE:zero_update", "ROME", "WISE"]
    styles = bench.plot_line_styles(methods[::-1])
    assert sorted(styles) == methods
    looks = {(s["color"], s["marker"], s["linestyle"]) for s in styles.values()}
    assert len(looks) == len(methods)
    # Sorted order, so a method keeps its look whatever order the cells were read in.
    assert styles == bench.plot_line_styles(methods)
