"""Subtree-affine data parallelism (DESIGN.md §6, docs/distributed.md): each rank owns whole subtrees of the tree.

A rank trains only on sequences routed into the subtrees it owns, so a bank block below the assignment level is
fetched by exactly one rank: its gradient never leaves that rank, and the rank holds only its own blocks. Blocks above
the assignment level (and the generic block) are *shared* by the ranks owning their descendants; their gradients are
summed within that owner group only. The anchor is ordinary DDP.

    plan_subtrees   paths + token counts -> SubtreePlan (assignment level, owner of each subtree, LPT by tokens)
    SubtreeSampler  the deterministic per-step order: at step s, rank r draws batch_size sequences of its own subtrees
    BankSync        per-rank runtime: shared-block group reductions, the global clip norm, communication counters

Gradient scale: a rank's loss is the mean over its local batch and DDP averages the anchor's gradients over ranks, so
the run optimises the mean of the per-rank means. Bank gradients are divided by the world size to match (a block's
gradient is then exactly its share of that global loss), which is also what a single process computes with
`trainer.subtree_ranks=N`: its batch is the N ranks' batches in rank order and its loss is the mean of their means.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from ..bank.stores import GENERIC, BlockStore
from ..data.packing import SequenceShards


class SubtreePlanError(ValueError):
    pass


@dataclass
class SubtreePlan:
    level: int                  # assignment level, 1-based (1 = the root's k children)
    world: int
    branching: int
    levels: int
    owner: np.ndarray           # [k**level] owning rank of each subtree at the assignment level
    seq_rank: np.ndarray        # [S] owning rank of each training sequence
    rank_tokens: np.ndarray     # [world] training tokens per rank
    nodes: int = 1              # hosts; ranks are numbered node-major (rank // (world // nodes) is the node)

    @property
    def imbalance(self) -> float:
        """Largest rank's tokens over the mean (1.0 = perfect)."""
        return float(self.rank_tokens.max() / max(self.rank_tokens.mean(), 1e-9))

    def sequences(self, rank: int) -> np.ndarray:
        """Sorted training-sequence indices of `rank`."""
        return np.flatnonzero(self.seq_rank == rank)

    def members(self, key: str) -> np.ndarray:
        """[nodes, world] bool: which ranks train each block of bank key `l{lvl}` or `generic`."""
        if key == GENERIC:
            return np.ones((1, self.world), dtype=bool)
        lvl, a, k = int(key[1:]), self.level - 1, self.branching
        if lvl >= a:  # inside a subtree: its one owner (node n's ancestor at level a is n // k**(lvl-a))
            owner = self.owner[np.arange(k ** (lvl + 1)) // k ** (lvl - a)]
            return np.eye(self.world, dtype=bool)[owner]
        # above the assignment level: every rank that owns one of the node's descendant subtrees
        one_hot = np.eye(self.world, dtype=bool)[self.owner]
        return one_hot.reshape(k ** (lvl + 1), k ** (a - lvl), self.world).any(axis=1)

    def held_rows(self, rank: int, keys: Sequence[str]) -> dict[str, np.ndarray]:
        """Bank rows (global node ids) rank `rank` holds: the blocks it owns plus the shared blocks it helps train."""
        return {key: np.flatnonzero(self.members(key)[:, rank]) for key in keys}

    def shared_sets(self, keys: Sequence[str]) -> list[tuple[str, tuple[int, ...], np.ndarray]]:
        """(key, owner group, rows) for blocks trained by >= 2 ranks, in one order that every rank agrees on."""
        out = []
        for key in keys:
            mem = self.members(key)
            multi = np.flatnonzero(mem.sum(1) >= 2)
            groups: dict[tuple[int, ...], list[int]] = {}
            for row in multi.tolist():
                groups.setdefault(tuple(np.flatnonzero(mem[row]).tolist()), []).append(row)
            out.extend((key, g, np.array(rows, dtype=np.int64)) for g, rows in sorted(groups.items()))
        return out

    def summary(self) -> dict:
        return {"level": self.level, "world": self.world, "nodes": self.nodes, "subtrees": int(len(self.owner)),
                "rank_tokens": self.rank_tokens.tolist(), "imbalance": round(self.imbalance, 4),
                "rank_sequences": np.bincount(self.seq_rank, minlength=self.world).tolist()}


def lpt_assign(tokens: np.ndarray, world: int) -> np.ndarray:
    """Longest-processing-time greedy: subtrees by tokens (descending, ties by id) to the least-loaded rank.

    Empty subtrees (no training data, so never fetched) go round-robin by count, which spreads their blocks' memory.
    """
    owner = np.empty(len(tokens), dtype=np.int64)
    heap = [(0, r) for r in range(world)]
    order = np.lexsort((np.arange(len(tokens)), -tokens))
    nonempty = [int(i) for i in order if tokens[i] > 0]
    for i in nonempty:
        load, r = heapq.heappop(heap)
        owner[i] = r
        heapq.heappush(heap, (load + int(tokens[i]), r))
    count = np.bincount(owner[nonempty], minlength=world) if nonempty else np.zeros(world, dtype=np.int64)
    heap = [(int(c), r) for r, c in enumerate(count)]
    heapq.heapify(heap)
    for i in np.flatnonzero(tokens <= 0).tolist():
        c, r = heapq.heappop(heap)
        owner[i] = r
        heapq.heappush(heap, (c + 1, r))
    return owner


def node_local_assign(paths: np.ndarray, tokens: np.ndarray, level: int, world: int, nodes: int, k: int,
                      max_imbalance: float) -> np.ndarray | None:
    """Owners of the level-`level` subtrees such that every subtree of a shallower *node level* b stays on one node
    (ranks are numbered node-major: rank = node * (world // nodes) + local rank).

    Level-b subtrees go to nodes by LPT, then each node's level-`level` subtrees to its ranks by LPT. Every block at or
    below level b is then trained by ranks of a single node, so its shared-block all-reduce never leaves the node;
    only blocks above b (and the generic block) are reduced across nodes. b is the shallowest level whose plan is
    balanced within `max_imbalance` (else the best balanced); None when no b gives every rank a non-empty subtree.
    """
    per_node = world // nodes
    sub_tokens = np.bincount(paths[:, level - 1], weights=tokens, minlength=k ** level).astype(np.int64)
    best: tuple[float, np.ndarray] | None = None
    for b in range(1, level + 1):
        node_tokens = np.bincount(paths[:, b - 1], weights=tokens, minlength=k ** b).astype(np.int64)
        if (node_tokens > 0).sum() < nodes:
            continue
        node_of = lpt_assign(node_tokens, nodes)[np.arange(k ** level) // k ** (level - b)]
        owner = np.empty(k ** level, dtype=np.int64)
        feasible = True
        for n in range(nodes):
            mine = np.flatnonzero(node_of == n)
            if (sub_tokens[mine] > 0).sum() < per_node:
                feasible = False
                break
            owner[mine] = n * per_node + lpt_assign(sub_tokens[mine], per_node)
        if not feasible:
            continue
        loads = np.bincount(owner, weights=sub_tokens, minlength=world)
        imbalance = float(loads.max() / max(loads.mean(), 1e-9))
        if imbalance <= max_imbalance:
            return owner
        if best is None or imbalance < best[0]:
            best = (imbalance, owner)
    return None if best is None else best[1]


def plan_subtrees(paths: np.ndarray, tokens: np.ndarray, *, world: int, branching: int, level: int = 0,
                  max_imbalance: float = 1.1, nodes: int = 1) -> SubtreePlan:
    """Assign the subtrees of one tree level to `world` ranks, balanced by token count.

    level=0 picks the shallowest level with at least `world` non-empty subtrees whose LPT assignment is within
    `max_imbalance` of perfect balance; if none is, the least imbalanced level (shallowest on ties). Deeper levels
    balance better but make more shallow blocks shared, i.e. communicated within their owner groups.
    nodes > 1 (multi-node runs, ranks numbered node-major): ownership keeps whole subtrees on one node
    (node_local_assign), so shared blocks below the node level are reduced inside a node.
    """
    paths = np.asarray(paths, dtype=np.int64)
    tokens = np.asarray(tokens, dtype=np.int64)
    if paths.ndim != 2 or len(paths) != len(tokens) or len(paths) == 0:
        raise SubtreePlanError(f"need paths [S, levels] and tokens [S] for S >= 1 sequences, got {paths.shape} "
                               f"and {tokens.shape}")
    if world < 1:
        raise SubtreePlanError(f"world size must be >= 1, got {world}")
    if nodes < 1 or world % nodes:
        raise SubtreePlanError(f"{world} ranks cannot be split evenly over {nodes} nodes (trainer.num_nodes / "
                               "trainer.subtree_nodes): every node must run the same number of ranks")
    levels, k = paths.shape[1], branching
    candidates = [level] if level else list(range(1, levels + 1))
    best: SubtreePlan | None = None
    counts = []
    for a in candidates:
        if not 1 <= a <= levels:
            raise SubtreePlanError(f"trainer.subtree_level={a}: the tree has levels 1..{levels}")
        ids = paths[:, a - 1]
        if ids.min() < 0 or ids.max() >= k ** a:
            raise SubtreePlanError(f"level-{a} node ids must be in [0, {k ** a}), got {ids.min()}..{ids.max()}: "
                                   "the shards do not match index.router.branching")
        sub_tokens = np.bincount(ids, weights=tokens, minlength=k ** a).astype(np.int64)
        counts.append((a, int((sub_tokens > 0).sum())))
        if counts[-1][1] < world:
            continue
        owner = lpt_assign(sub_tokens, world) if nodes == 1 else \
            node_local_assign(paths, tokens, a, world, nodes, k, max_imbalance)
        if owner is None:
            counts[-1] = (a, f"{counts[-1][1]}, too few for {world // nodes} ranks on each of {nodes} nodes")
            continue
        plan = SubtreePlan(a, world, k, levels, owner, owner[ids],
                           np.bincount(owner, weights=sub_tokens, minlength=world).astype(np.int64), nodes)
        if plan.imbalance <= max_imbalance:
            return plan
        if best is None or plan.imbalance < best.imbalance:
            best = plan
    if best is None:
        seen = ", ".join(f"level {a}: {n}" for a, n in counts)
        raise SubtreePlanError(f"trainer.data_parallel=subtree: {world} ranks need at least {world} non-empty "
                               f"subtrees at the assignment level, the training data has {seen}; use fewer ranks, "
                               "a deeper trainer.subtree_level, or trainer.data_parallel=replicated")
    return best


def shard_paths_and_tokens(shards: SequenceShards, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Every training sequence's path [S, L] and its non-padding token count [S], read shard by shard."""
    from safetensors import safe_open

    paths, tokens = [], []
    for f in shards.files:
        with safe_open(str(f), framework="numpy") as h:
            paths.append(h.get_tensor("paths"))
            doc = h.get_slice("doc_ids")
            n = doc.get_shape()[0]
            tokens.extend((doc[a:min(a + chunk, n)] >= 0).sum(1) for a in range(0, n, chunk))
    return np.concatenate(paths).astype(np.int64), np.concatenate(tokens).astype(np.int64)


def plan_for_recipe(recipe, index_dir: str | Path, world: int) -> SubtreePlan:
    """The plan for a run: `trainer.subtree_ranks` ranks (default: the world size) at `trainer.subtree_level`."""
    t = recipe.trainer
    ranks = t.subtree_ranks or world
    if world > 1 and ranks != world:
        raise SubtreePlanError(f"trainer.subtree_ranks={ranks} but the run has {world} processes: leave it 0 "
                               "(it only exists so that one process can reproduce a multi-rank run)")
    nodes = t.subtree_nodes or (t.num_nodes if world > 1 else 1)
    if world > 1 and nodes != t.num_nodes:
        raise SubtreePlanError(f"trainer.subtree_nodes={nodes} but the run has trainer.num_nodes={t.num_nodes}: "
                               "leave it 0 (it only exists so that one process can reproduce a multi-node run)")
    paths, tokens = shard_paths_and_tokens(SequenceShards(Path(index_dir) / "shards", "train"))
    return plan_subtrees(paths, tokens, world=ranks, branching=recipe.index.router.branching,
                         level=t.subtree_level, nodes=nodes)


class SubtreeSampler(Sampler[int]):
    """Endless deterministic order: at step s, for each rank in `ranks`, batch_size sequences of its subtrees.

    Rank r walks its own sequences in epochs, epoch e in a permutation seeded by (seed, r, e); the position after
    step s is (s + 1) * batch_size, so resuming at global step s restarts at s * batch_size. `ranks=[r]` is rank r of
    a distributed run; `ranks=range(N)` on one process yields the N ranks' batches back to back (the reference).
    """

    def __init__(self, plan: SubtreePlan, seed: int, batch_size: int, *, ranks: Sequence[int], start_step: int = 0):
        self.plan, self.seed, self.batch_size, self.start_step = plan, seed, batch_size, start_step
        self.ranks = list(ranks)
        self.seqs = {r: plan.sequences(r) for r in self.ranks}
        for r, s in self.seqs.items():
            if len(s) == 0:
                raise SubtreePlanError(f"rank {r} owns no training sequences")

    def _perm(self, rank: int, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, rank, epoch]).permutation(self.seqs[rank])

    def __iter__(self) -> Iterator[int]:
        state = {r: (-1, np.empty(0, dtype=np.int64)) for r in self.ranks}
        step = self.start_step
        while True:
            for r in self.ranks:
                n = len(self.seqs[r])
                for pos in range(step * self.batch_size, (step + 1) * self.batch_size):
                    e, off = divmod(pos, n)
                    if e != state[r][0]:
                        state[r] = (e, self._perm(r, e))
                    yield int(state[r][1][off])
            step += 1


@dataclass
class CommCounter:
    """What a rank sent through all-reduce: anchor gradient buckets (DDP), shared bank blocks, clip-norm scalars."""

    anchor_reduce: str = "fp32"  # the anchor buckets' dtype on the wire (trainer.ddp.grad_reduce; hmlm.train.ddp)
    anchor_bytes: int = 0
    anchor_calls: int = 0
    shared_bytes: int = 0
    shared_calls: int = 0
    norm_calls: int = 0
    shared_keys: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return dict(vars(self))


class BankSync:
    """The bank side of one rank of a subtree-parallel run.

    Must be built on every rank at the same point (it creates one process group per shared-block owner group).
    """

    def __init__(self, plan: SubtreePlan, store: BlockStore, rank: int):
        self.plan, self.rank, self.world = plan, rank, plan.world
        self.counter = CommCounter()
        keys = store.keys()
        self.sets = []
        groups: dict[tuple[int, ...], object] = {}
        for key, ranks, rows in plan.shared_sets(keys):
            if ranks not in groups:
                groups[ranks] = dist.new_group(list(ranks))  # collective: every rank creates every group
            if rank in ranks:
                self.sets.append((key, ranks, groups[ranks], store.local_rows(key, rows)))
        self.shared_keys = {key for key, *_ in self.sets}

    @torch.no_grad()
    def reduce(self, store: BlockStore, global_norm: bool) -> torch.Tensor | None:
        """Scale this rank's bank gradients to the global loss, sum shared blocks within their owner groups.

        Afterwards every member of a group updates a shared block with the same gradient, so the copies stay equal.
        Returns the global bank gradient norm (one scalar all-reduce) when clipping needs it.
        """
        kept, by_key = [], {}
        for key, rows, grad in store.fetched_grads():
            grad.div_(self.world)
            (by_key.setdefault(key, []) if key in self.shared_keys else kept).append((key, rows, grad))
        dev = store.compute_device
        # gloo reduces CPU tensors, NCCL CUDA tensors
        comm_dev = dev if dist.get_backend() == "nccl" else torch.device("cpu")
        sq = sum((g.float().pow(2).sum() for _, _, g in kept), torch.zeros((), device=dev))
        for key, ranks, group, local in self.sets:
            width = store.format_of(key).numel
            pos_of = torch.full((int(local.max()) + 1,), -1, dtype=torch.long)
            pos_of[local] = torch.arange(len(local))
            buf = torch.zeros((len(local), width), dtype=torch.float32, device=comm_dev)
            count = torch.zeros(len(local), dtype=torch.float32, device=comm_dev)
            for _, rows, grad in by_key.get(key, []):
                pos = pos_of[rows.clamp(max=len(pos_of) - 1)]
                hit = (rows < len(pos_of)) & (pos >= 0)
                pos_of_hit = pos[hit].to(comm_dev)
                count.index_add_(0, pos_of_hit, torch.ones(len(pos_of_hit), device=comm_dev))
                buf.index_add_(0, pos_of_hit, grad.detach().float()[hit.to(grad.device)].to(comm_dev))
            flat = torch.cat([buf.flatten(), count])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
            self.counter.shared_bytes += flat.numel() * flat.element_size()
            self.counter.shared_calls += 1
            self.counter.shared_keys[key] = self.counter.shared_keys.get(key, 0) + flat.numel() * flat.element_size()
            grads, used = flat[:buf.numel()].view_as(buf), flat[buf.numel():] > 0
            if not used.any():
                continue
            reduced = grads[used].to(dev)
            kept.append((key, local[used.cpu()], reduced))
            if self.rank == ranks[0]:  # count a shared block once in the global norm
                sq = sq + reduced.pow(2).sum()
        store.replace_fetched_grads(kept)
        if not global_norm:
            return None
        sq = sq.reshape(1).to(comm_dev, torch.float64)
        dist.all_reduce(sq, op=dist.ReduceOp.SUM)
        self.counter.norm_calls += 1
        return sq.sqrt().reshape(()).float()

