"""Which parameters are token tables, and how their rows are split across ranks.

A token table is a 2-D tensor whose rows are the vocabulary: an input token embedding, or an
untied output head over the vocabulary. Position, token-type and other tables are not.

How a model's tables are found (``tag_module_tables``), first rule that speaks wins:

1. Explicit: ``exclude`` / ``include`` name patterns (the ds_config's ``exclude_tables`` /
   ``tables``), then ``mark_not_token_table`` / ``mark_token_table`` tags.
2. What the model says. A Hugging Face model (``get_input_embeddings()`` /
   ``get_output_embeddings()``; the output one counts when its rows are the vocabulary) and a
   megatron-core language model (its ``is_embedding_or_output_parameter`` markers) name their
   tables, and inside such a model nothing else is a table (GPT-2's ``wpe``, BERT's
   ``token_type_embeddings`` stay body).
3. Elsewhere, a documented rule for plain torch: an ``nn.Embedding`` (or megatron
   ``VocabParallelEmbedding``) is a token table unless its name has a segment ``pos``,
   ``position(s)``, ``positional``, ``wpe``, ``type``, ``segment`` or ``rel``; among those left
   the vocabulary is the largest row count, and smaller embeddings are not tables. An untied
   head is an ``nn.Linear`` whose weight has the shape of such a table, named like a head
   (a segment ``head``, ``lm``, ``output``, ``out``, ``decoder``, ``logits``, ``unembed``,
   ``embed``) or the model's last Linear.

Ember needs three facts per table that the tensor alone does not carry when its rows are sharded
(Megatron vocab parallelism): the global row count V, the first global row this shard holds,
and the process group(s) that split the rows. They travel as an attribute on the Parameter,
which survives deepspeed.initialize (it keeps the same Parameter objects).

megatron-core is consulted only when something already imported it: a model built from its
layers has, and a model that has not never pays its import.
"""
from __future__ import annotations

import fnmatch
import re
import sys
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional, Sequence

import torch
from torch import nn

_ATTR = "_ember_token_table"
_BODY_ATTR = "_ember_not_token_table"

_NOT_VOCAB = {"pos", "position", "positions", "positional", "wpe", "type", "segment", "rel"}
_HEAD_NAMES = {"head", "lm", "output", "out", "decoder", "logits", "unembed", "embed"}


@dataclass
class TableMeta:
    """Row-sharding facts of one token table (all optional for an unsharded table)."""
    global_rows: Optional[int] = None       # V over every shard; None: the local row count
    row_offset: int = 0                     # global index of this shard's first row
    row_groups: list = field(default_factory=list)  # process groups that split the rows
    name: Optional[str] = None              # for messages and checkpoints
    source: str = "tag"                     # which rule chose it (shown in the summary)


def mark_token_table(param: torch.Tensor, *, global_rows: Optional[int] = None,
                     row_offset: int = 0, row_group=None, name: Optional[str] = None,
                     source: str = "tag"):
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
    setattr(param, _ATTR, TableMeta(global_rows, int(row_offset), groups, name, source))
    if hasattr(param, _BODY_ATTR):
        delattr(param, _BODY_ATTR)
    return param


def mark_not_token_table(param: torch.Tensor):
    """Opt a parameter out of every automatic rule (e.g. a positional table); returns it."""
    if hasattr(param, _ATTR):
        delattr(param, _ATTR)
    setattr(param, _BODY_ATTR, True)
    return param


def is_token_table(param: torch.Tensor) -> bool:
    return hasattr(param, _ATTR)


def is_excluded(param: torch.Tensor) -> bool:
    return bool(getattr(param, _BODY_ATTR, False))


def table_meta(param: torch.Tensor) -> TableMeta:
    """The TableMeta of a tagged parameter, completed from megatron-core where it can be."""
    meta: TableMeta = getattr(param, _ATTR)
    if meta.global_rows is None and getattr(param, "tensor_model_parallel", False) \
            and getattr(param, "partition_dim", -1) == 0:
        tp_group, tp_rank, tp_size = _megatron_tp()
        if tp_size > 1:
            rows = _shape(param)[0]
            meta = TableMeta(rows * tp_size, rows * tp_rank, [tp_group], meta.name, meta.source)
            setattr(param, _ATTR, meta)
    return meta


