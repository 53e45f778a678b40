#!/usr/bin/env bash
# The lifelong benchmark matrix of issue 4, cell by cell (one process per method x dataset
# cell), resumable: rerun the same command after an interruption and finished cells are
# skipped, unfinished ones continue from their last checkpoint.
#
#   scripts/run_benchmarks.sh                      # every group below, in this order
#   scripts/run_benchmarks.sh zsre100 halluc100    # some groups
#   nohup scripts/run_benchmarks.sh > bench.log 2>&1 &   # in the background
#   python -m easyedit_nmke bench --status --out runs/bench   # how far each cell got
#
# Groups (cells):
#   zsre100     ZsRE, T=100: NMKE (hybrid), its ablations general/specific/fixed/none,
#               MicroEdit, FT, ROME, MEMIT, and AlphaEdit/WISE/GRACE when upstream EasyEdit
#               is the installed easyeditor (otherwise printed as skipped)
#   halluc100   WISE hallucination set, T=100 (Rel = perplexity): NMKE, NMKE:none, MicroEdit
#   zsre1000    ZsRE, T=1000 (725 dev records, then zsre_mend_train-1k): NMKE, NMKE:none,
#               MicroEdit, MEMIT
#   cf1000      CounterFact, T=1000: NMKE, NMKE:none
#
# Environment: OUT (default runs/bench), THREADS torch threads per cell (default 1),
# JOBS cells run at the same time (default 1; with 2 cores, JOBS=2 THREADS=1),
# EASYEDIT_NMKE_DATA_DIR (default ../shared/data), PYTHON (default python),
# EXTRA extra flags for every cell (e.g. "--mmlu-n 200"), ONLY a space-separated list of
# methods to keep from the chosen groups (e.g. ONLY="NMKE:general FT").
# Outputs: $OUT/cells/*.json (one per cell), $OUT/results.md, $OUT/plots/*.png,
# $OUT/logs/<cell>.log, $OUT/work/<cell>/ (checkpoints: at every T and every 25 edits in between,
# so a killed cell resumes with at most 25 edits lost; EXTRA="--save-every N" changes that).
# Cost per edit on the 2-core dev machine, one thread per cell, one other job on the
# second core (about twice that with three jobs on two cores): NMKE 4-9 s on ZsRE
# (90-130 s on the long hallucination passages), FT ~5 s, ROME ~35 s, MEMIT ~40 s
# (PyPI compute_z: up to 25 full-model forward/backward steps), plus ~2 min per cell for
# MMLU/WikiText-2 before and after.  A T=1000 NMKE cell takes ~2-3 h, a T=1000 MEMIT
# cell ~12 h.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-runs/bench}
THREADS=${THREADS:-1}
JOBS=${JOBS:-1}
PY=${PYTHON:-python}
EXTRA=${EXTRA:-}
ONLY=${ONLY:-}
export EASYEDIT_NMKE_DATA_DIR=${EASYEDIT_NMKE_DATA_DIR:-../shared/data}
export HF_HUB_OFFLINE=1
mkdir -p "$OUT/logs"

GROUPS_TO_RUN=("$@")
[ ${#GROUPS_TO_RUN[@]} -eq 0 ] && GROUPS_TO_RUN=(zsre100 halluc100 zsre1000 cf1000)

# One line per cell: dataset  num_edits  eval_at  method
cells() {
  local group=$1 m
  case $group in
    zsre100)
      for m in NMKE NMKE:general NMKE:specific NMKE:fixed NMKE:none MicroEdit FT ROME MEMIT AlphaEdit WISE GRACE; do
        echo "zsre 100 10,25,50,100 $m"
      done ;;
    halluc100)
      for m in NMKE NMKE:none MicroEdit; do echo "hallucination 100 10,50,100 $m"; done ;;
    zsre1000)
      for m in NMKE NMKE:none NMKE:zero_update MicroEdit MEMIT; do echo "zsre 1000 10,100,250,500,1000 $m"; done ;;
    cf1000)
      for m in NMKE NMKE:none; do echo "counterfact 1000 10,100,250,500,1000 $m"; done ;;
    *) echo "unknown group $group (zsre100 halluc100 zsre1000 cf1000)" >&2; return 1 ;;
  esac
}

run_cell() {
  local dataset=$1 n=$2 eval_at=$3 method=$4
  local log="$OUT/logs/${dataset}-T${n}__${method//:/-}.log"
  echo "[$(date '+%F %T')] start  $dataset T=$n $method (log: $log)"
  # shellcheck disable=SC2086
  if "$PY" -m easyedit_nmke bench --datasets "$dataset" --num-edits "$n" --eval-at "$eval_at" \
      --methods "$method" --out "$OUT" --threads "$THREADS" --no-progress $EXTRA >>"$log" 2>&1; then
    echo "[$(date '+%F %T')] done   $dataset T=$n $method"
  else
    echo "[$(date '+%F %T')] FAILED $dataset T=$n $method (see $log)"
  fi
}
export -f run_cell
export OUT THREADS PY EXTRA

keep_cell() {
  local method=${1##* } m
  [ -z "$ONLY" ] && return 0
  for m in $ONLY; do [ "$m" = "$method" ] && return 0; done
  return 1
}

for group in "${GROUPS_TO_RUN[@]}"; do
  cells "$group" || exit 1
done | while read -r line; do keep_cell "$line" && echo "$line"; done | xargs -P "$JOBS" -L 1 bash -c 'run_cell "$0" "$1" "$2" "$3"'

"$PY" -m easyedit_nmke bench --report-only --out "$OUT"
