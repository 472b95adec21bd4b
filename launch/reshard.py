"""Resume a checkpoint at another job shape: TP, PP, DP and ZeRO stage may all change.

DeepSpeed's own files are laid out by the job that wrote them (one flat fp32 partition per
data-parallel rank and parameter group under ZeRO 1/2, one slice of every parameter under
ZeRO 3, one file per TP rank and PP stage), and DeepSpeed refuses to load them at another
data-parallel size. Its answer is the universal checkpoint (``ds_to_universal``: one full fp32
tensor per parameter and optimizer-state key, resliced on load); its converter assumes Adam
state on every parameter group, which Ember's token-table groups do not have (their state is
r, c, s per table, not two V x D moments), so it stops on an Ember checkpoint. This module
follows the same design, in two halves:

``read_universal(folder)``
    the shape-free state of a checkpoint, in one process, from DeepSpeed's files: every
    parameter as one full fp32 tensor under its GPT name (the real vocabulary rows only, as
    DeepSpeed's universal format strips the padding), every tensor of the body optimizer's
    state the same way, Ember's table state by global row (r over the whole vocabulary, c, s,
    step), the learning-rate schedule and the step counters. The fp32 master weights come from
    the optimizer partitions (bf16 runs lose nothing).

``load_universal(engine, state)``
    writes that state into a freshly built engine of any shape: each rank cuts its TP slice
    (megatron's fused-block and stride rules, the vocabulary padded for its TP size), then its
    ZeRO partition through DeepSpeed's own fragment maps (``_hp_mapping`` under ZeRO 1/2, the
    flat fp32 sub-groups under ZeRO 3, the parameters themselves without ZeRO), and creates the
    body optimizer's state where DeepSpeed would have.

launch/train.py calls both from ``--resume`` when the checkpoint's shape differs from the run's
and says what it converted; at the same shape DeepSpeed's own loader runs, bitwise as before.
Every rank reads the whole state (full fp32 weights and optimizer moments in CPU memory): fine
for the small and mid-size models this project trains, the reason the same-shape path stays
DeepSpeed's.
"""
from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

SHAPE_KEYS = ("tp", "pp", "dp", "zero_stage")
VOCAB_TABLES = ("embedding.weight", "lm_head.weight")
_ZERO_FILE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")


def shape_of(train_state: dict) -> dict:
    """The job shape a train_state.json records (missing keys: the single-process defaults)."""
    return {k: int(train_state.get(k, 1 if k != "zero_stage" else 0)) for k in SHAPE_KEYS}


def describe(shape: dict) -> str:
    return (f"TP {shape['tp']} x PP {shape['pp']} x DP {shape['dp']}, "
            f"ZeRO {shape['zero_stage']}")


@dataclass
class UniversalState:
    """A checkpoint without its job shape. Tensors are full, fp32, on the CPU, named as in
    models.gpt.GPT at TP = 1; vocabulary tables (and Ember's r) hold the real rows only."""
    params: dict = field(default_factory=dict)        # name -> tensor
    optim: dict = field(default_factory=dict)         # name -> {key: tensor like the param}
    optim_step: dict = field(default_factory=dict)    # name -> body optimizer step (tensor)
    tables: dict = field(default_factory=dict)        # name -> dict(r, c, s, step, ...)
    groups: dict = field(default_factory=dict)        # token_table flag -> hyperparameters
    engine: dict = field(default_factory=dict)        # lr_scheduler, global_steps, ...
    shape: dict = field(default_factory=dict)


