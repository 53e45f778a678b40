"""Lifelong runner and CLI pieces on a tiny model: schema, metrics, resume."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from easyedit_nmke.evaluate import metrics
from easyedit_nmke.evaluate.records import DEMO_DATA, EditRecord, load_records, record_from_dict
from easyedit_nmke.evaluate.runner import RESULT_KEYS, RunConfig, results_table, run_lifelong
from easyedit_nmke.methods import load_hparams, method_spec
from easyedit_nmke.util.hparams import HParamsError
from easyedit_nmke.util.requests import RequestError

from conftest import REPO, SHARED_DATA, interrupted_on_call, smollm2_zsre_run, tiny_hparams, tiny_model


def test_demo_set_is_valid_and_large_enough():
    records = load_records([])
    assert len(records) >= 50
    assert len({r.subject for r in records}) == len(records)
    for r in records:
        assert r.subject in r.prompt and r.subject in r.rephrase
        assert r.target and r.locality_prompt and r.locality_answer


def test_zsre_and_counterfact_records_are_read():
    zsre = record_from_dict(
        {"src": "Who wrote Hamlet?", "subject": "Hamlet", "alt": "Goethe", "answers": ["Shakespeare"],
         "rephrase": "Hamlet was written by whom?", "loc": "nq question: who painted the mona lisa",
         "loc_ans": "Leonardo da Vinci"}
    )
    assert zsre.target == "Goethe" and zsre.locality_prompt == "nq question: who painted the mona lisa"
    cf = record_from_dict(
        {"prompt": "The mother tongue of Danielle Darrieux is", "subject": "Danielle Darrieux",
         "target_new": "English", "ground_truth": "French", "rephrase_prompt": "Danielle Darrieux spoke",
         "locality_prompt": "Michel Rocard spoke", "locality_ground_truth": "French"}
    )
    assert cf.rephrase == "Danielle Darrieux spoke" and cf.request()["target_new"] == "English"
    with pytest.raises(ValueError, match="empty target"):
        record_from_dict({"src": "Who wrote Hamlet?", "subject": "Hamlet", "alt": ""})


def test_templated_prompts_are_scored_with_the_subject_filled_in(tmp_path):
    record = record_from_dict(
        {"prompt": "{} is the capital of", "subject": "Paris", "target_new": "Italy",
         "rephrase_prompt": "The city of {} is the capital of"}
    )
    assert record.prompt == "Paris is the capital of" and record.rephrase == "The city of Paris is the capital of"
    path = tmp_path / "edits.json"
    path.write_text(json.dumps([{"src": "Who wrote Hamlet?", "subject": "Hamlet", "alt": "Goethe"}]))
    with pytest.raises(ValueError, match="at least 1"):
        load_records([path], limit=0)


def test_records_a_method_would_refuse_are_all_reported_before_editing(tokenizer, corpus_file, tmp_path):
    records = _records(4)
    records[1] = dataclasses.replace(records[1], subject="nowhere in the prompt")
    records[3] = dataclasses.replace(records[3], subject="")
    model = tiny_model("llama", len(tokenizer))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hp = tiny_hparams("llama", corpus_file, tmp_path / "stats")
    config = RunConfig(eval_at=[4], progress=False)
    with pytest.raises(RequestError, match=r"2 of 4 records cannot be edited by NMKE: record 1: .*; record 3: "):
        run_lifelong(model, tokenizer, hp, method_spec("NMKE"), records, config)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_locality_texts_read_records_without_an_edit_target(tmp_path):
    """WISE's unrelated text comes from a train split, where some ZsRE records have no target."""
    from easyedit_nmke.evaluate.records import load_records, locality_texts

    path = tmp_path / "train.json"
    path.write_text(json.dumps([
        {"src": "What gender is Ada?", "subject": "Ada", "alt": "", "answers": ["female"],
         "loc": "nq question: who plays the cat in the hat movie", "loc_ans": "Mike Myers"},
        {"src": "Who wrote Hamlet?", "subject": "Hamlet", "alt": "Goethe", "loc": "nq question: x"},
    ]))
    assert locality_texts(path) == ["nq question: who plays the cat in the hat movie Mike Myers"]
    # Questions the run scores stay out (ZsRE's train split is also edited past the dev file).
    assert locality_texts(path, {"nq question: who plays the cat in the hat movie"}) == []
    with pytest.raises(ValueError, match=r"train.json\[0\].*empty target"):
        load_records([path])  # records to edit still need a target


