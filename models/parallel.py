"""Process groups for the models: torch.distributed start-up, megatron-core parallel_state,
and the adapter DeepSpeed needs to see megatron's tensor-parallel groups (its ``mpu``).

Works the same under torchrun, the deepspeed launcher, SLURM (after launch/ sets the env) and a
single plain ``python`` process (a world of one).
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_distributed(backend: str | None = None) -> None:
    """Start the default process group from the launcher's environment (RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT). A world of one (a plain ``python`` process, or a launcher with
    one rank) needs no rendezvous: it gets an in-process store and no port, so nothing it
    leaves in the environment can collide with another job. gloo on CPU, nccl on CUDA."""
    if dist.is_initialized():
        return
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        # DeepSpeed reads these even when the process group already exists
        for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
            os.environ.setdefault(key, "1" if "SIZE" in key else "0")
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
    else:
        dist.init_process_group(backend=backend)


def init_model_parallel(tensor_parallel: int = 1, seed: int = 1234,
                        pipeline_parallel: int = 1) -> None:
    """Initialise megatron-core parallel_state with ``tensor_parallel`` x ``pipeline_parallel``
    ranks per model replica (the rest is data parallel; rank order TP, DP, PP as megatron and
    DeepSpeed's pipeline topology both lay it out) and seed its RNG trackers. On CPU the
    tracker is seeded without touching torch.cuda."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import random as mcore_random

    init_distributed()
    world = dist.get_world_size()
    if world % (tensor_parallel * pipeline_parallel):
        raise ValueError(f"tensor parallel size {tensor_parallel} x pipeline parallel size "
                         f"{pipeline_parallel} does not divide the world size {world}")
    if ps.model_parallel_is_initialized():
        now = (ps.get_tensor_model_parallel_world_size(),
               ps.get_pipeline_model_parallel_world_size())
        if now != (tensor_parallel, pipeline_parallel):
            raise RuntimeError(f"megatron parallel_state is already initialised with TP x PP = "
                               f"{now[0]} x {now[1]}")
    else:
        ps.initialize_model_parallel(tensor_model_parallel_size=tensor_parallel,
                                     pipeline_model_parallel_size=pipeline_parallel)
    torch.manual_seed(seed)
    mcore_random.model_parallel_cuda_manual_seed(
        seed, inference_rng_tracker=not torch.cuda.is_available())


def destroy_model_parallel() -> None:
    from megatron.core import parallel_state as ps
    ps.destroy_model_parallel()


def tp_group():
    """The tensor-parallel group, or None when parallel_state is not initialised."""
    from megatron.core import parallel_state as ps
    return ps.get_tensor_model_parallel_group() if ps.model_parallel_is_initialized() else None


def tp_rank() -> int:
    from megatron.core import parallel_state as ps
    return ps.get_tensor_model_parallel_rank() if ps.model_parallel_is_initialized() else 0


def tp_size() -> int:
    from megatron.core import parallel_state as ps
    return ps.get_tensor_model_parallel_world_size() if ps.model_parallel_is_initialized() else 1


class MegatronMPU:
    """The ``mpu`` object DeepSpeed expects (``deepspeed.initialize(mpu=...)``), backed by
    megatron-core parallel_state: DeepSpeed then averages gradients over the data-parallel
    group only and partitions ZeRO state over it. Model parallel = tensor parallel here
    (no pipeline stages)."""

    def __init__(self):
        from megatron.core import parallel_state as ps
        self.ps = ps

    def get_model_parallel_group(self):
        return self.ps.get_tensor_model_parallel_group()

    def get_model_parallel_rank(self):
        return self.ps.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self):
        return self.ps.get_tensor_model_parallel_world_size()

    def get_model_parallel_src_rank(self):
        return self.ps.get_tensor_model_parallel_src_rank()

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_src_rank = get_model_parallel_src_rank

    def get_data_parallel_group(self):
        return self.ps.get_data_parallel_group()

    def get_data_parallel_rank(self):
        return self.ps.get_data_parallel_rank()

    def get_data_parallel_world_size(self):
        return self.ps.get_data_parallel_world_size()

    def get_data_parallel_group_ranks(self):
        return dist.get_process_group_ranks(self.ps.get_data_parallel_group())

