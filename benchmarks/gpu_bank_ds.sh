#!/usr/bin/env bash
# DeepSpeed for the bank's offloaded tiers (issue 9, item 2) on one GPU machine, within a wall-time budget (default
# 240 s, counting this script's own start and the ops' build):
#
#   bash benchmarks/gpu_bank_ds.sh OUT_DIR [BUDGET_S] [GROUPS]
#
# GROUPS (comma-separated, default train,fetch,zero3; host160, host410 and hostfetch only when named):
#   train  one `benchmarks/gpu_bank.py` run at the 160M + 4.6B-bank shape of gpu_bank.sh, batch 8: the anchor alone;
#          disk tier (bf16 moments) through the thread pool and through DeepSpeed's async I/O (memory.disk_io);
#          tiers device,device,host with the host level updated on the GPU and by DeepSpeed's CPU Adam
#          (memory.host_update)
#   fetch  `hmlm bench fetch` with the deepest level on disk (host,host,disk), threads vs aio
#   zero3  the naive baseline: the bank as parameters under DeepSpeed ZeRO-3 with CPU offload (memory.store=zero3),
#          2 timed steps (its dense CPU AdamW over 4.6B parameters takes seconds per step)
#   host160 the host tier at the 160M + 4.6B shape, batch 16, bf16 moments, tiers device,device,host: rows read staged
#          or from page-locked host RAM by a UVA kernel or per-row DMA (memory.host_read), updated on the GPU or by
#          DeepSpeed's CPU Adam
#   host410 the same three rows at the 410M + 12.7B shape (memory (512,128,32,0)), batch 8
#   hostfetch `hmlm bench fetch --tiers host` with memory.host_read=staged, =uva and =pinned (only when named)
# Rows are written as they finish: OUT_DIR/train/bank_rows.json + bank.md, OUT_DIR/fetch_{threads,aio}.json,
# OUT_DIR/fetch_host_{staged,uva,pinned}.json, OUT_DIR/host{160,410}/bank_rows.json + bank.md,
# OUT_DIR/zero3/bank_rows.json + bank.md; OUT_DIR/tools.txt (compilers, libaio), OUT_DIR/build_*.log (op builds).
#
# Needs: the carried wheels of deepspeed and its dependencies in .gpu-ds/ (installed into $HMLM_DS_SITE, default
# /tmp/site, when deepspeed is not importable), omegaconf, and .gpu-aio/ (Debian's libaio unpacked in .gpu-aio/root;
# wheels of ninja, py-cpuinfo, einops, msgpack, psutil, installed where the image lacks them). The ops are built once into .gpu-ops-cache/ (git-ignored, not carried: a second call on the warm
# machine reuses them, so GROUPS skipped by the budget can be run in a second call).
# `GPU_BANK_DS_TINY=1` runs every call on a tiny model (CPU test; no install, rows whose op is missing become errors).
set -uo pipefail
start=$SECONDS
out="${1:?usage: bash benchmarks/gpu_bank_ds.sh OUT_DIR [BUDGET_S] [GROUPS]}"
budget="${2:-240}"
groups=",${3:-train,fetch,zero3},"
here="$(cd "$(dirname "$0")/.." && pwd)"
py="${PYTHON:-python3}"
tiny="${GPU_BANK_DS_TINY:-0}"
mkdir -p "$out"
left() { echo $((budget - (SECONDS - start))); }

{ for t in g++ gcc ninja nvcc; do echo "$t: $(command -v "$t" || echo missing)"; done
  if [ -f /usr/include/libaio.h ]; then echo "/usr/include/libaio.h: present"; else echo "/usr/include/libaio.h: missing"; fi
  "$py" -c "import os, sysconfig; h = os.path.join(sysconfig.get_paths()['include'], 'Python.h'); \
print('Python.h (needed to build the ops):', h if os.path.exists(h) else 'missing')"
} | tee "$out/tools.txt"

