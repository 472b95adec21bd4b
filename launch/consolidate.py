"""A checkpoint of launch/train.py, of any TP / PP / DP shape and ZeRO stage, as one plain GPT
(TP = 1, PP = 1).

    from launch.consolidate import load_consolidated
    model, state = load_consolidated("ckpt")        # the --save folder, or one step folder

The weights are launch/reshard.py's shape-free ones (the fp32 masters from the optimizer
partitions). ``shard_state_dicts`` is a second, independent reader of DeepSpeed's module files
(every TP rank's low-precision shard in full, ``mp_rank_XX_model_states.pt``; under pipeline
parallelism ``layer_LL-model_XX-model_states.pt``): what a checkpoint without ZeRO holds, and a
check of the first. ``join`` puts TP shards together along each parameter's tensor-parallel
dimension as GPT's partition attributes say (stride, fused blocks). Nothing needs a process
group of more than one rank.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import torch

TRAIN_STATE = "train_state.json"


def notices(tool: str):
    """Where a reader's checkpoint notices go: one line on stderr, ``[tool] warning: ...``."""
    return lambda m: print(f"[{tool}] {m}", file=sys.stderr, flush=True)


def run_reader(checkpoint, work):
    """(0, work()) or, when it fails, (2, None) after one line ``error: ...`` on stderr: the
    readers' (export, generate, evaluate) command-line errors, never a traceback for a
    checkpoint that cannot be used (ConfigError: none of its steps is intact)."""
    try:
        return 0, work()
    except (OSError, ValueError) as e:
        message = str(e)
    except RuntimeError as e:                   # torch / safetensors reading a file
        message = f"{checkpoint}: {(str(e).strip().splitlines() or [type(e).__name__])[0]}"
    print(f"error: {message}", file=sys.stderr, flush=True)
    return 2, None


def checkpoint_folder(path, log=None, flag: str = "--checkpoint") -> Path:
    """The step folder of ``path`` (a --save folder or one step folder), chosen and verified
    exactly as ``train.py --resume`` does: launch.checkpoint.open_checkpoint, the one owner of
    the checkpoint folder format (ConfigError, one line, when none is intact)."""
    from launch.checkpoint import open_checkpoint
    return open_checkpoint(path, log=log or notices("consolidate"), flag=flag)


TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")


def _tokenizer_in(folder: Path):
    """The first of TOKENIZER_FILES in ``folder``, or None."""
    return next((folder / n for n in TOKENIZER_FILES if (folder / n).is_file()), None)


def find_tokenizer(path, given=None) -> Path:
    """The tokenizer train.py keeps beside its checkpoints (the --save folder), or an export
    folder's copy; ``given`` (a file, or a folder holding one) wins."""
    if given:
        given = Path(given).expanduser()
        if given.is_file():
            return given
        if not given.is_dir():
            raise FileNotFoundError(f"--tokenizer {given}: no such file or folder")
        found = _tokenizer_in(given)
        if found is None:
            raise FileNotFoundError(f"--tokenizer {given}: the folder holds no tokenizer.model "
                                    f"or tokenizer.json")
        return found
    path = Path(path)
    for folder in (path, path.parent, path.parent.parent):
        found = _tokenizer_in(folder)
        if found is not None:
            return found
    raise FileNotFoundError(f"no tokenizer next to {path} (tokenizer.model / tokenizer.json); "
                            f"give --tokenizer")


def model_config(state: dict):
    """The GPTConfig a checkpoint was trained with."""
    from models.gpt import GPTConfig
    fields = dict(state["model_config"])
    dtype = fields.get("params_dtype")
    if isinstance(dtype, str):
        fields["params_dtype"] = getattr(torch, dtype.removeprefix("torch."))
    return GPTConfig(**{k: v for k, v in fields.items() if k in GPTConfig.__dataclass_fields__})


def shard_state_dicts(folder: Path, state: dict) -> list[dict]:
    """One state dict per TP rank, in GPT's parameter names (tensors only)."""
    tp, pp = int(state.get("tp", 1)), int(state.get("pp", 1))
    if int(state.get("zero_stage", 0)) == 3:
        if tp > 1:
            raise ValueError(f"{folder}: a ZeRO-3 checkpoint at TP {tp} cannot be consolidated "
                             f"yet (TP 1 can)")
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        return [dict(get_fp32_state_dict_from_zero_checkpoint(str(folder.parent),
                                                               tag=folder.name))]
    shards = [{} for _ in range(tp)]
    if pp > 1:
        from models.pipeline import gpt_name
        layers = int(state["model_config"]["num_layers"])
        for f in sorted(folder.glob("layer_*-model_*-model_states.pt")):
            index, rank = map(int, re.match(r"layer_(\d+)-model_(\d+)-", f.name).groups())
            for k, v in torch.load(f, map_location="cpu", weights_only=False).items():
                shards[rank][gpt_name(f"{index}.{k}", layers)] = v
    else:
        for rank in range(tp):
            f = folder / f"mp_rank_{rank:02d}_model_states.pt"
            shards[rank] = torch.load(f, map_location="cpu", weights_only=False)["module"]
    return [{k: v for k, v in s.items() if torch.is_tensor(v)} for s in shards]


def join(shards: list, param) -> torch.Tensor:
    """The full tensor of ``param`` (a TP = 1 GPT parameter carrying GPT's partition
    attributes) from its TP shards."""
    if len(shards) == 1 or not getattr(param, "tensor_model_parallel", False):
        return shards[0]
    dim, tp = param.partition_dim, len(shards)
    blocks = getattr(param, "partition_blocks", None)
    if blocks is not None:
        parts = [s.split([b // tp for b in blocks], dim=dim) for s in shards]
        stride = len(blocks)
    else:
        stride = getattr(param, "partition_stride", 1)
        parts = [s.chunk(stride, dim=dim) for s in shards]
    return torch.cat([parts[r][j] for j in range(stride) for r in range(tp)], dim=dim)


def load_consolidated(path, log=None):
    """(GPT at TP = 1 holding the checkpoint's weights in fp32, its train_state dict). ``path``:
    a --save folder or a step folder, chosen and verified as a resume does
    (``checkpoint_folder``). The weights are launch/reshard.py's shape-free ones: the fp32
    masters of any ZeRO stage, TP and PP shape (bf16 runs lose nothing)."""
    return load_folder(checkpoint_folder(path, log))


def load_folder(folder):
    """``load_consolidated`` of a step folder that ``checkpoint_folder`` chose (verified)."""
    from launch.reshard import read_universal
    from models.gpt import GPT
    folder = Path(folder)
    state = json.loads((folder / TRAIN_STATE).read_text())
    cfg = model_config(state)
    cfg.params_dtype = torch.float32
    model = GPT(cfg)
    weights = read_universal(folder, optimizer=False, verified=True).params
    full = {}
    for name, p in model.named_parameters():
        t = weights[name]
        if name in ("embedding.weight", "lm_head.weight"):    # the real rows, padded for TP 1
            t = torch.cat([t, t.new_zeros(p.shape[0] - t.shape[0], *t.shape[1:])])
        if t.shape != p.shape:
            raise ValueError(f"{folder}: parameter {name} is {tuple(t.shape)}, the model has "
                             f"{tuple(p.shape)}")
        full[name] = t
    model.load_state_dict(full, strict=False)
    return model, state
