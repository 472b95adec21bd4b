"""Settings of a training run: the command line, the ds_config, and every check that can be made
before any process group, data or model work, so that a wrong setting costs seconds, not a
queue wait plus a model build. Each problem is a ConfigError with a one-line message that
names the fix; the resume check compares a checkpoint's recorded settings with this run's."""
from __future__ import annotations

import argparse
import copy
import difflib
import json
import math
import os
from numbers import Real
from pathlib import Path
from typing import Optional

from launch.data import add_data_args
from launch.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
DS_CONFIG_DIR = ROOT / "ds_configs"
WARMUP_SCHEDULERS = ("WarmupCosineLR", "WarmupLR", "WarmupDecayLR")

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
    m.add_argument("--preset", default="tiny", help="GPT preset of models/gpt.py: tiny (default), 60m, 410m, 1b")
    m.add_argument("--embedding", choices=("dense", "leviathan"), default="leviathan",
                   help="input embedding: a dense vocab-parallel table or the Leviathan generator "
                        "(default)")
    m.add_argument("--tp", type=int, default=1, help="tensor-parallel size (divides world size "
                   "and num_heads; default 1); the rest of the world is data parallel")
    m.add_argument("--pp", type=int, default=None,
                   help="pipeline stages (DeepSpeed's pipeline engine; divides num_layers; "
                        "ZeRO 0/1 only); default: the ds_config's pipeline.stages, else 1. "
                        "world = TP x PP x DP")
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
    o.add_argument("--strict-resume", action="store_true",
                   help="refuse to resume when the newest checkpoint is damaged (default: report "
                        "it, set it aside and resume from the newest intact one)")
    o.add_argument("--max-skipped-steps", type=int, default=3, metavar="N",
                   help="consecutive steps with a non-finite loss or gradients (skipped, no "
                        "update) tolerated before the run stops with exit status 3 (default 3; "
                        "0: stop at the first)")
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


def resolve_batch(ds_cfg: dict, world: int, tp: int, path="ds_config",
                  pp: int = 1) -> tuple[int, int, int, int]:
    """(micro batch, gradient accumulation, data-parallel size, global batch) from the ds_config,
    filling the missing one of the three like DeepSpeed does, and checking that
    train_batch_size == micro * accumulation * (world / (TP x PP)) when all are given."""
    dp = world // (tp * pp)
    if pp > 1:
        tp = f"{tp} / PP {pp}"                # for the messages: world / TP / PP
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


def pipeline_stages(args, ds_cfg: dict, ds_path="ds_config") -> int:
    """--pp, else the ds_config's ``pipeline.stages`` (DeepSpeed's own key), else 1."""
    pp = args.pp if getattr(args, "pp", None) is not None else \
        (ds_cfg.get("pipeline") or {}).get("stages", 1)
    if not isinstance(pp, int) or isinstance(pp, bool) or pp < 1:
        raise ConfigError(f"pipeline stages must be an integer >= 1 (--pp or {ds_path}'s "
                          f"pipeline.stages), got {pp!r}")
    return pp


def validate(args, ds_cfg: dict, world: int, cuda: bool, ds_path="ds_config") -> dict:
    """Every start-up check that needs no process group or data. Returns the resolved plan."""
    tp = args.tp
    if tp < 1:
        raise ConfigError(f"--tp must be >= 1, got {tp}")
    if world % tp:
        raise ConfigError(f"--tp {tp} does not divide the world size {world}")
    pp = pipeline_stages(args, ds_cfg, ds_path)
    if world % (tp * pp):
        raise ConfigError(f"--tp {tp} x --pp {pp} does not divide the world size {world}")
    cfg = model_config(args)
    if pp > 1:
        if cfg.num_layers % pp:
            raise ConfigError(f"--pp {pp} does not divide num_layers {cfg.num_layers} (each "
                              f"stage takes the same number of decoder layers)")
        stage = (ds_cfg.get("zero_optimization") or {}).get("stage", 0)
        if stage not in (0, 1):
            raise ConfigError(f"{ds_path}: ZeRO stage {stage} cannot be combined with pipeline "
                              f"parallelism (--pp {pp}); DeepSpeed's pipeline engine takes ZeRO "
                              f"0 or 1")
        if getattr(cfg, "sequence_parallel", False) and tp > 1:
            raise ConfigError(f"sequence parallelism is not supported with --pp {pp}")
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
    micro, accum, dp, global_batch = resolve_batch(ds_cfg, world, tp, ds_path, pp)
    clip = ds_cfg.get("gradient_clipping")
    if clip is not None and (not isinstance(clip, (int, float)) or clip < 0):
        raise ConfigError(f"{ds_path}: gradient_clipping must be a number >= 0, got {clip!r}")
    _check_zero_and_optimizer(ds_cfg, ds_path)
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
    if args.max_skipped_steps < 0:
        raise ConfigError(f"--max-skipped-steps must be >= 0, got {args.max_skipped_steps}")
    _check_folders(args)
    return dict(tp=tp, pp=pp, dp=dp, world=world, micro=micro, accum=accum,
                global_batch=global_batch,
                steps=steps, seq_length=cfg.seq_length, tokens_per_step=tokens_per_step,
                precision=precision)


