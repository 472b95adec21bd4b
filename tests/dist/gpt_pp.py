"""Rank script: the GPT trained through DeepSpeed's pipeline engine (models/pipeline.py) or, as
the reference, as one stage through the ordinary engine; fp32, ZeRO-1, 4 steps of 2+
micro-batches. Each rank saves its losses and its parameters, under GPT's names and unsharded
over TP (an all-gather), to $EMBER_TEST_OUT/<case>-rank<r>.pt; tests/test_pipeline.py compares.

usage: torchrun --nproc_per_node N gpt_pp.py CASE [CASE ...]
CASE = EMBEDDING:OPTIMIZER:TP:PP:DP   (PP 1: the single-stage reference, DP must be 1)
"""
import os
import sys
from pathlib import Path

from _common import finish

import torch
import torch.distributed as dist

from megatron.core import parallel_state as ps                     # noqa: E402
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed  # noqa: E402

import deepspeed                                                    # noqa: E402
import ember_ds                                                     # noqa: E402
from models.gpt import GPT, GPTConfig                               # noqa: E402
from models.parallel import MegatronMPU, init_distributed          # noqa: E402
from models.pipeline import gpt_name, gpt_pipeline, stage_param_groups  # noqa: E402
from launch.consolidate import join                                 # noqa: E402

V, S, MICRO, GLOBAL, STEPS = 256, 16, 2, 8, 4
LEV = dict(seed_dim=16, heads=4, knots=8, modes=8)


def config(embedding):
    return GPTConfig(vocab_size=V, hidden_size=32, num_layers=4, num_heads=4,
                     ffn_hidden_size=64, seq_length=S, embedding=embedding, leviathan=dict(LEV),
                     init_seed=5)


def ds_config(optimizer, dp):
    opt = {"type": "Ember", "params": {"lr": 3e-3, "body_lr": 2e-3, "body_weight_decay": 0.1}} \
        if optimizer == "ember" else \
        {"type": "AdamW", "params": {"lr": 2e-3, "weight_decay": 0.1, "torch_adam": True}}
    return {"train_micro_batch_size_per_gpu": MICRO, "train_batch_size": GLOBAL,
            "gradient_accumulation_steps": GLOBAL // (MICRO * dp), "gradient_clipping": 1.0,
            "optimizer": opt, "zero_optimization": {"stage": 1}, "steps_per_print": 10 ** 9,
            "zero_allow_untested_optimizer": True}


def batches():
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, V, (GLOBAL, S + 1), generator=g) for _ in range(STEPS)]


def unshard(p, tp_group):
    """The full tensor of a TP shard (GPT's partition attributes), gathered over TP."""
    tp = dist.get_world_size(tp_group)
    if tp == 1 or not getattr(p, "tensor_model_parallel", False):
        return p.detach().clone()
    parts = [torch.empty_like(p) for _ in range(tp)]
    dist.all_gather(parts, p.detach().contiguous(), group=tp_group)
    return join(parts, p)


def run(case):
    embedding, optimizer, tp, pp, dp = case.split(":")
    tp, pp, dp = int(tp), int(pp), int(dp)
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    model_parallel_cuda_manual_seed(1, inference_rng_tracker=True)
    assert ps.get_data_parallel_world_size() == dp
    cfg = config(embedding)
    data = batches()
    dp_rank = ps.get_data_parallel_rank()
    per_rank = GLOBAL // dp
    losses = []
    if pp == 1:
        model = GPT(cfg)
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                          config=ds_config(optimizer, dp), mpu=MegatronMPU())
        for batch in data:
            mine = batch[dp_rank * per_rank:(dp_rank + 1) * per_rank]
            total = 0.0
            for m in range(0, per_rank, MICRO):
                ids = mine[m:m + MICRO]
                loss = engine(ids[:, :-1], labels=ids[:, 1:]).mean()
                engine.backward(loss)
                engine.step()
                total += loss.item()
            losses.append(total / (per_rank // MICRO))
        named = list(model.named_parameters())
    else:
        module = gpt_pipeline(cfg, pp)
        engine, *_ = deepspeed.initialize(model=module,
                                          model_parameters=stage_param_groups(module),
                                          config=ds_config(optimizer, dp))
        for batch in data:
            mine = batch[dp_rank * per_rank:(dp_rank + 1) * per_rank]
            micro = iter([(mine[m:m + MICRO, :-1], mine[m:m + MICRO, 1:])
                          for m in range(0, per_rank, MICRO)])
            losses.append(engine.train_batch(micro).item())
        named = [(gpt_name(n, cfg.num_layers), p) for n, p in module.named_parameters()]
    opt = engine.basic_optimizer
    tables = []
    if optimizer == "ember":
        assert isinstance(opt, ember_ds.Ember), type(opt)
        names = {id(p): n for n, p in named}
        tables = [dict(name=names[id(p)], steps=opt.table_state(i).get("step", 0))
                  for i, p in enumerate(opt.token_tables)]
    tp_group = ps.get_tensor_model_parallel_group()
    params = {n: unshard(p, tp_group) for n, p in named}
    rank = dist.get_rank()
    torch.save(dict(losses=losses, params=params, tables=tables, stage=ps.get_pipeline_model_parallel_rank(),
                    wrapper=type(engine.optimizer).__name__),
               Path(os.environ["EMBER_TEST_OUT"]) / f"{case.replace(':', '_')}-rank{rank}.pt")
    dist.barrier()


def main():
    ember_ds.disable_cpu_shm_build()
    init_distributed()
    for case in sys.argv[1:]:
        run(case)
    finish({})


if __name__ == "__main__":
    main()
