"""MicroEdit on tiny random models with tiny TopK SAEs: hook, switch, decoder-row edits, state."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import REQUESTS, TEMPLATES, interrupted_on_call, tiny_model

sae_lens = pytest.importorskip("sae_lens")

from easyedit_nmke.models.microedit import (  # noqa: E402
    MicroEditHyperParams,
    apply_microedit_to_model,
    detach_microedit,
    get_state,
    prepare_state,
    routing_report,
)
from easyedit_nmke.models.microedit.calibration import calibrate_threshold  # noqa: E402
from easyedit_nmke.models.microedit.sae_hook import reconstruction_distance, sae_reconstruction  # noqa: E402
from easyedit_nmke.models.microedit.compute_decoder_edit import (  # noqa: E402
    RehearsedEdit,
    ReplayBatch,
    edit_input,
    target_logprobs,
)
from easyedit_nmke.models.microedit.rehearsal import EditMemory, select_rehearsal  # noqa: E402
from easyedit_nmke.models.microedit.sae_io import SAEError  # noqa: E402
from easyedit_nmke.util.hparams import HParamsError  # noqa: E402
from easyedit_nmke.util.requests import RequestError, normalise_request  # noqa: E402

LAYER = 2


def tiny_sae(d_in: int = 64, d_sae: int = 128, k: int = 8, seed: int = 0):
    torch.manual_seed(seed)
    return sae_lens.TopKSAE(sae_lens.TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=k, dtype="float32", device="cpu"))


@pytest.fixture
def sae_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "sae"
    tiny_sae().save_model(str(directory))
    return directory


def hparams_for(arch: str, sae_dir: Path, **overrides) -> MicroEditHyperParams:
    config = dict(
        alg_name="MicroEdit",
        model_name=f"tiny-{arch}",
        layers=[LAYER],
        layer_module_tmp=TEMPLATES[arch]["layer_module_tmp"],
        ln_f_module=TEMPLATES[arch]["ln_f_module"],
        sae_path=str(sae_dir),
        ard_threshold=1e9,  # route everything unless a test says otherwise
        ard_alpha=1.0,
        edit_lr=5e-2,
        stage1_steps=3,
        stage2_steps=15,
    )
    config.update(overrides)
    return MicroEditHyperParams.from_dict(config)


def logits(model, tok, texts):
    enc = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**enc).logits


TEXTS = ["The capital city of Norway is Oslo", "A small bakery sells bread"]


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gpt2", "gemma3"])
def test_bypassed_sae_leaves_logits_identical(arch, tokenizer, sae_dir):
    model = tiny_model(arch, len(tokenizer))
    before = logits(model, tokenizer, TEXTS)
    state = prepare_state(model, tokenizer, hparams_for(arch, sae_dir), progress=False)
    with state.switch.mode_set("off"):
        assert torch.equal(logits(model, tokenizer, TEXTS), before)
    state.switch.threshold = 1e-30  # nothing is that close: every input passes unchanged
    assert torch.equal(logits(model, tokenizer, TEXTS), before)
    with state.switch.mode_set("always"):
        assert not torch.allclose(logits(model, tokenizer, TEXTS), before)
    detach_microedit(model)
    assert "microedit_sae" not in dict(model.named_modules())
    assert torch.equal(logits(model, tokenizer, TEXTS), before)


def test_switch_routes_exactly_the_inputs_at_or_below_tau(tokenizer, sae_dir):
    model = tiny_model("llama", len(tokenizer))
    state = prepare_state(model, tokenizer, hparams_for("llama", sae_dir), progress=False)
    report = routing_report(model, tokenizer, {"a": [(TEXTS[0], " x")], "b": [(TEXTS[1], " y")]}, with_distances=True)
    ard_a, ard_b = report["ard"]["a"][0], report["ard"]["b"][0]
    assert ard_a != ard_b
    low, high = sorted([ard_a, ard_b])
    with state.switch.mode_set("off"):
        plain = logits(model, tokenizer, TEXTS)
    with state.switch.mode_set("always"):
        routed = logits(model, tokenizer, TEXTS)
    first_low = ard_a == low
    state.switch.threshold = low  # at tau: routed; above: passes
    mixed = logits(model, tokenizer, TEXTS)
    routed_row, plain_row = (0, 1) if first_low else (1, 0)
    n_routed = (tokenizer(TEXTS[routed_row])["input_ids"]).__len__()
    n_plain = (tokenizer(TEXTS[plain_row])["input_ids"]).__len__()
    assert torch.allclose(mixed[routed_row, :n_routed], routed[routed_row, :n_routed], atol=1e-5)
    assert torch.allclose(mixed[plain_row, :n_plain], plain[plain_row, :n_plain], atol=1e-5)
    state.switch.threshold = low * (1 - 1e-6)
    assert torch.allclose(logits(model, tokenizer, TEXTS), plain, atol=1e-5)
    state.switch.threshold = high
    with state.switch.recording() as record:
        logits(model, tokenizer, TEXTS)
    assert record.routed == [True, True]


def test_padding_does_not_change_an_inputs_distance(tokenizer, sae_dir):
    model = tiny_model("llama", len(tokenizer))
    prepare_state(model, tokenizer, hparams_for("llama", sae_dir), progress=False)
    alone = routing_report(model, tokenizer, {"x": [(TEXTS[1], " y")]}, with_distances=True)["ard"]["x"][0]
    batched = routing_report(model, tokenizer, {"x": [(TEXTS[0] + " and more words", " z"), (TEXTS[1], " y")]},
                             with_distances=True)["ard"]["x"][1]
    assert batched == pytest.approx(alone, rel=1e-5)


def test_massive_norm_positions_pass_through_unchanged(tokenizer, sae_dir):
    model = tiny_model("llama", len(tokenizer))
    state = prepare_state(model, tokenizer, hparams_for("llama", sae_dir), progress=False)
    hidden = torch.randn(1, 6, 64)
    hidden[0, 0] *= 1000.0
    with state.switch.mode_set("always"):
        out = state.switch.route(hidden)
    assert torch.equal(out[0, 0], hidden[0, 0])
    assert not torch.equal(out[0, 1:], hidden[0, 1:])
    assert torch.allclose(out[0, 1:], sae_reconstruction(state.sae, hidden)[0, 1:])


def test_edit_trains_only_the_active_decoder_rows_and_teaches_the_target(tokenizer, sae_dir):
    model = tiny_model("llama", len(tokenizer))
    hparams = hparams_for("llama", sae_dir)
    state = prepare_state(model, tokenizer, hparams, progress=False)
    w_before = state.sae.W_dec.detach().clone()
    others = {name: p.detach().clone() for name, p in model.named_parameters() if "microedit_sae" not in name}
    request = REQUESTS[0]
    pair = [(request["prompt"], " " + request["target_new"])]

    def target_logprob():
        from easyedit_nmke.evaluate.metrics import target_perplexity

        return -torch.tensor(target_perplexity(model, tokenizer, pair)).log()

    before = target_logprob()
    apply_microedit_to_model(model, tokenizer, [request], hparams)
    after = target_logprob()
    assert after > before + 0.5
    changed = (state.sae.W_dec != w_before).any(-1)
    active = torch.zeros_like(changed)
    active[state.edited_latents()] = True
    assert changed.any()
    assert not (changed & ~active).any()  # rows outside the active set: bitwise unchanged
    assert torch.equal(state.sae.W_dec[~active], w_before[~active])
    for name, p in model.named_parameters():
        if name in others:
            assert torch.equal(p, others[name]), name
    info = state.last_edit_info
    assert info["ard_after"] < info["ard_before"]
    assert state.num_edits == 1


def _one_edit(arch, tokenizer, sae_dir, **overrides):
    """Decoder after one edit of REQUESTS[0], the edit's inputs (``.replay``: recorded or not) and the state."""
    model = tiny_model(arch, len(tokenizer))
    hparams = hparams_for(arch, sae_dir, **overrides)
    state = prepare_state(model, tokenizer, hparams, progress=False)
    inputs = edit_input(model.eval(), tokenizer, normalise_request(REQUESTS[0]), hparams, state.switch)
    apply_microedit_to_model(model, tokenizer, [REQUESTS[0]], hparams)
    return state.sae.W_dec.detach().clone(), inputs, state


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
@pytest.mark.parametrize("layer", [LAYER, 3])  # 3: the last block, nothing above the SAE to replay
def test_replaying_the_blocks_above_the_sae_gives_the_full_forwards_edit(arch, layer, tokenizer, sae_dir):
    """Stage 2 on the blocks above the hook only (fast_path) trains the rows the full model would."""
    fast_rows, fast_inputs, fast_state = _one_edit(arch, tokenizer, sae_dir, layers=[layer], fast_path=True, stop_prob=1.0)
    full_rows, full_inputs, full_state = _one_edit(arch, tokenizer, sae_dir, layers=[layer], fast_path=False, stop_prob=1.0)
    assert fast_inputs.replay is not None and full_inputs.replay is None
    assert fast_state.last_edit_info["steps"][1] == full_state.last_edit_info["steps"][1] == 15
    torch.testing.assert_close(fast_rows, full_rows, rtol=1e-4, atol=1e-5)


