#!/usr/bin/env bash
# SmolLM2-135M post-hoc memories on the GPU machine: three consecutive calls on one warm machine (docs/results.md,
# "SmolLM2-135M post-hoc"; the plan and why in benchmarks/gpu_posthoc.py). Filled once by
# benchmarks/gpu_posthoc_prepare.sh; then, each call from the repository root within ~30 s of the previous one:
#
#   bash benchmarks/gpu_posthoc.sh OUT --call 1     # carry [".smol/a"]: stage GGUF part 1 outside the repo
#   bash benchmarks/gpu_posthoc.sh OUT --call 2     # carry [".smol/b"]: reassemble, convert, fit (memory only)
#   bash benchmarks/gpu_posthoc.sh OUT --call 3     # carry [".smol/c"]: eval before/after, generate, removal, latency
#
# Exit status 3 (and OUT/missing.txt) when an earlier call's files are not on the machine: start again at call 1.
# Extra arguments go to `gpu_posthoc.py call N` (e.g. trainer.max_steps=... in call 2, --budget-s in call 3).
set -euo pipefail
out="${1:?usage: bash benchmarks/gpu_posthoc.sh OUT --call 1|2|3 [gpu_posthoc.py call options]}"
shift
[ "${1:-}" = "--call" ] || { echo "usage: bash benchmarks/gpu_posthoc.sh OUT --call 1|2|3 [options]" >&2; exit 2; }
call="${2:?--call needs 1, 2 or 3}"
shift 2
cd "$(dirname "${BASH_SOURCE[0]}")/.."
py="${PYTHON:-python3}"
smol="${HMLM_SMOL:-.smol}"
mkdir -p "$out"
site_args=()
case "$call" in
  2) tarball="$smol/b/site.tar.xz" ;;
  3) tarball="$smol/c/site.tar.xz" ;;
  *) tarball="" ;;
esac
if [ -n "$tarball" ]; then
  source benchmarks/carried_site.sh
  unpack_site "$py" "$tarball" hmlm-posthoc-site
  site_args=(--site "$SITE")
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=true
"$py" benchmarks/gpu_posthoc.py call "$call" --out "$out" --smol "$smol" "${site_args[@]}" "$@" 2>&1 \
  | tee "$out/log.txt"
