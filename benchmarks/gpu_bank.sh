#!/usr/bin/env bash
# The bank-at-scale rows of issue 9 (docs/benchmarks.md) on one GPU machine (H100 80GB, 128 GB RAM, 64 GB disk),
# within a hard wall-time budget that includes this script's own start (default 250 s):
#
#   bash benchmarks/gpu_bank.sh OUT_DIR [BUDGET_S] [DISK_DIR]
#
# 160M anchor, memory (256,64,16,0), k=16: a 4.6B-parameter bf16 bank, sequences of 2048, batch 8 and 4. Rows: the
# anchor alone; + memory with tiers device (bf16 moments), device,device,host, host, disk (bf16 moments), device (fp32
# moments); then `hmlm bench bank-io` of the bank (tiers auto). Tokens/s, ratio against the anchor alone at the same
# batch (same process), peak GPU GiB, MFU. benchmarks/gpu_bank.py skips the rows the budget cannot hold and says so;
# a row still running at the end of the budget is stopped. Results: OUT_DIR/bank.md (the tables) and
# OUT_DIR/bank_rows.json (every row), rewritten after each row; OUT_DIR/machine.txt (GPU, RAM, disk).
# DISK_DIR (default $TMPDIR/hmlm-gpu-bank, not under OUT_DIR: its files are large) holds the disk tier's level files
# (a ~28 GB sparse file) and the bank-io scratch (~19 GB); it is removed at the end.
#
# Needs hmlm importable with its entry points (`pip install --no-deps -e .`; tried here if missing) and omegaconf
# (e.g. PYTHONPATH=/tmp/site). `bash benchmarks/gpu_bank.sh OUT --dry-run` prints the rows, bytes and estimates.
# The issue's other rows, outside this budget:
#   hmlm bench train ... --tiers auto --branching 2,4,8,16   (bank-size sweep at the same fetch size)
#   hmlm bench fetch ... --tiers "device;host;host,host,disk"  (route + fetch of one memory)
set -uo pipefail
start=$SECONDS
out="${1:?usage: bash benchmarks/gpu_bank.sh OUT_DIR [BUDGET_S|--dry-run] [DISK_DIR]}"
budget="${2:-250}"
disk="${3:-${TMPDIR:-/tmp}/hmlm-gpu-bank}"
py="${PYTHON:-python}"
here="$(cd "$(dirname "$0")/.." && pwd)"
mkdir -p "$out"
if [ "$budget" = "--dry-run" ]; then
  exec "$py" "$here/benchmarks/gpu_bank.py" --out "$out" --dry-run
fi
"$py" -c "import omegaconf" 2>/dev/null || { echo "gpu_bank.sh: omegaconf is missing (carry its wheel)" >&2; exit 2; }
"$py" -c "from hmlm import registry; registry.get('stores', 'tiered')" 2>/dev/null \
  || "$py" -m pip install -q --no-deps --no-build-isolation -e "$here" \
  || { echo "gpu_bank.sh: cannot install hmlm (pip install --no-deps -e .)" >&2; exit 2; }
{ nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv; free -g; mkdir -p "$disk"; df -h "$disk"; } \
  > "$out/machine.txt" 2>&1
# the driver's own budget ends 10 s before this script's (removing the disk tier's files, printing); `timeout` is the
# backstop should a stopped row not return
left=$((budget - (SECONDS - start)))
# GPU_BANK_ARGS: more driver arguments (e.g. "--tiny --steps 1" to try this script on a CPU)
timeout -k 5 $((left - 5)) "$py" "$here/benchmarks/gpu_bank.py" --out "$out" --budget-s $((left - 10)) \
  --disk-dir "$disk" ${GPU_BANK_ARGS:-}
rc=$?
rm -rf "$disk"
echo "gpu_bank.sh: exit $rc after $((SECONDS - start)) s (budget $budget s); tables in $out/bank.md"
exit $rc
