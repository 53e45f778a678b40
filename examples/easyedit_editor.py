"""NMKE inside EasyEdit's BaseEditor, on CPU, with the embedded SmolLM2 model.

    python examples/easyedit_editor.py

Works with PyPI easyeditor 0.0.1.dev0 (installed by scripts/install.sh) and with
upstream EasyEdit on the path.  EasyEdit picks model classes from substrings of
``model_name``; the PyPI release loads 'llama' paths with ``LlamaTokenizer``, which
mangles SmolLM2's GPT-2-style BPE on transformers 5, so the converted model is
exposed under a directory name containing 'gpt' (AutoModelForCausalLM + GPT2Tokenizer).
"""
from pathlib import Path

import easyedit_nmke
from easyedit_nmke.compat import easyeditor_flavour, import_easyeditor
from easyedit_nmke.models.nmke import NMKEHyperParams, get_state
from easyedit_nmke.util.env import cache_root
from easyedit_nmke.util.model_loader import embedded_model_dir

REPO = Path(__file__).resolve().parent.parent


def model_dir_for_easyeditor() -> str:
    link = cache_root() / "models" / "smollm2-135m-gpt-style"
    if not link.exists():
        link.symlink_to(embedded_model_dir(), target_is_directory=True)
    return str(link)


def main() -> None:
    import_easyeditor()
    easyedit_nmke.register(now=True)
    from easyeditor import BaseEditor

    hparams = NMKEHyperParams.from_hparams(REPO / "hparams/NMKE/smollm2-135m.yaml").replace(
        model_name=model_dir_for_easyeditor()
    )
    editor = BaseEditor.from_hparams(hparams)
    # Sequential (lifelong) editing: upstream takes sequential_edit=True, the PyPI
    # release keeps edits when keep_original_weight=False.
    mode = {"sequential_edit": True} if easyeditor_flavour() == "upstream" else {"keep_original_weight": False}
    metrics, model, _ = editor.edit(
        prompts=["The capital city of Norway is", "The Eiffel Tower is located in the city of"],
        target_new=["Bergen", "Rome"],
        ground_truth=["Oslo", "Paris"],
        subject=["Norway", "Eiffel Tower"],
        **mode,
    )
    for m in metrics:
        print(m["requested_rewrite"]["prompt"], "->", m["requested_rewrite"]["target_new"], "post:", m["post"])
    print("edits in the lifelong state:", get_state(model).num_edits)


if __name__ == "__main__":
    main()
