#!/usr/bin/env bash
# The main job on a fresh machine: install, then index the bundled corpus and train the quickstart model on CPU.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup-env.sh"
cd "$root"
exec "$root/.venv/bin/hmlm" fit --recipe recipes/quickstart.yaml "$@"
