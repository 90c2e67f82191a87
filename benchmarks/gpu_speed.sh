#!/usr/bin/env bash
# Training-step speed on one GPU (issue 10): the plain-PyTorch reference of the 160M shape and `hmlm bench train`,
# in one call, each row written as JSON to OUT_DIR as soon as it is measured.
#
#   bash benchmarks/gpu_speed.sh OUT_DIR [REFERENCE_PY] [--part 1|2|all] [--dry-run]
#
# REFERENCE_PY (or $HMLM_REFERENCE) is ../shared/bench/reference_160m.py, carried to the GPU machine in a git-ignored
# folder (it is not part of hmlm). Runs, in priority order:
#   part 1: ref_b8                 reference, B=8 (eager, compiled, per-sample memory given as tensors)
#           hmlm_160m_b8_eager     160M anchor alone and + memory (256,64,16,0) on the device store, eager
#           hmlm_160m_b8_compiled  the same with --compile (trainer.compile: forward, memory, loss, backward)
#           hmlm_160m_b16_eager / hmlm_160m_b16_compiled   anchor alone at B=16
#   part 2: ref_b16                reference, B=16
#           hmlm_410m_b8_eager / hmlm_410m_b8_compiled     410M anchor alone
#           hmlm_160m_b8_docmask_compiled   packed documents (flex attention under compile), anchor alone
#           hmlm_160m_b8_cudagraphs         trainer.compile_mode=reduce-overhead (CUDA graphs), anchor alone
# All hmlm rows use batch x 2048 tokens, bf16 autocast, the paper's k=16 four-level tree and a bf16 bank, with
# data.doc_mask=false (plain causal attention, as the reference) except the docmask row.
#
# A deadline keeps the call inside the GPU tool's limit: a run whose estimated time no longer fits in
# HMLM_GPU_BUDGET_S (default 450 s from the start) is skipped and listed in OUT_DIR/skipped.txt; run the script
# again with `--part 2` (or the skipped parts) in a second call. OUT_DIR/summary.txt lists each run's exit status
# and seconds; OUT_DIR/<run>.log holds its output. --dry-run prints the hmlm commands instead of running anything
# (tests/test_gpu_script.py runs each of them on CPU at a tiny size).
set -uo pipefail

out="${1:?usage: bash benchmarks/gpu_speed.sh OUT_DIR [REFERENCE_PY] [--part 1|2|all]}"
shift
ref="${HMLM_REFERENCE:-}"
part="all"
dry=0
while [ $# -gt 0 ]; do
  case "$1" in
    --part) part="${2:?--part needs 1, 2 or all}"; shift 2 ;;
    --dry-run) dry=1; shift ;;
    *) ref="$1"; shift ;;
  esac
done
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-python3}"
budget="${HMLM_GPU_BUDGET_S:-450}"
start=$(date +%s)
if [ "$dry" = 0 ]; then
  mkdir -p "$out"
  : > "$out/summary.txt"
  : > "$out/skipped.txt"
fi

# hmlm needs its entry points (the plugin registry) and omegaconf: install both when missing, from local wheels
if [ "$dry" = 1 ]; then
  :
elif ! "$py" -c "import omegaconf" 2>/dev/null; then
  "$py" -m pip install -q --no-index --find-links "${HMLM_WHEELS:-.whl}" omegaconf \
    || { echo "gpu_speed: omegaconf is missing; carry its wheel (and antlr4-python3-runtime) in ${HMLM_WHEELS:-.whl}" >&2; exit 2; }
fi
if [ "$dry" = 0 ] && ! "$py" -c "import hmlm.registry as r; r.get('anchors', 'openlm')" 2>/dev/null; then
  "$py" -m pip install -q --no-deps --no-build-isolation -e . \
    || { echo "gpu_speed: could not install hmlm (pip install --no-deps -e .)" >&2; exit 2; }
fi
[ "$dry" = 1 ] || "$py" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" \
  | tee "$out/device.txt"

shape=(--recipe recipes/quickstart.yaml anchor.vocab_size=50432 index.router.branching=16 index.router.levels=4
       'memory.sizes=[256,64,16,0]' memory.dtype=bfloat16 data.seq_len=2048 data.doc_mask=false)
steps=(--steps 10 --warmup 3)

# run NAME ESTIMATE_S COMMAND...: run it if its estimate fits the time left, else record it as skipped
run() {
  local name="$1" est="$2"; shift 2
  local now left t0 rc
  if [ "$dry" = 1 ]; then
    "$@"
    return
  fi
  now=$(date +%s); left=$(( budget - (now - start) ))
  if [ "$left" -lt "$est" ]; then
    echo "$name (needs ~${est} s, ${left} s left)" | tee -a "$out/skipped.txt"
    return
  fi
  t0=$now
  timeout "$left" "$@" > "$out/$name.log" 2>&1
  rc=$?
  echo "$name rc=$rc $(( $(date +%s) - t0 )) s" | tee -a "$out/summary.txt"
}

reference() {  # B=N python reference_160m.py; its last line is the JSON of all its rows
  local b="$1"
  if [ "$dry" = 1 ]; then
    echo "# reference B=$b: $ref"
    return
  fi
  if [ -z "$ref" ] || [ ! -f "$ref" ]; then
    echo "gpu_speed: no reference script (pass its path or set HMLM_REFERENCE)" >&2
    return 2
  fi
  B="$b" "$py" "$ref" | tee "$out/ref_b$b.txt" && tail -n 1 "$out/ref_b$b.txt" > "$out/ref_b$b.json"
}

bench() {  # NAME [overrides and flags...]: hmlm bench train at the 160M shape unless overridden
  local name="$1"; shift
  local cmd=(bench train "${shape[@]}" anchor.preset=160m "$@" "${steps[@]}" --out "$out/$name.json")
  if [ "$dry" = 1 ]; then
    printf '%q ' hmlm "${cmd[@]}"
    echo
    return
  fi
  "$py" -m hmlm.cli "${cmd[@]}"
}

if [ "$part" = "1" ] || [ "$part" = "all" ]; then
  run ref_b8 170 reference 8
  run hmlm_160m_b8_eager 60 bench hmlm_160m_b8_eager trainer.batch_size=8 --stores device
  run hmlm_160m_b8_compiled 170 bench hmlm_160m_b8_compiled trainer.batch_size=8 --stores device --compile
  run hmlm_160m_b16_eager 30 bench hmlm_160m_b16_eager trainer.batch_size=16 --stores ""
  run hmlm_160m_b16_compiled 90 bench hmlm_160m_b16_compiled trainer.batch_size=16 --stores "" --compile
fi
if [ "$part" = "2" ] || [ "$part" = "all" ]; then
  run ref_b16 170 reference 16
  run hmlm_410m_b8_eager 40 bench hmlm_410m_b8_eager anchor.preset=410m trainer.batch_size=8 --stores ""
  run hmlm_410m_b8_compiled 90 bench hmlm_410m_b8_compiled anchor.preset=410m trainer.batch_size=8 --stores "" \
    --compile
  run hmlm_160m_b8_docmask_compiled 90 bench hmlm_160m_b8_docmask_compiled trainer.batch_size=8 data.doc_mask=true \
    --stores "" --compile
  run hmlm_160m_b8_cudagraphs 100 bench hmlm_160m_b8_cudagraphs trainer.batch_size=8 \
    trainer.compile_mode=reduce-overhead --stores "" --compile
fi
[ "$dry" = 1 ] || echo "gpu_speed: done in $(( $(date +%s) - start )) s; rows in $out/*.json, skipped runs in $out/skipped.txt"