def _optimizer_types() -> list[str]:
    """What ``"optimizer": {"type": ...}`` may name: DeepSpeed's built-ins, torch.optim's
    classes (DeepSpeed falls back to them) and Ember."""
    import torch
    try:
        from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS
    except ImportError:
        DEEPSPEED_OPTIMIZERS = ["adam", "adamw", "lamb", "adagrad", "lion"]
    torch_names = [n for n, v in vars(torch.optim).items()
                   if isinstance(v, type) and issubclass(v, torch.optim.Optimizer)]
    return list(DEEPSPEED_OPTIMIZERS) + torch_names + ["Ember"]


def _is_number(v) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(v)


def _check_zero_and_optimizer(ds_cfg: dict, ds_path) -> None:
    zero = ds_cfg.get("zero_optimization", {})
    stage = zero.get("stage", 0) if isinstance(zero, dict) else zero
    if stage not in (0, 1, 2, 3) or isinstance(stage, bool):
        raise ConfigError(f"{ds_path}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    opt = ds_cfg.get("optimizer")
    if not isinstance(opt, dict) or "type" not in opt:
        raise ConfigError(f"{ds_path}: needs an \"optimizer\": {{\"type\": ..., \"params\": ...}}")
    name, known = opt["type"], _optimizer_types()
    lowered = {k.lower(): k for k in known}
    if not isinstance(name, str) or (name.lower() not in lowered and name not in known):
        near = difflib.get_close_matches(str(name).lower(), list(lowered), n=1, cutoff=0.6)
        hint = f"did you mean {lowered[near[0]]!r}? " if near else ""
        raise ConfigError(f"{ds_path}: unknown optimizer type {name!r}; {hint}known: Ember, "
                          "AdamW, Adam, Lamb, Lion, Adagrad or a torch.optim class name")
    params = opt.get("params", {})
    if not isinstance(params, dict):
        raise ConfigError(f"{ds_path}: optimizer.params must be an object, got {params!r}")
    for key, v in params.items():
        numeric = key.split("_")[-1] in ("lr", "eps", "decay", "beta1", "beta2", "momentum")
        if key.endswith("betas"):
            ok = isinstance(v, (list, tuple)) and all(_is_number(b) for b in v)
        else:
            ok = not numeric or _is_number(v)
        if not ok:
            raise ConfigError(f"{ds_path}: optimizer.params.{key} must be a number"
                              f"{' pair' if key.endswith('betas') else ''}, got {v!r} (write it "
                              f"without quotes, e.g. --ds optimizer.params.{key}="
                              f"{'[0.9,0.95]' if key.endswith('betas') else '3e-4'})")


def check_with_deepspeed(ds_cfg: dict, ds_path, mpu=None) -> None:
    """Let DeepSpeed's own config parser see the ds_config before any data or model work (it
    needs the process group): a misspelled or mistyped entry becomes one line naming it,
    instead of a pydantic dump after the model is built. Only its validation errors count;
    anything else is left to deepspeed.initialize."""
    import sys

    from deepspeed.runtime.config import DeepSpeedConfig
    try:
        from pydantic import ValidationError
    except ImportError:
        return
    try:
        DeepSpeedConfig(copy.deepcopy(ds_cfg), mpu=mpu)
    except ValidationError as e:
        model = next((getattr(m, e.title) for name, m in list(sys.modules.items())
                      if name.startswith("deepspeed") and isinstance(getattr(m, e.title, None),
                                                                     type)), None)
        known = sorted(getattr(model, "model_fields", {})) if model else []
        section = next((k for k, v in ds_cfg.items() if isinstance(v, dict)
                        and any(err["loc"] and err["loc"][0] in v for err in e.errors())), None)
        parts = []
        for err in e.errors():
            key = ".".join(map(str, (section, *err["loc"]) if section else err["loc"]))
            near = difflib.get_close_matches(str(err["loc"][-1]), known, n=1) \
                if err.get("type") == "extra_forbidden" and err["loc"] else []
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            parts.append(f"{key}: {err['msg'].lower()}{hint}, got {err.get('input')!r}")
        raise ConfigError(f"{ds_path}: {'; '.join(parts)}") from None
    except Exception:       # noqa: BLE001 - not a config error of the user's: initialize decides
        return


def _check_folders(args) -> None:
    """--out / --save / --resume must be folders (or creatable ones) this user can write."""
    for flag, value in (("--out", args.out), ("--save", args.save),
                        ("--resume", None if args.resume in (None, "auto") else args.resume)):
        if not value:
            continue
        path = Path(value)
        if path.exists() and not path.is_dir():
            raise ConfigError(f"{flag} {path} is a file, not a folder; give a folder path")
        parent = path
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if flag != "--resume" and not os.access(parent, os.W_OK | os.X_OK):
            raise ConfigError(f"{flag} {path}: no permission to write in {parent}")


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
# Resume: what a checkpoint's train_state.json records, and what must match to continue it
# ------------------------------------------------------------------------------------------

MUST_MATCH = ("preset", "embedding", "vocab_size", "seq_length", "data_digest")
MAY_DIFFER = ("seed", "global_batch", "steps")
SHAPE = ("tp", "pp", "dp", "zero_stage")     # may change: --resume converts (launch/reshard.py)
LAYOUT_ONLY = ("params_dtype", "sequence_parallel", "recompute")   # model fields that may too


def shape_changed(old: dict, now: dict) -> list[str]:
    """What differs between a checkpoint's job shape and this run's (empty: DeepSpeed's own
    loader resumes it, bitwise); precision counts, DeepSpeed's files differ with it."""
    diffs = [f"{k} {old[k]} -> {now[k]}" for k in SHAPE if k in old and k in now and old[k] != now[k]]
    om, nm = old.get("model_config") or {}, now.get("model_config") or {}
    if om.get("params_dtype") and nm.get("params_dtype") and om["params_dtype"] != nm["params_dtype"]:
        diffs.append(f"params {om['params_dtype'].removeprefix('torch.')} -> "
                     f"{nm['params_dtype'].removeprefix('torch.')}")
    return diffs


def run_record(args, plan: dict, gcfg, zero_stage: int, prepared=None) -> dict:
    """The settings a checkpoint records (``prepared``: the data, once it is known)."""
    import dataclasses
    mc = {k: (v if isinstance(v, (int, float, str, bool, type(None), dict, list)) else str(v))
          for k, v in dataclasses.asdict(gcfg).items()} if dataclasses.is_dataclass(gcfg) else {}
    rec = dict(preset=args.preset, embedding=args.embedding, tp=args.tp,
               pp=plan.get("pp", 1), seed=args.seed,
               global_batch=plan["global_batch"], micro=plan["micro"], accum=plan["accum"],
               dp=plan["dp"], zero_stage=zero_stage, seq_length=plan["seq_length"],
               steps=plan["steps"], model_config=mc)
    if prepared is not None:
        rec.update(data_digest=prepared.digest, vocab_size=prepared.vocab_size)
    else:                                      # the vocabulary is known once the tokenizer is,
        mc.pop("vocab_size", None)             # unless this run trains one of --vocab-size
        if not getattr(args, "tokenizer", None) and getattr(args, "vocab_size", None):
            rec["vocab_size"] = args.vocab_size
    return rec


def check_resume(old: dict, now: dict, where) -> list[str]:
    """Refuse (one ConfigError line listing every difference) when the checkpoint at ``where``
    cannot continue this run; return warnings for settings that may change. Keys missing on
    either side (older checkpoints, data not prepared yet) are not compared."""
    def fmt(v):
        return f"{v[:12]}..." if isinstance(v, str) and len(v) > 16 else repr(v)
    diffs = [f"{k} {fmt(old[k])} (this run: {fmt(now[k])})" for k in MUST_MATCH
             if k in old and k in now and old[k] != now[k]]
    om, nm = old.get("model_config") or {}, now.get("model_config") or {}
    diffs += [f"model {k} {om[k]!r} (this run: {nm[k]!r})" for k in sorted(nm)
              if k in om and om[k] != nm[k] and k not in ("init_seed", "embedding")
              and k not in MUST_MATCH and k not in LAYOUT_ONLY]
    if diffs:
        raise ConfigError(
            f"cannot resume from {where}: it was saved with {', '.join(diffs)}; resume with the "
            "checkpoint's settings or start a new --save folder")
    return [f"resuming with {k} = {now[k]!r} (checkpoint: {old[k]!r}): the run will not match "
            "an uninterrupted one" for k in MAY_DIFFER if k in old and k in now and old[k] != now[k]]