def test_replay_keeps_massive_norm_positions_unreplaced(tokenizer, sae_dir):
    """With some positions outside the SAE (a low massive-norm factor) both paths still agree."""
    rows = {}
    for fast in (True, False):
        rows[fast], inputs, _ = _one_edit("llama", tokenizer, sae_dir, massive_norm_factor=1.05, fast_path=fast, stop_prob=1.0)
        assert 0 < int(inputs.ordinary.sum()) < inputs.ordinary.numel()
    torch.testing.assert_close(rows[True], rows[False], rtol=1e-4, atol=1e-5)


def test_a_replay_that_does_not_fit_falls_back_once_to_the_full_forward(tokenizer, sae_dir):
    # Not the final norm: the check against the model's own logits fails.
    hparams = hparams_for("llama", sae_dir, ln_f_module="model.layers.0.mlp")
    model = tiny_model("llama", len(tokenizer))
    state = prepare_state(model, tokenizer, hparams, progress=False)
    with pytest.warns(UserWarning, match="fast_path: replay of the blocks above the SAE differs") as caught:
        apply_microedit_to_model(model, tokenizer, [REQUESTS[0]], hparams)
        apply_microedit_to_model(model, tokenizer, [REQUESTS[1]], hparams)
    assert sum("fast_path" in str(w.message) for w in caught) == 1  # later edits skip the replay
    assert state.replay_fits is False
    reference = tiny_model("llama", len(tokenizer))
    full_hparams = hparams_for("llama", sae_dir, fast_path=False)
    reference_state = prepare_state(reference, tokenizer, full_hparams, progress=False)
    apply_microedit_to_model(reference, tokenizer, [REQUESTS[0], REQUESTS[1]], full_hparams)
    assert torch.equal(state.sae.W_dec, reference_state.sae.W_dec)


