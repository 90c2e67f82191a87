"""Keep lm-eval's `simple_evaluate` from printing git's "fatal: not a git repository" on stderr.

lm-eval records the commit of the working directory by running `git describe --always` with git's stderr inherited
(`lm_eval.loggers.utils.get_git_commit_hash`), so every call from outside a repository prints git's complaint.
`install()` puts a version with the same result in place of the name lm-eval's evaluator calls: git's stderr is
captured, and outside a repository the hash comes from lm-eval's own `.git` reader, as before. Importing the hmlm
adapter installs it, so every route into lm-eval with the hmlm model (its API, `python -m hmlm.eval.harness`,
`hmlm eval`) is quiet.

`no_request_bars()` keeps lm-eval's per-task request-building progress bars off stderr while `hmlm eval` runs.

It also drops lm-eval's warning, printed once per task that loads its data with `custom_dataset` (every task in
evals/tasks and evals/examples), that "custom kwargs can be passed to --metadata": those tasks take none.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import subprocess
from typing import Iterator


def git_commit_hash() -> str | None:
    """lm-eval's `get_git_commit_hash`, without git's stderr."""
    from lm_eval.loggers.utils import get_commit_from_path

    try:
        out = subprocess.run(["git", "describe", "--always"], capture_output=True, check=True)  # noqa: S607
        return out.stdout.decode().strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return get_commit_from_path(os.getcwd())


class _DropMetadataAdvice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed to `--metadata`" not in record.getMessage()


def install() -> None:
    import lm_eval.evaluator as evaluator

    task_logger = logging.getLogger("lm_eval.api.task")
    if not any(isinstance(f, _DropMetadataAdvice) for f in task_logger.filters):
        task_logger.addFilter(_DropMetadataAdvice())

    if hasattr(evaluator, "get_git_commit_hash"):   # a later lm-eval may compute it elsewhere; then nothing to do
        evaluator.get_git_commit_hash = git_commit_hash


@contextlib.contextmanager
def no_request_bars() -> Iterator[None]:
    """Without the tqdm bar lm-eval draws on stderr while it builds each task's requests (one bar per task and memory
    mode, each done in a fraction of a second): `hmlm eval` shows its own progress and reports. Restored after."""
    import lm_eval.api.task as task_module

    bar = task_module.tqdm
    task_module.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        task_module.tqdm = bar