class PatternError(ValueError):
    """A table pattern that matches no parameter of the model."""


def tag_module_tables(module: nn.Module, include: Sequence[str] = (),
                      exclude: Sequence[str] = ()) -> list:
    """Tag the token tables of ``module`` by the rules in this module's docstring and return
    them, each once (tied tables are one Parameter). ``include`` / ``exclude`` are shell-style
    patterns over ``module.named_parameters()`` names; one that matches nothing is an error."""
    named = list(module.named_parameters())
    for p in _match(named, exclude, "exclude_tables"):
        mark_not_token_table(p)
    for name, p in named:
        if is_token_table(p) and table_meta(p).name is None:
            table_meta(p).name = name
    for p in _match(named, include, "tables"):
        if not is_token_table(p):
            _tag(p, _name_of(named, p), "ds_config pattern")
    covered = set()  # modules inside a model that names its own tables
    for mod_name, mod in module.named_modules():
        if id(mod) in covered:
            continue
        declared = _declared_by_model(mod)
        if declared is None:
            continue
        covered.update(id(m) for m in mod.modules())
        for p, source in declared:
            if not is_token_table(p) and not is_excluded(p):
                _tag(p, _name_of(named, p), source)
    _plain_torch_rule(module, named, covered)
    return list(iter_token_tables(p for _, p in named))


