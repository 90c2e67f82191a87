#!/usr/bin/env bash
# The bank-at-scale rows of issue 9 that benchmarks/gpu_bank.sh leaves out, in one GPU call with a wall-time budget:
#
#   bash benchmarks/gpu_bank_scale.sh OUT_DIR [BUDGET_S] [--dry-run]
#
#   b16     160M + 4.6B bank (bf16 moments, every level on the device) at batch 16 x 2048, with the anchor alone at
#           batch 16 in the same process: the issue's step-time target row; each row profiled after its timing
#   410m    410M anchor, memory (512,128,32,0): the 12.7B bank with `memory.tiers: auto` at batch 8 x 2048, profiled
#   sweep   160M, the same fetch size with a bank grown by the branching k = 2, 4, 8 (and 16: the first plan's row):
#           ~48M to 4.6B parameters on the device at batch 8
#   fetch   `hmlm bench fetch`: route + fetch of one memory (18M parameters) from device, host, and host with the
#           deepest level on disk; cold, warm, and shallow levels cached
# Rows are written as soon as measured (OUT/b16, OUT/410m: bank.md + bank_rows.json; OUT/sweep.json, OUT/fetch.json);
# OUT/profile holds the profiler tables; OUT/summary.txt each stage's exit status and seconds; OUT/machine.txt the
# GPU, memory, disk and the compilers present (for DeepSpeed's ops).
# GPU_BANK_SCALE_ARGS: overrides appended to every stage (tests shrink the shapes with it and run on CPU).
set -uo pipefail
out="${1:?usage: bash benchmarks/gpu_bank_scale.sh OUT_DIR [BUDGET_S] [--dry-run]}"
budget="${2:-540}"
dry=0
[ "${3:-}" = "--dry-run" ] || [ "$budget" = "--dry-run" ] && dry=1
[ "$budget" = "--dry-run" ] && budget=540
py="${PYTHON:-python3}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
start=$SECONDS
disk="${TMPDIR:-/tmp}/hmlm-gpu-bank-scale"
extra=(${GPU_BANK_SCALE_ARGS:-})
paper=(anchor.preset=160m anchor.vocab_size=50432 index.router.branching=16 index.router.levels=4
       'memory.sizes=[256,64,16,0]' memory.dtype=bfloat16 data.seq_len=2048 memory.io_threads=16)
mkdir -p "$out"
if [ "$dry" = 0 ]; then
  : > "$out/summary.txt"
  { nvidia-smi --query-gpu=name,memory.total --format=csv 2>&1; free -g; mkdir -p "$disk"; df -h "$disk"
    for tool in g++ gcc ninja nvcc; do printf '%s: %s\n' "$tool" "$(command -v $tool || echo missing)"; done
    ls /usr/include/libaio.h 2>&1; } > "$out/machine.txt" 2>&1
fi

# stage NAME SECONDS_WANTED CMD...: runs CMD under the time left (at most SECONDS_WANTED), or records it skipped
stage() {
  local name="$1" want="$2"; shift 2
  if [ "$dry" = 1 ]; then printf '%s: ' "$name"; printf '%q ' "$@"; echo; return; fi
  local left=$((budget - (SECONDS - start) - 5))
  if [ "$left" -lt 30 ]; then echo "$name skipped: ${left} s left" | tee -a "$out/summary.txt"; return; fi
  [ "$want" -lt "$left" ] && left="$want"
  local t0=$SECONDS
  timeout -k 10 "$left" "$@" > "$out/$name.log" 2>&1
  echo "$name rc=$? $((SECONDS - t0)) s" | tee -a "$out/summary.txt"
  rm -rf "$disk"
}

# (an array, not a shell function: `timeout` runs programs only)
bank=("$py" benchmarks/gpu_bank.py --disk-dir "$disk" --bankio-tiers "")
stage b16 150 "${bank[@]}" --profile "$out/profile/b16" --out "$out/b16" --budget-s 140 --batches 16 --plans "device@bf16" "${extra[@]}"
stage 410m 200 "${bank[@]}" --profile "$out/profile/410m" --out "$out/410m" --budget-s 190 --batches 8 --plans "auto@bf16" \
  anchor.preset=410m 'memory.sizes=[512,128,32,0]' "${extra[@]}"
stage sweep 130 "$py" -m hmlm.cli bench train --recipe recipes/quickstart.yaml "${paper[@]}" trainer.batch_size=8 \
  memory.optim_state=bf16 "${extra[@]}" --stores "" --tiers device --branching 2,4,8 --steps 6 --warmup 2 \
  --out "$out/sweep.json"
stage fetch 90 "$py" -m hmlm.cli bench fetch --recipe recipes/quickstart.yaml "${paper[@]}" "${extra[@]}" \
  --tiers "device;host;host,host,disk" --disk-dir "$disk/fetch" --out "$out/fetch.json"
[ "$dry" = 1 ] || echo "gpu_bank_scale: done after $((SECONDS - start)) s of $budget s"
