#!/usr/bin/env bash
# Training-step speed on one GPU (issue 10): the plain-PyTorch reference of the 160M shape and `hmlm bench train`,
# in one call, each row written as JSON to OUT_DIR as soon as it is measured, then the table (speed.md, speed.json).
#
#   bash benchmarks/gpu_speed.sh OUT_DIR [REFERENCE_PY] [--part 1|2|3|all] [--dry-run]
#
# REFERENCE_PY (or $HMLM_REFERENCE; default .bench/reference_160m.py) is ../shared/bench/reference_160m.py, carried to
# the GPU machine in a git-ignored folder (it is not part of hmlm); benchmarks/reference_rows.py runs it unchanged and adds each row's peak memory.
# Runs, in priority order (part 1 is the default and is the issue-10 table at batch 8):
#   part 1: ref_b8                 reference, B=8: anchor alone eager and compiled
#           hmlm_160m_b8_eager     160M anchor alone, then + memory (256,64,16,0) on the device store, eager
#           hmlm_160m_b8_compiled  the same with --compile (trainer.compile: forward, memory, loss, backward)
#   part 2: ref_b16, hmlm_160m_b16_eager / _compiled (anchor alone, then + memory with bf16 moments, B=16)
#           hmlm_410m_b8_eager / _compiled                 410M anchor alone
#   part 3: ref_b8_memory          the reference's rows with per-sample memory given as tensors (a second compile)
#           hmlm_160m_b8_docmask_compiled   packed documents (flex attention under compile), anchor alone
#           hmlm_160m_b8_cudagraphs         trainer.compile_mode=reduce-overhead (CUDA graphs), anchor alone
#   part 5: ref_b16, hmlm_160m_b16_cudagraphs, hmlm_160m_b8_cudagraphs_memory: CUDA graphs (reduce-overhead), anchor
#           alone and + memory (bf16 moments at B=16), not in "all"
#   part 4: fit_overhead_b8        `hmlm bench fit-overhead`: fit's tokens/s against the bench's, 160M + memory on the
#                                  device store, the bundled corpus indexed with the hashing embedder (not in "all")
# All hmlm rows use batch x 2048 tokens, bf16 autocast, the paper's k=16 four-level tree and a bf16 bank, with
# data.doc_mask=false (plain causal attention, as the reference) except the docmask row.
#
# HMLM_PROFILE=1 adds `--profile OUT_DIR/profile/<run>` to every hmlm row (hmlm.bench.profile: the step's regions,
# the device's busy fraction and the top kernels, taken after the row's timing).
# A deadline keeps the call inside its share of the GPU tool's limit: HMLM_GPU_BUDGET_S (default 300 s from the
# start) bounds everything, the table included. A run whose minimum time no longer fits is skipped and listed in
# OUT_DIR/skipped.txt; a run that is started gets the time left and keeps the rows it finished (each row is written
# when measured). OUT_DIR/summary.txt lists each run's exit status and seconds, OUT_DIR/<run>.log its output,
# OUT_DIR/commands.txt the exact commands. --dry-run prints the commands instead of running anything
# (tests/test_gpu_script.py runs each hmlm command on CPU at a tiny size, and the reference runner on a stand-in).
set -uo pipefail

out="${1:?usage: bash benchmarks/gpu_speed.sh OUT_DIR [REFERENCE_PY] [--part 1|2|3|all] [--dry-run]}"
shift
ref="${HMLM_REFERENCE:-.bench/reference_160m.py}"
part="1"
dry=0
while [ $# -gt 0 ]; do
  case "$1" in
    --part) part="${2:?--part needs 1, 2, 3, 4, 5 or all}"; shift 2 ;;
    --dry-run) dry=1; shift ;;
    *) ref="$1"; shift ;;
  esac
done
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-python3}"
budget="${HMLM_GPU_BUDGET_S:-300}"
table_s=10  # kept back for the table at the end
start=$(date +%s)
if [ "$dry" = 0 ]; then
  mkdir -p "$out"
  : > "$out/summary.txt"
  : > "$out/skipped.txt"
  : > "$out/commands.txt"