def test_a_final_norm_the_model_lacks_is_refused_before_anything_changes(tokenizer, sae_dir):
    model = tiny_model("llama", len(tokenizer))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with pytest.raises(SAEError, match="ln_f_module 'model.final_norm'"):
        prepare_state(model, tokenizer, hparams_for("llama", sae_dir, ln_f_module="model.final_norm"), progress=False)
    assert get_state(model) is None
    after = dict(model.named_parameters())
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)


def test_sequential_edits_accumulate_and_weights_copy_restores_exactly(tokenizer, sae_dir):
    model = tiny_model("llama", len(tokenizer))
    hparams = hparams_for("llama", sae_dir)
    _, copy0 = apply_microedit_to_model(model, tokenizer, [REQUESTS[0]], hparams, return_orig_weights=True,
                                        keep_original_weight=True)
    state = get_state(model)
    after_first = state.sae.W_dec.detach().clone()
    _, copy1 = apply_microedit_to_model(model, tokenizer, [REQUESTS[1]], hparams, return_orig_weights=True,
                                        keep_original_weight=True)
    assert torch.equal(copy1["microedit_sae.W_dec"], after_first)  # the second edit built on the first
    from easyedit_nmke.util import nethook

    with torch.no_grad():
        nethook.get_parameter(model, "microedit_sae.W_dec")[...] = copy0["microedit_sae.W_dec"]
    state.reset()
    assert torch.equal(state.sae.W_dec, copy0["microedit_sae.W_dec"])


def test_reset_save_and_load_round_trip(tokenizer, sae_dir, tmp_path):
    hparams = hparams_for("llama", sae_dir)
    model = tiny_model("llama", len(tokenizer))
    state = prepare_state(model, tokenizer, hparams, progress=False)
    original = state.sae.W_dec.detach().clone()
    apply_microedit_to_model(model, tokenizer, REQUESTS[:2], hparams)
    edited_logits = logits(model, tokenizer, TEXTS)
    state.save(tmp_path / "state")

    fresh = tiny_model("llama", len(tokenizer))
    fresh_state = prepare_state(fresh, tokenizer, hparams, progress=False)
    fresh_state.load(tmp_path / "state")
    assert fresh_state.num_edits == 2
    assert torch.equal(fresh_state.sae.W_dec, state.sae.W_dec)
    assert torch.allclose(logits(fresh, tokenizer, TEXTS), edited_logits)
    fresh_state.reset()
    assert torch.equal(fresh_state.sae.W_dec, original)
    assert fresh_state.num_edits == 0


def test_failed_request_in_a_call_takes_the_earlier_ones_back(tokenizer, sae_dir, monkeypatch):
    import easyedit_nmke.models.microedit.microedit_main as microedit_main

    hparams = hparams_for("llama", sae_dir)
    model = tiny_model("llama", len(tokenizer))
    apply_microedit_to_model(model, tokenizer, [REQUESTS[0]], hparams)
    state = get_state(model)
    decoder, originals = state.sae.W_dec.detach().clone(), dict(state.original_rows)
    real = microedit_main.compute_decoder_edit
    calls = []

    def diverges_on_second(*args, **kwargs):
        edit = real(*args, **kwargs)
        calls.append(edit)
        if len(calls) == 2:
            edit.rows[0, 0] = float("nan")
        return edit

    monkeypatch.setattr(microedit_main, "compute_decoder_edit", diverges_on_second)
    with pytest.raises(ValueError, match="not finite"):
        apply_microedit_to_model(model, tokenizer, REQUESTS[1:3], hparams)
    assert len(calls) == 2
    assert torch.equal(state.sae.W_dec, decoder)  # the first request's rows were put back
    assert state.num_edits == 1 and len(state.edit_log) == 1
    assert set(state.original_rows) == set(originals)


