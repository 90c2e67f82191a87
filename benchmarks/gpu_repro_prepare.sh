#!/usr/bin/env bash
# CPU side, once, on a machine with registry access: fill .repro/ (git-ignored) with everything the GPU calls of
# benchmarks/gpu_repro.sh carry, and check that it fits the 64 MiB that may travel with the checkout.
#
#   bash benchmarks/gpu_repro_prepare.sh            # then carry [".repro"] in each GPU call
#
#   .repro/demo/           hmlm data build-demo (real text capped at HMLM_DEMO_TEXT_MB, default 46 MB; ~12 MiB)
#   .repro/minilm-bf16/    hmlm embedder export --dtype bfloat16 (44 MiB)
#   .repro/site.tar.xz     lm-eval and the other packages hmlm eval needs that the GPU image lacks (~2 MiB)
#
# Steps already done are skipped (delete a folder to redo it). Needs the venv of scripts/setup-env.sh.
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
py="${PYTHON:-$root/.venv/bin/python}"
hmlm=("$py" -m hmlm.cli)
repro=.repro
sources="${HMLM_DEMO_SOURCES:-.cache/demo-sources}"
mkdir -p "$repro"

bash scripts/fetch_demo_sources.sh "$sources"
"$py" -c "import mwparserfromhell" 2>/dev/null || "$py" -m pip install -q mwparserfromhell
if [ ! -f "$repro/demo/MANIFEST.json" ]; then
  HF_HUB_OFFLINE=1 "${hmlm[@]}" data build-demo --sources "$sources" --out "$repro/demo" \
    --max-text-mb "${HMLM_DEMO_TEXT_MB:-46}"
fi
if [ ! -f "$repro/minilm-bf16/hmlm_embedder.json" ]; then
  HF_HUB_OFFLINE=1 "${hmlm[@]}" embedder export --out "$repro/minilm-bf16" --dtype bfloat16
fi
if [ ! -f "$repro/site.tar.xz" ]; then
  "$py" benchmarks/gpu_repro_site.py --out "$repro/site.tar.xz" --wheels .cache/site-wheels
fi

# what travels: tracked files + untracked files git does not ignore + the carried folder
tracked=$( { git ls-files -z; git ls-files -z --others --exclude-standard; } | xargs -0 -r du -cb 2>/dev/null \
  | awk '/\ttotal$/ {s += $1} END {print s + 0}')
carried=$(du -sb "$repro" | cut -f1)
"$py" - "$tracked" "$carried" <<'EOF'
import sys
tracked, carried = (int(x) / 2**20 for x in sys.argv[1:3])
total = tracked + carried
print(f"checkout {tracked:.1f} MiB + .repro {carried:.1f} MiB = {total:.1f} MiB of the 64 MiB a GPU call may take")
sys.exit(0 if total <= 63 else "too big: lower HMLM_DEMO_TEXT_MB and rebuild .repro/demo")
EOF