def _load(path: Path):
    """A checkpoint file, memory-mapped: its tensors stay file pages (shared by every rank of a
    node that reads the same file, dropped by the kernel under pressure) until a join copies
    them; copy-on-write, so the file is never changed. Old-format files are read whole."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise
        return torch.load(path, map_location="cpu", weights_only=False)


def gpt_names(num_layers: int, pp: int):
    """Checkpoint / live parameter name -> GPT name (pipeline modules number their layers)."""
    if pp == 1:
        return lambda n: n
    from models.pipeline import gpt_name
    return lambda n: gpt_name(n, num_layers)


def _tp_rank(mp: int, tp: int) -> int:
    """The TP rank of DeepSpeed's checkpoint ``mp_rank``: the pipeline grid numbers
    model-parallel ranks stage-major (pp * TP + tp), and without a pipeline it is the TP rank."""
    return mp % tp


# -- reading ---------------------------------------------------------------------------------

class _Shards:
    """Per-TP-rank flattened pieces of every parameter and state key, joined at the end."""

    def __init__(self, tp: int, optimizer: bool = True):
        self.tp, self.optimizer = tp, optimizer
        self.params = [defaultdict(list) for _ in range(tp)]
        self.optim = [defaultdict(lambda: defaultdict(list)) for _ in range(tp)]
        self.shapes = [{} for _ in range(tp)]
        self.step = {}

    def add(self, t: int, name: str, piece, state: dict, frag):
        self.params[t][name].append(piece)
        for key, v in (state.items() if self.optimizer else ()):
            if key == "step":
                self.step[name] = v
            elif torch.is_tensor(v) and v.dim() == 1:
                self.optim[t][name][key].append(v.narrow(0, *frag))

    def shard(self, t: int, name: str):
        shape = self.shapes[t][name]
        n = int(torch.Size(shape).numel())
        value = torch.cat(self.params[t][name])[:n].float().view(shape)
        state = {k: torch.cat(v)[:n].float().view(shape)
                 for k, v in self.optim[t][name].items()}
        return value, state


def _read_zero12(files: dict, shapes: dict, names, tp: int, optimizer: bool) -> _Shards:
    """ZeRO 1/2 (and DeepSpeed's bf16 optimizer): each data-parallel rank's file holds its flat
    fp32 partition of every group, the group's optimizer state over the same partition, and
    where each parameter's fragment sits in it (``param_slice_mappings``)."""
    out = _Shards(tp, optimizer)
    for (dp, mp) in sorted(files):
        t = _tp_rank(mp, tp)
        osd = _load(files[(dp, mp)])["optimizer_state_dict"]
        parts = osd["single_partition_of_fp32_groups"]
        state = osd["base_optimizer_state"]["state"]
        for g, mapping in enumerate(osd["param_slice_mappings"]):
            for pipe_name, frag in mapping.items():
                name = names(pipe_name)
                out.shapes[t][name] = shapes[mp][pipe_name]
                out.add(t, name, parts[g].narrow(0, frag.start, frag.numel),
                        state.get(g, {}), (frag.start, frag.numel))
    return out


def _read_zero3(folder: Path, files: dict, names, tp: int, optimizer: bool) -> _Shards:
    """ZeRO 3: every parameter is split into ceil(numel / DP) pieces, rank r holding piece r of
    each, concatenated in the order of the model file's ``param_shapes`` over the flat fp32
    sub-groups (a parameter never spans two)."""
    out = _Shards(tp, optimizer)
    for (dp, mp) in sorted(files):
        t = _tp_rank(mp, tp)
        osd = _load(files[(dp, mp)])["optimizer_state_dict"]
        world = int(osd["partition_count"] if not isinstance(osd["partition_count"], list)
                    else osd["partition_count"][0])
        flats = osd["fp32_flat_groups"]
        state = osd["optimizer_state_dict"]["state"]
        model = _load(folder / f"zero_pp_rank_{dp}_mp_rank_{mp:02d}_model_states.pt")
        sg, offset = 0, 0
        for group in model["param_shapes"]:
            for pipe_name, shape in group.items():
                part = -(-int(torch.Size(shape).numel()) // world)
                while offset + part > flats[sg].numel():
                    sg, offset = sg + 1, 0
                name = names(pipe_name)
                out.shapes[t][name] = shape
                out.add(t, name, flats[sg].narrow(0, offset, part), state.get(sg, {}),
                        (offset, part))
                offset += part
    return out


def _read_zero0(folder: Path, ts: dict, model_files: dict, tp: int, optimizer: bool) -> _Shards:
    """No ZeRO: the module files hold the weights (launch/consolidate.py reads them), the
    optimizer's state dict (Ember's) numbers the parameters in group order, which train.py
    records as ``param_names`` per group."""
    from launch.consolidate import shard_state_dicts
    out = _Shards(tp, optimizer)
    weights_by_tp = shard_state_dicts(folder, ts)
    for mp, sd in model_files.items():
        t = _tp_rank(mp, tp)
        weights = weights_by_tp[t]
        group_names = [list(weights)] if not optimizer else sd.get("param_names")
        if group_names is None:
            raise ValueError(f"{folder}: a ZeRO-0 checkpoint without the parameter names of "
                             "its optimizer groups (saved by an older launch/train.py) cannot "
                             "change shape")
        opt = sd.get("optimizer") or {"state": {}}
        index = 0
        for group in group_names:
            for name in group:
                w = weights[name]
                out.shapes[t][name] = w.shape
                st = {k: (v.reshape(-1) if torch.is_tensor(v) and v.dim() > 0 else v)
                      for k, v in opt["state"].get(index, {}).items()}
                out.add(t, name, w.reshape(-1), st, (0, w.numel()))
                index += 1
    return out


def _join_tables(entries_by_tp: list, vocab: int, names) -> dict:
    """Ember's table state by global row: each TP rank's r sits at its row offset."""
    tables = {}
    for entries in entries_by_tp:
        for e in entries:
            if e["state"] is None:
                continue
            name = names(e["name"]) if e.get("name") and e["name"][0].isdigit() else e["name"]
            st = e["state"]
            cur = tables.setdefault(name, dict(
                r=torch.zeros(int(e["global_rows"]), dtype=torch.float32),
                c=st["c"].float().clone(), s=st["s"].float().reshape(1).clone(),
                step=int(st["step"]), nonfinite_skips=int(st.get("nonfinite_skips", 0))))
            off = int(e.get("row_offset", 0))
            cur["r"][off:off + st["r"].numel()] = st["r"].float()
    for st in tables.values():
        st["r"] = st["r"][:vocab].clone()
    return tables


EMBER_FILE = "ember_tables.pt"


def ember_tables_by_row(engine, names, dist, vocab: int) -> dict:
    """Ember's table state in the layout-free form a checkpoint keeps beside DeepSpeed's files
    (``ember_tables.pt``): per table name r over the real vocabulary rows, c, s, step. A
    collective: every rank calls it, the first data-parallel replica's shards are joined (under
    PP the tables live on different stages), and every rank gets the result."""
    ember = find_ember(engine.optimizer)
    mine = []
    if ember is not None:
        from megatron.core import parallel_state as ps
        first = not ps.model_parallel_is_initialized() or ps.get_data_parallel_rank() == 0
        if first:
            mine = [dict(e, state=None if e["state"] is None else {
                k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in e["state"].items()})
                for e in ember.tables_state_dict()["tables"]]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    return _join_tables(gathered, vocab, names)


def read_universal(folder, optimizer: bool = True, verified: bool = False) -> UniversalState:
    """The shape-free state of the checkpoint ``folder`` (a step folder, or a --save folder:
    its checkpoint), first chosen and verified as a resume does (launch.checkpoint's
    open_checkpoint; ``verified``: the caller did, e.g. Checkpointer.choose);
    ``optimizer=False``: the weights only (launch/consolidate.py, export)."""
    from launch.consolidate import checkpoint_folder, join, model_config, notices
    from models.gpt import GPT
    folder = Path(folder) if verified else checkpoint_folder(folder, notices("reshard"))
    ts = json.loads((folder / "train_state.json").read_text())
    shape = shape_of(ts)
    tp, pp, stage = shape["tp"], shape["pp"], shape["zero_stage"]
    cfg = model_config(ts)
    cfg.params_dtype = torch.float32
    names = gpt_names(cfg.num_layers, pp)
    zero = {}
    for f in folder.iterdir():
        m = _ZERO_FILE.match(f.name)
        if m:
            zero[(int(m.group(1)), int(m.group(2)))] = f
    n_mp = tp * pp
    if stage == 3:
        model_files = {mp: _load(folder / f"zero_pp_rank_0_mp_rank_{mp:02d}_model_states.pt")
                       for mp in range(n_mp)}
    else:
        model_files = {mp: _load(folder / f"mp_rank_{mp:02d}_model_states.pt")
                       for mp in range(n_mp)}
    if stage in (1, 2) or (stage == 0 and zero):      # bf16 without ZeRO: the bf16 optimizer
        shards = _read_zero12(zero, {mp: {k: v for g in sd["param_shapes"] for k, v in g.items()}
                                     for mp, sd in model_files.items()}, names, tp, optimizer)
    elif stage == 3:
        shards = _read_zero3(folder, zero, names, tp, optimizer)
    else:
        shards = _read_zero0(folder, ts, model_files, tp, optimizer)

    # the TP = 1 model knows how each parameter's shards join (fused blocks, strides); built on
    # the meta device: shapes and partition attributes, no memory
    with torch.device("meta"):
        reference = dict(GPT(cfg).named_parameters())
    state = UniversalState(shape=shape)
    V = cfg.vocab_size
    for name, p in reference.items():
        have = [t for t in range(tp) if name in shards.shapes[t]]
        if len(have) != tp:
            raise ValueError(f"{folder}: parameter {name} is missing from TP rank(s) "
                             f"{sorted(set(range(tp)) - set(have))}")
        pieces = [shards.shard(t, name) for t in range(tp)]
        full = join([v for v, _ in pieces], p)
        keys = set(pieces[0][1])
        moments = {k: join([s[k] for _, s in pieces], p) for k in keys}
        if name in VOCAB_TABLES:
            full = full[:V].clone()
            moments = {k: v[:V].clone() for k, v in moments.items()}
        state.params[name] = full
        if moments:
            state.optim[name] = moments
        if name in shards.step:
            state.optim_step[name] = shards.step[name]

    # Ember's tables and the groups' hyperparameters, from one data-parallel rank per TP rank
    per_tp = [[] for _ in range(tp)]
    for mp in range(n_mp):
        t = _tp_rank(mp, tp)
        base = _base_optimizer_state(folder, zero, model_files[mp], mp, stage)
        per_tp[t].extend((base.get("ember_tables") or {}).get("tables", []))
        for g in base.get("param_groups", []):
            state.groups.setdefault(bool(g.get("token_table")),
                                    {k: v for k, v in g.items() if k != "params"})
    saved = folder / EMBER_FILE
    state.tables = (_load(saved) if saved.is_file()                 # written since 2026-11-29
                    else _join_tables(per_tp, V, names))
    sd = model_files[0]
    state.engine = {k: sd.get(k) for k in ("lr_scheduler", "global_steps", "global_samples",
                                            "skipped_steps")}
    return state


def _base_optimizer_state(folder, zero, model_sd, mp, stage) -> dict:
    if stage == 0 and not zero:
        return model_sd.get("optimizer") or {}
    osd = _load(zero[(0, mp)])["optimizer_state_dict"]
    return osd.get("base_optimizer_state") or osd.get("optimizer_state_dict") or {}


# -- writing ---------------------------------------------------------------------------------

def _tp_slice(full: torch.Tensor, param, rank: int, tp: int, shape) -> torch.Tensor:
    """This rank's TP slice of a full (real-rows) tensor, padded as the live parameter is."""
    from models.gpt import shard
    if not getattr(param, "tensor_model_parallel", False) or tp == 1:
        piece = full
    else:
        dim = param.partition_dim
        rows = shape[dim] * tp
        if full.shape[dim] < rows and dim == 0:       # vocabulary padding differs with TP
            full = torch.cat([full, full.new_zeros(rows - full.shape[0], *full.shape[1:])])
        piece = shard(full, dim, rank, tp, getattr(param, "partition_stride", 1),
                      getattr(param, "partition_blocks", None))
    if piece.shape[0] < shape[0]:                      # vocabulary padding at TP = 1
        piece = torch.cat([piece, piece.new_zeros(shape[0] - piece.shape[0], *piece.shape[1:])])
    if tuple(piece.shape) != tuple(shape):
        raise ValueError(f"checkpoint tensor does not fit: {tuple(piece.shape)} for a parameter "
                         f"of shape {tuple(shape)}")
    return piece


def find_ember(optimizer):
    from ember_ds import Ember
    seen = 0
    while optimizer is not None and not isinstance(optimizer, Ember) and seen < 4:
        optimizer = getattr(optimizer, "optimizer", None)
        seen += 1
    return optimizer if isinstance(optimizer, Ember) else None


def load_universal(engine, state: UniversalState, names=None) -> list[str]:
    """Write ``state`` into ``engine`` (any shape, freshly built); returns what was restored,
    for the log line. ``names``: live parameter name -> GPT name (pipeline modules)."""
    from megatron.core import parallel_state as ps
    tp = ps.get_tensor_model_parallel_world_size() if ps.model_parallel_is_initialized() else 1
    tp_rank = ps.get_tensor_model_parallel_rank() if tp > 1 else 0
    names = names or (lambda n: n)
    stage = int(engine.zero_optimization_stage())
    live = {}
    for n, p in engine.module.named_parameters():
        name = names(n)
        if name not in state.params:
            raise ValueError(f"the checkpoint has no parameter {name}")
        shape = tuple(getattr(p, "ds_shape", None) or p.shape)
        value = _tp_slice(state.params[name], p, tp_rank, tp, shape)
        moments = {k: _tp_slice(v, p, tp_rank, tp, shape)
                   for k, v in state.optim.get(name, {}).items()}
        live[p] = (name, value, moments)
    opt = engine.optimizer
    ember = find_ember(opt)
    base = getattr(opt, "optimizer", opt)
    with torch.no_grad():
        if stage == 3:
            _write_zero3(opt, base, live, state)
        elif hasattr(opt, "bit16_groups") or hasattr(opt, "bf16_groups"):
            _write_flat(opt, base, live, state)
        else:
            _write_plain(base, live, state)
        _write_groups(base, state)
        done = ["weights", "body optimizer state"]
        if ember is not None and state.tables:
            _write_tables(ember, state, names)
            done.append("Ember tables by global row")
    sched = getattr(engine, "lr_scheduler", None)
    if sched is not None and state.engine.get("lr_scheduler"):
        sched.load_state_dict(state.engine["lr_scheduler"])
        done.append("lr schedule")
    for key in ("global_steps", "global_samples", "skipped_steps"):
        if state.engine.get(key) is not None:
            setattr(engine, key, state.engine[key])
    return done


def _new_state(base, tensor, members: list, state: UniversalState) -> None:
    """The body optimizer's state for ``tensor`` (a parameter, or a flat partition holding the
    ``members`` (name, value, moments)), zero-filled, with their step; nothing for tables."""
    keys = {k for _, _, moments in members for k in moments}
    if not keys:
        return
    base.state[tensor] = {k: torch.zeros_like(tensor) for k in keys}
    steps = [state.optim_step[name] for name, _, _ in members if name in state.optim_step]
    if steps:
        s = steps[0]
        base.state[tensor]["step"] = s.clone() if torch.is_tensor(s) else torch.tensor(float(s))


def _write_plain(base, live: dict, state: UniversalState) -> None:
    """No ZeRO: the optimizer steps the parameters themselves."""
    for p, (name, value, moments) in live.items():
        p.data.copy_(value.to(p.dtype))
        _new_state(base, p, [live[p]], state)
        for k, v in moments.items():
            base.state[p][k].copy_(v)


def _write_flat(opt, base, live: dict, state: UniversalState) -> None:
    """ZeRO 1/2 and DeepSpeed's bf16 optimizer: every rank keeps the whole (low-precision)
    parameters; the fp32 master and the optimizer state are one flat partition per group, and
    ``param._hp_mapping`` says which fragment of which parameter sits where in it."""
    lp_groups = getattr(opt, "bit16_groups", None) or getattr(opt, "bf16_groups")
    for g, lps in enumerate(lp_groups):
        flat = base.param_groups[g]["params"][0]
        _new_state(base, flat, [live[lp] for lp in lps], state)
        for lp in lps:
            name, value, moments = live[lp]
            lp.data.copy_(value.to(lp.dtype))
            mapping = getattr(lp, "_hp_mapping", None)
            if mapping is None:                        # not in this rank's partition
                continue
            src = mapping.lp_fragment_address
            dst = mapping.hp_fragment_address
            mapping.hp_fragment.data.copy_(value.reshape(-1).narrow(0, src.start, src.numel))
            for k, v in moments.items():
                base.state[flat][k].narrow(0, dst.start, dst.numel).copy_(
                    v.reshape(-1).narrow(0, src.start, src.numel))


def _write_zero3(opt, base, live: dict, state: UniversalState) -> None:
    """ZeRO 3: each rank holds piece ``rank`` of every parameter (ceil(numel / DP) elements),
    laid end to end in the flat fp32 sub-groups; the low-precision pieces are the parameters'
    ``ds_tensor``."""
    import torch.distributed as dist
    rank = dist.get_rank(group=opt.dp_process_group)
    for sg, lps in enumerate(opt.fp16_groups):
        flat = opt.fp32_partitioned_groups_flat[sg]
        _new_state(base, flat, [live[lp] for lp in lps], state)
        offset = 0
        for lp in lps:
            name, value, moments = live[lp]
            part = lp.ds_tensor.ds_numel

            def piece(t):
                t = t.reshape(-1)
                t = torch.cat([t, t.new_zeros(part * opt.partition_count - t.numel())])
                return t.narrow(0, part * rank, part)
            mine = piece(value)
            flat.narrow(0, offset, part).copy_(mine)
            lp.ds_tensor.data.copy_(mine.to(lp.ds_tensor.dtype))
            for k, v in moments.items():
                base.state[flat][k].narrow(0, offset, part).copy_(piece(v))
            offset += part


def _write_groups(base, state: UniversalState) -> None:
    """The groups' hyperparameters (lr as the schedule had set it, betas, ...), by kind."""
    for g in base.param_groups:
        saved = state.groups.get(bool(g.get("token_table")))
        if saved:
            for k, v in saved.items():
                if k in g:
                    g[k] = v


def _write_tables(ember, state: UniversalState, names) -> None:
    saved = []
    for t in range(len(ember.token_tables)):
        rows, cols, V, meta = ember._table_info(t)
        name = meta.name or ""
        src = state.tables.get(names(name) if name[:1].isdigit() else name)
        if src is None:
            saved.append(dict(name=meta.name, shape=[rows, cols], global_rows=V,
                              row_offset=meta.row_offset, state=None))
            continue
        r = src["r"]
        if r.numel() < V:
            r = torch.cat([r, r.new_zeros(V - r.numel())])
        saved.append(dict(name=meta.name, shape=[rows, cols], global_rows=V,
                          row_offset=meta.row_offset, state=dict(
                              r=r[meta.row_offset:meta.row_offset + rows].clone(),
                              c=src["c"].clone(), s=src["s"].clone(), step=src["step"],
                              nonfinite_skips=src.get("nonfinite_skips", 0))))
    ember.load_table_state(dict(version=1, tables=saved))


__all__ = ["EMBER_FILE", "SHAPE_KEYS", "UniversalState", "describe", "ember_tables_by_row",
           "find_ember", "gpt_names", "load_universal", "read_universal", "shape_of"]
