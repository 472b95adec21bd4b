#!/usr/bin/env python
"""Pretrain the GPT of models/gpt.py (dense table or Leviathan embedding) with DeepSpeed.

The same command runs under every launcher (it reads RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR / MASTER_PORT from the environment; a plain process is a world of one):

    python launch/train.py --preset tiny --embedding leviathan --steps 200
    torchrun --nproc_per_node 2 launch/train.py --deepspeed_config ds_configs/ember_zero2_fp32.json
    deepspeed --num_gpus 8 launch/train.py --preset 410m --tp 2 \
        --deepspeed_config ds_configs/ember_zero1_bf16.json --data /data/texts --save ckpt

What it does: checks the settings (before any process group or data work), prepares the data
(launch/data.py: SentencePiece tokenizer + megatron indexed dataset, cached), builds the model on
megatron-core's tensor-parallel groups, hands it to ``deepspeed.initialize`` (ZeRO stage,
precision, clipping, optimizer and WarmupCosineLR schedule from the ds_config), trains with a
seed+step-determined sample order, evaluates validation loss / perplexity, writes
``<out>/metrics.csv`` (and TensorBoard events when installed), ``<out>/summary.json`` and
``<out>/loss.png``, and saves atomic checkpoints (see ``Checkpoints``).

Run ``python launch/train.py --help`` for the flags; docs/LAUNCH.md has the full story.
"""
from __future__ import annotations

import argparse
import copy
import csv
import json
import logging
import math
import os
import re
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

from launch.data import (DataError, DataSettings, DeterministicSampler, TokenWindows,  # noqa: E402
                         add_data_args, eval_indices, prepare_data, resolve_inputs)

DS_CONFIG_DIR = ROOT / "ds_configs"
CSV_FIELDS = ["step", "tokens", "train_loss", "val_loss", "val_ppl", "lr", "body_lr",
              "grad_norm", "tokens_per_s", "elapsed_s"]
WARMUP_SCHEDULERS = ("WarmupCosineLR", "WarmupLR", "WarmupDecayLR")


class ConfigError(ValueError):
    """Wrong or contradictory settings, found at start-up."""


# ------------------------------------------------------------------------------------------
# Arguments
# ------------------------------------------------------------------------------------------

def _key_value(s: str):
    if "=" not in s:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {s!r}")
    k, v = s.split("=", 1)
    try:
        v = json.loads(v)
    except ValueError:
        pass                      # a bare string
    return k.strip(), v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Pretrain a GPT (dense or Leviathan embedding) with DeepSpeed; runs the same "
                    "under python, torchrun and the deepspeed launcher. docs/LAUNCH.md has "
                    "the details.")
    m = p.add_argument_group("model")
    m.add_argument("--preset", default="tiny", help="GPT preset of models/gpt.py: tiny (default), 60m, 410m")
    m.add_argument("--embedding", choices=("dense", "leviathan"), default="leviathan",
                   help="input embedding: a dense vocab-parallel table or the Leviathan generator "
                        "(default)")
    m.add_argument("--tp", type=int, default=1, help="tensor-parallel size (divides world size "
                   "and num_heads; default 1); the rest of the world is data parallel")
    m.add_argument("--model", dest="model_overrides", action="append", type=_key_value,
                   default=[], metavar="KEY=VALUE",
                   help="override a GPTConfig field, e.g. --model hidden_size=64 --model "
                        "num_layers=2 (JSON values); repeatable")
    d = p.add_argument_group("deepspeed")
    d.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config",
                   default=None, help="ds_config JSON (default: ds_configs/ember_zero1_bf16.json "
                   "on GPU, ds_configs/ember_zero1_fp32.json on CPU)")
    d.add_argument("--ds", dest="ds_overrides", action="append", type=_key_value, default=[],
                   metavar="KEY.PATH=VALUE",
                   help="override a ds_config entry, e.g. --ds train_micro_batch_size_per_gpu=4 "
                        "--ds optimizer.params.lr=3e-4 (JSON values); repeatable")
    d.add_argument("--deepspeed", action="store_true", help=argparse.SUPPRESS)
    d.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    add_data_args(p)
    p.add_argument("--split-seed", type=int, default=1234,
                   help="seed of the train/validation document split and tokenizer training "
                        "(default 1234; kept apart from --seed so the cache survives a seed change)")
    t = p.add_argument_group("schedule")
    g = t.add_mutually_exclusive_group()
    g.add_argument("--steps", type=int, default=None, help="optimizer steps (default 100)")
    g.add_argument("--tokens", type=float, default=None,
                   help="train on this many tokens instead (rounded up to whole steps)")
    t.add_argument("--eval-interval", type=int, default=50,
                   help="validate every N steps (and always before the first and after the last "
                        "step; default 50); 0: only before and after")
    t.add_argument("--eval-samples", type=int, default=64,
                   help="validation windows (of seq_length tokens) per evaluation (default 64)")
    t.add_argument("--time-limit", type=float, default=0.0,
                   help="stop cleanly (evaluate, save) after this many minutes; 0: no limit")
    t.add_argument("--seed", type=int, default=1234,
                   help="seeds weight init (GPTConfig.init_seed) and the sample order "
                   "(default 1234)")
    o = p.add_argument_group("output")
    o.add_argument("--out", default=None,
                   help="run folder for metrics.csv, summary.json, loss.png, TensorBoard "
                        "(default runs/<preset>-<embedding>)")
    o.add_argument("--save", default=None, help="checkpoint folder (shared by all nodes)")
    o.add_argument("--save-interval", type=int, default=0,
                   help="checkpoint every N steps (and always at the end when --save is given)")
    o.add_argument("--keep", type=int, default=2, help="complete checkpoints to keep (default 2)")
    o.add_argument("--resume", nargs="?", const="auto", default=None, metavar="DIR",
                   help="resume from the latest complete checkpoint in DIR (no DIR: the --save "
                        "folder; starts fresh when that holds none)")
    o.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    o.add_argument("--verbose", action="store_true", help="keep DeepSpeed's info logging")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


