#!/usr/bin/env bash
# The small-scale reproduction on the GPU machine (docs/results.md): one self-contained part per call.
#
#   bash benchmarks/gpu_repro.sh OUTDIR --part 1      # seed 0: S, S+mem, 2S, then S+generic if time is left
#   bash benchmarks/gpu_repro.sh OUTDIR --part 2      # seed 1: S, S+mem, 2S, then S->mem frozen if time is left
#   bash benchmarks/gpu_repro.sh OUTDIR --tiny --part all --text-mb 1 --facts-per-relation 20   # CPU rehearsal
#
# Reads .repro/ (HMLM_REPRO to change it), filled once on a machine with registry access by
# benchmarks/gpu_repro_prepare.sh: site.tar.xz (packages the GPU image lacks: lm-eval and its imports, omegaconf),
# minilm-bf16/ (hmlm embedder export) and demo/ (hmlm data build-demo). Nothing is installed: the packages are
# unpacked under the interpreter's prefix (see below) and appended to sys.path by benchmarks/gpu_repro.py. Writes 5
# files to OUTDIR, rewritten after every run: summary.json, table.md, fig1_accuracy_by_frequency.png,
# eval_reports.json.xz, log.txt. Exit status 1 if a run was skipped or failed (the summary says which and why).
set -euo pipefail
out="${1:?usage: bash benchmarks/gpu_repro.sh OUTDIR [--part 1|2|all] [gpu_repro.py options]}"
shift
cd "$(dirname "${BASH_SOURCE[0]}")/.."
repro="${HMLM_REPRO:-.repro}"
py="${PYTHON:-python3}"
source benchmarks/carried_site.sh
mkdir -p "$out"
unpack_site "$py" "$repro/site.tar.xz" hmlm-repro-site
site="$SITE"
emb=()
if [ -f "$repro/minilm-bf16/hmlm_embedder.json" ]; then
  emb=(--embedder-path "$repro/minilm-bf16")
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=true
"$py" benchmarks/gpu_repro.py --out "$out" --site "$site" --demo "$repro/demo" "${emb[@]}" \
  --work "${HMLM_REPRO_WORK:-${TMPDIR:-/tmp}/hmlm-repro}" "$@" 2>&1 | tee "$out/log.txt"