def test_state_load_checks_the_sae_before_changing_anything(tokenizer, sae_dir, tmp_path):
    hparams = hparams_for("llama", sae_dir)
    model = tiny_model("llama", len(tokenizer))
    apply_microedit_to_model(model, tokenizer, REQUESTS[:1], hparams)
    get_state(model).save(tmp_path / "state")
    # Another, narrower SAE saved at the same path: the saved latents do not fit it.
    narrow_dir = tmp_path / "narrow"
    tiny_sae(d_sae=16).save_model(str(narrow_dir))
    other = tiny_model("llama", len(tokenizer))
    other_state = prepare_state(other, tokenizer, hparams_for("llama", narrow_dir), progress=False)
    apply_microedit_to_model(other, tokenizer, REQUESTS[1:2], hparams_for("llama", narrow_dir))
    other_state.sae_source = get_state(model).sae_source  # pretend the sources match
    decoder, log = other_state.sae.W_dec.detach().clone(), list(other_state.edit_log)
    with pytest.raises(ValueError, match="this one has 16 latents|does not fit this SAE"):
        other_state.load(tmp_path / "state")
    assert torch.equal(other_state.sae.W_dec, decoder)
    assert other_state.edit_log == log and other_state.num_edits == 1
    # Rows of the wrong width, and a malformed log entry, are refused the same way.
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(tmp_path / "state" / "microedit_state.safetensors"))
    save_file({**tensors, "edited_rows": tensors["edited_rows"][:, :32].contiguous()},
              str(tmp_path / "state" / "microedit_state.safetensors"))
    model_state = get_state(model)
    decoder = model_state.sae.W_dec.detach().clone()
    with pytest.raises(ValueError, match=r"edited_rows has shape \(\d+, 32\), expected"):
        model_state.load(tmp_path / "state")
    save_file(tensors, str(tmp_path / "state" / "microedit_state.safetensors"))
    meta_path = tmp_path / "state" / "microedit_state.json"
    meta = json.loads(meta_path.read_text())
    meta["edit_log"][0]["subjekt"] = meta["edit_log"][0].pop("subject")
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="malformed"):
        model_state.load(tmp_path / "state")
    assert torch.equal(model_state.sae.W_dec, decoder) and model_state.num_edits == 1


def test_hooked_sae_settings_must_match_the_hparams(tokenizer, sae_dir):
    model = tiny_model("llama", len(tokenizer))
    apply_microedit_to_model(model, tokenizer, REQUESTS[:1], hparams_for("llama", sae_dir))
    with pytest.raises(ValueError, match=r"ard_alpha 1.0 \(hparams: 2.0\).*detach_microedit"):
        apply_microedit_to_model(model, tokenizer, REQUESTS[1:2], hparams_for("llama", sae_dir, ard_alpha=2.0))
    with pytest.raises(ValueError, match=r"sae_k 8 \(hparams: 4\)"):
        apply_microedit_to_model(model, tokenizer, REQUESTS[1:2], hparams_for("llama", sae_dir, sae_k=4))
    assert get_state(model).num_edits == 1
    detach_microedit(model)
    apply_microedit_to_model(model, tokenizer, REQUESTS[1:2], hparams_for("llama", sae_dir, ard_alpha=2.0))
    assert get_state(model).switch.alpha == 2.0


def test_two_models_do_not_share_state(tokenizer, sae_dir):
    hparams = hparams_for("llama", sae_dir)
    a, b = tiny_model("llama", len(tokenizer)), tiny_model("llama", len(tokenizer))
    apply_microedit_to_model(a, tokenizer, [REQUESTS[0]], hparams)
    prepare_state(b, tokenizer, hparams, progress=False)
    assert get_state(a) is not get_state(b)
    assert not torch.equal(get_state(a).sae.W_dec, get_state(b).sae.W_dec)


