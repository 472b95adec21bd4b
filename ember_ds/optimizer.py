"""Ember: a factored second-moment optimizer for token tables, with a body optimizer inside.

For a table W (V rows = tokens, D columns) with gradient G, Ember keeps r (V), c (D), s (1) and
a step count, all fp32 (docs/EMBER.md has the derivation):

    q = G*G;  r <- b2 r + (1-b2) rowmean(q);  c <- b2 c + (1-b2) colsum(q)/V
    s <- b2 s + (1-b2) sum(q)/(V D);  vhat_ij = r_i c_j / (s (1 - b2^t))
    W <- W (1 - lr wd) - lr G / (sqrt(vhat) + eps)

Design decisions:
- One optimizer object for the whole model. Tables go to Ember groups, everything else to body
  groups stepped by an ordinary torch optimizer (AdamW by default) that shares Ember's group
  dicts and state dict. DeepSpeed sees one basic optimizer, flattens each group on its own
  (so a partition never mixes tables and body), and checkpoints both states through
  Ember.state_dict().
- The step never needs a whole table: it works on *pieces* (contiguous [rows, cols] blocks) of
  whatever tensor it is handed (a table, or a ZeRO partition mapped back to tables by
  ember_ds.layout), forms partial row/column sums, all-reduces them over the group that
  partitions the table and over every group that splits its rows (tensor parallelism), and
  updates its own elements. The state stays replicated and identical on every rank.
- A tensor Ember cannot map back to (table, row, column) is an error: never a silent fallback
  to an unfactored update.
- State is fp32 and stays fp32 through load_state_dict (torch casts optimizer state to the
  parameter dtype; Ember keeps its table state out of torch's path).
- A non-finite gradient anywhere in a table, or squares that sum past fp32's range (detected
  on the reduced total, so every rank agrees), skips that table's step: weights and state
  untouched, counted in ``nonfinite_skips``, with a warning; ``nonfinite="raise"`` raises
  instead.
"""
from __future__ import annotations

import inspect
import warnings
from typing import Optional

import torch
from torch import nn

from .comm import StatComm
from . import cpu_fused, triton_kernels
from .factored import piece_stats, piece_update
from .layout import Unit, pieces, units_from_wrapper, whole_unit
from .tables import _shape, is_token_table, mark_token_table, table_meta, tag_module_tables

NORMALIZATIONS = ("rows", "active_rows")

# Set while DeepSpeed builds its optimizer wrapper: some wrappers (stage 0 + bf16) call step()
# once with zero gradients to create state; Ember ignores those calls (state is created lazily,
# and the call would count a step and apply weight decay).
_WRAPPER_INIT_DEPTH = [0]


