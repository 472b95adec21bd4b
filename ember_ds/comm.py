"""Ember's collectives: small all-reduces of row/column statistics, on dedicated groups.

Ember sends V_local + D floats per table per step. Issued on the same process group as
DeepSpeed's large gradient collectives they queue behind them (about 2% step time measured by
the paper's authors), so by default each group gets a mirror: a new group of the same ranks
used only by Ember. Mirrors are created collectively (every rank must create every group, in
the same order), once, the first time Ember needs them.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


class StatComm:
    def __init__(self, dedicated: bool = True):
        self.dedicated = dedicated
        self._mirror = {}  # tuple(ranks) -> process group

    def size(self, group) -> int:
        if group is None or not dist.is_initialized():
            return 1
        return dist.get_world_size(group)

    def prepare(self, groups) -> None:
        """Create mirrors for ``groups`` (collective over the world: call on every rank)."""
        if not self.dedicated or not dist.is_initialized() or dist.get_world_size() == 1:
            return
        mine = sorted({tuple(dist.get_process_group_ranks(g)) for g in groups
                       if g is not None and self.size(g) > 1})
        mine = [r for r in mine if r not in self._mirror]
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        wanted = sorted({tuple(r) for lst in everyone for r in lst} - set(self._mirror))
        for ranks in wanted:  # same order on every rank
            self._mirror[ranks] = dist.new_group(list(ranks))

    def all_reduce(self, buf: torch.Tensor, group) -> None:
        if self.size(group) == 1:
            return
        if self.dedicated:
            key = tuple(dist.get_process_group_ranks(group))
            if key not in self._mirror:
                raise RuntimeError("Ember: statistics group was not prepared on all ranks")
            group = self._mirror[key]
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
