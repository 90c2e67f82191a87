#!/usr/bin/env bash
# The example plugins' results on the bundled corpus (issue 14; docs/results.md, "Plugins"): the quickstart recipe
# with FFN, relu2 and product-key (pkm) memories at equal fetched parameters, then the quickstart routed by the
# random-projection router instead of hierarchical k-means, then one table from the files the two parts wrote.
# Despite its name it runs on any device (the CPU numbers of docs/results.md come from it too).
#
#   bash benchmarks/gpu_plugins.sh OUT_DIR types  [KEY=VALUE ...]  # index + one fit per type + hmlm eval of them
#   bash benchmarks/gpu_plugins.sh OUT_DIR router [KEY=VALUE ...]  # randproj index + fit + hmlm eval
#   bash benchmarks/gpu_plugins.sh OUT_DIR report                  # OUT_DIR/plugins.{md,json,png} from both parts
#
# KEY=VALUE are recipe overrides for both parts (give the same ones to both, e.g. trainer.max_steps=300 for the CPU
# run); TYPES=ffn,pkm chooses the memory types (default ffn,relu2,pkm); LIMIT eval items per task (default 64).
# On one H100 at the quickstart's 600 steps: types ~6 min, router ~4 min.
#
# Needs hmlm importable with its entry points (tried: pip install --no-deps -e .) and setuptools (the example plugins
# are installed from plugins/ into OUT_DIR/site, first on PYTHONPATH). Where a registry is out of reach (the GPU
# machine), carry what benchmarks/gpu_repro_prepare.sh puts in .repro/ (HMLM_REPRO to change it), without the demo
# corpus: `minilm-bf16/` (the embedder, 44 MiB; used as index.embedder.path) and `site.tar.xz` (lm-eval and the
# other packages hmlm eval needs, appended to sys.path), i.e. carry [".repro/minilm-bf16", ".repro/site.tar.xz"].
set -uo pipefail
usage="usage: bash benchmarks/gpu_plugins.sh OUT_DIR types|router|report [KEY=VALUE ...]"
out="${1:?$usage}"
what="${2:?$usage}"
shift 2
overrides=("$@")
case "$what" in
  types|router|report) ;;
  *) echo "gpu_plugins.sh: second argument is types, router or report" >&2; exit 2 ;;
esac
cd "$(dirname "${BASH_SOURCE[0]}")/.."
py="${PYTHON:-python}"
repro="${HMLM_REPRO:-.repro}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"

if [ "$what" = "report" ]; then
  exec "$py" benchmarks/plugins_report.py "$out"
fi

"$py" -c "from hmlm import registry; registry.get('stores', 'tiered')" 2>/dev/null \
  || "$py" -m pip install -q --no-deps --no-build-isolation -e . \
  || { echo "gpu_plugins.sh: cannot install hmlm (pip install --no-deps -e .)" >&2; exit 2; }
"$py" -m pip install -q --no-deps --no-build-isolation --upgrade --target "$out/site" \
  ./plugins/hmlm-relu2-memory ./plugins/hmlm-pkm ./plugins/hmlm-randproj-router \
  || { echo "gpu_plugins.sh: cannot install the example plugins" >&2; exit 2; }
export PYTHONPATH="$out/site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
carried_site=""
if [ -f "$repro/site.tar.xz" ]; then
  # appended (not prepended) to sys.path, so the image's own packages win; under the interpreter's prefix where that
  # is writable, because datasets pickles modules outside sys.prefix by value (see benchmarks/gpu_repro.sh)
  prefix=$("$py" -c 'import os, sys; print(os.path.realpath(sys.prefix))')
  if [ -w "$prefix" ]; then carried_site="$prefix/hmlm-plugins-site"; else carried_site="$out/carried-site"; fi
  rm -rf "$carried_site" && mkdir -p "$carried_site" && tar -xJf "$repro/site.tar.xz" -C "$carried_site"
fi
if [ -f "$repro/minilm-bf16/hmlm_embedder.json" ]; then
  overrides=("index.embedder.path=$(cd "$repro/minilm-bf16" && pwd)" "${overrides[@]}")
fi
hmlm() {
  "$py" -c 'import sys
site = sys.argv.pop(1)
if site:
    sys.path.append(site)
from hmlm.cli import main
sys.exit(main(sys.argv[1:]))' "$carried_site" "$@"
}
{ date -u +%Y-%m-%dT%H:%M:%SZ; echo "cpus $(getconf _NPROCESSORS_ONLN)"   # nproc would honour OMP_NUM_THREADS
  lscpu 2>/dev/null | grep -m1 "Model name" | tr -s ' ' || true
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no GPU"
  echo "overrides: ${overrides[*]:-}"; } > "$out/machine-$what.txt"
hmlm plugins > "$out/plugins.txt" 2>&1; cat "$out/plugins.txt"
case "$what" in
  types)   # one index, every type at the recipe's fetched size, then hmlm eval of all of them
    hmlm bench memory-types --recipe recipes/quickstart.yaml --types "${TYPES:-ffn,relu2,pkm}" \
      --out-dir "$out/types" --limit "${LIMIT:-64}" "${overrides[@]}" 2>&1 | tee "$out/types.log" | tail -n 30 ;;
  router)  # the same recipe and seed, routed by random projections
    hmlm fit --recipe recipes/plugins/randproj.yaml out_dir="$out/randproj" --overwrite "${overrides[@]}" 2>&1 \
      | tee "$out/randproj.log" | tail -n 15
    hmlm eval --model "$out/randproj/model" --limit "${LIMIT:-64}" --out "$out/router-eval" 2>&1 \
      | tee "$out/router-eval.log" | tail -n 30 ;;
esac
