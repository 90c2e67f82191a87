#!/usr/bin/env bash
# Create (or reuse) .venv and install hmlm into it. torch is pinned to the CPU build that lies on disk
# (torch==2.13.0) BEFORE anything else, so that no dependency can make pip pull a multi-GB CUDA wheel.
# Usage: bash scripts/setup-env.sh [extras]      e.g. `bash scripts/setup-env.sh test`
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
extras="${1:-}"
if [ ! -x "$root/.venv/bin/python" ]; then
  python3 -m venv "$root/.venv"
fi
py="$root/.venv/bin/python"
"$py" -m pip install -q --disable-pip-version-check --upgrade pip 2>&1 | grep -v "is ignored" || true
if ! "$py" -c "import torch" 2>/dev/null; then
  "$py" -m pip install -q --disable-pip-version-check "torch==${HMLM_TORCH_VERSION:-2.13.0}" 2>&1 | grep -v "is ignored" || true
fi
# a constraint keeps the installed torch in place while the rest resolves
tv="$("$py" -c 'import torch; print(torch.__version__.split("+")[0])')"
spec="$root"; [ -n "$extras" ] && spec="$root[$extras]"
"$py" -m pip install -q --disable-pip-version-check -e "$spec" -c <(echo "torch==$tv") 2>&1 | grep -v "is ignored" || true
"$py" -c "import hmlm, torch; print(f'hmlm {hmlm.__version__} ready (torch {torch.__version__})')"
