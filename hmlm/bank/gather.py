"""The per-sample gather of a fetch: every level's fetched rows into the memory's layer-major tensors, as one op.

A fetch reads each level's U unique rows once (a table [U, P] in the compute dtype). Every sample needs its path's row
of every level, laid out per named tensor of the memory type as one contiguous [shape[0], B, ...] tensor (layer-major:
each layer's [B, ...] slice is contiguous for the memory's batched matmuls) with the levels' ranks concatenated along
the rank axis. Backward sums the gradients of the samples that share a row in float32 and rounds once to the table's
dtype, in passes in which no row repeats (`unique_passes`: no two samples add into one row at once, and the order of
the sums is fixed, so the result is deterministic).

Why one autograd op instead of index_select, the pieces' views and a cat under autograd: the backward of each view of
a piece allocates a zeroed [B, P] tensor, copies its slice in and autograd sums the pieces, then the view's backward
copies again and the gather casts to float32: about 23 passes over B x P values per level (~5 ms per step at the
160M shape, batch 16, on an H100). Here: one strided copy into float32 rows in pass order, then one index_copy_ and
index_add_ per further pass.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch

from ..protocols import TensorSpec
from .levels import to_device_many
from .rows import RowFormat


def unique_passes(index: torch.Tensor) -> list[torch.Tensor]:
    """Split the positions of `index` (CPU ints) into passes in which no value repeats: pass j holds each value's j-th
    occurrence. index_add_ over one pass never has two samples add into the same row at once."""
    order = torch.argsort(index, stable=True)
    sorted_index = index[order]
    first = torch.ones_like(sorted_index, dtype=torch.bool)
    first[1:] = sorted_index[1:] != sorted_index[:-1]
    starts = torch.nonzero(first).squeeze(1)
    occurrence = torch.arange(len(index)) - starts[torch.cumsum(first.long(), 0) - 1]
    return [order[occurrence == j] for j in range(int(occurrence.max()) + 1)] if len(index) else []


@dataclass(frozen=True)
class LevelGather:
    """One level's part of a gather: which table row each sample reads and where the level's rank goes."""

    fmt: RowFormat
    index: torch.Tensor            # [B] row of the level's table for each sample, on the compute device
    pass_sizes: tuple[int, ...]    # lengths of the unique passes, in order
    order: torch.Tensor            # [B] sample positions in pass order (the passes concatenated), compute device
    rank_offset: int               # where this level's rank starts in the concatenated rank axis
    rank: int


def plan_level(fmt: RowFormat, index: torch.Tensor, rank_offset: int, rank: int) -> LevelGather:
    """The gather of one level from `index` (CPU, [B]); its index tensors stay on the CPU until `on_device`."""
    passes = unique_passes(index)
    order = torch.cat(passes) if passes else torch.zeros(0, dtype=torch.long)
    return LevelGather(fmt, index, tuple(len(p) for p in passes), order, rank_offset, rank)


def on_device(levels: Sequence[LevelGather], device: torch.device) -> list[LevelGather]:
    """The levels' index tensors on `device`, every level's in one transfer that does not stall the host."""
    moved = to_device_many([t for lv in levels for t in (lv.index, lv.order)], device)
    return [replace(lv, index=moved[2 * i], order=moved[2 * i + 1]) for i, lv in enumerate(levels)]


def _out_dim(spec: TensorSpec) -> int:
    # outputs are [shape[0], B, *shape[1:]]: the rank axis moves one to the right unless it is the first
    return spec.rank_axis + 1 if spec.rank_axis >= 1 else 0


class GatherLayout(torch.autograd.Function):
    """outputs[name] [shape[0], B, ...] = the named piece of table_l[index_l[b]] for every level l and sample b."""

    @staticmethod
    def forward(ctx, spec: dict[str, TensorSpec], levels: Sequence[LevelGather], batch: int,  # type: ignore[override]
                *tables: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.spec, ctx.levels, ctx.batch = spec, levels, batch
        ctx.table_meta = [(t.shape[0], t.dtype) for t in tables]
        dtype, device = tables[0].dtype, tables[0].device
        outs = {name: torch.empty((s.shape[0], batch, *s.shape[1:]), dtype=dtype, device=device)
                for name, s in spec.items()}
        for lv, table in zip(levels, tables):
            # one gather of whole rows (index_select's fast path for contiguous rows), then each piece's strided copy
            rows = table.index_select(0, lv.index)
            for p in lv.fmt.pieces:
                src = rows[:, p.offset:p.offset + p.numel].view(batch, *p.shape)
                dst = outs[p.name].narrow(_out_dim(spec[p.name]), lv.rank_offset, lv.rank)
                dst.copy_(src.movedim(0, 1))
        return tuple(outs[name] for name in spec)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):  # type: ignore[override]
        spec, levels, batch = ctx.spec, ctx.levels, ctx.batch
        by_name = dict(zip(spec, grads))
        out: list[torch.Tensor | None] = []
        for lv, (rows_u, dtype) in zip(levels, ctx.table_meta):
            device = lv.index.device
            # float32 rows of the samples' gradients, in pass order (row k belongs to sample order[k])
            ordered = torch.empty((batch, lv.fmt.numel), dtype=torch.float32, device=device)
            for p in lv.fmt.pieces:
                dst = ordered[:, p.offset:p.offset + p.numel].view(batch, *p.shape)
                g = by_name.get(p.name)
                if g is None:
                    dst.zero_()
                    continue
                g = g.narrow(_out_dim(spec[p.name]), lv.rank_offset, lv.rank).movedim(1, 0)   # [B, *shape] view
                dst.copy_(g.index_select(0, lv.order) if len(lv.pass_sizes) > 1 else g)
            rows = lv.index.index_select(0, lv.order) if len(lv.pass_sizes) > 1 else lv.index
            total = torch.empty((rows_u, lv.fmt.numel), dtype=torch.float32, device=device)
            start = 0
            for j, n in enumerate(lv.pass_sizes):
                # pass 0 holds every row once (every table row is some sample's): a copy, later passes add
                if j == 0:
                    total.index_copy_(0, rows[start:start + n], ordered[start:start + n])
                else:
                    total.index_add_(0, rows[start:start + n], ordered[start:start + n])
                start += n
            out.append(total.to(dtype))
        return (None, None, None, *out)


def gather_layout(spec: dict[str, TensorSpec], levels: Sequence[LevelGather], batch: int,
                  tables: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-sample memory tensors [B, *shape] (views of layer-major [shape[0], B, ...] tensors) from every level's
    table [U_l, P_l] (compute dtype; differentiable) and its LevelGather (index tensors on the tables' device)."""
    outs = GatherLayout.apply(spec, list(levels), batch, *tables)
    return {name: t.movedim(0, 1) for name, t in zip(spec, outs)}
