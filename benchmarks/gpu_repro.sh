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
# The carried packages go under the interpreter's prefix where it is writable (a fresh GPU machine: yes), because
# datasets fingerprints with dill, and dill pickles any module outside sys.prefix by value: from /tmp, lm-eval's
# and datasets' own modules would be pickled whole (a CPU rehearsal with pyarrow outside the prefix failed that way
# on pyarrow's MonthDayNano; with the packages under the prefix it passed).
prefix=$("$py" -c 'import os, sys; print(os.path.realpath(sys.prefix))')
if [ -w "$prefix" ]; then
  site="$prefix/hmlm-repro-site"
else
  site="${TMPDIR:-/tmp}/hmlm-repro-site"
  echo "gpu_repro.sh: $prefix is not writable; packages go to $site (hmlm eval may fail to fingerprint)" >&2
fi
rm -rf "$site"
mkdir -p "$site" "$out"
if [ -f "$repro/site.tar.xz" ]; then
  tar -xJf "$repro/site.tar.xz" -C "$site"
fi
emb=()
if [ -f "$repro/minilm-bf16/hmlm_embedder.json" ]; then
  emb=(--embedder-path "$repro/minilm-bf16")
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=true
"$py" benchmarks/gpu_repro.py --out "$out" --site "$site" --demo "$repro/demo" "${emb[@]}" \
  --work "${HMLM_REPRO_WORK:-${TMPDIR:-/tmp}/hmlm-repro}" "$@" 2>&1 | tee "$out/log.txt"
