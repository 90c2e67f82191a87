"""lm-eval's own command line with the `hmlm` model registered:

    python -m hmlm.eval.harness --model hmlm --model_args path=runs/quickstart/model,memory=fetched \
        --tasks hmlm_atomic_number --include_path evals/tasks

lm-eval 0.4.x finds models only in its own MODEL_MAPPING or through `register_model` in an imported module; it
has no entry-point group, so a plain `lm_eval --model hmlm` cannot see an out-of-tree model. This module imports
the adapter (which registers `hmlm`) and then hands the arguments to lm-eval's CLI unchanged.
"""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    from . import adapter  # noqa: F401  (registers the `hmlm` model)
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()


if __name__ == "__main__":
    main()
