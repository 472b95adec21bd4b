"""Helpers for the rank scripts under tests/dist (run by torchrun, never by pytest)."""
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def write_result(obj) -> None:
    """Write this rank's result for the pytest side (conftest.torchrun) to read."""
    rank = int(os.environ.get("RANK", "0"))
    out = Path(os.environ["EMBER_TEST_OUT"]) / f"rank{rank}.json"
    out.write_text(json.dumps(obj))


def start_deepspeed_ranks() -> tuple[int, int]:
    """DeepSpeed's process group over gloo, without the CPU shared-memory op build; returns
    (rank, world)."""
    import deepspeed
    import torch.distributed as dist

    import ember_ds
    ember_ds.disable_cpu_shm_build()
    deepspeed.init_distributed(dist_backend="gloo")
    return dist.get_rank(), dist.get_world_size()


def finish(obj) -> None:
    """Write this rank's result, wait for every rank, and leave without interpreter teardown
    (DeepSpeed's offload threads and gloo can abort in atexit handlers after a clean run)."""
    import torch.distributed as dist
    write_result(obj)
    sys.stdout.flush()
    sys.stderr.flush()
    if dist.is_initialized():
        dist.barrier()
    os._exit(0)
