"""Where each token table's elements live in the tensors DeepSpeed hands the optimizer.

Without a wrapper the optimizer steps the tables themselves. DeepSpeed's wrappers replace a
param group's tensors by fp32 copies: per-parameter clones (stage 0 + bf16), flat partitions
that cut across rows and tables (ZeRO-1/2, BF16_Optimizer), or flats of per-parameter
partitions (ZeRO-3). For each such tensor this module computes a ``Unit``: which tables it
belongs to (on every rank of the partitioning group, even ranks holding none of a table's
elements, so all ranks keep the same replicated state) and which runs of each table's
row-major elements this rank holds, and where (docs/EMBER.md, "The step", walks through it).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist


@dataclass
class Segment:
    """``length`` elements of table ``table`` from row-major offset ``start_in_table``, stored
    at ``start_in_tensor`` of the flattened stepped tensor."""
    table: int
    start_in_table: int
    length: int
    start_in_tensor: int


@dataclass
class Unit:
    """One stepped tensor: the tables partitioned into it across ``group`` and this rank's
    segments. ``group`` None means the tensor holds its tables whole."""
    tables: list
    segments: list = field(default_factory=list)
    group: Optional[object] = None


def pieces(start: int, length: int, cols: int):
    """Split a row-major run into at most three contiguous 2-D blocks: a partial first row,
    a block of whole rows, a partial last row. Yields (row0, nrows, col0, ncols, offset)."""
    e, end = start, start + length
    if e % cols and e < end:
        n = min(cols - e % cols, end - e)
        yield e // cols, 1, e % cols, n, e - start
        e += n
    full = (end - e) // cols
    if full:
        yield e // cols, full, 0, cols, e - start
        e += full * cols
    if e < end:
        yield e // cols, 1, 0, end - e, e - start


def _flat_segments(params, pads, partition_size, rank, table_of):
    """ZeRO-1/2 and BF16_Optimizer: parameters concatenated (each followed by its interior
    padding), the flat cut into equal partitions; rank owns [rank*P, (rank+1)*P)."""
    tables, segs, off, a = [], [], 0, rank * partition_size
    for k, p in enumerate(params):
        t = table_of(p)
        n = p.numel()
        tables.append(t)
        lo, hi = max(off, a), min(off + n, a + partition_size)
        if lo < hi:
            segs.append(Segment(t, lo - off, hi - lo, lo - a))
        off += n + (pads[k] if pads else 0)
    return tables, segs


def _zero3_segments(params, rank, table_of):
    """ZeRO-3: each parameter partitioned alone (ceil(numel/W) per rank, tail padding),
    this rank's partitions concatenated into the sub-group's flat."""
    tables, segs, f = [], [], 0
    for p in params:
        t = table_of(p)
        pn = p.partition_numel()
        tables.append(t)
        start = rank * pn
        n = max(0, min(pn, p.ds_numel - start))
        if n:
            segs.append(Segment(t, start, n, f))
        f += pn
    return tables, segs


def units_from_wrapper(wrapper, table_of) -> dict:
    """Map id(stepped tensor) -> Unit for every tensor a DeepSpeed wrapper will hand the basic
    optimizer. ``table_of(param)`` returns the table index of an original parameter (raising
    for a non-table parameter inside a token-table group is the caller's job: it returns None
    for body parameters, and units with only body parameters are dropped)."""
    name = type(wrapper).__name__
    units = {}

    def add(tensor, tables, segs, group):
        if all(t is None for t in tables):
            return
        if any(t is None for t in tables):
            raise RuntimeError("Ember: a DeepSpeed partition mixes token tables and body "
                               "parameters; Ember keeps them in separate param groups, so "
                               "something regrouped them")
        units[id(tensor)] = Unit(sorted(set(tables)), segs, group)

    if name == "DeepSpeedZeroOptimizer":  # ZeRO-1/2
        for i, flat in enumerate(wrapper.single_partition_of_fp32_groups):
            group = wrapper.real_dp_process_group[i]
            # round_robin_bit16_groups is the flat order, also under round robin gradients
            # (where DeepSpeed's own p._hp_mapping is wrong).
            pads = getattr(wrapper, "round_robin_bit16_padding", None)
            tables, segs = _flat_segments(wrapper.round_robin_bit16_groups[i],
                                          pads[i] if pads else None, int(wrapper.partition_size[i]),
                                          dist.get_rank(group), table_of)
            add(flat, tables, segs, group)
    elif name == "BF16_Optimizer":
        for i, flat in enumerate(wrapper.fp32_groups_flat_partition):
            group = wrapper.real_dp_process_group[i]
            size = wrapper.bf16_groups_flat[i].numel() // dist.get_world_size(group)
            tables, segs = _flat_segments(wrapper.bf16_groups[i], None, size,
                                          dist.get_rank(group), table_of)
            add(flat, tables, segs, group)
    elif name == "DeepSpeedZeroOptimizer_Stage3":
        for sg, flat in enumerate(wrapper.fp32_partitioned_groups_flat):
            params = wrapper.fp16_groups[sg]
            if not params:
                continue
            group = params[0].ds_process_group
            tables, segs = _zero3_segments(params, dist.get_rank(group), table_of)
            add(flat, tables, segs, group)
    elif name in ("FP16_UnfusedOptimizer", "FP16_Optimizer"):
        # Stage 0 with bf16/fp16: one fp32 clone per parameter, same shape, same position.
        lp_groups = wrapper.fp16_groups
        hp_groups = getattr(wrapper, "fp32_groups", None) or \
            getattr(wrapper, "fp32_groups_flat", None)
        if name == "FP16_Optimizer":
            raise NotImplementedError("Ember: fused FP16_Optimizer is not supported (fp16 with a "
                                      "fused optimizer); use bf16 or ZeRO")
        for lp, hp in zip(lp_groups, hp_groups):
            for p, clone in zip(lp, hp):
                t = table_of(p)
                if t is not None:
                    units[id(clone)] = Unit([t], [Segment(t, 0, p.numel(), 0)], None)
    else:
        raise NotImplementedError(
            f"Ember does not know how DeepSpeed's {name} lays out parameters, so it cannot map "
            "its partitions back to table rows and columns; refusing to fall back to an "
            "unfactored update. Supported: ZeRO stages 0-3 (fp32/bf16), BF16_Optimizer.")
    return units


def whole_unit(table: int, param: torch.Tensor) -> Unit:
    return Unit([table], [Segment(table, 0, param.numel(), 0)], None)