if [ "$tiny" != 1 ] && ! "$py" -c "import deepspeed" 2>/dev/null; then
  site="${HMLM_DS_SITE:-/tmp/site}"
  wheels=("$here"/.gpu-ds/*.whl)
  command -v ninja >/dev/null || wheels+=("$here"/.gpu-aio/ninja-*.whl)
  # DeepSpeed's other dependencies, from .gpu-aio where the image lacks them (CPU Adam reads the CPU's features
  # with py-cpuinfo)
  for pair in py_cpuinfo:cpuinfo einops:einops msgpack:msgpack psutil:psutil; do
    "$py" -c "import ${pair##*:}" 2>/dev/null || wheels+=("$here"/.gpu-aio/"${pair%%:*}"-*.whl)
  done
  "$py" -m pip install -q --no-index --no-deps --no-compile --target "$site" "${wheels[@]}" \
    || { echo "gpu_bank_ds.sh: cannot install the carried wheels (${wheels[*]})" >&2; exit 2; }
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PATH="$site/bin:$PATH"
fi
"$py" -c "import omegaconf" 2>/dev/null || { echo "gpu_bank_ds.sh: omegaconf is missing (carry its wheel)" >&2; exit 2; }
"$py" -c "from hmlm import registry; registry.get('stores', 'zero3')" 2>/dev/null \
  || "$py" -m pip install -q --no-deps --no-build-isolation -e "$here" \
  || { echo "gpu_bank_ds.sh: cannot install hmlm (pip install --no-deps -e .)" >&2; exit 2; }
[ -f /usr/include/libaio.h ] || export HMLM_LIBAIO_DIR="${HMLM_LIBAIO_DIR:-$here/.gpu-aio/root}"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$here/.gpu-ops-cache}" MAX_JOBS="${MAX_JOBS:-16}"
export HF_HUB_OFFLINE=1

# both ops at once (each a JIT build of a few C++ files); the time is part of the budget and is reported
t0=$SECONDS
for op in async_io cpu_adam; do
  "$py" -c "import sys, time; t = time.time(); from hmlm.bank.dsops import load_op; load_op(sys.argv[1]); \
print(sys.argv[1], 'loaded in', round(time.time() - t, 1), 's')" "$op" > "$out/build_$op.log" 2>&1 &
done
wait
for op in async_io cpu_adam; do echo "== $op: $(tail -n 1 "$out/build_$op.log")"; done
echo "== ops: $((SECONDS - t0)) s"

if [ "$tiny" = 1 ]; then
  bank=(--tiny --steps 1 --warmup 1); zbank=(--tiny --steps 1 --warmup 1); scale=100
  fetch=(anchor.options.preset=tiny anchor.options.n_layers=2 anchor.options.d_model=32 anchor.options.n_heads=2 anchor.options.head_dim=16 anchor.options.ffn_dim=64
         anchor.vocab_size=128 index.router.branching=4 index.router.levels=3 "memory.sizes=[8,4,2]"
         memory.dtype=bfloat16 memory.io_threads=2)
  prompts=3
else
  bank=(--steps 6 --warmup 2); zbank=(--steps 2 --warmup 1); scale=1
  fetch=(anchor.options.preset=160m anchor.vocab_size=50432 index.router.branching=16 index.router.levels=4
         "memory.sizes=[256,64,16,0]" memory.dtype=bfloat16 memory.io_threads=16)
  prompts=30
fi
disk="${TMPDIR:-/tmp}/hmlm-gpu-bank-ds"
run() {  # name, seconds it needs, command...
  local name="$1" need=$(($2 / scale)); shift 2
  local l; l=$(left)
  if [ "$l" -lt $((need + 5)) ]; then echo "== $name: skipped, needs ~$need s and $l s are left" | tee -a "$out/times.txt"; return; fi
  local t=$SECONDS
  timeout -k 5 $((l - 5)) "$@" > "$out/$name.log" 2>&1
  echo "== $name: exit $? after $((SECONDS - t)) s" | tee -a "$out/times.txt"
  tail -n 25 "$out/$name.log"
}
if [[ "$groups" == *,train,* ]]; then
  plans="disk@bf16+memory.disk_io=threads;disk@bf16+memory.disk_io=aio"
  plans+=";device,device,host+memory.host_update=gpu;device,device,host+memory.host_update=cpu_adam"
  run train 200 "$py" "$here/benchmarks/gpu_bank.py" --out "$out/train" --budget-s $(($(left) - 15)) \
    --disk-dir "$disk" --batches 8 --bankio-tiers "" --plans "$plans" "${bank[@]}"
fi
if [[ "$groups" == *,fetch,* ]]; then
  for io in threads aio; do
    run "fetch_$io" 40 "$py" -m hmlm.cli bench fetch --recipe "$here/recipes/quickstart.yaml" --tiers "host,host,disk" \
      --prompts "$prompts" --disk-dir "$disk/fetch" --out "$out/fetch_$io.json" "${fetch[@]}" "memory.disk_io=$io"
    rm -rf "$disk/fetch"
  done
fi
host_plans="device,device,host@bf16+memory.host_update=gpu+memory.host_read=staged"
host_plans+=";device,device,host@bf16+memory.host_update=gpu+memory.host_read=uva"
host_plans+=";device,device,host@bf16+memory.host_update=gpu+memory.host_read=pinned"
host_plans+=";device,device,host@bf16+memory.host_update=cpu_adam+memory.host_read=staged"
if [[ "$groups" == *,host160,* ]]; then
  [ "$tiny" = 1 ] && b16=8 || b16=16
  run host160 150 "$py" "$here/benchmarks/gpu_bank.py" --out "$out/host160" --budget-s $(($(left) - 15)) \
    --disk-dir "$disk" --batches "$b16" --bankio-tiers "" --plans "$host_plans" "${bank[@]}"
fi
if [[ "$groups" == *,host410,* ]]; then
  big=(anchor.options.preset=410m "memory.sizes=[512,128,32,0]")
  [ "$tiny" = 1 ] && big=()
  run host410 170 "$py" "$here/benchmarks/gpu_bank.py" --out "$out/host410" --budget-s $(($(left) - 15)) \
    --disk-dir "$disk" --batches 8 --bankio-tiers "" --plans "$host_plans" "${bank[@]}" "${big[@]}"
fi
if [[ "$groups" == *,hostfetch,* ]]; then
  for read in staged uva pinned; do
    run "fetch_host_$read" 30 "$py" -m hmlm.cli bench fetch --recipe "$here/recipes/quickstart.yaml" --tiers "host" \
      --prompts "$prompts" --disk-dir "$disk/fetch" --out "$out/fetch_host_$read.json" "${fetch[@]}" \
      "memory.host_read=$read"
  done
fi
if [[ "$groups" == *,zero3,* ]]; then
  run zero3 150 "$py" "$here/benchmarks/gpu_bank.py" --out "$out/zero3" --budget-s $(($(left) - 15)) \
    --disk-dir "$disk" --batches 8 --bankio-tiers "" --plans "zero3" "${zbank[@]}"
fi
rm -rf "$disk"
echo "gpu_bank_ds.sh: $((SECONDS - start)) s of the $budget s budget; rows under $out"