fi

# hmlm needs its entry points (the plugin registry) and omegaconf: install both when missing, from local wheels
if [ "$dry" = 1 ]; then
  :
elif ! "$py" -c "import omegaconf" 2>/dev/null; then
  "$py" -m pip install -q --no-index --find-links "${HMLM_WHEELS:-.whl}" omegaconf \
    || { echo "gpu_speed: omegaconf is missing; carry its wheel (and antlr4-python3-runtime) in ${HMLM_WHEELS:-.whl}" >&2; exit 2; }
fi
if [ "$dry" = 0 ] && ! "$py" -c "from hmlm import registry; registry.get('stores', 'tiered')" 2>/dev/null; then
  "$py" -m pip install -q --no-deps --no-build-isolation -e . \
    || { echo "gpu_speed: could not install hmlm (pip install --no-deps -e .)" >&2; exit 2; }
fi
[ "$dry" = 1 ] || "$py" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" \
  | tee "$out/device.txt"

shape=(--recipe recipes/quickstart.yaml anchor.vocab_size=50432 index.router.branching=16 index.router.levels=4
       'memory.sizes=[256,64,16,0]' memory.dtype=bfloat16 data.seq_len=2048 data.doc_mask=false)
steps=(--steps 10 --warmup 3)

# run NAME ESTIMATE_S BUILDER ARGS...: BUILDER (reference/bench) puts the command in CMD; it runs if its estimate fits
# the time left (else it is recorded as skipped), under `timeout`, which needs a program, not a shell function
run() {
  local name="$1" est="$2"; shift 2
  local now left t0 rc
  CMD=()
  "$@" || return
  if [ "$dry" = 1 ]; then
    printf '%q ' "${CMD[@]}"
    echo
    return
  fi
  now=$(date +%s); left=$(( budget - table_s - (now - start) ))
  if [ "$left" -lt "$est" ]; then
    echo "$name (needs ~${est} s, ${left} s left)" | tee -a "$out/skipped.txt"
    return
  fi
  printf '%q ' "${CMD[@]}" >> "$out/commands.txt"
  echo >> "$out/commands.txt"
  t0=$now
  timeout -k 10 "$left" "${CMD[@]}" > "$out/$name.log" 2>&1
  rc=$?
  echo "$name rc=$rc $(( $(date +%s) - t0 )) s" | tee -a "$out/summary.txt"
}

reference() {  # B STOP_AFTER: the reference at batch B, ended after row STOP_AFTER ("" = all of its rows)
  local b="$1" stop="$2" name="ref_b$1"
  [ -z "$stop" ] && name="ref_b$1_memory"
  if [ "$dry" = 0 ] && { [ -z "$ref" ] || [ ! -f "$ref" ]; }; then
    echo "gpu_speed: no reference script (pass its path or set HMLM_REFERENCE)" >&2
    return 2
  fi
  CMD=(env "B=$b" "$py" benchmarks/reference_rows.py "$ref" "$out/$name.json" --stop-after "$stop")
}

bench() {  # NAME [overrides and flags...]: hmlm bench train at the 160M shape unless overridden
  local name="$1"; shift
  CMD=("$py" -m hmlm.cli bench train "${shape[@]}" anchor.options.preset=160m "$@" "${steps[@]}" --out "$out/$name.json")
  # HMLM_PROFILE=1: each row also profiled after its timing (torch.profiler tables in OUT_DIR/profile/NAME)
  [ "${HMLM_PROFILE:-0}" = 1 ] && CMD+=(--profile "$out/profile/$name")
  return 0
}

fitover() {  # NAME [overrides...]: hmlm bench fit-overhead at the 160M shape, index built first (hashing embedder)
  local name="$1"; shift
  CMD=("$py" -m hmlm.cli bench fit-overhead "${shape[@]}" anchor.options.preset=160m index.embedder.name=hashing
       "index.dir=$out/index" "$@" --steps 30 --warmup 5 --out "$out/$name.json")
}