def test_token_accuracy_is_teacher_forced(tokenizer):
    model = tiny_model("llama", len(tokenizer))
    pair = ("The capital of France is", " Paris and more")
    acc = metrics.token_accuracy(model, tokenizer, [pair])[0]
    # Recompute by hand: argmax at each answer position with the true prefix fed in.
    prompt = tokenizer(pair[0])["input_ids"]
    answer = tokenizer(pair[1], add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt + answer])
    with torch.no_grad():
        logits = model(ids).logits[0]
    preds = logits[len(prompt) - 1 : len(prompt) - 1 + len(answer)].argmax(-1)
    assert acc == pytest.approx(float((preds == torch.tensor(answer)).float().mean()))


def _records(n):
    return load_records([], limit=n)


def test_run_lifelong_schema_and_resume(tokenizer, corpus_file, tmp_path, monkeypatch):
    spec = method_spec("NMKE")
    hp = tiny_hparams("llama", corpus_file, tmp_path / "stats")
    records = _records(4)
    config = RunConfig(eval_at=[2, 4], progress=False, immediate=True)

    straight = run_lifelong(tiny_model("llama", len(tokenizer)), tokenizer, hp, spec, records, config)
    data = straight.to_dict()
    for key in ("alg", "model", "data", "hparams", "env", "runs"):
        assert key in data
    assert data["hparams"]["mask_mode"] == "hybrid"
    assert [r["T"] for r in data["runs"]] == [2, 4]
    for row in data["runs"]:
        assert set(RESULT_KEYS) <= set(row)
        assert 0.0 <= row["loc"] <= 1.0 and row["sec_per_edit"] > 0
        # One key per layer and edit: at most T occupied null-space directions per layer.
        for layer in hp.layers:
            entry = row["null_space"]["layers"][str(layer)]
            assert 0 <= entry["occupied"] <= row["T"] <= entry["dims"]
            assert 0 <= entry["masked_occupied"] <= entry["masked_dims"] <= entry["dims"]  # hybrid
            assert 0 < entry["mean_kept_neurons"] <= tiny_model("llama", len(tokenizer)).config.intermediate_size
    early, late = (run["null_space"]["layers"] for run in data["runs"])
    assert all(late[k]["occupied"] >= early[k]["occupied"] for k in early)
    assert "Right after each edit" in results_table(data) and "null space used" in results_table(data)

    # Killed during the third edit, then resumed from the T=2 checkpoint: same final numbers.
    import easyedit_nmke.models.nmke as nmke_module

    work = tmp_path / "work"
    with interrupted_on_call(monkeypatch, nmke_module, "apply_nmke_to_model", 3):
        run_lifelong(tiny_model("llama", len(tokenizer)), tokenizer, hp, spec, records, config, work_dir=work)
    with pytest.raises(ValueError, match="another run"):
        run_lifelong(tiny_model("llama", len(tokenizer)), tokenizer, hp, spec, records[:3], config, work_dir=work)
    # The same prompts and targets with other locality pairs, or other scoring, are another run too.
    other_loc = [dataclasses.replace(r, locality_answer="something else") for r in records]
    other_config = RunConfig(eval_at=[2, 4], progress=False, immediate=False)
    for other_records, cfg in ((other_loc, config), (records, other_config)):
        with pytest.raises(ValueError, match="another run"):
            run_lifelong(tiny_model("llama", len(tokenizer)), tokenizer, hp, spec, other_records, cfg, work_dir=work)
    resumed_model = tiny_model("llama", len(tokenizer))
    resumed = run_lifelong(resumed_model, tokenizer, hp, spec, records, config, work_dir=work)
    final, expected = resumed.runs[-1], straight.runs[-1]
    for key in ("rel", "gen", "loc"):
        assert final[key] == pytest.approx(expected[key], abs=1e-6)
    from easyedit_nmke.models.nmke import get_state

    assert get_state(resumed_model).num_edits == 4


