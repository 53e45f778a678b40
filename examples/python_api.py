"""NMKE through its Python API: a few sequential edits on SmolLM2, with greedy completions.

    python examples/python_api.py
"""
from pathlib import Path

import torch

from easyedit_nmke.evaluate.records import load_records
from easyedit_nmke.models.nmke import NMKEHyperParams, apply_nmke_to_model, get_state
from easyedit_nmke.util.model_loader import load_model_and_tokenizer

REPO = Path(__file__).resolve().parent.parent


def complete(model, tok, prompt: str, n: int = 6) -> str:
    ids = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def main() -> None:
    hparams = NMKEHyperParams.from_hparams(REPO / "hparams/NMKE/smollm2-135m.yaml")
    model, tok = load_model_and_tokenizer(hparams.model_name)
    records = load_records([], limit=3)  # the project's own demo facts
    for r in records:
        print(f"before: {r.prompt!r} -> {complete(model, tok, r.prompt)!r}")
    for r in records:
        model, _ = apply_nmke_to_model(model, tok, [r.request()], hparams)
    for r in records:
        print(f"after:  {r.prompt!r} -> {complete(model, tok, r.prompt)!r} (target {r.target!r})")
        print(f"        {r.rephrase!r} -> {complete(model, tok, r.rephrase)!r}")
    state = get_state(model)
    print(f"{state.num_edits} edits; time per phase (s): {state.timings}")
    state.save("nmke_state")  # resume later with NMKEState.load("nmke_state")


if __name__ == "__main__":
    main()