def test_copy_edits_a_copy_and_leaves_the_original(tokenizer, sae_dir):
    hparams = hparams_for("llama", sae_dir)
    model = tiny_model("llama", len(tokenizer))
    apply_microedit_to_model(model, tokenizer, [REQUESTS[0]], hparams)
    w = get_state(model).sae.W_dec.detach().clone()
    before = logits(model, tokenizer, TEXTS)
    copied, _ = apply_microedit_to_model(model, tokenizer, [REQUESTS[1]], hparams, copy=True)
    assert copied is not model
    assert torch.equal(get_state(model).sae.W_dec, w)
    assert torch.equal(logits(model, tokenizer, TEXTS), before)
    assert get_state(copied).num_edits == 2


def test_bad_inputs_leave_the_model_unchanged(tokenizer, sae_dir):
    model = tiny_model("llama", len(tokenizer))
    names = {n for n, _ in model.named_parameters()}
    with pytest.raises(ValueError, match=r"layer 7 is out of range: LlamaForCausalLM has 4 layers \(0..3\)"):
        apply_microedit_to_model(model, tokenizer, [REQUESTS[0]], hparams_for("llama", sae_dir, layers=[7]))
    with pytest.raises(RequestError, match="empty target_new"):
        apply_microedit_to_model(model, tokenizer, [dict(REQUESTS[0], target_new=" ")], hparams_for("llama", sae_dir))
    with pytest.raises(RequestError, match="does not occur in prompt"):
        apply_microedit_to_model(model, tokenizer, [dict(REQUESTS[0], subject="Sweden")], hparams_for("llama", sae_dir))
    assert get_state(model) is None
    assert {n for n, _ in model.named_parameters()} == names


def test_threshold_calibration_is_the_mean_distance_on_ordinary_text(tokenizer, sae_dir, corpus_file, monkeypatch, tmp_path):
    monkeypatch.setenv("EASYEDIT_NMKE_CACHE", str(tmp_path / "cache"))
    model = tiny_model("llama", len(tokenizer))
    hparams = hparams_for("llama", sae_dir, ard_threshold=None, calibration_dataset=str(corpus_file),
                          calibration_samples=12, calibration_max_length=16)
    state = prepare_state(model, tokenizer, hparams, progress=False)
    from easyedit_nmke.models.microedit.calibration import input_ard
    from easyedit_nmke.util.corpus import corpus_windows
    from easyedit_nmke.util.requests import pad_id

    windows = corpus_windows([corpus_file.read_text()], tokenizer, 16, 12)
    values = input_ard(model, state.switch, state.layer_name, windows, pad_id(tokenizer), batch_size=5)
    assert state.threshold == pytest.approx(sum(values) / len(values), rel=1e-5)
    assert calibrate_threshold(model, tokenizer, state.switch, hparams, progress=False) == state.threshold  # cached
    assert any((tmp_path / "cache" / "microedit_calibration").glob("*.json"))


def test_reconstruction_distance_formula():
    hidden = torch.zeros(1, 3, 4)
    recon = torch.ones(1, 3, 4)
    ordinary = torch.tensor([[True, True, False]])
    assert reconstruction_distance(hidden, recon, ordinary, alpha=2.0).item() == pytest.approx((4 + 4) / (2.0 * 2))
    none = reconstruction_distance(hidden, recon, torch.zeros(1, 3, dtype=torch.bool), alpha=2.0)
    assert none.item() == float("inf")


def test_lifelong_run_reports_routing_plots_distances_and_resumes(tokenizer, sae_dir, tmp_path, monkeypatch):
    from easyedit_nmke.evaluate.ard_plot import plot_ard_distributions
    from easyedit_nmke.evaluate.records import load_records
    from easyedit_nmke.evaluate.runner import RunConfig, results_table, run_lifelong
    from easyedit_nmke.methods import method_spec
    import easyedit_nmke.models.microedit as microedit_module

    spec = method_spec("MicroEdit")
    hparams = hparams_for("llama", sae_dir, stage2_steps=4)
    records = load_records([], limit=3)
    config = RunConfig(eval_at=[2, 3], progress=False, record_distances=True)
    straight = run_lifelong(tiny_model("llama", len(tokenizer)), tokenizer, hparams, spec, records, config).to_dict()
    for row in straight["runs"]:
        assert row["routing"]["routed_edit"] == 1.0  # tau 1e9: everything routed
        assert len(row["routing"]["ard"]["edit"]) == row["T"]
    assert len(straight["routing_before"]["ard"]["edit"]) == 3
    assert "routed edit" in results_table(straight)
    png = plot_ard_distributions(straight, tmp_path / "ard.png")
    assert png.stat().st_size > 1000

    work = tmp_path / "work"
    with interrupted_on_call(monkeypatch, microedit_module, "apply_microedit_to_model", 3):
        run_lifelong(tiny_model("llama", len(tokenizer)), tokenizer, hparams, spec, records, config, work_dir=work)
    resumed_model = tiny_model("llama", len(tokenizer))
    resumed = run_lifelong(resumed_model, tokenizer, hparams, spec, records, config, work_dir=work).to_dict()
    for key in ("rel", "gen", "loc"):
        assert resumed["runs"][-1][key] == pytest.approx(straight["runs"][-1][key], abs=1e-6)
    assert get_state(resumed_model).num_edits == 3
    assert resumed["routing_before"] == straight["routing_before"]


