#!/usr/bin/env bash
# The bank-at-scale rows of docs/benchmarks.md (issue 9) on one GPU machine, in under 8 minutes on one H100 80GB
# (128 GB RAM, 64 GB disk). Every row is a JSON file in OUT_DIR; the console shows the tables.
#
#   bash benchmarks/gpu_bank.sh OUT_DIR [DISK_DIR]
#
# Needs hmlm installed with its entry points (`pip install --no-deps -e .`, plus the omegaconf wheel on the GPU image).
# DISK_DIR (default OUT_DIR/disk) holds the disk tier's level files (up to ~8 GB) and the bank-io scratch (~19 GB);
# it is removed at the end. Rows, with their expected wall time on an H100 (process start ~15 s, bank fill, warm-up
# and timed steps):
#   1. 160M + 4.6B bank, 16 x 2048, fp32 moments: anchor alone; tiers auto, device+device+host, all host,
#      device+device+disk                                                                                ~120 s
#   2. bank-size sweep at the same fetch size, k = 2, 4, 8, 16 (48M ... 4.6B bank), tiers auto, 16 x 2048   ~80 s
#   3. bench fetch: one memory (18M parameters) from device / host / host+host+disk, cold, warm, cached      ~40 s
#   4. bench bank-io: init, export, load, checkpoint save/load of the 4.6B bank, tiers auto                  ~45 s
#   5. 410M + 12.7B bank, 8 x 2048, factored moments: anchor alone and tiers auto                            ~100 s
set -uo pipefail
out="${1:?usage: bash benchmarks/gpu_bank.sh OUT_DIR [DISK_DIR]}"
disk="${2:-$out/disk}"
mkdir -p "$out" "$disk"
py="${PYTHON:-python}"
"$py" -c "import omegaconf" 2>/dev/null || { echo "gpu_bank.sh: omegaconf is missing (carry its wheel)" >&2; exit 2; }
"$py" -c "from hmlm import registry; registry.get('stores', 'tiered')" 2>/dev/null \
  || "$py" -m pip install -q --no-deps --no-build-isolation -e . \
  || { echo "gpu_bank.sh: cannot install hmlm (pip install --no-deps -e .)" >&2; exit 2; }

{ nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv; free -g; df -h "$disk"; } > "$out/machine.txt" 2>&1
q="recipes/quickstart.yaml"
p160=(anchor.preset=160m anchor.vocab_size=50432 index.router.branching=16 index.router.levels=4
      "memory.sizes=[256,64,16,0]" memory.dtype=bfloat16 data.seq_len=2048 "memory.disk_dir=$disk/160m")
p410=(anchor.preset=410m anchor.vocab_size=50432 index.router.branching=16 index.router.levels=4
      "memory.sizes=[512,128,32,0]" memory.dtype=bfloat16 data.seq_len=2048 "memory.disk_dir=$disk/410m")
run() {  # name, limit in seconds, hmlm arguments...
  local name="$1" limit="$2"; shift 2
  local t0=$SECONDS
  echo "== $name"
  timeout "$limit" "$py" -m hmlm.cli "$@" > "$out/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$out/$name.log"
  echo "== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$out/times.txt"
}

# 1. the 160M rows at 16 x 2048 (anchor baseline in the same process as its memory rows)
run train160_b16 200 bench train --recipe "$q" "${p160[@]}" trainer.batch_size=16 memory.io_threads=16 --stores "" \
    --tiers "auto;device,device,host;host;device,device,disk" --steps 8 --warmup 2 --out "$out/train160_b16.json"
rm -rf "$disk/160m"
# 2. the bank-size sweep (tiers auto at every size)
run sweep160_b16 140 bench train --recipe "$q" "${p160[@]}" trainer.batch_size=16 --stores "" --tiers "" \
    --branching 2,4,8,16 --steps 8 --warmup 2 --out "$out/sweep160_b16.json"
rm -rf "$disk/160m"
# 3. one memory, routed and fetched
run fetch160 90 bench fetch --recipe "$q" "${p160[@]}" --tiers "device;host;host,host,disk" --prompts 50 \
    --disk-dir "$disk/fetch" --out "$out/fetch160.json"
rm -rf "$disk/fetch"
# 4. start-up and export of the 4.6B bank
run bankio160 120 bench bank-io --recipe "$q" "${p160[@]}" memory.io_threads=16 trainer.batch_size=16 \
    --tiers "auto" --work-dir "$disk/bankio" --out "$out/bankio160.json"
# 5. the 410M configuration: 12.7B bank at 8 x 2048 (factored moments: ~2 bytes of state per parameter)
run train410_b8 150 bench train --recipe "$q" "${p410[@]}" trainer.batch_size=8 memory.optim_state=factored \
    memory.io_threads=16 --stores "" --tiers "auto" --steps 6 --warmup 2 --out "$out/train410_b8.json"
du -sh "$disk"/* >> "$out/machine.txt" 2>/dev/null
rm -rf "$disk"
echo "rows in $out:"; ls "$out"
