"""Score task items on tree paths given per item, many (item, path) pairs in one batched pass (`hmlm eval --removal`).

lm-eval scores each item of a task once per call, under one memory mode. Knowledge removal needs the same item on
several paths (one for each block that reroutes it), and one lm-eval call per block set repeated its request
building and per-call overhead hundreds of times. Here the items' requests, as lm-eval built them in one ordinary run
(`capture`), are replayed instead: each `Job` (an item and the path to fetch its memory from) gets fresh copies of
the item's `Instance`s, the requests of many jobs go through the `hmlm` adapter together with each request's path
pinned (`PinnedPathsLM`: the adapter batches them by path and length as it batches any run), and the task's own
filters and `process_results` turn the responses into its metric, as `lm_eval.evaluator.evaluate` does. Generation
items also get log p(reference answer) on the same path, as `hmlm.eval.removal.score` computes it.

A job's result is what lm-eval's run gives for that item when the router sends it to that path: the adapter decodes
greedily and per request (rows never interact), so only the float rounding of a differently composed batch can differ
(tests/test_removal.py compares both).
"""
from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from lm_eval.api.instance import Instance

from . import EvalError
from .adapter import HMLMEvalLM

ItemId = tuple[str, int]      # (task, doc_id)


@dataclass(frozen=True)
class Job:
    """Score `item` with the memory on `path` (one node per level)."""

    item: ItemId
    path: tuple[int, ...]


class PinnedPathsLM(HMLMEvalLM):
    """The `hmlm` adapter with each request's tree path given by the caller instead of routed: `pinned` holds one
    path per request of the next call, in request order."""

    pinned: torch.Tensor | None = None

    def route_keys(self, keys: Sequence[str]) -> torch.Tensor:
        pinned, self.pinned = self.pinned, None   # one call's paths, never reused by the next
        if pinned is None or len(pinned) != len(keys):
            raise RuntimeError(f"PinnedPathsLM: {len(keys)} requests but "
                               f"{'no' if pinned is None else len(pinned)} pinned paths")
        return pinned


def capture(task_dict: dict) -> dict[ItemId, list[Instance]]:
    """The requests lm-eval built in its last run over `task_dict` (run with `limit`, not `samples`, so that an
    instance's doc_id is the item's), per item in request order."""
    out: dict[ItemId, list[Instance]] = defaultdict(list)
    for name, task in task_dict["tasks"].items():
        for inst in task.instances or []:
            out[(name, inst.doc_id)].append(inst)
    return {k: sorted(v, key=lambda inst: inst.idx) for k, v in out.items()}


def _fresh(inst: Instance) -> Instance:
    return Instance(request_type=inst.request_type, doc=inst.doc, arguments=inst.arguments, idx=inst.idx,
                    metadata=(inst.task_name, inst.doc_id, inst.repeats))


def order_jobs(lm: HMLMEvalLM, requests: dict[ItemId, list[Instance]], jobs: Sequence[Job]) -> list[Job]:
    """`jobs` sorted so that consecutive ones share a prompt length and a path (the adapter's batches: generation
    batches need prompts of one length, and a batch on one path fetches one set of blocks)."""
    lengths = {j.item: len(lm.tok_encode(requests[j.item][0].args[0])) for j in jobs}
    return sorted(jobs, key=lambda j: (lengths[j.item], j.path, j.item))


def rescore(lm: PinnedPathsLM, task_dict: dict, requests: dict[ItemId, list[Instance]], jobs: Sequence[Job], *,
            chunk: int = 256, deadline: float | None = None, advance: Callable[[int], None] | None = None
            ) -> dict[Job, tuple[float, float | None]]:
    """{job: (correct, log p(reference answer) for a generation item else None)}, `chunk` jobs per pass in the given
    order (see `order_jobs`). With `deadline` (a time.perf_counter() value) no chunk starts after it: the jobs left
    are missing from the result. `advance(n)` is called after each chunk with its number of jobs."""
    from .removal import _answer_pair
    from .report import _primary_metric

    out: dict[Job, tuple[float, float | None]] = {}
    for start in range(0, len(jobs), chunk):
        if deadline is not None and time.perf_counter() > deadline:
            break
        part = jobs[start:start + chunk]
        out.update(_score_chunk(lm, task_dict, requests, part, _primary_metric, _answer_pair))
        if advance is not None:
            advance(len(part))
    return out


def _score_chunk(lm, task_dict, requests, jobs, primary_metric, answer_pair) -> dict[Job, tuple[float, float | None]]:
    copies = {j: [_fresh(inst) for inst in requests[j.item]] for j in jobs}
    by_type: dict[str, list[tuple[Instance, Job]]] = defaultdict(list)
    for j, insts in copies.items():
        for inst in insts:
            by_type[inst.request_type].extend([(inst, j)] * (inst.repeats or 1))   # lm-eval's K copies
    for reqtype, reqs in by_type.items():
        lm.pinned = torch.tensor([j.path for _, j in reqs], dtype=torch.long)
        for resp, (inst, _) in zip(getattr(lm, reqtype)([inst for inst, _ in reqs]), reqs, strict=True):
            inst.resps.append(resp)
    per_task: dict[str, list[Instance]] = defaultdict(list)
    for j, insts in copies.items():
        per_task[j.item[0]].extend(insts)
    for name, insts in per_task.items():
        for f in getattr(task_dict["tasks"][name], "_filters", []):
            f.apply(insts)
    out, pairs = {}, {}
    configs = {name: task_dict["tasks"][name].dump_config() for name in per_task}
    for j, insts in copies.items():
        task = task_dict["tasks"][j.item[0]]
        doc = insts[0].doc
        key = list(insts[0].filtered_resps)[-1]   # the last filter, as removal.score keeps the last logged sample
        metrics = task.process_results(doc, [inst.filtered_resps[key] for inst in insts])
        metric = primary_metric(metrics, configs[j.item[0]])
        if metric is None:
            raise EvalError(f"--removal: task {j.item[0]} reports no accuracy metric ({', '.join(metrics)})")
        out[j] = (float(metrics[metric]), None)
        pair = answer_pair(task, {"arguments": [inst.args for inst in insts], "target": task.doc_to_target(doc)})
        if pair is not None:
            pairs[j] = pair
    if pairs:
        lm.pinned = torch.tensor([j.path for j in pairs], dtype=torch.long)
        for j, (ll, _) in zip(pairs, lm.loglikelihood(list(pairs.values())), strict=True):
            out[j] = (out[j][0], ll)
    return out