def test_locality_reference_is_the_model_before_the_sae_was_hooked(tokenizer, sae_dir):
    from easyedit_nmke.evaluate import metrics
    from easyedit_nmke.evaluate.records import load_records
    from easyedit_nmke.evaluate.runner import RunConfig, run_lifelong
    from easyedit_nmke.methods import method_spec

    records = load_records([], limit=2)
    pairs = [(r.locality_prompt, r.locality_answer) for r in records]
    reference = metrics.answer_predictions(tiny_model("llama", len(tokenizer)), tokenizer, pairs)
    model = tiny_model("llama", len(tokenizer))
    hparams = hparams_for("llama", sae_dir, stage2_steps=2)  # tau 1e9: locality inputs go through the SAE too
    result = run_lifelong(model, tokenizer, hparams, method_spec("MicroEdit"), records, RunConfig(eval_at=[2], progress=False))
    expected = metrics.mean(metrics.locality_agreement(model, tokenizer, pairs, reference))
    assert result.runs[-1]["loc"] == pytest.approx(expected, abs=1e-9)
    assert expected < 1.0  # routing them through the (random) SAE is counted as damage


def test_ard_margin_pulls_the_edit_input_well_under_tau(tokenizer, sae_dir):
    model = tiny_model("llama", len(tokenizer))
    request = REQUESTS[0]
    probe = prepare_state(model, tokenizer, hparams_for("llama", sae_dir), progress=False)
    pair = [(request["prompt"], " " + request["target_new"])]
    unedited = routing_report(model, tokenizer, {"edit": pair}, with_distances=True)["ard"]["edit"][0]
    detach_microedit(model)
    tau = unedited * 0.9  # the unedited input would not be routed
    hparams = hparams_for("llama", sae_dir, ard_threshold=tau, ard_margin=0.3, stage1_steps=200, stop_prob=0.5)
    apply_microedit_to_model(model, tokenizer, [request], hparams)
    state = get_state(model)
    after = routing_report(model, tokenizer, {"edit": pair}, with_distances=True)
    assert after["ard"]["edit"][0] <= 0.3 * tau * 1.01
    assert after["routed_edit"] == 1.0
    assert state.last_edit_info["steps"][0] < 200  # stage 1 stopped at the margin
    assert probe is not state


def test_constant_norm_rescale_sae_edits_through_the_same_linear_decoder(tokenizer, tmp_path):
    """SAE-Lens' per-token input normalisation (the Mistral-7B release) keeps ẑ linear in W_dec."""
    from easyedit_nmke.models.microedit.sae_hook import decoder_output_scale

    torch.manual_seed(0)
    cfg = sae_lens.TopKSAEConfig(d_in=64, d_sae=128, k=8, normalize_activations="constant_norm_rescale")
    sae = sae_lens.TopKSAE(cfg)
    hidden = torch.randn(2, 5, 64) * 7.0
    acts = sae.encode(hidden)
    by_hand = (acts @ sae.W_dec + sae.b_dec) * decoder_output_scale(sae, hidden)
    assert torch.allclose(by_hand, sae.decode(sae.encode(hidden)), atol=1e-5)

    sae.save_model(str(tmp_path / "sae"))
    model = tiny_model("llama", len(tokenizer))
    hparams = hparams_for("llama", tmp_path / "sae")
    apply_microedit_to_model(model, tokenizer, [REQUESTS[0]], hparams)
    state = get_state(model)
    assert state.sae.cfg.normalize_activations == "constant_norm_rescale"
    assert state.last_edit_info["ard_after"] < state.last_edit_info["ard_before"]


# --- rehearsal of earlier edits (rehearsal_edits, the plugin's extension) -------------------


def test_rehearsal_picks_the_earlier_edits_sharing_most_rows_most_recent_first():
    request = normalise_request(REQUESTS[0])
    memory = [EditMemory(request, torch.tensor(rows)) for rows in ([1, 2, 3], [7, 8], [2, 3, 9], [3, 4, 5])]
    current = torch.tensor([2, 3, 4])
    assert select_rehearsal(memory, current, 2) == [memory[3], memory[2]]  # 2 shared each: newest first
    assert select_rehearsal(memory, current, 10) == [memory[3], memory[2], memory[0]]  # memory[1] shares none
    assert select_rehearsal(memory, current, 0) == []
    with pytest.raises(HParamsError, match="rehearsal_edits must be >= 0"):
        hparams_for("llama", Path("unused"), rehearsal_edits=-1)