# ------------------------------------------------------------------------------------------
# Settings: load, check, resolve (everything here runs before any process group exists)
# ------------------------------------------------------------------------------------------

def world_from_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the launcher's environment (a world of one)."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def default_ds_config(cuda: bool) -> Path:
    return DS_CONFIG_DIR / ("ember_zero1_bf16.json" if cuda else "ember_zero1_fp32.json")


def load_ds_config(path, overrides=()) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"ds_config not found: {path}")
    try:
        cfg = json.loads(path.read_text())
    except ValueError as e:
        raise ConfigError(f"ds_config {path} is not valid JSON: {e}") from e
    if not isinstance(cfg, dict):
        raise ConfigError(f"ds_config {path} must hold a JSON object")
    for key, value in overrides:
        node = cfg
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--ds {key}: {part} is not an object in {path}")
        node[parts[-1]] = value
    return cfg


def _enabled(cfg: dict, key: str) -> bool:
    v = cfg.get(key)
    return bool(v.get("enabled", False)) if isinstance(v, dict) else False


def precision_of(ds_cfg: dict) -> str:
    if _enabled(ds_cfg, "bf16"):
        return "bf16"
    if _enabled(ds_cfg, "fp16"):
        return "fp16"
    return "fp32"


def resolve_batch(ds_cfg: dict, world: int, tp: int, path="ds_config") -> tuple[int, int, int, int]:
    """(micro batch, gradient accumulation, data-parallel size, global batch) from the ds_config,
    filling the missing one of the three like DeepSpeed does, and checking that
    train_batch_size == micro * accumulation * (world / TP) when all are given."""
    dp = world // tp
    micro = ds_cfg.get("train_micro_batch_size_per_gpu")
    accum = ds_cfg.get("gradient_accumulation_steps")
    total = ds_cfg.get("train_batch_size")
    for name, v in (("train_micro_batch_size_per_gpu", micro),
                    ("gradient_accumulation_steps", accum), ("train_batch_size", total)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ConfigError(f"{path}: {name} must be a positive integer, got {v!r}")
    if micro is None and total is None:
        raise ConfigError(f"{path}: give train_micro_batch_size_per_gpu (and optionally "
                          "train_batch_size / gradient_accumulation_steps)")
    if micro is None:
        accum = accum or 1
        if total % (accum * dp):
            raise ConfigError(f"{path}: train_batch_size {total} is not divisible by gradient "
                              f"accumulation {accum} x data-parallel size {dp} (world {world} / "
                              f"TP {tp})")
        micro = total // (accum * dp)
    elif accum is None:
        if total is None:
            accum = 1
        elif total % (micro * dp):
            raise ConfigError(f"{path}: train_batch_size {total} is not a multiple of micro batch "
                              f"{micro} x data-parallel size {dp} (world {world} / TP {tp})")
        else:
            accum = total // (micro * dp)
    if total is not None and total != micro * accum * dp:
        raise ConfigError(
            f"{path}: train_batch_size {total} != micro batch {micro} x gradient accumulation "
            f"{accum} x data-parallel size {dp} (world {world} / TP {tp}) = {micro * accum * dp}; "
            "fix one of them or drop train_batch_size and let it be computed")
    return micro, accum, dp, micro * accum * dp


def model_config(args, vocab_size: Optional[int] = None):
    """GPTConfig from --preset, --embedding, --model overrides, --seed (and the tokenizer's
    vocabulary once known). Unknown presets / fields are ConfigErrors."""
    try:
        from models.gpt import PRESETS, GPTConfig
    except ImportError as e:
        raise ConfigError(f"models.gpt is not importable ({e})") from e
    if args.preset not in PRESETS:
        raise ConfigError(f"unknown preset {args.preset!r}; presets: {', '.join(PRESETS)}")
    overrides = dict(args.model_overrides)
    fields = set(getattr(GPTConfig, "__dataclass_fields__", {}))
    unknown = sorted(k for k in overrides if fields and k not in fields)
    if unknown:
        raise ConfigError(f"unknown GPTConfig field(s) in --model: {', '.join(unknown)}; fields: "
                          f"{', '.join(sorted(fields))}")
    overrides["embedding"] = args.embedding
    if "init_seed" not in overrides and (not fields or "init_seed" in fields):
        overrides["init_seed"] = args.seed
    if vocab_size is not None:
        overrides["vocab_size"] = vocab_size
    try:
        return GPTConfig.from_preset(args.preset, **overrides)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model settings: {e}") from e


def validate(args, ds_cfg: dict, world: int, cuda: bool, ds_path="ds_config") -> dict:
    """Every start-up check that needs no process group or data. Returns the resolved plan."""
    tp = args.tp
    if tp < 1:
        raise ConfigError(f"--tp must be >= 1, got {tp}")
    if world % tp:
        raise ConfigError(f"--tp {tp} does not divide the world size {world}")
    cfg = model_config(args)
    if cfg.num_heads % tp:
        raise ConfigError(f"--tp {tp} does not divide the number of attention heads "
                          f"{cfg.num_heads} of preset {args.preset!r}")
    if getattr(cfg, "ffn_hidden_size", None) and cfg.ffn_hidden_size % tp:
        raise ConfigError(f"--tp {tp} does not divide ffn_hidden_size {cfg.ffn_hidden_size}")
    if getattr(cfg, "sequence_parallel", False) and tp > 1 and cfg.seq_length % tp:
        raise ConfigError(f"sequence parallelism needs --tp {tp} to divide seq_length "
                          f"{cfg.seq_length}")
    precision = precision_of(ds_cfg)
    if _enabled(ds_cfg, "bf16") and _enabled(ds_cfg, "fp16"):
        raise ConfigError(f"{ds_path}: bf16 and fp16 are both enabled; enable one")
    if not cuda and precision != "fp32":
        raise ConfigError(f"{ds_path} enables {precision}, but no GPU is visible: on CPU train "
                          "in fp32 (use ds_configs/*_fp32.json)")
    micro, accum, dp, global_batch = resolve_batch(ds_cfg, world, tp, ds_path)
    clip = ds_cfg.get("gradient_clipping")
    if clip is not None and (not isinstance(clip, (int, float)) or clip < 0):
        raise ConfigError(f"{ds_path}: gradient_clipping must be a number >= 0, got {clip!r}")
    opt = ds_cfg.get("optimizer")
    if not isinstance(opt, dict) or "type" not in opt:
        raise ConfigError(f"{ds_path}: needs an \"optimizer\": {{\"type\": ..., \"params\": ...}}")
    if args.steps is not None and args.steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {args.steps}")
    if args.tokens is not None and args.tokens <= 0:
        raise ConfigError(f"--tokens must be > 0, got {args.tokens}")
    tokens_per_step = global_batch * cfg.seq_length
    if args.tokens is not None:
        steps = max(1, math.ceil(args.tokens / tokens_per_step))
    else:
        steps = args.steps or 100
    if args.eval_interval < 0 or args.save_interval < 0 or args.eval_samples < 1:
        raise ConfigError("--eval-interval and --save-interval must be >= 0, --eval-samples >= 1")
    if args.resume == "auto" and not args.save:
        raise ConfigError("--resume without a folder needs --save (the folder to resume from)")
    if args.keep < 1:
        raise ConfigError(f"--keep must be >= 1, got {args.keep}")
    return dict(tp=tp, dp=dp, world=world, micro=micro, accum=accum, global_batch=global_batch,
                steps=steps, seq_length=cfg.seq_length, tokens_per_step=tokens_per_step,
                precision=precision)


def finalize_ds_config(ds_cfg: dict, plan: dict) -> dict:
    """The ds_config handed to deepspeed.initialize: batch sizes made explicit and consistent,
    the LR schedule filled in (WarmupCosineLR when absent; "auto" entries resolved)."""
    cfg = copy.deepcopy(ds_cfg)
    cfg["train_micro_batch_size_per_gpu"] = plan["micro"]
    cfg["gradient_accumulation_steps"] = plan["accum"]
    cfg["train_batch_size"] = plan["global_batch"]
    cfg.setdefault("steps_per_print", 10 ** 9)
    cfg.setdefault("gradient_clipping", 1.0)
    steps = plan["steps"]
    warmup = max(2, min(1000, round(0.1 * steps)))
    sched = cfg.get("scheduler")
    if sched is None:
        sched = cfg["scheduler"] = {"type": "WarmupCosineLR", "params": {}}
    params = sched.setdefault("params", {})
    if sched.get("type") == "WarmupCosineLR":
        params.setdefault("warmup_type", "linear")
        params.setdefault("cos_min_ratio", 0.1)
        params.setdefault("warmup_min_ratio", 0.0)
        if params.get("total_num_steps", "auto") == "auto":
            params["total_num_steps"] = steps
        if params.get("warmup_num_steps", "auto") == "auto":
            params["warmup_num_steps"] = warmup
    else:
        for k in ("total_num_steps", "warmup_num_steps", "warmup_max_lr", "warmup_min_lr"):
            if params.get(k) == "auto":
                if k == "total_num_steps":
                    params[k] = steps
                elif k == "warmup_num_steps":
                    params[k] = warmup
                else:
                    raise ConfigError(f"scheduler param {k} = 'auto' is only understood for "
                                      "WarmupCosineLR")
    return cfg


# ------------------------------------------------------------------------------------------
# Checkpoints: <save>/<tag>/ complete or absent, <save>/latest updated last
# ------------------------------------------------------------------------------------------

TAG_RE = re.compile(r"^step(\d+)$")


def tag_of(step: int) -> str:
    return f"step{step:08d}"


def _complete(folder: Path) -> bool:
    return (folder / "train_state.json").is_file()


def find_checkpoint(root) -> Optional[tuple[str, Path]]:
    """(tag, folder) of the newest complete checkpoint under ``root``: the one ``latest``
    names when it is complete, else the highest complete ``step*`` folder. Temporary folders
    (``.tmp-*``, left by a kill during a save) are never considered."""
    root = Path(root)
    if not root.is_dir():
        return None
    latest = root / "latest"
    if latest.is_file():
        tag = latest.read_text().strip()
        if TAG_RE.match(tag) and _complete(root / tag):
            return tag, root / tag
    found = sorted((int(TAG_RE.match(p.name).group(1)), p) for p in root.iterdir()
                   if p.is_dir() and TAG_RE.match(p.name) and _complete(p))
    return (found[-1][1].name, found[-1][1]) if found else None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class Checkpointer:
    """Atomic DeepSpeed checkpoints.

    save(step): every rank writes through ``engine.save_checkpoint`` into
    ``<save>/.tmp-<tag>/<tag>/`` (plus ``rng-rank<r>.pt``; rank 0 adds ``train_state.json``, the
    completeness marker); after a barrier rank 0 renames the folder to ``<save>/<tag>`` (one
    atomic rename on the shared filesystem), then rewrites ``<save>/latest`` (temp file +
    os.replace), then prunes old checkpoints. A kill at any point leaves the previous checkpoint
    complete and ``latest`` naming a complete one.
    """

    def __init__(self, root, engine, rank: int, dist, keep: int = 2):
        self.root = Path(root)
        self.engine, self.rank, self.dist, self.keep = engine, rank, dist, keep

    def clean_leftovers(self) -> None:
        if self.rank == 0 and self.root.is_dir():
            for p in self.root.glob(".tmp-*"):
                shutil.rmtree(p, ignore_errors=True)
        self.dist.barrier()

    def save(self, step: int, client_state: dict, train_state: dict) -> Path:
        import torch
        tag = tag_of(step)
        staging = self.root / f".tmp-{tag}"
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if staging.exists():
                shutil.rmtree(staging)
        self.dist.barrier()
        self.engine.save_checkpoint(str(staging), tag=tag, client_state=client_state,
                                    save_latest=False)
        torch.save(_rng_state(), staging / tag / f"rng-rank{self.rank}.pt")
        if self.rank == 0:
            _write_atomic(staging / tag / "train_state.json", json.dumps(train_state, indent=1))
        self.dist.barrier()
        crash = os.environ.get("EMBER_TEST_CRASH_IN_SAVE")
        if crash and int(crash) == step:          # tests: a kill after writing, before publishing
            os._exit(17)
        final = self.root / tag
        if self.rank == 0:
            if final.exists():                    # re-saving a step (after resuming further back)
                old = self.root / f".tmp-old-{tag}"
                os.rename(final, old)
                shutil.rmtree(old, ignore_errors=True)
            os.rename(staging / tag, final)
            _fsync_dir(self.root)
            _write_atomic(self.root / "latest", tag)
            for extra in staging.iterdir():       # e.g. DeepSpeed's zero_to_fp32.py
                if not (self.root / extra.name).exists():
                    shutil.move(str(extra), self.root / extra.name)
            shutil.rmtree(staging, ignore_errors=True)
            self._prune(keep_tag=tag)
        self.dist.barrier()
        return final

    def _prune(self, keep_tag: str) -> None:
        done = sorted((int(TAG_RE.match(p.name).group(1)), p) for p in self.root.iterdir()
                      if p.is_dir() and TAG_RE.match(p.name) and _complete(p))
        for _, p in done[:-self.keep]:
            if p.name != keep_tag:
                shutil.rmtree(p, ignore_errors=True)

    def load(self, folder: Path) -> dict:
        """Load a complete checkpoint folder ``<root>/<tag>``; returns its client state."""
        import torch
        load_path, client = self.engine.load_checkpoint(str(folder.parent), tag=folder.name)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint {folder}")
        rng = folder / f"rng-rank{self.rank}.pt"
        if rng.is_file():
            _set_rng_state(torch.load(rng, weights_only=False))
        return client or {}


def _rng_state() -> dict:
    import random

    import numpy as np
    import torch
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    try:
        from megatron.core.tensor_parallel import get_cuda_rng_tracker
        state["tracker"] = get_cuda_rng_tracker().get_states()
    except Exception:       # noqa: BLE001 - tracker without states (CPU)
        pass
    return state


def _set_rng_state(state: dict) -> None:
    import random

    import numpy as np
    import torch
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if "tracker" in state:
        try:
            from megatron.core.tensor_parallel import get_cuda_rng_tracker
            get_cuda_rng_tracker().set_states(state["tracker"])
        except Exception:   # noqa: BLE001
            pass


# ------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------

class Metrics:
    """metrics.csv (one row per step; validation columns filled at evaluation steps), optional
    TensorBoard, written by global rank 0 only."""

    def __init__(self, out: Path, active: bool, resume_step: int = 0):
        self.out, self.active = out, active
        self.path = out / "metrics.csv"
        self.rows: list[dict] = []
        self.tb = None
        if not active:
            return
        out.mkdir(parents=True, exist_ok=True)
        if resume_step > 0 and self.path.is_file():
            # keep the history up to the checkpoint; drop steps that will be redone
            with open(self.path, newline="") as fh:
                self.rows = [r for r in csv.DictReader(fh) if int(r["step"]) <= resume_step]
        self._rewrite()
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(out / "tensorboard"))
        except Exception:   # noqa: BLE001 - tensorboard not installed
            self.tb = None

    def _rewrite(self) -> None:
        tmp = self.path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, CSV_FIELDS)
            w.writeheader()
            w.writerows(self.rows)
        os.replace(tmp, self.path)

    def log(self, row: dict) -> None:
        if not self.active:
            return
        row = {k: ("" if row.get(k) is None else row[k]) for k in CSV_FIELDS}
        self.rows.append(row)
        with open(self.path, "a", newline="") as fh:
            csv.DictWriter(fh, CSV_FIELDS).writerow(row)
        if self.tb is not None:
            for k in ("train_loss", "val_loss", "val_ppl", "lr", "body_lr", "grad_norm",
                      "tokens_per_s"):
                if row[k] != "":
                    self.tb.add_scalar(k, float(row[k]), int(row["step"]))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()

    def plot(self, title: str) -> Optional[Path]:
        if not self.active:
            return None
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        tr = [(int(r["step"]), float(r["train_loss"])) for r in self.rows if r["train_loss"] != ""]
        va = [(int(r["step"]), float(r["val_loss"])) for r in self.rows if r["val_loss"] != ""]
        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
        if tr:
            ax.plot(*zip(*tr), lw=1.0, alpha=0.85, label="train loss")
        if va:
            ax.plot(*zip(*va), "o-", ms=4, label="validation loss")
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats / token)")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = self.out / "loss.png"
        fig.savefig(path)
        plt.close(fig)
        return path


