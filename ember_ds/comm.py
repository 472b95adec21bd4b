"""Ember's collectives: small all-reduces of row/column statistics, on dedicated groups.

Ember sends V_local + D floats per table per step. Issued on the same process group as
DeepSpeed's large gradient collectives they queue behind them (about 2% step time measured by
the paper's authors), so by default each group gets a mirror: a new group of the same ranks
used only by Ember. Mirrors are created with local synchronisation (only the group's members
take part, in the same order on each: partition groups first, then row groups), so ranks that
hold no token table (pipeline stages, say) never have to join in.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


class StatComm:
    def __init__(self, dedicated: bool = True):
        self.dedicated = dedicated
        self._mirror = {}  # tuple(ranks) -> process group

    @staticmethod
    def size(group) -> int:
        if group is None or not dist.is_initialized():
            return 1
        return dist.get_world_size(group)

    def prepare(self, groups) -> None:
        """Create mirrors for ``groups`` (in this order; every member must pass its groups in
        the same order)."""
        if not self.dedicated:
            return
        for g in groups:
            if self.size(g) <= 1:
                continue
            ranks = tuple(dist.get_process_group_ranks(g))
            if ranks not in self._mirror:
                self._mirror[ranks] = dist.new_group(list(ranks), use_local_synchronization=True)

    def all_reduce(self, buf: torch.Tensor, group) -> None:
        if self.size(group) == 1:
            return
        if self.dedicated:
            key = tuple(dist.get_process_group_ranks(group))
            if key not in self._mirror:
                raise RuntimeError("Ember: statistics group was not prepared")
            group = self._mirror[key]
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