def test_a_rehearsed_edits_reconstruction_is_the_saes_own_with_the_trained_rows_in_place(tokenizer, sae_dir):
    model = tiny_model("llama", len(tokenizer)).eval()
    hparams = hparams_for("llama", sae_dir)
    state = prepare_state(model, tokenizer, hparams, progress=False)
    current = edit_input(model, tokenizer, normalise_request(REQUESTS[0]), hparams, state.switch)
    earlier = edit_input(model, tokenizer, normalise_request(REQUESTS[1]), hparams, state.switch)
    rehearsed = RehearsedEdit.build(earlier, current.latents, state.sae)
    new_rows = torch.randn(current.latents.numel(), state.sae.W_dec.shape[1])
    got = rehearsed.reconstruction(new_rows, state.sae.b_dec.detach())
    with torch.no_grad():
        state.sae.W_dec[current.latents] = new_rows
    expected = sae_reconstruction(state.sae, earlier.hidden)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_rehearsal_keeps_earlier_edits_and_still_trains_only_the_current_rows(tokenizer, sae_dir):
    """Two edits, then a third with and without rehearsing them: rehearsal leaves them more likely."""

    def target_logprob(model, request):
        from easyedit_nmke.evaluate.metrics import target_perplexity

        return -torch.tensor(target_perplexity(model, tokenizer, [(request["prompt"], " " + request["target_new"])])).log()

    earlier_logprob = {}
    for count in (0, 2):
        model = tiny_model("llama", len(tokenizer))
        apply_microedit_to_model(model, tokenizer, REQUESTS[:2], hparams_for("llama", sae_dir, stop_prob=1.0))
        state = get_state(model)
        before = state.sae.W_dec.detach().clone()
        hparams = hparams_for("llama", sae_dir, stop_prob=1.0, rehearsal_edits=count)
        apply_microedit_to_model(model, tokenizer, REQUESTS[2:], hparams)
        assert state.last_edit_info["rehearsed"] == count
        changed = (state.sae.W_dec != before).any(-1).nonzero().squeeze(1)
        assert changed.numel() > 0
        assert torch.isin(changed, state.edit_log[-1].latents).all()  # only the third edit's rows moved
        earlier_logprob[count] = sum(target_logprob(model, r) for r in REQUESTS[:2])
    assert earlier_logprob[2] > earlier_logprob[0] + 0.5


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
def test_one_batched_replay_gives_each_inputs_own_target_logprobs(arch, tokenizer, sae_dir):
    """Inputs of different lengths, right-padded into one replay: each row's log-probs are its full forward's."""
    model = tiny_model(arch, len(tokenizer)).eval()
    hparams = hparams_for(arch, sae_dir)
    state = prepare_state(model, tokenizer, hparams, progress=False)
    inputs = [
        edit_input(model, tokenizer, normalise_request(request), hparams, state.switch, use_replay=False)
        for request in REQUESTS[:3]
    ]
    assert len({each.input_ids.shape[1] for each in inputs}) > 1  # the batch really is padded
    batch = ReplayBatch.build(model, hparams, inputs, state.switch)
    assert batch is not None
    torch.manual_seed(0)
    recons = [each.hidden + 0.5 * torch.randn_like(each.hidden) for each in inputs]
    batched = batch.target_logprobs(recons)
    for each, recon, got in zip(inputs, recons, batched):
        expected = target_logprobs(model, each, recon, state.switch)  # no replay: the whole model
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(got, target_logprobs(model, each, each.hidden, state.switch))  # recon is used


def test_edit_log_is_saved_loaded_and_reset_with_the_state(tokenizer, sae_dir, tmp_path):
    hparams = hparams_for("llama", sae_dir, stage2_steps=2)
    model = tiny_model("llama", len(tokenizer))
    apply_microedit_to_model(model, tokenizer, REQUESTS[:2], hparams)
    state = get_state(model)
    assert [e.request for e in state.edit_log] == [normalise_request(r) for r in REQUESTS[:2]]
    state.save(tmp_path / "state")
    fresh = tiny_model("llama", len(tokenizer))
    fresh_state = prepare_state(fresh, tokenizer, hparams, progress=False)
    fresh_state.load(tmp_path / "state")
    assert [e.request for e in fresh_state.edit_log] == [e.request for e in state.edit_log]
    assert all(torch.equal(a.latents, b.latents) for a, b in zip(fresh_state.edit_log, state.edit_log))
    fresh_state.reset()
    assert fresh_state.edit_log == [] and fresh_state.num_edits == 0


