#!/usr/bin/env bash
# Create (or reuse) .venv and install hmlm into it. torch is pinned to the CPU build that lies on disk
# (torch==2.13.0) BEFORE anything else, so that no dependency can make pip pull a multi-GB CUDA wheel.
# Usage: bash scripts/setup-env.sh [extras]      e.g. `bash scripts/setup-env.sh test`
# pip's own output goes to .venv/setup.log and is shown only when a step fails.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
extras="${1:-}"
if [ ! -x "$root/.venv/bin/python" ]; then
  python3 -m venv "$root/.venv"
fi
py="$root/.venv/bin/python"
log="$root/.venv/setup.log"
# a re-run with nothing changed skips pip (~20 s, and no registry access): the stamp records what was installed (this
# script, pyproject.toml, the extras, the torch pin, the checkout it points at) and is written only after a complete
# install
stamp="$root/.venv/.hmlm-setup-${extras:-core}"
want="$(cat "$root/scripts/setup-env.sh" "$root/pyproject.toml" | sha256sum | cut -c1-16) ${HMLM_TORCH_VERSION:-2.13.0} $root"
# hmlm's own bytecode, as pip compiles an installed package's: an editable install is never compiled, and where
# PYTHONDONTWRITEBYTECODE is set every command would compile hmlm's modules again (~0.3 s of each `hmlm eval`);
# the .pyc files are checked against their sources' times on import, so an edit is never hidden
compile_hmlm() { "$py" -m compileall -q "$root/hmlm" > /dev/null 2>&1 || true; }
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && \
   "$py" -c "from importlib import metadata as m; print(f\"hmlm {m.version('hmlm')} ready (torch {m.version('torch')}, installed earlier; $stamp)\")" 2>/dev/null; then
  compile_hmlm
  exit 0
fi
: > "$log"
run() {  # run a pip step quietly; on failure show its output and stop
  if ! "$@" >> "$log" 2>&1; then
    echo "setup-env: failed: $*" >&2
    tail -40 "$log" >&2
    exit 1
  fi
}
run "$py" -m pip install -q --disable-pip-version-check --upgrade pip
if ! "$py" -c "import torch" 2>/dev/null; then
  run "$py" -m pip install -q --disable-pip-version-check "torch==${HMLM_TORCH_VERSION:-2.13.0}"
fi
# a constraint keeps the installed torch in place while the rest resolves
tv="$("$py" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null)"
spec="$root"; [ -n "$extras" ] && spec="$root[$extras]"
run "$py" -m pip install -q --disable-pip-version-check -e "$spec" -c <(echo "torch==$tv")
compile_hmlm
"$py" -c "import hmlm, torch; print(f'hmlm {hmlm.__version__} ready (torch {torch.__version__}; pip log: $log)')"
echo "$want" > "$stamp"
