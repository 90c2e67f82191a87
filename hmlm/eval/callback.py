"""In-training evaluation: a Lightning callback that runs a small task set every N steps and logs bucket accuracies.

    from hmlm.eval.callback import BucketEvalCallback
    trainer = L.Trainer(..., callbacks=[BucketEvalCallback(every_n_steps=200, tasks=["hmlm_atomic_number"])])

It evaluates the LightningModule's live `model` (an HMLMModule's MemoryLM) with the index's tokenizer and tree,
through the same lm-eval path as `hmlm eval`, and logs `eval/<task>/<mode>/acc` and
`eval/<task>/<mode>/acc_bucket_<bucket>` to every logger of the trainer (rank 0 only).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import lightning as L

from ..export import LoadedModel
from .buckets import DEFAULT_EDGES, FrequencyCounter


class BucketEvalCallback(L.Callback):
    def __init__(self, every_n_steps: int = 200, tasks: Sequence[str] = ("hmlm_atomic_number",),
                 memory: Sequence[str] = ("fetched",), limit: int | None = 64, batch_size: int = 32,
                 edges: Sequence[int] = DEFAULT_EDGES, include_path: str | None = None, max_gen_toks: int = 16):
        if every_n_steps < 1:
            raise ValueError(f"BucketEvalCallback: every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.tasks, self.memory = list(tasks), list(memory)
        self.limit, self.batch_size, self.edges = limit, batch_size, tuple(edges)
        self.include_path, self.max_gen_toks = include_path, max_gen_toks
        self.history: list[dict[str, Any]] = []
        self._done = 0            # last multiple of every_n_steps evaluated (resumes never repeat a step)
        self._loaded: LoadedModel | None = None
        self._counter: FrequencyCounter | None = None
        self._tasks: dict | None = None

    def _setup(self, pl_module) -> LoadedModel:
        if self._loaded is None:
            from ..index import load_router, load_tokenizer
            from .modeldata import EvalData
            from .report import load_tasks, task_manager

            recipe = pl_module.recipe
            index_dir = Path(recipe.index.dir)
            meta = {"index": {"dir": str(index_dir),
                              "corpus": json.loads((index_dir / "index.json").read_text(encoding="utf-8"))["corpus"]},
                    "recipe": {"data": {"max_docs": recipe.data.max_docs}}}
            self._loaded = LoadedModel(index_dir, meta, recipe, pl_module.model, load_tokenizer(index_dir),
                                       load_router(recipe, index_dir / "tree.safetensors"))
            self._counter = FrequencyCounter.for_model(EvalData.of(self._loaded))
            self._tasks = load_tasks(task_manager(self.tasks, self.include_path), self.tasks)
        self._loaded.model = pl_module.model
        return self._loaded

    def evaluate(self, pl_module) -> dict[str, float]:
        from .report import evaluate_modes

        loaded = self._setup(pl_module)
        was_training = loaded.model.training
        loaded.model.eval()
        try:
            assert self._tasks is not None
            results = evaluate_modes(loaded, self._tasks, self.memory, limit=self.limit,
                                     batch_size=self.batch_size, counter=self._counter, edges=self.edges,
                                     max_gen_toks=self.max_gen_toks)
        finally:
            loaded.model.train(was_training)
        metrics: dict[str, float] = {}
        for mode, tasks in results.items():
            for task, r in tasks.items():
                if r["value"] is not None:
                    metrics[f"eval/{task}/{mode}/{r['metric']}"] = float(r["value"])
                for bucket, b in (r["buckets"] or {}).items():
                    if b["acc"] is not None:
                        metrics[f"eval/{task}/{mode}/acc_bucket_{bucket}"] = float(b["acc"])
        return metrics

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        k = trainer.global_step // self.every_n_steps
        if k <= self._done:
            return
        self._done = k
        if not trainer.is_global_zero:
            return
        metrics = self.evaluate(pl_module)
        self.history.append({"step": trainer.global_step, **metrics})
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
