#!/usr/bin/env python
"""Pretrain the GPT of models/gpt.py (dense table or Leviathan embedding) with DeepSpeed.

The same command runs under every launcher (it reads RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR / MASTER_PORT from the environment; a plain process is a world of one):

    python launch/train.py --preset tiny --embedding leviathan --steps 200
    torchrun --nproc_per_node 2 launch/train.py --deepspeed_config ds_configs/ember_zero2_fp32.json
    deepspeed --num_gpus 8 launch/train.py --preset 410m --tp 2 \
        --deepspeed_config ds_configs/ember_zero1_bf16.json --data /data/texts --save ckpt

A run is a ``Trainer``: settings are checked first (launch/settings.py, before any process
group), then the process groups start, the run locks its folders (launch/lock.py), prepares the
data (launch/data.py), checks and verifies the checkpoint it resumes from before anything is
built (launch/checkpoint.py), builds the model and the DeepSpeed engine, trains, evaluates,
saves and writes its outputs (launch/metrics.py). A failure on any rank reaches the user as one
line with an exit status that says what it was (launch/errors.py).

Run ``python launch/train.py --help`` for the flags; docs/LAUNCH.md has the full story.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

warnings.filterwarnings("ignore", message=".*Transformer Engine.*")
warnings.filterwarnings("ignore", message=".*Apex.*")
warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*")
warnings.filterwarnings("ignore", message=".*reduce_scatter_tensor.*")
warnings.filterwarnings("ignore", message="The value of the smallest subnormal")  # flush-denormal

from launch.checkpoint import (Checkpointer, candidates, fault, find_checkpoint,  # noqa: E402,F401
                               no_checkpoint, read_train_state, rng_state, set_rng_state,
                               tag_of, write_atomic)
from launch.data import (DataError, DataSettings, DeterministicSampler, TokenWindows,  # noqa: E402,F401
                         eval_indices, prepare_data, resolve_inputs, settings_from_args)
from launch.errors import ConfigError, NonFiniteError, report  # noqa: E402,F401
from launch.lock import LockError, RunLock  # noqa: E402
from launch.metrics import CSV_FIELDS, Metrics  # noqa: E402,F401
from launch.settings import (WARMUP_SCHEDULERS, build_parser, check_resume,  # noqa: E402,F401
                             check_with_deepspeed,
                             default_ds_config, finalize_ds_config, load_ds_config, model_config,
                             parse_args, resolve_batch, run_record, shape_changed, validate,
                             world_from_env)


def _log(msg: str, rank: int) -> None:
    if rank == 0:
        print(f"[train] {msg}", flush=True)


def _quiet_libraries(verbose: bool) -> None:
    level = logging.INFO if verbose else logging.WARNING
    try:
        from deepspeed.utils import logger as ds_logger
        ds_logger.setLevel(level)
    except ImportError:
        pass
    logging.getLogger("megatron").setLevel(level)


def _lrs(engine) -> tuple[Optional[float], Optional[float]]:
    """(table / main lr, body lr) from the basic optimizer's groups (Ember marks table groups)."""
    opt = getattr(engine, "basic_optimizer", None) or engine.optimizer
    groups = getattr(opt, "param_groups", [])
    if not groups:
        return None, None
    tables = [g for g in groups if g.get("token_table")]
    body = [g for g in groups if not g.get("token_table")]
    main = float(tables[0]["lr"]) if tables else float(groups[0]["lr"])
    return main, (float(body[0]["lr"]) if tables and body else None)


def evaluate(engine, windows: TokenWindows, idx, micro: int, device, dist) -> float:
    """Mean per-token validation loss over every rank's share (a world all-reduce; TP ranks
    hold the same numbers, so the ratio is unaffected)."""
    import torch
    engine.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    with torch.no_grad():
        for i in range(0, len(idx), micro):
            ids, labels = windows.batch(idx[i:i + micro])
            loss = engine(ids.to(device), labels=labels.to(device))
            total[0] += loss.double().sum()
            total[1] += loss.numel()
    engine.train()
    dist.all_reduce(total)
    return float(total[0] / total[1])