def test_a_failed_first_edit_unhooks_the_sae_it_hooked(tokenizer, sae_dir, monkeypatch):
    import easyedit_nmke.models.microedit.microedit_main as microedit_main

    hparams = hparams_for("llama", sae_dir, ard_threshold=1e9)  # everything routed once hooked
    model = tiny_model("llama", len(tokenizer))
    before = logits(model, tokenizer, TEXTS)

    def fails(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(microedit_main, "execute_microedit", fails)
    with pytest.raises(RuntimeError, match="out of memory"):
        apply_microedit_to_model(model, tokenizer, [REQUESTS[0]], hparams)
    assert get_state(model) is None and "microedit_sae" not in dict(model.named_modules())
    assert torch.equal(logits(model, tokenizer, TEXTS), before)
    # An SAE hooked before the call (prepare_method, earlier edits) stays hooked.
    monkeypatch.undo()
    apply_microedit_to_model(model, tokenizer, [REQUESTS[0]], hparams)
    monkeypatch.setattr(microedit_main, "execute_microedit", fails)
    with pytest.raises(RuntimeError):
        apply_microedit_to_model(model, tokenizer, [REQUESTS[1]], hparams)
    assert get_state(model) is not None and get_state(model).num_edits == 1


def test_state_load_refuses_other_ard_settings_other_sae_weights_and_malformed_files(tokenizer, sae_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    hparams = hparams_for("llama", sae_dir)
    model = tiny_model("llama", len(tokenizer))
    apply_microedit_to_model(model, tokenizer, REQUESTS[:1], hparams)
    get_state(model).save(tmp_path / "state")

    def fresh_state(**overrides):
        return prepare_state(tiny_model("llama", len(tokenizer)), tokenizer, hparams_for("llama", sae_dir, **overrides),
                             progress=False)

    with pytest.raises(ValueError, match="ard_alpha"):
        fresh_state(ard_alpha=2.0).load(tmp_path / "state")
    tensors = load_file(str(tmp_path / "state" / "microedit_state.safetensors"))
    tensors["original_rows"] = tensors["original_rows"] + 1.0
    save_file(tensors, str(tmp_path / "state" / "microedit_state.safetensors"))
    state = fresh_state()
    decoder = state.sae.W_dec.detach().clone()
    with pytest.raises(ValueError, match="other weights"):
        state.load(tmp_path / "state")
    assert torch.equal(state.sae.W_dec, decoder)
    del tensors["edited_rows"]
    save_file(tensors, str(tmp_path / "state" / "microedit_state.safetensors"))
    with pytest.raises(ValueError, match="malformed"):
        state.load(tmp_path / "state")


def test_save_leaves_out_an_edit_the_editor_wrote_back(tokenizer, sae_dir, tmp_path):
    from easyedit_nmke.util import nethook

    hparams = hparams_for("llama", sae_dir, stage2_steps=3)
    model = tiny_model("llama", len(tokenizer))
    apply_microedit_to_model(model, tokenizer, [REQUESTS[0]], hparams)
    _, weights_copy = apply_microedit_to_model(model, tokenizer, [REQUESTS[1]], hparams, return_orig_weights=True,
                                               keep_original_weight=True)
    state = get_state(model)
    state.save(tmp_path / "kept")  # not written back yet: both edits saved, the record kept
    assert json.loads((tmp_path / "kept" / "microedit_state.json").read_text())["num_edits"] == 2
    with torch.no_grad():
        nethook.get_parameter(model, "microedit_sae.W_dec")[...] = weights_copy["microedit_sae.W_dec"]
    state.save(tmp_path / "restored")
    meta = json.loads((tmp_path / "restored" / "microedit_state.json").read_text())
    assert meta["num_edits"] == 1 and [e["prompt"] for e in meta["edit_log"]] == [REQUESTS[0]["prompt"]]


def test_an_edit_the_editor_wrote_back_leaves_the_log(tokenizer, sae_dir):
    """EasyEdit's non-sequential mode restores the decoder after each call: that edit is gone from the log."""
    from easyedit_nmke.util import nethook

    hparams = hparams_for("llama", sae_dir, stage2_steps=3)
    model = tiny_model("llama", len(tokenizer))
    _, weights_copy = apply_microedit_to_model(model, tokenizer, [REQUESTS[0]], hparams, return_orig_weights=True,
                                               keep_original_weight=True)
    with torch.no_grad():
        nethook.get_parameter(model, "microedit_sae.W_dec")[...] = weights_copy["microedit_sae.W_dec"]
    apply_microedit_to_model(model, tokenizer, [REQUESTS[1]], hparams)
    state = get_state(model)
    assert [e.request for e in state.edit_log] == [normalise_request(REQUESTS[1])]
    assert state.num_edits == 1
    apply_microedit_to_model(model, tokenizer, [REQUESTS[2]], hparams)  # kept: the second edit stays
    assert len(state.edit_log) == 2 and state.num_edits == 2