class Ember(torch.optim.Optimizer):
    """Ember on the token tables, ``body_optimizer`` (AdamW) on every other parameter.

    One ``lr`` / ``eps`` / ``weight_decay`` mean the whole model: ``body_lr``, ``body_eps`` and
    ``body_weight_decay`` default to them (so ``Ember(model)`` decays nothing, like the
    reference Ember; set ``body_weight_decay`` for AdamW-style decay of the body only).
    ``body_betas`` left as None take the body optimizer's own (AdamW: (0.9, 0.999)).

    ``params``: an nn.Module (its tables found by ember_ds.tables' rules; ``tables`` /
    ``exclude_tables`` add or remove them by parameter-name pattern), an iterable of tensors
    (tagged ones are tables), or param groups (a group with ``"token_table": True`` holds
    tables only).
    """

    def __init__(self, params, lr: float = 1e-3, beta2: float = 0.999, eps: float = 1e-8,
                 weight_decay: float = 0.0, normalize: str = "rows", *,
                 body_optimizer="AdamW", body_lr: Optional[float] = None,
                 body_betas=None, body_eps: Optional[float] = None,
                 body_weight_decay: Optional[float] = None, body_kwargs: Optional[dict] = None,
                 nonfinite: str = "skip", dedicated_comm: bool = True,
                 tables=None, exclude_tables=None):
        if not lr >= 0.0:
            raise ValueError(f"Ember: invalid lr {lr}")
        if not 0.0 <= beta2 < 1.0:
            raise ValueError(f"Ember: beta2 must be in [0, 1), got {beta2}")
        if not eps >= 0.0:
            raise ValueError(f"Ember: invalid eps {eps}")
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"Ember: normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
        if nonfinite not in ("skip", "raise"):
            raise ValueError(f"Ember: nonfinite must be 'skip' or 'raise', got {nonfinite!r}")
        if isinstance(params, nn.Module):
            tag_module_tables(params, tables or (), exclude_tables or ())
            params = list(params.parameters())
        elif tables or exclude_tables:
            raise ValueError("Ember: tables / exclude_tables patterns need the model: pass the "
                             "nn.Module (or use the ds_config route, which sees engine.module)")
        from_module = isinstance(params, nn.Module)
        table_groups, body_groups = _split_groups(params)
        if not table_groups and not body_groups:
            raise ValueError("Ember got an empty parameter list")
        if not table_groups and not from_module and not _WRAPPER_INIT_DEPTH[0]:
            warnings.warn("Ember: none of the parameters it was given is a token table "
                          "(untagged tensors), so everything goes to the body optimizer; pass "
                          "the model itself (Ember(model)), tag the tables with "
                          "ember_ds.mark_token_table, or name Ember in the ds_config")

        self._tables: list = []          # original table Parameters, in group order
        self._table_index: dict = {}     # id(param) -> table index
        for g in table_groups:
            for p in g["params"]:
                self._register_table(p)

        self._body = None
        body = [p for g in body_groups for p in g["params"]]  # ZeRO-3 empties groups later
        self._body_size = (len(body), sum(int(getattr(p, "ds_numel", 0) or p.numel())
                                          for p in body))
        if body_groups:
            self._body = _make_body_optimizer(
                body_optimizer, body_groups,
                dict(lr=body_lr, betas=None if body_betas is None else tuple(body_betas),
                     eps=body_eps, weight_decay=body_weight_decay),
                dict(lr=lr, eps=eps, weight_decay=weight_decay), body_kwargs or {})
        defaults = dict(lr=lr, beta2=beta2, eps=eps, weight_decay=weight_decay,
                        normalize=normalize, token_table=False)
        super().__init__(table_groups + body_groups, defaults)
        if self._body is not None:
            if not all(any(g is h for h in self.param_groups) for g in self._body.param_groups):
                raise RuntimeError("Ember: body optimizer does not share its param groups")
            self._body.state = self.state
        self.nonfinite = nonfinite
        self._comm = StatComm(dedicated_comm)
        self._comm_ready = False
        self._units: dict = {}           # id(stepped tensor) -> (tensor, Unit)
        self._table_state: dict = {}     # table index -> dict(r, c, s, step, nonfinite_skips)

    # ----------------------------------------------------------------- tables
    def _register_table(self, p: torch.Tensor) -> None:
        if id(p) in self._table_index:
            return
        shape = _shape(p)
        if len(shape) != 2:
            raise ValueError(f"Ember: a token table must be 2-D (rows = tokens), got shape "
                             f"{tuple(shape)}")
        if not (p.dtype.is_floating_point):
            raise ValueError(f"Ember: token table of dtype {p.dtype} cannot be factored")
        if not is_token_table(p):
            mark_token_table(p)
        self._table_index[id(p)] = len(self._tables)
        self._tables.append(p)

    def _table_info(self, t: int):
        p = self._tables[t]
        rows, cols = _shape(p)
        meta = table_meta(p)
        global_rows = meta.global_rows if meta.global_rows is not None else rows
        return rows, cols, global_rows, meta

    @property
    def token_tables(self) -> list:
        """The original table Parameters Ember updates (each once)."""
        return list(self._tables)

    def table_state(self, index: int = 0) -> dict:
        """The fp32 state of table ``index``: r (rows), c (cols), s, step, nonfinite_skips
        (on the device path the counts are read back from the device here)."""
        st = self._table_state.get(index)
        return {} if st is None else self._host_counts(st)

    def summary(self, zero_stage: Optional[int] = None, dp_size: int = 1) -> str:
        """A short table: the parameters Ember factors (name, global shape, how their rows are
        split, the rule that chose them) and what goes to the body optimizer."""
        rows = [("token table", "shape", "sharding", "chosen by")]
        for t, p in enumerate(self._tables):
            local, cols, V, meta = self._table_info(t)
            split = [f"TP rows {V // max(local, 1)}-way"] if meta.row_groups else []
            if zero_stage and dp_size > 1:
                split.append(f"ZeRO-{zero_stage} over {dp_size} ranks")
            rows.append((meta.name or f"table {t}", f"{V} x {cols}",
                         ", ".join(split) or "whole", meta.source))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        state = sum(4 * (self._table_info(t)[0] + self._table_info(t)[1] + 1)
                    for t in range(len(self._tables)))
        lines.insert(0, f"Ember factors {len(self._tables)} token table(s); its state: "
                        f"{state / 2**10:.1f} KiB fp32, replicated on every rank")
        lines.insert(2, "  ".join("-" * w for w in widths))
        if self._body is not None:
            count, numel = self._body_size
            g0 = self._body.param_groups[0]
            lines.append(f"body: {count} tensors ({numel:,} elements) -> "
                         f"{type(self._body).__name__} (lr {g0.get('lr')}, weight decay "
                         f"{g0.get('weight_decay', 0.0)})")
        else:
            lines.append("body: no parameters")
        return "\n".join(lines)

    # ------------------------------------------------------------- DeepSpeed
    def attach_deepspeed(self, wrapper) -> None:
        """Learn how ``wrapper`` (DeepSpeed's engine.optimizer) lays the tables out in the
        tensors it will hand to step(). Called by ember_ds.deepspeed_integration after the
        engine builds its optimizer; a no-op when the wrapper is Ember itself."""
        self._units = {}
        if wrapper is self:
            return
        table_of = self._table_index.get
        found = units_from_wrapper(wrapper, lambda p: table_of(id(p)))
        tensors = {id(t): t for g in self.param_groups for t in g["params"]}
        tensors.update(_wrapper_tensors(wrapper))
        for key, unit in found.items():
            if key not in tensors:
                raise RuntimeError("Ember: DeepSpeed partition tensor not found in its groups")
            self._units[key] = (tensors[key], unit)
        self._comm_ready = False

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if _WRAPPER_INIT_DEPTH[0]:
            return loss
        groups = self.param_groups
        table_groups = [g for g in groups if g.get("token_table")]
        if table_groups:
            self._step_tables(table_groups)
        body_groups = [g for g in groups if not g.get("token_table") and g["params"]]
        if body_groups:
            if self._body is None:
                raise RuntimeError("Ember: body parameters appeared in a group Ember did not "
                                   "create")
            self._body.state = self.state
            saved = self._body.param_groups
            self._body.param_groups = body_groups
            try:
                self._body.step()
            finally:
                self._body.param_groups = saved
        return loss

    def _unit_for(self, tensor: torch.Tensor) -> Unit:
        entry = self._units.get(id(tensor))
        if entry is not None and entry[0] is tensor:
            return entry[1]
        t = self._table_index.get(id(tensor))
        if t is not None:
            return whole_unit(t, tensor)
        raise RuntimeError(
            f"Ember was handed a tensor of shape {tuple(tensor.shape)} in a token-table group "
            "that it cannot map back to table rows and columns (an optimizer wrapper it does "
            "not know, or a DeepSpeed engine built without importing ember_ds first). Ember "
            "refuses to fall back to an unfactored update.")

    def _prepare_comm(self, units) -> None:
        groups = [u.group for _, u in self._units.values()] + [u.group for _, u in units]
        for t in range(len(self._tables)):
            groups += self._table_info(t)[3].row_groups
        self._comm.prepare(groups)
        self._comm_ready = True

    def _state(self, t: int, rows: int, cols: int, device) -> dict:
        st = self._table_state.get(t)
        if st is None:
            st = dict(r=torch.zeros(rows, dtype=torch.float32, device=device),
                      c=torch.zeros(cols, dtype=torch.float32, device=device),
                      s=torch.zeros(1, dtype=torch.float32, device=device),
                      step=0, nonfinite_skips=0)
            self._table_state[t] = st
        elif st["r"].device != torch.device(device):
            self._host_counts(st).pop("aux", None)   # counts back on the host first
            for key in ("r", "c", "s"):
                st[key] = st[key].to(device)
        return st

    def _step_tables(self, groups) -> None:
        work = []  # (group, tensor, unit)
        for g in groups:
            for tensor in g["params"]:
                unit = self._unit_for(tensor)
                if tensor.grad is None:
                    if unit.group is not None:
                        raise RuntimeError("Ember: a partitioned token-table tensor has no "
                                           "gradient")
                    continue
                if tensor.grad.is_sparse:
                    raise RuntimeError("Ember: sparse gradients are not supported; build the "
                                       "embedding with sparse=False")
                work.append((g, tensor, unit))
        if not work:
            return
        if not self._comm_ready:
            self._prepare_comm([(None, u) for _, _, u in work])

        # Pass 1: partial statistics of this rank's elements, reduced over the partitioning
        # group (one buffer per stepped tensor: rows + cols floats per table, and rows more
        # nonzero counts for a table normalised by its active rows).
        stats = {}  # table -> (rowsum, colsum, rownz or None)
        on_device = {}  # table -> whether its step runs on the device path (no host read)
        for g, tensor, unit in work:
            sizes = [self._table_info(t)[:2] for t in unit.tables]
            nz = g["normalize"] == "active_rows"
            dev = triton_kernels.device_step_enabled(tensor)
            for t in unit.tables:
                on_device[t] = dev
            # a whole table in one piece on the device path: the stats kernel stores its sums,
            # so the buffer needs no zeroing (one launch less)
            whole = dev and not nz and _whole_table(unit, tensor, sizes)
            buf = (torch.empty if whole else torch.zeros)(
                sum((2 if nz else 1) * r + c for r, c in sizes), dtype=torch.float32,
                device=tensor.device)
            views, off = {}, 0
            for t, (rows, cols) in zip(unit.tables, sizes):
                views[t] = (buf[off:off + rows], buf[off + rows:off + rows + cols],
                            buf[off + rows + cols:off + 2 * rows + cols] if nz else None)
                off += (2 if nz else 1) * rows + cols
            for seg in unit.segments:
                cols = self._table_info(seg.table)[1]
                rowsum, colsum, rownz = views[seg.table]
                for row0, nrows, col0, ncols, o in pieces(seg.start_in_table, seg.length, cols):
                    gv = _block(tensor.grad, seg.start_in_tensor + o, nrows, ncols)
                    piece_stats(gv, _span(rowsum, row0, nrows), _span(colsum, col0, ncols),
                                None if rownz is None else _span(rownz, row0, nrows),
                                overwrite=whole)
            self._comm.all_reduce(buf, unit.group)
            stats.update(views)

        # Row-split tables (vocab parallel): column sums (and, for a table normalised by its
        # active rows, the count of rows with any |g| > 0) are summed over every group that
        # splits the rows; one buffer per group. Without row groups nothing is copied.
        extra = {}  # table -> colsum, or [colsum..., n_active] (normalize="active_rows")
        for g, tensor, unit in work:
            for t in unit.tables:
                rowsum, colsum, rownz = stats[t]
                if rownz is None:
                    extra[t] = colsum
                else:
                    n_active = torch.count_nonzero(rownz).to(torch.float32).reshape(1)
                    extra[t] = torch.cat([colsum, n_active])
        by_group = {}
        for t in extra:
            for grp in self._table_info(t)[3].row_groups:
                by_group.setdefault(id(grp), (grp, []))[1].append(t)
        for grp, ts in by_group.values():
            buf = torch.cat([extra[t] for t in ts])
            self._comm.all_reduce(buf, grp)
            off = 0
            for t in ts:
                n = extra[t].numel()
                extra[t] = buf[off:off + n]
                off += n

        # Pass 2: each table's state (replicated), then this rank's elements.
        first = {}  # table -> (its group, device), where first met
        for g, tensor, unit in work:
            for t in unit.tables:
                first.setdefault(t, (g, tensor.device))
        device_tables = [t for t in first if on_device[t]]
        for t in device_tables:
            self._device_table_step(t, first[t][0], first[t][1], stats[t][0], extra[t])
        if device_tables and self.nonfinite == "raise":
            self._raise_if_skipped(device_tables)   # the one host read "raise" asks for
        # elsewhere on an accelerator, all tables' totals (finite check) in one host read
        totals = {t: extra[t][:self._table_info(t)[1]].sum()
                  for t, (_, dev) in first.items() if dev.type != "cpu" and not on_device[t]}
        if totals:
            finite = torch.isfinite(torch.stack(list(totals.values()))).tolist()
            totals = {t: (v, ok) for (t, v), ok in zip(totals.items(), finite)}
        factors = {t: self._table_step(t, g, dev, stats[t][0], extra[t], totals.get(t))
                   for t, (g, dev) in first.items()
                   if not on_device[t]}  # (row, column factors) or None: skipped
        for g, tensor, unit in work:
            lr, eps, wd = g["lr"], g["eps"], g["weight_decay"]
            decay = 1.0 - lr * wd
            for seg in unit.segments:
                cols = self._table_info(seg.table)[1]
                if on_device[seg.table]:  # factors made in the kernel; skipped there
                    st = self._table_state[seg.table]
                    for row0, nrows, col0, ncols, o in pieces(seg.start_in_table, seg.length,
                                                              cols):
                        a = seg.start_in_tensor + o
                        triton_kernels.piece_update_factored(
                            _block(tensor, a, nrows, ncols), _block(tensor.grad, a, nrows, ncols),
                            _span(st["r"], row0, nrows), _span(st["c"], col0, ncols), st,
                            lr, eps, decay)
                    continue
                if factors[seg.table] is None:
                    continue
                row_f, col_f = factors[seg.table]
                for row0, nrows, col0, ncols, o in pieces(seg.start_in_table, seg.length, cols):
                    a = seg.start_in_tensor + o
                    piece_update(_block(tensor, a, nrows, ncols),
                                 _block(tensor.grad, a, nrows, ncols), _span(row_f, row0, nrows),
                                 _span(col_f, col0, ncols), lr, eps, decay)

    def _device_table_step(self, t: int, g: dict, device, rowsum, extra) -> None:
        """Table t's state step on the device path: one kernel, no host read. The finite
        check is the state kernel's (on the reduced total, so every rank decides alike); a
        skipped step leaves weights and state unchanged and is counted on the device, and
        reaches the host when asked (check_nonfinite, table_state, state_dict)."""
        rows, cols, V, _ = self._table_info(t)
        st = self._state(t, rows, cols, device)
        b2 = g["beta2"]
        if "aux" not in st:   # first device step (or after a load): counts from the host
            st["aux"] = torch.tensor([st["step"], st["nonfinite_skips"], 0.0, b2],
                                     dtype=torch.float64, device=device)
            st["aux_beta2"] = b2
        elif st["aux_beta2"] != b2:
            st["aux"][3].fill_(b2)
            st["aux_beta2"] = b2
        active = g["normalize"] == "active_rows"
        triton_kernels.state_step_triton(st, rowsum, extra[:cols],
                                         extra[cols:cols + 1] if active else None, b2, V)

    def _raise_if_skipped(self, tables) -> None:
        flags = torch.stack([self._table_state[t]["aux"][2] for t in tables]).tolist()
        bad = [t for t, f in zip(tables, flags) if f]
        if bad:
            self.check_nonfinite(warn=False)
            name = table_meta(self._tables[bad[0]]).name or bad[0]
            raise FloatingPointError(f"Ember: non-finite gradient in token table {name}")

    def check_nonfinite(self, warn: bool = True) -> int:
        """How many table steps were skipped for a non-finite gradient since the last call
        (one host read of the device counters; on CPU the counts are already on the host),
        with one warning naming the tables when ``warn``. A training loop calls it when it
        wants to know (train.py: every logged step); step() itself never reads the device."""
        new = []
        for t, st in self._table_state.items():
            total = self._host_counts(st)["nonfinite_skips"]
            seen = st.get("reported_skips", 0)
            if total > seen:
                new.append((t, total - seen))
                st["reported_skips"] = total
        if new and warn:
            names = ", ".join(f"{table_meta(self._tables[t]).name or t} ({n})" for t, n in new)
            warnings.warn(f"Ember: non-finite gradient in token table(s) {names}; those steps "
                          "were skipped (weights and state unchanged)")
        return sum(n for _, n in new)

    @staticmethod
    def _host_counts(st: dict) -> dict:
        """st with its step and skip counts read back from the device counters, if any."""
        aux = st.get("aux")
        if aux is not None:
            step, skips = aux[:2].tolist()
            st["step"], st["nonfinite_skips"] = int(step), int(skips)
        return st

    def _table_step(self, t: int, g: dict, device, rowsum, extra, checked=None):
        """Table t's state step from its reduced statistics (``extra``: the column sums, then
        the active-row count under normalize="active_rows"): r, c, s and step in place, and the
        update's factors (sqrt(vhat_ij) = row_f[i] * col_f[j]); None when the gradient is not
        finite. Every rank sees the same reduced sums, so every rank decides alike. A NaN or inf
        anywhere in the table reaches its total sum of squares; a total past fp32's range is
        skipped too (s would become inf). On CPU one fused call does it (cpu_fused.state_step),
        elsewhere the torch ops below, in the same order and rounding (``checked``: the total
        and whether it is finite, when the caller read them for several tables at once)."""
        rows, cols, V, _ = self._table_info(t)
        st = self._state(t, rows, cols, device)
        b2, colsum = g["beta2"], extra[:cols]
        active = g["normalize"] == "active_rows"
        if cpu_fused.use_for_state(st, rowsum, colsum):
            row_f, col_f = torch.empty_like(st["r"]), torch.empty_like(st["c"])
            denom_c = max(float(extra[cols]), 1.0) if active else V
            finite = cpu_fused.state_step(st, rowsum, colsum, denom_c, b2, V, st["step"] + 1,
                                          row_f, col_f)
        else:
            row_f = col_f = None
            total, finite = checked or (colsum.sum(), None)
            if finite is None:
                finite = bool(torch.isfinite(total))
        if not finite:
            st["nonfinite_skips"] += 1
            st["reported_skips"] = st["nonfinite_skips"]   # warned (or raised) here
            name = table_meta(self._tables[t]).name or t
            msg = f"Ember: non-finite gradient in token table {name}"
            if self.nonfinite == "raise":
                raise FloatingPointError(msg)
            warnings.warn(msg + "; its step was skipped (weights and state unchanged)")
            return None
        st["step"] += 1
        if row_f is None:
            bc = 1.0 - b2 ** st["step"]
            denom_c = extra[cols].clamp_min(1.0) if active else V
            st["r"].mul_(b2).add_(rowsum, alpha=(1.0 - b2) / cols)
            st["c"].mul_(b2).add_(colsum / denom_c, alpha=1.0 - b2)
            st["s"].mul_(b2).add_(total / (V * cols), alpha=1.0 - b2)
            row_f = (st["r"] / (st["s"].clamp_min(1e-30) * bc)).sqrt_()
            col_f = st["c"].sqrt()
        return row_f, col_f

    # ------------------------------------------------------------ checkpoints
    def state_dict(self):
        sd = super().state_dict()
        sd["ember_tables"] = self.tables_state_dict()
        return sd

    def tables_state_dict(self) -> dict:
        """The tables' part of state_dict(): per table its name, shape, global rows, row offset
        and state (r, c, s, step), the layout a checkpoint needs to join TP shards by row."""
        tables = []
        for t in range(len(self._tables)):
            rows, cols, V, meta = self._table_info(t)
            st = self._table_state.get(t)
            if st is not None:
                self._host_counts(st)
            tables.append(dict(name=meta.name, shape=[rows, cols], global_rows=V,
                               row_offset=meta.row_offset,
                               state=None if st is None else dict(
                                   r=st["r"].clone(), c=st["c"].clone(), s=st["s"].clone(),
                                   step=st["step"], nonfinite_skips=st["nonfinite_skips"])))
        return dict(version=1, tables=tables)

    def load_state_dict(self, state_dict) -> None:
        state_dict = dict(state_dict)
        saved = state_dict.pop("ember_tables", None)
        if saved is None:
            raise ValueError("Ember.load_state_dict: not an Ember state dict (no 'ember_tables')")
        restored = self._restored_tables(saved)
        super().load_state_dict(state_dict)
        self._table_state = restored
        if self._body is not None:
            self._body.state = self.state

    def load_table_state(self, saved: dict) -> None:
        """Only the tables' state (``state_dict()["ember_tables"]``, in this optimizer's own
        layout): how launch/reshard.py restores r, c, s and step into a job of another shape
        while DeepSpeed's partitions receive the body optimizer's state."""
        self._table_state = self._restored_tables(saved)

    def _restored_tables(self, saved: dict) -> dict:
        if len(saved["tables"]) != len(self._tables):
            raise ValueError(f"Ember.load_state_dict: checkpoint has {len(saved['tables'])} token "
                             f"tables, this optimizer {len(self._tables)}")
        restored = {}
        for t, entry in enumerate(saved["tables"]):
            rows, cols, V, meta = self._table_info(t)
            if list(entry["shape"]) != [rows, cols] or entry["global_rows"] != V or \
                    entry.get("row_offset", 0) != meta.row_offset:
                raise ValueError(
                    f"Ember.load_state_dict: token table {t} ({meta.name or 'unnamed'}) is "
                    f"{rows}x{cols} (global rows {V}, offset {meta.row_offset}) but the "
                    f"checkpoint holds {entry['shape'][0]}x{entry['shape'][1]} (global rows "
                    f"{entry['global_rows']}, offset {entry.get('row_offset', 0)})")
            st = entry["state"]
            if st is None:
                continue
            for key, n in (("r", rows), ("c", cols), ("s", 1)):
                v = st[key]
                if not torch.is_tensor(v) or not v.dtype.is_floating_point or v.numel() != n:
                    raise ValueError(f"Ember.load_state_dict: table {t} state {key!r} must be a "
                                     f"float tensor of {n} elements")
            restored[t] = dict(r=st["r"].detach().to(torch.float32).clone(),
                               c=st["c"].detach().to(torch.float32).clone(),
                               s=st["s"].detach().to(torch.float32).clone().reshape(1),
                               step=int(st["step"]),
                               nonfinite_skips=int(st.get("nonfinite_skips", 0)))
        return restored