def evaluate_pipeline(engine, windows: TokenWindows, idx, micro: int, device, dist) -> float:
    """evaluate() through the pipeline engine: its eval schedule runs whole micro-batches
    (the last stage's mean loss, broadcast to every stage), so a remainder of the validation
    share smaller than one micro-batch is left out."""
    import torch
    n = len(idx) // micro
    if n == 0:
        raise ConfigError(f"--eval-samples gives each data-parallel rank {len(idx)} validation "
                          f"windows, fewer than one micro-batch ({micro}) for the pipeline")
    batches = (tuple(t.to(device) for t in windows.batch(idx[i * micro:(i + 1) * micro]))
               for i in range(n))
    loss = engine.eval_batch(batches, num_micro_batches=n).double().reshape(()) * n
    total = torch.stack([loss, torch.tensor(float(n), dtype=torch.float64, device=device)])
    dist.all_reduce(total)
    return float(total[0] / total[1])


def _ppl(loss: float) -> float:
    return math.exp(min(loss, 50.0)) if math.isfinite(loss) else float("nan")


def _agree(dist, world: int, error: Optional[str], cls=ConfigError) -> None:
    """Raise the first rank's error on every rank (no rank left waiting for one that left)."""
    errors = [None] * world
    dist.all_gather_object(errors, error)
    if any(errors):
        raise cls(next(e for e in errors if e))


