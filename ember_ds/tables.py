"""Which parameters are token tables, and how their rows are split across ranks.

A token table is a 2-D tensor whose rows are tokens (input embedding, untied LM head). Ember
needs three facts per table that the tensor alone does not carry when its rows are sharded
(Megatron vocab parallelism): the global row count V, the first global row this shard holds,
and the process group(s) that split the rows. They travel as an attribute on the Parameter,
which survives deepspeed.initialize (it keeps the same Parameter objects).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional

import torch
from torch import nn

_ATTR = "_ember_token_table"
_BODY_ATTR = "_ember_not_token_table"


@dataclass
class TableMeta:
    """Row-sharding facts of one token table (all optional for an unsharded table)."""
    global_rows: Optional[int] = None       # V over every shard; None: the local row count
    row_offset: int = 0                     # global index of this shard's first row
    row_groups: list = field(default_factory=list)  # process groups that split the rows
    name: Optional[str] = None              # for messages and checkpoints


def mark_token_table(param: torch.Tensor, *, global_rows: Optional[int] = None,
                     row_offset: int = 0, row_group=None, name: Optional[str] = None):
    """Tag ``param`` as a token table for Ember; returns it.

    For a vocab-parallel shard give ``global_rows`` (the full vocabulary), ``row_offset`` (this
    shard's first row) and ``row_group`` (the tensor-parallel group, or a list of groups, that
    splits the rows). A megatron-core parameter tagged ``tensor_model_parallel`` with
    ``partition_dim == 0`` gets these from parallel_state when they are left out.
    """
    if len(_shape(param)) != 2:
        raise ValueError(f"a token table must be 2-D (rows = tokens), got shape {tuple(_shape(param))}"
                         + (f" for {name}" if name else ""))
    groups = [] if row_group is None else (list(row_group) if isinstance(row_group, (list, tuple))
                                           else [row_group])
    setattr(param, _ATTR, TableMeta(global_rows, int(row_offset), groups, name))
    return param


def mark_not_token_table(param: torch.Tensor):
    """Opt a parameter out of the automatic nn.Embedding rule (e.g. a positional table)."""
    setattr(param, _BODY_ATTR, True)
    return param


def is_token_table(param: torch.Tensor) -> bool:
    return hasattr(param, _ATTR)


def table_meta(param: torch.Tensor) -> TableMeta:
    """The TableMeta of a tagged parameter, completed from megatron-core where it can be."""
    meta: TableMeta = getattr(param, _ATTR)
    if meta.global_rows is None and getattr(param, "tensor_model_parallel", False) \
            and getattr(param, "partition_dim", -1) == 0:
        tp_group, tp_rank, tp_size = _megatron_tp()
        if tp_size > 1:
            rows = _shape(param)[0]
            meta = TableMeta(rows * tp_size, rows * tp_rank, [tp_group], meta.name)
            setattr(param, _ATTR, meta)
    return meta


def tag_module_tables(module: nn.Module) -> list:
    """Tag every nn.Embedding / megatron-core VocabParallelEmbedding weight in ``module`` that
    is not tagged yet (nor opted out), and return all token tables of the module, each once
    (tied tables are one Parameter)."""
    vpe = _vocab_parallel_embedding_cls()
    for mod_name, mod in module.named_modules():
        w = getattr(mod, "weight", None)
        if not isinstance(w, torch.Tensor) or is_token_table(w) or getattr(w, _BODY_ATTR, False):
            continue
        if vpe is not None and isinstance(mod, vpe):
            tp_group = getattr(mod, "tp_group", None)
            mark_token_table(w, global_rows=mod.num_embeddings, row_offset=mod.vocab_start_index,
                             row_group=tp_group if _group_size(tp_group) > 1 else None,
                             name=mod_name + ".weight")
        elif isinstance(mod, nn.Embedding):
            mark_token_table(w, name=mod_name + ".weight")
    seen, tables = set(), []
    for p in module.parameters():
        if is_token_table(p) and id(p) not in seen:
            seen.add(id(p))
            tables.append(p)
    return tables


def iter_token_tables(params: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
    seen = set()
    for p in params:
        if is_token_table(p) and id(p) not in seen:
            seen.add(id(p))
            yield p


def _shape(param: torch.Tensor):
    """The logical shape, also for a ZeRO-3 partitioned parameter (shape (0,) there)."""
    return tuple(getattr(param, "ds_shape", None) or param.shape)


def _group_size(group) -> int:
    if group is None or not torch.distributed.is_initialized():
        return 1
    return torch.distributed.get_world_size(group)


def _vocab_parallel_embedding_cls():
    try:
        from megatron.core.tensor_parallel import VocabParallelEmbedding
        return VocabParallelEmbedding
    except Exception:  # megatron-core missing or broken: plain nn.Embedding rules still apply
        return None


def _megatron_tp():
    try:
        from megatron.core import parallel_state as ps
        if ps.model_parallel_is_initialized():
            return (ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_rank(),
                    ps.get_tensor_model_parallel_world_size())
    except Exception:
        pass
    return None, 0, 1