# ------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------

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


def _ppl(loss: float) -> float:
    return math.exp(min(loss, 50.0))


def main(argv=None) -> dict:
    """Train; returns the summary (also written to <out>/summary.json by rank 0). Settings
    errors raise ConfigError / DataError before any heavy work; the CLI turns them into a
    one-line message and exit status 2."""
    args = parse_args(argv)
    import torch
    cuda = torch.cuda.is_available()
    rank, world, local_rank = world_from_env()

    # 1. settings, checked before any process group or data work
    ds_path = Path(args.deepspeed_config) if args.deepspeed_config else default_ds_config(cuda)
    ds_user = load_ds_config(ds_path, args.ds_overrides)
    plan = validate(args, ds_user, world, cuda, ds_path=str(ds_path))
    ds_cfg = finalize_ds_config(ds_user, plan)
    out = Path(args.out or ROOT / "runs" / f"{args.preset}-{args.embedding}")
    settings = DataSettings(vocab_size=args.vocab_size, tokenizer_type=args.tokenizer_type,
                            val_fraction=args.val_fraction, split_seed=args.split_seed,
                            jsonl_key=args.jsonl_key, tokenizer=args.tokenizer)
    settings.check()
    resolve_inputs(args.data)           # missing paths / empty folders: fail before start-up

    # 2. process groups (megatron TP groups; DeepSpeed reuses the default group)
    import deepspeed
    import torch.distributed as dist

    import ember_ds  # noqa: F401  (registers "optimizer": {"type": "Ember"})
    from ember_ds import disable_cpu_shm_build
    from megatron.core import parallel_state as ps
    from models.gpt import GPT
    from models.parallel import MegatronMPU, destroy_model_parallel, init_model_parallel
    _quiet_libraries(args.verbose)
    if not cuda:
        disable_cpu_shm_build()
        torch.set_flush_denormal(True)   # subnormal floats can slow CPU kernels 10-100x
    if ps.model_parallel_is_initialized() and ps.get_tensor_model_parallel_world_size() != args.tp:
        destroy_model_parallel()
    init_model_parallel(args.tp, seed=args.seed)
    rank, world = dist.get_rank(), dist.get_world_size()
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")

    # 3. data: one builder per node (local rank 0), the rest wait, then all check they agree;
    #    a data error on any node stops every rank with that message (no rank left waiting)
    failure = None
    if local_rank == 0:
        try:
            prepared = prepare_data(args.data, args.cache_dir, settings,
                                    log=lambda m: _log(m.replace("[data] ", "data: "), 0))
        except DataError as e:
            failure = str(e)
    failures = [None] * world
    dist.all_gather_object(failures, failure)
    if any(failures):
        raise DataError(next(f for f in failures if f))
    if local_rank != 0:
        prepared = prepare_data(args.data, args.cache_dir, settings, log=lambda m: None)
    digests = [None] * world
    dist.all_gather_object(digests, prepared.digest)
    if len(set(digests)) != 1:
        raise DataError("ranks prepared different data (tokenizer or token files differ between "
                        "nodes): put --cache-dir on a shared filesystem or copy one node's cache")
    seq = plan["seq_length"]
    train_windows = TokenWindows(prepared.tokens("train"), seq, "train")
    valid_windows = TokenWindows(prepared.tokens("valid"), seq, "validation")
    sampler = DeterministicSampler(len(train_windows), args.seed, plan["micro"], plan["accum"],
                                   dp_size, dp_rank)
    val_idx = eval_indices(len(valid_windows), args.eval_samples, dp_size, dp_rank)

    # 4. model and engine
    gcfg = model_config(args, vocab_size=prepared.vocab_size)
    model = GPT(gcfg)
    counts = model.param_counts() if hasattr(model, "param_counts") else {}
    ds_logger = logging.getLogger("DeepSpeed")
    level = ds_logger.level
    if not args.verbose:     # silences "get learning rate before it has started" (handled below)
        ds_logger.setLevel(logging.ERROR)
    try:
        engine, _, _, scheduler = deepspeed.initialize(
            model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
            config=ds_cfg, mpu=MegatronMPU() if args.tp > 1 else None)
    finally:
        ds_logger.setLevel(level)
    device = engine.device if hasattr(engine, "device") else device
    _log(f"{args.preset} / {args.embedding}: params {counts}, vocab {prepared.vocab_size}, "
         f"world {world} = TP {args.tp} x DP {dp_size}, micro batch {plan['micro']} x accum "
         f"{plan['accum']} -> {plan['global_batch']} x {seq} = {plan['tokens_per_step']:,} "
         f"tokens/step, {plan['steps']} steps, {plan['precision']} on {device.type}, "
         f"{ds_path.name} (ZeRO {ds_cfg.get('zero_optimization', {}).get('stage', 0)})", rank)

    # 5. resume
    start_step = 0
    ckpt = Checkpointer(args.save, engine, rank, dist, args.keep) if args.save else None
    resumed_from = None
    if args.resume:
        root = Path(args.save if args.resume == "auto" else args.resume)
        found = find_checkpoint(root)
        if found is None and args.resume != "auto":
            if _complete(root) and TAG_RE.match(root.name):
                found = (root.name, root)
            else:
                raise ConfigError(f"--resume {root}: no complete checkpoint there")
        if found is None:
            _log(f"no checkpoint in {root}: starting from scratch", rank)
        else:
            loader = Checkpointer(found[1].parent, engine, rank, dist)
            client = loader.load(found[1])
            _check_resume(client, args, plan, prepared, gcfg)
            start_step = int(client["step"])
            resumed_from = str(found[1])
            _log(f"resumed from {found[1]} at step {start_step}", rank)
    if scheduler is not None and start_step == 0 and getattr(scheduler, "last_batch_iteration",
                                                            None) == -1:
        # DeepSpeed's warmup schedulers give lr 0 before their first step(): start at 1, so
        # optimizer step k (1-based) runs with the schedule's lr(k), as in Megatron.
        if type(scheduler).__name__ in WARMUP_SCHEDULERS:
            scheduler.step(1)
    if ckpt is not None:
        ckpt.clean_leftovers()

    # 6. train
    metrics = Metrics(out, rank == 0, resume_step=start_step)
    steps = plan["steps"]
    t_start = time.time()
    val_before = evaluate(engine, valid_windows, val_idx, plan["micro"], device, dist)
    _log(f"validation loss before: {val_before:.4f} (ppl {_ppl(val_before):.1f}) at step "
         f"{start_step}", rank)
    if start_step == 0 or not metrics.rows:
        metrics.log(dict(step=start_step, tokens=start_step * plan["tokens_per_step"],
                         val_loss=f"{val_before:.6f}", val_ppl=f"{_ppl(val_before):.4f}",
                         elapsed_s=0.0))
    bar = None
    if rank == 0 and not args.no_progress:
        from tqdm import tqdm
        bar = tqdm(total=steps, initial=start_step, desc="train", unit="step",
                   dynamic_ncols=True, mininterval=0.5, file=sys.stderr)
    train_losses: list[float] = []
    val_loss = val_before
    last_eval_step = start_step
    step = start_step
    t_loop = time.time()
    time_limit = args.time_limit * 60.0
    stopped_early = False
    while step < steps:
        t0 = time.time()
        lr, body_lr = _lrs(engine)          # the rates this step runs with
        loss_sum = torch.zeros(2, dtype=torch.float64, device=device)
        for micro in range(plan["accum"]):
            ids, labels = train_windows.batch(sampler.micro_batch_indices(step, micro))
            loss = engine(ids.to(device), labels=labels.to(device)).mean()
            engine.backward(loss)
            engine.step()
            loss_sum[0] += loss.detach().double()
        step += 1
        if rank == 0 and time_limit and time.time() - t_start > time_limit:
            loss_sum[1] = 1.0
        dist.all_reduce(loss_sum)
        train_loss = float(loss_sum[0]) / (plan["accum"] * world)
        train_losses.append(train_loss)
        dt = time.time() - t0
        tok_s = plan["tokens_per_step"] / max(dt, 1e-9)
        gn = engine.get_global_grad_norm() if hasattr(engine, "get_global_grad_norm") else None
        gn = float(gn) if gn is not None else None
        stop = float(loss_sum[1]) > 0
        row = dict(step=step, tokens=step * plan["tokens_per_step"], train_loss=f"{train_loss:.6f}",
                   lr=lr, body_lr=body_lr, grad_norm=gn, tokens_per_s=f"{tok_s:.1f}",
                   elapsed_s=f"{time.time() - t_start:.2f}")
        due_eval = args.eval_interval and step % args.eval_interval == 0
        if due_eval or step == steps or stop:
            val_loss = evaluate(engine, valid_windows, val_idx, plan["micro"], device, dist)
            last_eval_step = step
            row.update(val_loss=f"{val_loss:.6f}", val_ppl=f"{_ppl(val_loss):.4f}")
        metrics.log(row)
        if bar is not None:
            bar.update(1)
            post = {"loss": f"{train_loss:.3f}", "tok/s": f"{tok_s:,.0f}"}
            if row.get("val_loss"):
                post["val"] = f"{val_loss:.3f}"
            bar.set_postfix(post)
        if ckpt is not None and ((args.save_interval and step % args.save_interval == 0)
                                 or step == steps or stop):
            _save(ckpt, step, args, plan, prepared, gcfg, train_loss, val_loss)
        if stop:
            stopped_early = True
            _log(f"time limit of {args.time_limit} min reached: stopped at step {step}", rank)
            break
    if bar is not None:
        bar.close()
    if step != last_eval_step:       # (only when no step ran)
        val_loss = evaluate(engine, valid_windows, val_idx, plan["micro"], device, dist)
    train_time = time.time() - t_loop
    done_steps = step - start_step
    summary = dict(
        preset=args.preset, embedding=args.embedding, tp=args.tp, dp=dp_size, world=world,
        device=device.type, precision=plan["precision"], ds_config=str(ds_path),
        zero_stage=ds_cfg.get("zero_optimization", {}).get("stage", 0),
        optimizer=ds_cfg["optimizer"]["type"], param_counts=counts,
        vocab_size=prepared.vocab_size, seq_length=seq, global_batch=plan["global_batch"],
        steps=steps, start_step=start_step, end_step=step, stopped_early=stopped_early,
        tokens=step * plan["tokens_per_step"], resumed_from=resumed_from,
        val_loss_before=val_before, val_ppl_before=_ppl(val_before),
        val_loss_after=val_loss, val_ppl_after=_ppl(val_loss),
        train_losses=train_losses, train_seconds=round(train_time, 2),
        tokens_per_s=round(done_steps * plan["tokens_per_step"] / max(train_time, 1e-9), 1),
        out=str(out), metrics_csv=str(metrics.path), data=str(prepared.path),
        checkpoint=str(Path(args.save) / tag_of(step)) if ckpt else None)
    _log(f"validation loss after:  {val_loss:.4f} (ppl {_ppl(val_loss):.1f}) at step {step}; "
         f"{summary['tokens_per_s']:,.0f} tokens/s over {done_steps} steps", rank)
    if rank == 0:
        metrics.close()
        plot = metrics.plot(f"{args.preset} GPT, {args.embedding} embedding, "
                            f"{summary['optimizer']}, ZeRO {summary['zero_stage']}, "
                            f"{plan['precision']}, world {world} (TP {args.tp})")
        summary["plot"] = str(plot) if plot else None
        _write_atomic(out / "summary.json", json.dumps(summary, indent=1))
        _log(f"metrics: {metrics.path}   plot: {plot}   summary: {out / 'summary.json'}", rank)
    if hasattr(engine, "destroy"):
        engine.destroy()
    dist.barrier()
    return summary