class Trainer:
    """One training run. ``run()`` calls the steps in order; each is a method so that the order
    (checks before heavy work, verification before DeepSpeed reads a file) is visible here."""

    def __init__(self, argv=None):
        import torch
        self.args = args = parse_args(argv)
        self.cuda = torch.cuda.is_available()
        self.rank, self.world, self.local_rank = world_from_env()
        self.locks: list[RunLock] = []
        self.engine = None
        # settings, checked before any process group or data work
        self.ds_path = (Path(args.deepspeed_config) if args.deepspeed_config
                        else default_ds_config(self.cuda))
        ds_user = load_ds_config(self.ds_path, args.ds_overrides)
        self.plan = validate(args, ds_user, self.world, self.cuda, ds_path=str(self.ds_path))
        self.ds_cfg = finalize_ds_config(ds_user, self.plan)
        self.zero_stage = self.ds_cfg.get("zero_optimization", {}).get("stage", 0)
        self.out = Path(args.out or ROOT / "runs" / f"{args.preset}-{args.embedding}")
        self.data_settings = settings_from_args(args, args.split_seed)
        self.data_settings.check()
        resolve_inputs(args.data)           # missing paths / empty folders: fail before start-up
        if fault("config-error", rank=self.rank):
            raise ConfigError(f"injected settings error on rank {self.rank} (EMBER_FAULT)")
        self.resume_root = (None if not args.resume else
                            Path(args.save if args.resume == "auto" else args.resume))
        if self.resume_root is not None:    # the model and job shape, before the data is read
            found = candidates(self.resume_root)
            if found:
                check_resume(read_train_state(found[0]),
                             run_record(args, self.plan, model_config(args), self.zero_stage),
                             found[0])
            elif args.resume != "auto":
                raise ConfigError(no_checkpoint("--resume", self.resume_root))

    # -- start-up ----------------------------------------------------------------------------
    def start_distributed(self) -> None:
        """torch.distributed (gloo on CPU, NCCL on GPU): enough to agree on the run locks
        before the heavy imports."""
        import torch.distributed as dist

        from models.parallel import init_distributed
        init_distributed()
        self.dist = dist
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    def start_model_parallel(self) -> None:
        """megatron-core's tensor-parallel groups (DeepSpeed reuses the default group)."""
        import torch

        import ember_ds  # noqa: F401  (registers "optimizer": {"type": "Ember"})
        from ember_ds import disable_cpu_shm_build
        from megatron.core import parallel_state as ps
        from models.parallel import MegatronMPU, destroy_model_parallel, init_model_parallel
        _quiet_libraries(self.args.verbose)
        if not self.cuda:
            disable_cpu_shm_build()
            torch.set_flush_denormal(True)   # subnormal floats can slow CPU kernels 10-100x
        self.pp = self.plan["pp"]
        if ps.model_parallel_is_initialized() and (
                ps.get_tensor_model_parallel_world_size(),
                ps.get_pipeline_model_parallel_world_size()) != (self.args.tp, self.pp):
            destroy_model_parallel()
        init_model_parallel(self.args.tp, seed=self.args.seed, pipeline_parallel=self.pp)
        self.dp_rank = ps.get_data_parallel_rank()
        self.dp_size = ps.get_data_parallel_world_size()
        check_with_deepspeed(self.ds_cfg, self.ds_path,
                             MegatronMPU() if self.args.tp > 1 else None)
        self.device = (torch.device("cuda", torch.cuda.current_device()) if self.cuda
                       else torch.device("cpu"))

    def lock_folders(self) -> None:
        """Global rank 0 claims --out and --save; every rank learns whether it could."""
        error = None
        if self.rank == 0:
            folders = [(self.out, "output")]
            if self.args.save and Path(self.args.save).resolve() != self.out.resolve():
                folders.append((Path(self.args.save), "checkpoint"))
            try:
                for folder, purpose in folders:
                    self.locks.append(RunLock(folder, purpose, log=lambda m: _log(m, 0)).acquire())
            except (LockError, OSError) as e:
                error = str(e)
        _agree(self.dist, self.world, error)

    def prepare_data(self) -> None:
        """One builder per node (local rank 0), the rest wait, then all check they agree; a
        data error on any node stops every rank with that message."""
        args, dist = self.args, self.dist
        failure = None
        if self.local_rank == 0:
            try:
                self.prepared = prepare_data(
                    args.data, args.cache_dir, self.data_settings,
                    log=lambda m: _log(m.replace("[data] ", "data: "), 0))
            except DataError as e:
                failure = str(e)
        _agree(dist, self.world, failure, DataError)
        if self.local_rank != 0:
            self.prepared = prepare_data(args.data, args.cache_dir, self.data_settings,
                                         log=lambda m: None)
        digests = [None] * self.world
        dist.all_gather_object(digests, self.prepared.digest)
        if len(set(digests)) != 1:
            raise DataError("ranks prepared different data (tokenizer or token files differ "
                            "between nodes): put --cache-dir on a shared filesystem or copy one "
                            "node's cache")
        seq, plan = self.plan["seq_length"], self.plan
        self.train_windows = TokenWindows(self.prepared.tokens("train"), seq, "train")
        self.valid_windows = TokenWindows(self.prepared.tokens("valid"), seq, "validation")
        self.sampler = DeterministicSampler(len(self.train_windows), args.seed, plan["micro"],
                                            plan["accum"], self.dp_size, self.dp_rank)
        self.val_idx = eval_indices(len(self.valid_windows), args.eval_samples, self.dp_size,
                                    self.dp_rank)
        self.keep_tokenizer()
        self.gcfg = model_config(args, vocab_size=self.prepared.vocab_size)
        self.record = run_record(args, self.plan, self.gcfg, self.zero_stage, self.prepared)

    def keep_tokenizer(self) -> None:
        """Rank 0 copies the tokenizer into --save, so that launch/export.py and
        launch/generate.py find it next to the checkpoints."""
        if self.rank != 0 or not self.args.save:
            return
        src = self.prepared.tokenizer_path
        try:
            save = Path(self.args.save)
            save.mkdir(parents=True, exist_ok=True)
            for f in (src, src.parent / "eod_token.txt"):
                if f.is_file():
                    shutil.copyfile(f, save / f.name)
        except OSError as e:
            _log(f"warning: could not copy the tokenizer into {self.args.save}: {e}", 0)

    def choose_checkpoint(self) -> Optional[Path]:
        """The newest intact checkpoint (verified against its manifest, damaged ones set
        aside), checked against this run's settings before DeepSpeed reads any of it."""
        if self.resume_root is None:
            return None
        chooser = Checkpointer(self.resume_root, None, self.rank, self.world, self.dist,
                               log=lambda m: _log(m, self.rank))
        folder = chooser.choose(self.resume_root, strict=self.args.strict_resume,
                                required=self.args.resume != "auto")
        if folder is None:
            if self.args.resume != "auto":
                raise ConfigError(f"--resume {self.resume_root}: no intact checkpoint there")
            _log(f"no checkpoint in {self.resume_root}: starting from scratch", self.rank)
            return None
        for w in check_resume(read_train_state(folder), self.record, folder):
            _log(f"warning: {w}", self.rank)
        return folder

    def build_engine(self) -> None:
        import deepspeed

        from models.gpt import GPT
        from models.parallel import MegatronMPU
        if self.pp > 1:   # DeepSpeed's pipeline engine; the module brings its own topology
            from models.pipeline import gpt_pipeline, stage_param_groups
            model = gpt_pipeline(self.gcfg, self.pp)
            params = stage_param_groups(model)
            self.counts = model.param_counts
            mpu = None
        else:
            model = GPT(self.gcfg)
            self.counts = model.param_counts() if hasattr(model, "param_counts") else {}
            mpu = MegatronMPU() if self.args.tp > 1 else None
            params = [p for p in model.parameters() if p.requires_grad]
        ds_logger = logging.getLogger("DeepSpeed")
        level = ds_logger.level
        if not self.args.verbose:  # silences "get learning rate before it has started"
            ds_logger.setLevel(logging.ERROR)
        try:
            self.engine, _, _, self.scheduler = deepspeed.initialize(
                model=model, model_parameters=params,
                config=self.ds_cfg, mpu=mpu)
        finally:
            ds_logger.setLevel(level)
        self.device = getattr(self.engine, "device", self.device)
        p = self.plan
        _log(f"{self.args.preset} / {self.args.embedding}: params {self.counts}, vocab "
             f"{self.prepared.vocab_size}, world {self.world} = TP {self.args.tp} x PP "
             f"{self.pp} x DP "
             f"{self.dp_size}, micro batch {p['micro']} x accum {p['accum']} -> "
             f"{p['global_batch']} x {p['seq_length']} = {p['tokens_per_step']:,} tokens/step, "
             f"{p['steps']} steps, {p['precision']} on {self.device.type}, {self.ds_path.name} "
             f"(ZeRO {self.zero_stage})", self.rank)
        self.ckpt = (Checkpointer(self.args.save, self.engine, self.rank, self.world, self.dist,
                                  self.args.keep, log=lambda m: _log(m, self.rank))
                     if self.args.save else None)

    def resume(self, folder: Optional[Path]) -> int:
        start = 0
        if folder is not None:
            loader = Checkpointer(folder.parent, self.engine, self.rank, self.world, self.dist)
            changed = shape_changed(read_train_state(folder), self.record)
            if changed or os.environ.get("EMBER_RESHARD") == "always":
                client = loader.load_resharded(folder, set_rng_state, self.gpt_names())
                _log(f"converted {folder.name} to this job's shape ({', '.join(changed) or 'forced'}): "
                     f"{client['converted']}", self.rank)
            else:
                client = loader.load(folder, set_rng_state)
            if "step" not in client:
                raise ConfigError(f"checkpoint {folder} has no training step (not written by "
                                  "launch/train.py)")
            start = int(client["step"])
            _log(f"resumed from {folder} at step {start}", self.rank)
        sched = self.scheduler
        if sched is not None and start == 0 and getattr(sched, "last_batch_iteration", None) == -1:
            # DeepSpeed's warmup schedulers give lr 0 before their first step(): start at 1, so
            # optimizer step k (1-based) runs with the schedule's lr(k), as in Megatron.
            if type(sched).__name__ in WARMUP_SCHEDULERS:
                sched.step(1)
        if self.ckpt is not None:
            self.ckpt.clean_leftovers()
        return start

    # -- training ----------------------------------------------------------------------------
    def evaluate(self) -> float:
        if self.pp > 1:
            return evaluate_pipeline(self.engine, self.valid_windows, self.val_idx,
                                     self.plan["micro"], self.device, self.dist)
        return evaluate(self.engine, self.valid_windows, self.val_idx, self.plan["micro"],
                        self.device, self.dist)

    def train_step(self, step: int, time_up: bool) -> tuple[float, Optional[float], bool, bool]:
        """One optimizer step (``step`` is 0-based). Returns (mean loss over the global batch,
        grad norm, non-finite on some rank, time limit reached on rank 0), agreed by every rank
        through one all-reduce."""
        import torch
        engine, accum = self.engine, self.plan["accum"]
        skipped_before = getattr(engine, "skipped_steps", 0)
        flags = torch.zeros(3, dtype=torch.float64, device=self.device)
        batches = ([t.to(self.device) for t in self.train_windows.batch(
            self.sampler.micro_batch_indices(step, m))] for m in range(accum))
        if self.pp > 1:   # the pipeline engine runs the accum micro-batches as one schedule
            flags[0] += engine.train_batch(map(tuple, batches)).detach().double() * accum
        else:
            for ids, labels in batches:
                loss = engine(ids, labels=labels).mean()
                if fault("nan", step + 1, self.rank):
                    loss = loss * float("nan")
                engine.backward(loss)
                engine.step()
                flags[0] += loss.detach().double()
        gn = engine.get_global_grad_norm() if hasattr(engine, "get_global_grad_norm") else None
        gn = float(gn) if gn is not None else None
        # Ember's device step never reads the device: its skipped tables (and the warning)
        # reach the host here, after the grad-norm read has waited for the step anyway
        check = getattr(getattr(engine, "basic_optimizer", None), "check_nonfinite", None)
        if check is not None:
            check()
        # fp16's loss scaler skips overflowing steps by design; elsewhere a skip means trouble
        if self.plan["precision"] != "fp16" and (
                getattr(engine, "skipped_steps", 0) > skipped_before
                or (gn is not None and not math.isfinite(gn))):
            flags[1] = 1.0
        if time_up:
            flags[2] = 1.0
        self.dist.all_reduce(flags)
        loss = float(flags[0]) / (accum * self.world)
        return loss, gn, bool(flags[1] > 0) or not math.isfinite(loss), bool(flags[2] > 0)

    def save(self, step: int, train_loss: float, val_loss: float) -> None:
        state = dict(self.record, step=step, tokens=step * self.plan["tokens_per_step"],
                     train_loss=train_loss, val_loss=val_loss, time=time.time())
        from launch.reshard import EMBER_FILE, ember_tables_by_row
        tables = ember_tables_by_row(self.engine, self.gpt_names(), self.dist,
                                     self.prepared.vocab_size)
        self.ckpt.save(step, client_state={"step": step, "train_state": state,
                                           "param_names": self.optimizer_param_names()},
                       train_state=state, rng_state=rng_state,
                       extra={EMBER_FILE: tables} if tables else None)

    def gpt_names(self):
        """Live parameter name -> GPT name (pipeline modules number their layers)."""
        from launch.reshard import gpt_names
        return gpt_names(self.gcfg.num_layers, self.pp)

    def optimizer_param_names(self) -> Optional[list]:
        """GPT names of the optimizer's parameters, group by group: what a checkpoint without
        ZeRO needs to be resumed at another shape (ZeRO's files name their own)."""
        if self.zero_stage != 0:
            return None
        names = self.gpt_names()
        name_of = {id(p): names(n) for n, p in self.engine.module.named_parameters()}
        groups = getattr(self.engine.optimizer, "param_groups", [])
        return [[name_of.get(id(p), "") for p in g["params"]] for g in groups]

    def train(self, start: int) -> dict:
        args, plan, rank = self.args, self.plan, self.rank
        metrics = Metrics(self.out, rank == 0, resume_step=start)
        steps = plan["steps"]
        t_start = time.time()
        val_before = self.evaluate()
        _log(f"validation loss before: {val_before:.4f} (ppl {_ppl(val_before):.1f}) at step "
             f"{start}", rank)
        if start == 0 or not metrics.rows:
            metrics.log(dict(step=start, tokens=start * plan["tokens_per_step"],
                             val_loss=f"{val_before:.6f}", val_ppl=f"{_ppl(val_before):.4f}",
                             elapsed_s=0.0))
        bar = None
        if rank == 0 and not args.no_progress:
            from tqdm import tqdm
            bar = tqdm(total=steps, initial=start, desc="train", unit="step", dynamic_ncols=True,
                       mininterval=0.5, file=sys.stderr)
        train_losses: list[float] = []
        val_loss, last_eval, step = val_before, start, start
        bad_run: list[int] = []             # the current run of consecutive non-finite steps
        t_loop = time.time()
        time_limit = args.time_limit * 60.0
        stopped = None
        while step < steps:
            t0 = time.time()
            lr, body_lr = _lrs(self.engine)          # the rates this step runs with
            time_up = bool(rank == 0 and time_limit and time.time() - t_start > time_limit)
            train_loss, gn, bad, stop = self.train_step(step, time_up)
            step += 1
            train_losses.append(train_loss)
            bad_run = bad_run + [step] if bad else []
            tok_s = plan["tokens_per_step"] / max(time.time() - t0, 1e-9)
            row = dict(step=step, tokens=step * plan["tokens_per_step"],
                       train_loss=f"{train_loss:.6f}", lr=lr, body_lr=body_lr, grad_norm=gn,
                       tokens_per_s=f"{tok_s:.1f}", elapsed_s=f"{time.time() - t_start:.2f}")
            if len(bad_run) > args.max_skipped_steps:
                stopped = "non-finite"
                metrics.log(row)
                break
            if (args.eval_interval and step % args.eval_interval == 0) or step == steps or stop:
                val_loss = self.evaluate()
                last_eval = step
                row.update(val_loss=f"{val_loss:.6f}", val_ppl=f"{_ppl(val_loss):.4f}")
            metrics.log(row)
            if bar is not None:
                bar.update(1)
                post = {"loss": f"{train_loss:.3f}", "tok/s": f"{tok_s:,.0f}"}
                if row.get("val_loss"):
                    post["val"] = f"{val_loss:.3f}"
                bar.set_postfix(post)
            if bad:
                _log(f"warning: step {step}: non-finite loss or gradients ({train_loss}, grad "
                     f"norm {gn}); the update was skipped ({len(bad_run)} in a row, "
                     f"--max-skipped-steps {args.max_skipped_steps})", rank)
            if self.ckpt is not None and ((args.save_interval and step % args.save_interval == 0)
                                          or step == steps or stop):
                if bad or not math.isfinite(val_loss):
                    _log(f"warning: not saving step {step}: its loss is not finite", rank)
                else:
                    self.save(step, train_loss, val_loss)
            if stop:
                stopped = "time limit"
                _log(f"time limit of {args.time_limit} min reached: stopped at step {step}", rank)
                break
        if bar is not None:
            bar.close()
        if step != last_eval and stopped != "non-finite":       # (only when no step ran)
            val_loss = self.evaluate()
        summary = self.summary(start, step, stopped, val_before, val_loss, train_losses,
                               time.time() - t_loop, metrics)
        if stopped == "non-finite":
            good = find_checkpoint(args.save) if args.save else None
            raise NonFiniteError(
                f"training diverged: non-finite loss or gradients at steps {bad_run[0]}-{step} "
                f"({len(bad_run)} in a row, more than --max-skipped-steps "
                f"{args.max_skipped_steps}); nothing of them was saved"
                + (f"; the newest good checkpoint is {good[1]}" if good else "")
                + "; lower the learning rate (or check the data) and rerun with --resume")
        return summary

    def summary(self, start, step, stopped, val_before, val_loss, train_losses, train_time,
                metrics) -> dict:
        args, plan = self.args, self.plan
        done = step - start
        summary = dict(
            preset=args.preset, embedding=args.embedding, tp=args.tp, dp=self.dp_size,
            world=self.world, device=self.device.type, precision=plan["precision"],
            ds_config=str(self.ds_path), zero_stage=self.zero_stage,
            optimizer=self.ds_cfg["optimizer"]["type"], param_counts=self.counts,
            vocab_size=self.prepared.vocab_size, seq_length=plan["seq_length"],
            global_batch=plan["global_batch"], steps=plan["steps"], start_step=start,
            end_step=step, stopped_early=stopped is not None, stopped=stopped,
            tokens=step * plan["tokens_per_step"], resumed_from=self.resumed_from,
            val_loss_before=val_before, val_ppl_before=_ppl(val_before),
            val_loss_after=val_loss, val_ppl_after=_ppl(val_loss),
            train_losses=train_losses, train_seconds=round(train_time, 2),
            tokens_per_s=round(done * plan["tokens_per_step"] / max(train_time, 1e-9), 1),
            out=str(self.out), metrics_csv=str(metrics.path), data=str(self.prepared.path),
            checkpoint=(str(Path(args.save) / tag_of(step))
                        if self.ckpt and (Path(args.save) / tag_of(step)).is_dir() else None))
        if stopped == "non-finite":
            summary.update(val_loss_after=None, val_ppl_after=None)
            _log(f"stopped at step {step}: non-finite losses", self.rank)
        else:
            _log(f"validation loss after:  {val_loss:.4f} (ppl {_ppl(val_loss):.1f}) at step "
                 f"{step}; {summary['tokens_per_s']:,.0f} tokens/s over {done} steps", self.rank)
        if self.rank == 0:
            metrics.close()
            plot = metrics.plot(f"{args.preset} GPT, {args.embedding} embedding, "
                                f"{summary['optimizer']}, ZeRO {self.zero_stage}, "
                                f"{plan['precision']}, world {self.world} (TP {args.tp})")
            summary["plot"] = str(plot) if plot else None
            write_atomic(self.out / "summary.json", json.dumps(summary, indent=1))
            _log(f"metrics: {metrics.path}   plot: {plot}   summary: "
                 f"{self.out / 'summary.json'}", self.rank)
        return summary

    # -- the whole run -----------------------------------------------------------------------
    def run(self) -> dict:
        try:
            self.start_distributed()
            self.lock_folders()
            self.start_model_parallel()
            self.prepare_data()
            folder = self.choose_checkpoint()
            self.build_engine()
            self.resumed_from = str(folder) if folder is not None else None
            summary = self.train(self.resume(folder))
            self.finish()
            return summary
        finally:
            for lock in self.locks:
                lock.release()

    def finish(self) -> None:
        """Leave together: every rank passes one barrier after the last collective, so no rank
        tears down while another still talks to it."""
        if hasattr(self.engine, "destroy"):
            self.engine.destroy()
        self.dist.barrier()


