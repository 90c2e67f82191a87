#!/usr/bin/env bash
# The main job on a fresh machine: install, then index the bundled corpus and train the quickstart model on CPU.
#
# Re-runnable: a second run trains a new model over the first (`hmlm fit --overwrite`: the old run is kept aside until
# the new run's first checkpoint and moved back if it fails; the index is reused). `--resume` continues the old run
# instead; either flag given here is passed on as it is, like any recipe override (trainer.max_steps=100).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup-env.sh"
cd "$root"
mode=(--overwrite)
for arg in "$@"; do
  case "$arg" in --resume|--resume=*|--overwrite) mode=() ;; esac
done
if [[ ${#mode[@]} -gt 0 && ( -d runs/quickstart/model || -d runs/quickstart/checkpoints ) ]]; then
  echo "quickstart: runs/quickstart holds an earlier run; training a new one over it" \
       "(to continue the earlier run instead: bash scripts/quickstart.sh --resume)"
fi
exec "$root/.venv/bin/hmlm" fit --recipe recipes/quickstart.yaml "${mode[@]}" "$@"