def test_run_saves_between_checkpoints_and_resumes_there(tokenizer, corpus_file, tmp_path, monkeypatch, capsys):
    """save_every: a run killed between evaluation checkpoints resumes after its last save."""
    import easyedit_nmke.models.nmke as nmke_module

    spec = method_spec("NMKE")
    hp = tiny_hparams("llama", corpus_file, tmp_path / "stats").replace(mask_mode="none")
    records = _records(5)
    config = RunConfig(eval_at=[5], progress=False, immediate=True, save_every=2)
    straight = run_lifelong(tiny_model("llama", len(tokenizer)), tokenizer, hp, spec, records, config)

    work = tmp_path / "work"
    calls = {"n": 0}
    real = nmke_module.apply_nmke_to_model

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    with interrupted_on_call(monkeypatch, nmke_module, "apply_nmke_to_model", 4):  # killed in edit 4
        run_lifelong(tiny_model("llama", len(tokenizer)), tokenizer, hp, spec, records, config, work_dir=work)
    progress = json.loads((work / "checkpoint" / "progress.json").read_text())
    assert progress["done"] == 2 and progress["result"]["runs"] == []  # saved after edit 2, nothing evaluated yet
    monkeypatch.setattr(nmke_module, "apply_nmke_to_model", counting)
    capsys.readouterr()
    resumed = run_lifelong(tiny_model("llama", len(tokenizer)), tokenizer, hp, spec, records, config, work_dir=work)
    assert "resuming from checkpoint after 2 edits" in capsys.readouterr().out
    assert calls["n"] == 3  # edits 3-5 only
    for key in ("rel", "gen", "loc"):
        assert resumed.runs[-1][key] == pytest.approx(straight.runs[-1][key], abs=1e-6)
    assert resumed.immediate["rel"] == pytest.approx(straight.immediate["rel"], abs=1e-6)


class _Killed(BaseException):
    pass


def _checkpointer_for_kill_tests(directory):
    from types import SimpleNamespace

    from easyedit_nmke.evaluate.runner import _Checkpointer

    spec = SimpleNamespace(edited_parameters=lambda hparams: [], save_state=lambda model, path: path.mkdir())
    return _Checkpointer(directory, spec, SimpleNamespace(to_dict=dict), [], RunConfig(eval_at=[1]))


def _save(checkpointer, done):
    from types import SimpleNamespace

    result = SimpleNamespace(to_dict=lambda: {"done": done}, immediate_raw=[])
    checkpointer.save(torch.nn.Linear(1, 1), done, 0.0, result, [])


@pytest.mark.parametrize("first_kill", range(12))
def test_a_kill_anywhere_in_two_saves_keeps_the_newest_complete_checkpoint(first_kill, tmp_path, monkeypatch):
    """Kill the k-th file operation of a save (and then of the next one): resume finds the newest
    checkpoint whose progress.json was written, complete, under "checkpoint"."""
    import os as os_module
    import shutil as shutil_module
    from pathlib import Path

    counter = {"n": 0, "kill_at": -1}
    newest = {"done": 1}

    def killable(real, name):
        def wrapped(*args, **kwargs):
            if counter["n"] == counter["kill_at"]:
                counter["n"] += 1
                raise _Killed(name)
            counter["n"] += 1
            out = real(*args, **kwargs)
            if name == "replace" and str(args[1]).endswith("progress.json"):
                newest["done"] = json.loads(Path(args[1]).read_text())["done"]
            return out

        return wrapped

    # Every rename, replace and deletion (also those inside rmtree) is a kill point.
    operations = ("replace", "rename", "unlink", "rmdir")
    for module, name in [(os_module, op) for op in operations] + [(shutil_module, "rmtree")]:
        monkeypatch.setattr(module, name, killable(getattr(module, name), name))
    monkeypatch.setattr(Path, "rename", lambda self, target: os_module.rename(self, target) or Path(target))
    monkeypatch.setattr(Path, "unlink", lambda self, missing_ok=False: (self.exists() or not missing_ok) and os_module.unlink(self))

    work = tmp_path / "work"
    _save(_checkpointer_for_kill_tests(work), 1)
    for done, kill_at in ((2, first_kill), (3, 5)):  # a second interrupted save after resuming
        counter["n"], counter["kill_at"] = 0, kill_at
        try:
            _save(_checkpointer_for_kill_tests(work), done)
        except _Killed:
            pass
        counter["kill_at"] = -1
        resumed = _checkpointer_for_kill_tests(work)
        assert resumed.exists()
        final = work / "checkpoint"
        assert json.loads((final / "progress.json").read_text())["done"] == newest["done"]
        for part in ("edited_weights.safetensors", "locality_reference.safetensors", "state"):
            assert (final / part).exists(), part
    assert {p.name for p in work.iterdir()} <= {"checkpoint", "checkpoint.partial", "checkpoint.old"}


