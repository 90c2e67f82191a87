#!/usr/bin/env bash
# The example plugins' results on the bundled corpus (issue 14), on one GPU machine: the quickstart recipe (600 steps)
# with FFN, relu2 and product-key (pkm) memories at equal fetched parameters, then the quickstart routed by the
# random-projection router instead of hierarchical k-means, both evaluated with `hmlm eval`.
#
#   bash benchmarks/gpu_plugins.sh OUT_DIR types      # ~6 min on one H100: index, 3 fits, eval of the 3 models
#   bash benchmarks/gpu_plugins.sh OUT_DIR router     # ~4 min: randproj index + fit, eval beside types/ffn's model
#
# Needs hmlm installed with its entry points and the omegaconf + lm-eval wheels (as benchmarks/gpu_bank.sh). The
# example plugins are installed from plugins/ into OUT_DIR/site, which goes first on PYTHONPATH.
set -uo pipefail
out="${1:?usage: bash benchmarks/gpu_plugins.sh OUT_DIR types|router}"
what="${2:?usage: bash benchmarks/gpu_plugins.sh OUT_DIR types|router}"
py="${PYTHON:-python}"
mkdir -p "$out"
"$py" -c "from hmlm import registry; registry.get('stores', 'tiered')" 2>/dev/null \
  || "$py" -m pip install -q --no-deps --no-build-isolation -e . \
  || { echo "gpu_plugins.sh: cannot install hmlm (pip install --no-deps -e .)" >&2; exit 2; }
"$py" -m pip install -q --no-deps --no-build-isolation --upgrade --target "$out/site" \
  ./plugins/hmlm-relu2-memory ./plugins/hmlm-pkm ./plugins/hmlm-randproj-router \
  || { echo "gpu_plugins.sh: cannot install the example plugins" >&2; exit 2; }
export PYTHONPATH="$out/site${PYTHONPATH:+:$PYTHONPATH}"
"$py" -m hmlm.cli plugins > "$out/plugins.txt" 2>&1; cat "$out/plugins.txt"
case "$what" in
  types)   # one index, three memory types at the quickstart's fetched size, then hmlm eval of all three
    "$py" -m hmlm.cli bench memory-types --recipe recipes/quickstart.yaml --types ffn,relu2,pkm \
      --out-dir "$out/types" --limit 64 2>&1 | tee "$out/types.log" | tail -n 30 ;;
  router)  # the same recipe and seed, routed by random projections; evaluated beside the hkmeans FFN model
    "$py" -m hmlm.cli fit --recipe recipes/plugins/randproj.yaml out_dir="$out/randproj" 2>&1 \
      | tee "$out/randproj.log" | tail -n 15
    models=(--model "$out/randproj/model")
    [ -d "$out/types/ffn/model" ] && models+=(--model "$out/types/ffn/model")
    "$py" -m hmlm.cli eval "${models[@]}" --limit 64 --out "$out/router-eval" 2>&1 | tee "$out/router-eval.log" \
      | tail -n 30 ;;
  *) echo "gpu_plugins.sh: second argument is types or router" >&2; exit 2 ;;
esac
