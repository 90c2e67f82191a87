#!/usr/bin/env bash
# Issue 11's multi-GPU rows in ONE call of at most ~540 s: subtree-affine data parallelism with the anchor under DDP
# (fp32 and bf16 gradient reduction: trainer.ddp.grad_reduce), DeepSpeed ZeRO-1 and ZeRO-2, on 1/2/4 GPUs (1/2 when
# only two are visible: the world sizes follow torch.cuda.device_count()), then the 1.4B configuration
# (768,256,16,0: a 21.1B-parameter bank) on all GPUs with device+host tiers under ZeRO-2.
#
#   bash benchmarks/gpu_ds.sh OUT_DIR            # the GPU run
#   bash benchmarks/gpu_ds.sh OUT_DIR --tiny     # the same calls on a tiny model, 1 process each (CPU or GPU)
#   bash benchmarks/gpu_ds.sh OUT_DIR --dry-run  # every call's recipe and plan checked (`bench scaling --dry-run`)
#
# Results: OUT_DIR/results.md (one table) and OUT_DIR/results.json (all rows), one <name>.json + <name>.log per call,
# machine.txt, times.txt; calls that would overrun the budget are skipped and named in results.md.
# Needs hmlm (installed here with --no-deps -e . when missing), omegaconf and deepspeed (0.19.8) importable, e.g.
# carried wheels installed with `pip install --no-index --no-deps --target /tmp/site` and PYTHONPATH=/tmp/site.
# Expected wall time on 4 x H100 (process start ~20 s per world size, 5 warm-up + 20 timed steps):
#   160M + 4.6B bank, 4 x 2048 tokens per rank: ddp / ddp_bf16 / deepspeed_stage_1 / deepspeed_stage_2 x 1,2,4 GPUs
#                                                                                                       4 x ~110 s
#   1.4B + 21.1B bank (tiers device,device,host; factored moments), 4 x 2048 per rank, ZeRO-2, all GPUs    ~150 s
set -uo pipefail
out="${1:?usage: bash benchmarks/gpu_ds.sh OUT_DIR [--tiny|--dry-run]}"
tiny=0; [ "${2:-}" = "--tiny" ] && tiny=1
dry=(); [ "${2:-}" = "--dry-run" ] && dry=(--dry-run)
budget="${HMLM_BUDGET_S:-540}"
start=$SECONDS
mkdir -p "$out"
py="${PYTHON:-python}"
left() { echo $((budget - (SECONDS - start))); }
"$py" -c "import omegaconf" 2>/dev/null || { echo "gpu_ds.sh: omegaconf is missing (carry its wheel)" >&2; exit 2; }
[ ${#dry[@]} -gt 0 ] || "$py" -c "import deepspeed" >/dev/null 2>&1 \
  || { echo "gpu_ds.sh: deepspeed is not importable (carry its wheels; see docs/distributed.md)" >&2; exit 2; }
"$py" -c "from hmlm import registry; registry.get('stores', 'tiered')" 2>/dev/null \
  || "$py" -m pip install -q --no-deps --no-build-isolation -e . \
  || { echo "gpu_ds.sh: cannot install hmlm (pip install --no-deps -e .)" >&2; exit 2; }

ngpu=$("$py" -c "import torch; print(torch.cuda.device_count())")
[ ${#dry[@]} -gt 0 ] && ngpu=4  # plan the 4-GPU run
{ nvidia-smi --query-gpu=name,memory.total --format=csv 2>/dev/null; free -g; "$py" -c \
  "import torch, deepspeed, lightning; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__, 'lightning', lightning.__version__, 'gpus', torch.cuda.device_count())" 2>/dev/null; } \
  > "$out/machine.txt"
if [ "$ngpu" -ge 4 ]; then devices=1,2,4; all=4; elif [ "$ngpu" -ge 2 ]; then devices=1,2; all=2; else devices=1; all=1; fi
q="recipes/quickstart.yaml"
if [ "$tiny" = 1 ]; then
  devices=1; all=1
  p160=(anchor.options.preset=tiny anchor.vocab_size=512 index.router.branching=4 index.router.levels=2 "memory.sizes=[8,4]"
        data.seq_len=32 trainer.batch_size=2)
  p14b=("${p160[@]}" memory.store=tiered "memory.tiers=[device,host]" memory.optim_state=factored)
  steps=(--steps 2 --warmup 1); steps14=(--steps 1 --warmup 1)
else
  p160=(anchor.options.preset=160m anchor.vocab_size=50432 index.router.branching=16 index.router.levels=4
        "memory.sizes=[256,64,16,0]" memory.dtype=bfloat16 data.seq_len=2048 trainer.batch_size=4)
  p14b=(anchor.options.preset=1.4b anchor.vocab_size=50432 index.router.branching=16 index.router.levels=4
        "memory.sizes=[768,256,16,0]" memory.dtype=bfloat16 data.seq_len=2048 trainer.batch_size=4
        memory.store=tiered "memory.tiers=[device,device,host]" memory.optim_state=factored memory.io_threads=16)
  steps=(--steps 20 --warmup 5); steps14=(--steps 6 --warmup 2)
fi
names=()
run() {  # name, estimated seconds, hmlm bench scaling arguments...
  local name="$1" need="$2"; shift 2
  names+=("$name")
  local l; l=$(left)
  if [ "$l" -lt "$need" ]; then
    echo "== $name: skipped, needs ~$need s and $l s are left" | tee -a "$out/times.txt"; return
  fi
  local t0=$SECONDS
  echo "== $name"
  timeout "$l" "$py" -m hmlm.cli bench scaling --recipe "$q" "$@" --out "$out/$name.json" "${dry[@]}" \
    > "$out/$name.log" 2>&1
  local rc=$?
  tail -n 12 "$out/$name.log"
  echo "== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$out/times.txt"
}

n=$(echo "$devices" | tr ',' '\n' | wc -l)
# HMLM_DS_ROWS: which rows, in that order (default: all, the 160M rows first); HMLM_PROFILE=1: rank 0 of each row
# profiled after its timing (hmlm bench scaling --profile; tables in OUT_DIR/profile)
prof=(); [ "${HMLM_PROFILE:-0}" = 1 ] && prof=(--profile "$out/profile")
rows="160m_ddp,160m_ddp_bf16,160m_deepspeed_stage_1,160m_deepspeed_stage_2,1.4b_deepspeed_stage_2"
for row in $(echo "${HMLM_DS_ROWS:-$rows}" | tr ',' ' '); do
  case "$row" in
    # the anchor's DDP gradient all-reduce in bf16 (half the bytes; trainer.ddp applies to trainer.strategy=ddp)
    160m_ddp_bf16)
            run "$row" $((n * 30)) "${p160[@]}" trainer.strategy=ddp trainer.ddp.grad_reduce=bf16 --strategies ddp \
                --modes subtree --devices "$devices" "${steps[@]}" "${prof[@]}" ;;
    160m_*) s="${row#160m_}"
            run "$row" $((n * 30)) "${p160[@]}" --strategies "$s" --modes subtree --devices "$devices" "${steps[@]}" \
                "${prof[@]}" ;;
    1.4b_deepspeed_stage_2)
            run "$row" 150 "${p14b[@]}" --strategies deepspeed_stage_2 --modes subtree --devices "$all" \
                "${steps14[@]}" "${prof[@]}" ;;
    *) echo "gpu_ds.sh: unknown row $row in HMLM_DS_ROWS" >&2; exit 2 ;;
  esac
done

files=(); for n in "${names[@]}"; do files+=("$out/$n.json"); done
"$py" - "$out" "${files[@]}" <<'EOF'
import sys
from pathlib import Path
from hmlm.bench.scaling import write_report
out = Path(sys.argv[1])
rows = write_report([Path(f) for f in sys.argv[2:]], out / "results.md", out / "results.json",
                    title="hmlm bench scaling: subtree-affine bank, anchor under DDP / DeepSpeed (benchmarks/gpu_ds.sh)")
print((out / "results.md").read_text())
EOF
echo "gpu_ds.sh: $((SECONDS - start)) s"