def test_move_checkpoints_collects_every_folder_into_a_new_one(tmp_path):
    from easyedit_nmke.evaluate.runner import move_checkpoints

    for name in ("checkpoint", "checkpoint.old"):
        (tmp_path / "work" / name).mkdir(parents=True)
    first = move_checkpoints(tmp_path / "work", tmp_path / "stale")
    (tmp_path / "work" / "checkpoint").mkdir()
    second = move_checkpoints(tmp_path / "work", tmp_path / "stale")  # same second: a new name
    assert first != second and (first / "checkpoint.old").is_dir() and (second / "checkpoint").is_dir()
    assert not any((tmp_path / "work").iterdir())


def test_cli_overrides_and_hparams_loading():
    from easyedit_nmke.cli import parse_eval_at, parse_overrides

    assert parse_overrides(["mask_mode=none", "layers=[1, 2]"]) == {"mask_mode": "none", "layers": [1, 2]}
    # A brace starts a YAML mapping: an unquoted "{cache}/..." path is refused with the fix.
    with pytest.raises(SystemExit, match="not valid YAML.*quote it"):
        parse_overrides(["sae_path={cache}/saes/x"])
    assert parse_overrides(['sae_path="{cache}/saes/x"']) == {"sae_path": "{cache}/saes/x"}
    assert parse_eval_at("10,100", 100) == [10, 100]
    assert parse_eval_at(None, 50) == [1, 10, 50]
    hp = load_hparams(REPO / "hparams/NMKE/smollm2-135m.yaml", {"mask_mode": "none"})
    assert hp.mask_mode == "none"
    # --set values go through the same typed checks as the file: "1e-3" is YAML 1.1's string.
    hp = load_hparams(REPO / "hparams/NMKE/smollm2-135m.yaml", parse_overrides(["v_lr=1e-3", "layers=[4, 5]"]))
    assert hp.v_lr == 0.001 and hp.layers == [4, 5]
    with pytest.raises(HParamsError, match="v_num_grad_steps must be int"):
        load_hparams(REPO / "hparams/NMKE/smollm2-135m.yaml", parse_overrides(["v_num_grad_steps=ten"]))


@pytest.mark.integration
def test_cli_reports_bad_input_in_one_line_without_a_traceback(tmp_path):
    from easyedit_nmke.cli import main

    text = (REPO / "hparams/NMKE/smollm2-135m.yaml").read_text()
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text(text + "\nmask_moed: hybrid\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["edit", "--hparams", str(bad_yaml), "--num-edits", "1"])
    assert str(exit_info.value.code).startswith("easyedit-nmke edit: ") and "unknown key" in str(exit_info.value.code)
    bad_data = tmp_path / "edits.json"
    bad_data.write_text("[{\"src\": \"Who wrote Hamlet?\",")
    with pytest.raises(SystemExit, match=r"easyedit-nmke edit: .*edits.json: not valid JSON"):
        main(["edit", "--data", str(bad_data), "--num-edits", "1"])


def test_smollm2_zsre_ten_sequential_edits():
    """10 sequential ZsRE edits on SmolLM2 really edit it and keep unrelated answers.

    The unedited model scores Rel ~0.1 on these targets. The project's goal (issue 2)
    is Rel >= 0.9 and Loc >= 0.9 on them; the shipped YAML (2 context prefixes) measured
    Rel 1.0, Loc 0.937-0.943 at T=10 in the 100-edit runs (README "Results").
    """
    _, _, row = smollm2_zsre_run("NMKE")
    assert row["rel"] >= 0.9, row
    assert row["loc"] >= 0.9, row