def main(argv=None) -> dict:
    """Train; returns the summary (also written to <out>/summary.json by rank 0). Settings
    errors raise ConfigError / DataError before any heavy work."""
    return Trainer(argv).run()


def _leave(rc: int) -> None:
    """End the process after a run: a clean process-group shutdown on success, then exit
    without interpreter teardown (gloo / DeepSpeed threads can abort in atexit handlers, which
    launchers would report as a failed rank). Under torchrun the ranks of nodes other than
    node 0 leave a moment later: torchrun's exit barrier between nodes is served by node 0's
    agent, and when that agent arrives last it can close the store while a remote agent still
    waits on it ("recvValueWithTimeout failed" / "Error waiting on exit barrier")."""
    sys.stdout.flush()
    sys.stderr.flush()
    if rc == 0:
        try:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:   # noqa: BLE001 - leaving anyway
            pass
        if os.environ.get("TORCHELASTIC_RUN_ID") and os.environ.get("GROUP_RANK", "0") != "0":
            time.sleep(1.0)
    os._exit(rc)


def cli(argv=None) -> int:
    """Run; every failure becomes ``error: ...`` on the rank that met it and an exit status
    (launch/errors.py)."""
    try:
        main(argv)
    except (Exception, KeyboardInterrupt) as e:   # noqa: BLE001 - every failure is reported
        rank, world, _ = world_from_env()
        return report(e, rank, world)
    return 0


if __name__ == "__main__":
    _leave(cli())
