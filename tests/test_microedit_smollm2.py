"""MicroEdit on the real SmolLM2 with an SAE the project trains itself (integration)."""
from __future__ import annotations

import pytest
import torch

from conftest import REPO, SHARED_DATA

pytest.importorskip("sae_lens")

# The shipped YAML's own SAE: trained on first use into the cache (~10 minutes on a
# clean 2-core machine, 23 on a busy one) and reused afterwards. The same 10 edits with
# this SAE and these settings (tau 0.75) measured Rel 0.924, Gen 0.625, Loc 1.0, all edit
# prompts routed, no locality question routed (README "Results"); a smaller test-only SAE
# (60k tokens: FVE 0.79, 15% dead latents) was tried but not measured through to the end,
# so it is not used here.


@pytest.mark.integration
def test_smollm2_microedit_ten_sequential_zsre_edits():
    data = SHARED_DATA / "zsre_mend_eval_portability_gpt4.dev.json"
    if not data.is_file() or not (SHARED_DATA / "wikitext-2").is_dir():
        pytest.skip(f"ZsRE dev data or WikiText-2 not under {SHARED_DATA} (set EASYEDIT_NMKE_DATA_DIR)")
    from easyedit_nmke.evaluate.records import load_records
    from easyedit_nmke.evaluate.runner import RunConfig, run_lifelong
    from easyedit_nmke.methods import load_hparams, method_spec
    from easyedit_nmke.models.microedit.sae_io import read_metrics
    from easyedit_nmke.util.model_loader import load_model_and_tokenizer

    hparams = load_hparams(REPO / "hparams/MicroEdit/smollm2-135m.yaml")
    model, tok = load_model_and_tokenizer(hparams.model_name)
    records = load_records([data], limit=10)
    result = run_lifelong(model, tok, hparams, method_spec("MicroEdit"), records, RunConfig(eval_at=[10], progress=False))
    row = result.runs[-1]
    metrics = read_metrics(hparams.resolved_sae_path())
    assert metrics["fve"] >= 0.8 and metrics["dead_fraction"] <= 0.1, metrics
    # Guards the measured level with room for float differences across thread counts
    # (one flipped target token moves Rel by ~0.025); the bar is Rel >= 0.9.
    assert row["rel"] >= 0.85, row
    assert row["loc"] >= 0.95, row
    assert row["routing"]["routed_edit"] >= 0.9, row
    # The LLM's own weights are untouched: only the SAE decoder changed.
    fresh, _ = load_model_and_tokenizer(hparams.model_name)
    for (name, p), (_, q) in zip(fresh.named_parameters(), (kv for kv in model.named_parameters() if "microedit_sae" not in kv[0])):
        assert torch.equal(p, q), name