def _whole_table(unit: Unit, tensor: torch.Tensor, sizes) -> bool:
    """Whether ``unit`` is one whole table held by ``tensor`` (a single piece)."""
    if len(unit.segments) != 1 or len(sizes) != 1:
        return False
    seg, (rows, cols) = unit.segments[0], sizes[0]
    return seg.start_in_table == 0 and seg.length == rows * cols == tensor.numel()


def _block(t: torch.Tensor, start: int, rows: int, cols: int) -> torch.Tensor:
    """The [rows, cols] block of ``t`` from its flat element ``start``: ``t`` itself when it is
    that block (a whole table), else a view of its flat storage (a ZeRO partition's piece).
    Views are built only where needed: each torch op here runs with cold caches, right after a
    pass over the table."""
    if start == 0 and t.dim() == 2 and t.shape[0] == rows and t.shape[1] == cols:
        return t
    return t.reshape(-1)[start:start + rows * cols].view(rows, cols)


def _span(v: torch.Tensor, start: int, n: int) -> torch.Tensor:
    """v[start:start + n], or v itself when that is all of it."""
    return v if start == 0 and v.shape[0] == n else v[start:start + n]


def _split_groups(params):
    """Split params / groups into (table groups, body groups), each a list of dicts."""
    params = list(params)
    if not params:
        return [], []
    if not isinstance(params[0], dict):
        params = [{"params": params}]
    tables, body, seen = [], [], set()
    for group in params:
        group = dict(group)
        ps = group.pop("params")
        ps = [ps] if isinstance(ps, torch.Tensor) else list(ps)
        flag = group.pop("token_table", None)
        tab, bod = [], []
        for p in ps:
            if id(p) in seen:  # tied tables (and repeated tensors) count once
                continue
            seen.add(id(p))
            (tab if flag or (flag is None and is_token_table(p)) else bod).append(p)
        if tab:
            tables.append(dict(group, params=tab, token_table=True))
        if bod:
            body.append(dict(group, params=bod, token_table=False))
    return tables, body


