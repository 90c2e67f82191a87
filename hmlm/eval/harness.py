"""lm-eval's own command line with the `hmlm` model registered:

    python -m hmlm.eval.harness --model hmlm --model_args path=runs/quickstart/model,memory=fetched \
        --tasks hmlm_atomic_number --include_path evals/tasks

lm-eval 0.4.13 finds models only in its own registry or through `register_model` in a module it imported, so this
module imports the adapter (which registers `hmlm`) and hands the arguments to lm-eval's CLI. Releases that carry
EleutherAI/lm-evaluation-harness#4013 find it through the `lm_eval.models` entry point that hmlm's pyproject declares,
so a plain `lm_eval --model hmlm ...` works there.

lm-eval's CLI defaults to batch size 1, which costs the hmlm model a forward per request; without `--batch_size`
(or a `--config` file that may set it) this entry point asks for the adapter's default batch instead. Idle OpenMP
threads sleep (hmlm.utils.passive_openmp), as under `hmlm eval`.
"""
from __future__ import annotations

import sys

_SUBCOMMANDS = ("run", "ls", "validate")


def with_default_batch(argv: list[str], batch_size: int) -> list[str]:
    """`argv` plus `--batch_size N` for an evaluation run that does not choose a batch size itself."""
    if argv and argv[0] in _SUBCOMMANDS[1:]:
        return argv
    chosen = any(a in ("-b", "--batch_size", "-C", "--config") or a.startswith(("--batch_size=", "--config="))
                 for a in argv)
    return argv if chosen or not argv else [*argv, "--batch_size", str(batch_size)]


def main(argv: list[str] | None = None) -> None:
    from ..utils import passive_openmp

    passive_openmp()   # before the adapter imports torch, as `hmlm eval` does
    from .adapter import DEFAULT_BATCH_SIZE  # importing the adapter registers the `hmlm` model
    from lm_eval.__main__ import cli_evaluate

    args = list(sys.argv[1:] if argv is None else argv)
    sys.argv = ["lm_eval", *with_default_batch(args, DEFAULT_BATCH_SIZE)]
    cli_evaluate()


if __name__ == "__main__":
    main()