want() { [ "$part" = "$1" ] || { [ "$part" = "all" ] && [ "$1" != 4 ] && [ "$1" != 5 ]; } || [[ ",$part," == *",$1,"* ]]; }
# the second number is the least time a run needs to give its first row (compilation included); started, it may use
# all the time left (its later rows are kept only if they finish)
if want 1; then
  run ref_b8 75 reference 8 ref_compiled
  run hmlm_160m_b8_eager 40 bench hmlm_160m_b8_eager trainer.batch_size=8 --stores device
  run hmlm_160m_b8_compiled 80 bench hmlm_160m_b8_compiled trainer.batch_size=8 --stores device --compile
  if [ "$dry" = 1 ] || grep -q '"error": "out of memory' "$out/hmlm_160m_b8_eager.json" 2>/dev/null; then
    # memory did not fit at B=8: its step-time ratio against the anchor alone at the largest batch that fits
    run hmlm_160m_b4_eager 30 bench hmlm_160m_b4_eager trainer.batch_size=4 --stores device
  fi
fi
if want 2; then
  run ref_b16 75 reference 16 ref_compiled
  # with memory as at batch 8, bf16 moments (fp32 ones beside a batch of 16 do not fit in 80 GB)
  run hmlm_160m_b16_eager 30 bench hmlm_160m_b16_eager trainer.batch_size=16 memory.optim_state=bf16 --stores device
  run hmlm_160m_b16_compiled 80 bench hmlm_160m_b16_compiled trainer.batch_size=16 memory.optim_state=bf16 \
    --stores device --compile
  run hmlm_410m_b8_eager 40 bench hmlm_410m_b8_eager anchor.options.preset=410m trainer.batch_size=8 --stores ""
  run hmlm_410m_b8_compiled 90 bench hmlm_410m_b8_compiled anchor.options.preset=410m trainer.batch_size=8 --stores "" \
    --compile
fi
if want 3; then
  run ref_b8_memory 150 reference 8 ""
  run hmlm_160m_b8_docmask_compiled 90 bench hmlm_160m_b8_docmask_compiled trainer.batch_size=8 data.doc_mask=true \
    --stores "" --compile
  run hmlm_160m_b8_cudagraphs 100 bench hmlm_160m_b8_cudagraphs trainer.batch_size=8 \
    trainer.compile_mode=reduce-overhead --stores "" --compile
fi
if want 5; then
  # CUDA graphs over the compiled forward and backward (trainer.compile_mode=reduce-overhead), anchor alone and with
  # memory, at batch 16 then 8; the reference's compiled rows at batch 16 in the same call
  run ref_b16 75 reference 16 ref_compiled
  run hmlm_160m_b16_cudagraphs 150 bench hmlm_160m_b16_cudagraphs trainer.batch_size=16 memory.optim_state=bf16 \
    trainer.compile_mode=reduce-overhead --stores device --compile
  run hmlm_160m_b8_cudagraphs_memory 150 bench hmlm_160m_b8_cudagraphs_memory trainer.batch_size=8 \
    trainer.compile_mode=reduce-overhead --stores device --compile
fi
if want 4; then
  # `hmlm fit` (Lightning, the index's loader, logging, checkpoints) against the bench's step at the same shape: the
  # bundled corpus indexed with the hashing embedder (no embedder weights on the GPU machine), memory on the device
  run fit_overhead_b8 150 fitover fit_overhead_b8 trainer.batch_size=8 memory.store=device
fi
if [ "$dry" = 1 ]; then
  echo "python benchmarks/speed_table.py $out"
  exit 0
fi
"$py" benchmarks/speed_table.py "$out" > "$out/table.log" 2>&1 || echo "gpu_speed: the table failed (see $out/table.log)"
echo "gpu_speed: done in $(( $(date +%s) - start )) s; table in $out/speed.md (json: $out/speed.json), rows in" \
  "$out/*.json, skipped runs in $out/skipped.txt"
cat "$out/speed.md" 2>/dev/null