def _train_state(args, plan, prepared, gcfg) -> dict:
    import dataclasses
    mc = {k: (str(v) if not isinstance(v, (int, float, str, bool, type(None), dict, list)) else v)
          for k, v in dataclasses.asdict(gcfg).items()} if dataclasses.is_dataclass(gcfg) else {}
    return dict(preset=args.preset, embedding=args.embedding, tp=args.tp, seed=args.seed,
                global_batch=plan["global_batch"], micro=plan["micro"], accum=plan["accum"],
                dp=plan["dp"], seq_length=plan["seq_length"], steps=plan["steps"],
                data_digest=prepared.digest, vocab_size=prepared.vocab_size, model_config=mc)


def _save(ckpt: Checkpointer, step, args, plan, prepared, gcfg, train_loss, val_loss) -> None:
    state = _train_state(args, plan, prepared, gcfg)
    state.update(step=step, tokens=step * plan["tokens_per_step"], train_loss=train_loss,
                 val_loss=val_loss, time=time.time())
    ckpt.save(step, client_state={"step": step, "train_state": state}, train_state=state)


def _check_resume(client: dict, args, plan, prepared, gcfg) -> None:
    """A checkpoint resumes only the same model; a different data/batch setup is a warning."""
    if "step" not in client:
        raise ConfigError("the checkpoint has no training step (not written by launch/train.py)")
    old = client.get("train_state", {})
    now = _train_state(args, plan, prepared, gcfg)
    for k in ("preset", "embedding", "tp", "vocab_size", "seq_length"):
        if k in old and old[k] != now[k]:
            raise ConfigError(f"checkpoint was trained with {k} = {old[k]!r}, this run has "
                              f"{now[k]!r}")
    if old.get("model_config") and old["model_config"] != now["model_config"]:
        diff = sorted(k for k in now["model_config"]
                      if old["model_config"].get(k) != now["model_config"][k] and k != "init_seed")
        if diff:
            raise ConfigError(f"checkpoint model differs in {', '.join(diff)}")
    for k in ("seed", "global_batch", "data_digest", "steps"):
        if k in old and old[k] != now[k]:
            warnings.warn(f"resuming with {k} = {now[k]!r} (checkpoint: {old[k]!r}): the run will "
                          "not match an uninterrupted one")


def cli(argv=None) -> int:
    try:
        main(argv)
    except (ConfigError, DataError) as e:
        if world_from_env()[0] == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    rc = cli()
    sys.stdout.flush()
    sys.stderr.flush()
    # Leave without interpreter teardown: gloo / DeepSpeed threads can abort in atexit handlers
    # after a clean run, which launchers would report as a failed rank.
    os._exit(rc)