def _make_body_optimizer(spec, groups, options: dict, inherited: dict, extra: dict):
    """The body optimizer over ``groups``: ``options`` given by the user must be accepted;
    ``inherited`` (Ember's own lr / eps / weight_decay) fill the gaps where accepted."""
    cls = getattr(torch.optim, spec, None) if isinstance(spec, str) else spec
    if cls is None or not (inspect.isclass(cls) and issubclass(cls, torch.optim.Optimizer)):
        raise ValueError(f"Ember: body_optimizer must be a torch.optim.Optimizer class or the "
                         f"name of one in torch.optim, got {spec!r}")
    accepted = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in options.items() if v is not None}
    refused = sorted(set(kwargs) - set(accepted))
    if refused:
        raise ValueError(f"Ember: body optimizer {cls.__name__} takes no {refused} (body_"
                         f"{refused[0]}); leave it unset")
    for k, v in inherited.items():
        if k not in kwargs and k in accepted:
            kwargs[k] = v
    kwargs.update(extra)
    return cls(groups, **kwargs)


def _wrapper_tensors(wrapper) -> dict:
    """Tensors a DeepSpeed wrapper may hand to step() (ZeRO-3 leaves group params empty
    between steps)."""
    found = {}
    for attr in ("single_partition_of_fp32_groups", "fp32_groups_flat_partition",
                 "fp32_partitioned_groups_flat"):
        for t in getattr(wrapper, attr, None) or []:
            if torch.is_tensor(t):
                found[id(t)] = t
    for grp in getattr(wrapper, "fp32_groups", None) or []:
        for t in grp if isinstance(grp, (list, tuple)) else [grp]:
            if torch.is_tensor(t):
                found[id(t)] = t
    return found


def state_bytes(optimizer: Ember) -> int:
    """Bytes of Ember's table state (r, c, s): 4*(V_local + D + 1) per table."""
    total = 0
    for st in optimizer._table_state.values():
        total += sum(st[k].numel() * st[k].element_size() for k in ("r", "c", "s"))
    return total


__all__ = ["Ember", "NORMALIZATIONS", "state_bytes"]