def iter_token_tables(params: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
    seen = set()
    for p in params:
        if is_token_table(p) and id(p) not in seen:
            seen.add(id(p))
            yield p


# ------------------------------------------------------------------------------- the rules

def _match(named, patterns, key: str) -> list:
    found = []
    for pat in patterns or ():
        if not isinstance(pat, str):
            raise PatternError(f"Ember: {key} must be a list of parameter-name patterns "
                               f"(strings), got {pat!r}")
        hits = [p for n, p in named if fnmatch.fnmatchcase(n, pat)]
        if not hits:
            sample = ", ".join(n for n, _ in named[:4])
            raise PatternError(f"Ember: {key} pattern {pat!r} matches no parameter of the model "
                               f"(names look like: {sample}, ...); fix or remove the pattern")
        found += hits
    return found


def _name_of(named, p) -> Optional[str]:
    return next((n for n, q in named if q is p), None)


def _tag(p, name, source) -> None:
    if len(_shape(p)) != 2:
        raise ValueError(f"Ember: {name or 'a parameter'} ({source}) is not a 2-D table, shape "
                         f"{tuple(_shape(p))}")
    vpe_meta = getattr(p, "_ember_vocab_parallel", None)
    mark_token_table(p, name=name, source=source, **(vpe_meta or {}))


def _declared_by_model(mod: nn.Module):
    """[(param, source)] when ``mod`` names its own token tables, else None."""
    hf = sys.modules.get("transformers")
    if hf is not None and isinstance(mod, getattr(hf, "PreTrainedModel", ())):
        return _hf_tables(mod)
    if hasattr(mod, "setup_embeddings_and_output_layer") and \
            hasattr(mod, "share_embeddings_and_output_weights"):
        found = [(p, "megatron marker") for p in mod.parameters()
                 if getattr(p, "is_embedding_or_output_parameter", False)]
        for p, _ in found:
            _note_vocab_parallel(mod, p)
        return found
    return None


def _hf_tables(model) -> list:
    found = []
    emb = _safe_call(model, "get_input_embeddings")
    w_in = getattr(emb, "weight", None)
    if isinstance(w_in, torch.Tensor) and len(_shape(w_in)) == 2:
        found.append((w_in, "HF input embeddings"))
    out = _safe_call(model, "get_output_embeddings")
    w_out = getattr(out, "weight", None)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    rows = {vocab} | ({_shape(w_in)[0]} if found else set())
    if isinstance(w_out, torch.Tensor) and len(_shape(w_out)) == 2 and _shape(w_out)[0] in rows:
        found.append((w_out, "HF output embeddings"))
    return found


def _safe_call(obj, method):
    fn = getattr(obj, method, None)
    if not callable(fn):
        return None
    try:
        return fn()
    except (NotImplementedError, AttributeError):
        return None


def _plain_torch_rule(module, named, covered) -> None:
    """nn.Embedding / VocabParallelEmbedding over the vocabulary, and untied heads of its shape."""
    vpe = _vocab_parallel_embedding_cls()
    candidates = []  # (module name, module, global rows)
    for mod_name, mod in module.named_modules():
        if id(mod) in covered:
            continue
        is_vpe = vpe is not None and isinstance(mod, vpe)
        if not (is_vpe or isinstance(mod, nn.Embedding)):
            continue
        w = getattr(mod, "weight", None)
        if not isinstance(w, torch.Tensor) or is_excluded(w) or _segments(mod_name) & _NOT_VOCAB:
            continue
        if is_vpe:
            _note_vocab_parallel(mod, w)
        candidates.append((mod_name, w, int(mod.num_embeddings)))
    if not candidates:
        return
    vocab = max(rows for _, _, rows in candidates)
    shapes = set()
    for mod_name, w, rows in candidates:
        if rows == vocab:
            shapes.add(tuple(_shape(w)))
            if not is_token_table(w):
                _tag(w, mod_name + ".weight", "nn.Embedding rule")
    linears = [(n, m) for n, m in module.named_modules()
               if isinstance(m, nn.Linear) and id(m) not in covered]
    for i, (mod_name, mod) in enumerate(linears):
        w = mod.weight
        if tuple(_shape(w)) not in shapes or is_token_table(w) or is_excluded(w):
            continue
        if _segments(mod_name) & _HEAD_NAMES or i == len(linears) - 1:
            _tag(w, mod_name + ".weight", "untied head rule")


def _segments(name: str) -> set:
    return {s for s in re.split(r"[._]", name.lower()) if s}


def _note_vocab_parallel(mod, w) -> None:
    """Remember the row split of a vocab-parallel table on its weight, for _tag: a
    VocabParallelEmbedding's own facts, or a row-split (partition_dim 0) ColumnParallelLinear
    head's, from its tensor-parallel group."""
    owner = next((m for m in mod.modules() if getattr(m, "weight", None) is w), None)
    if owner is None:
        return
    group = getattr(owner, "tp_group", None)
    size = _group_size(group)
    if hasattr(owner, "vocab_start_index") and hasattr(owner, "num_embeddings"):
        rows, offset = int(owner.num_embeddings), int(owner.vocab_start_index)
    elif getattr(w, "tensor_model_parallel", False) and getattr(w, "partition_dim", -1) == 0 \
            and size > 1:
        local = _shape(w)[0]
        rows, offset = local * size, local * torch.distributed.get_rank(group)
    else:
        return
    w._ember_vocab_parallel = dict(global_rows=rows, row_offset=offset,
                                   row_group=group if size > 1 else None)


def _shape(param: torch.Tensor):
    """The logical shape, also for a ZeRO-3 partitioned parameter (shape (0,) there)."""
    return tuple(getattr(param, "ds_shape", None) or param.shape)


def _group_size(group) -> int:
    if group is None or not torch.distributed.is_initialized():
        return 1
    return torch.distributed.get_world_size(group)


def _vocab_parallel_embedding_cls():
    """megatron-core's VocabParallelEmbedding if megatron-core is already imported (a model
    built from it has imported it), else None: Ember never imports megatron-core itself."""
    if "megatron.core.tensor_parallel" not in sys.modules:
        return None
    try:
        from megatron.core.tensor_parallel import VocabParallelEmbedding
        return VocabParallelEmbedding
    except Exception:  # a broken install: plain nn.Embedding rules still apply
        return None


def _megatron_tp():
    if "megatron.core.parallel_state" not in sys.modules:
        return None, 0, 1
    try:
        from megatron.core import parallel_state as ps
        if ps.model_parallel_is_initialized():
            return (ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_rank(),
                    ps.get_tensor_model_parallel_world_size())
    except Exception:
        pass
    return None, 0, 1
