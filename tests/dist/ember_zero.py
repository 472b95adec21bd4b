"""Rank script: Ember through deepspeed.initialize with a ds_config under ZeRO 0-3 (fp32 and
bf16), compared with a single-process reference (dense Ember math on the tables, torch AdamW on
the body) fed the averaged gradients; then checkpoint save / resume.

usage: torchrun --nproc_per_node 2 ember_zero.py STAGE:DTYPE [STAGE:DTYPE ...]
"""
import copy
import sys
import tempfile

from _common import finish, start_deepspeed_ranks

import torch
import torch.distributed as dist
from torch import nn

import deepspeed
import ember_ds
from ember_ds import mark_token_table
from tests.ember_reference import ReferenceEmber

V_IN, V_OUT, D, T, MICRO, STEPS = 300, 257, 48, 12, 4, 5
HP = dict(lr=2e-3, beta2=0.95, eps=1e-8, weight_decay=0.01)
BODY = dict(body_lr=1e-3, body_betas=[0.9, 0.95], body_weight_decay=0.02)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V_IN, D)          # untagged: found through engine.module
        self.mix = nn.Linear(D, D)
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, V_OUT, bias=False)
        mark_token_table(self.head.weight, name="head")

    def forward(self, ids):
        return self.head(self.norm(torch.tanh(self.mix(self.emb(ids)))))


def loss_fn(model, ids, tgt):
    logits = model(ids).float()
    return nn.functional.cross_entropy(logits.reshape(-1, V_OUT), tgt.reshape(-1))


def batches(world):
    g = torch.Generator().manual_seed(123)
    for _ in range(STEPS + 4):
        ids = torch.randint(0, V_IN, (MICRO * world, T), generator=g)
        tgt = torch.randint(0, V_OUT, (MICRO * world, T), generator=g)
        yield ids, tgt


def ds_config(stage, dtype, world, client=False, offload=False):
    cfg = {
        "train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": 1,
        "train_batch_size": MICRO * world, "gradient_clipping": 0.0,
        "optimizer": {"type": "Ember", "params": {**HP, **BODY}},
        "zero_optimization": {"stage": stage},
        "steps_per_print": 10 ** 9, "wall_clock_breakdown": False,
    }
    if dtype in ("bf16", "bf16acc"):
        cfg["bf16"] = {"enabled": True}
    if dtype == "bf16acc":  # stage 1 + bf16 + fp32 accumulation: DeepSpeed's BF16_Optimizer
        cfg["data_types"] = {"grad_accum_dtype": "fp32"}
    if client:
        del cfg["optimizer"]
    if offload:
        cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
        cfg["zero_force_ds_cpu_optimizer"] = False
    return cfg


def full_params(engine, stage):
    params = list(engine.module.parameters())
    if stage == 3:
        with deepspeed.zero.GatheredParameters(params):
            return [p.detach().float().clone() for p in params]
    return [p.detach().float().clone() for p in params]


def run(stage, dtype, rank, world, client=False, offload=False, zero_init=False):
    torch.manual_seed(0)
    if zero_init:  # parameters partitioned as they are built: tables seen only through ds_shape
        ref = Net()
        with deepspeed.zero.Init(config_dict_or_path=ds_config(stage, dtype, world)):
            model = Net()
        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0):
            if rank == 0:
                for p, q in zip(model.parameters(), ref.parameters()):
                    p.data.copy_(q.data)
        assert model.emb.weight.shape == (0,) or model.emb.weight.numel() < V_IN * D
    else:
        model = Net()
        ref = copy.deepcopy(model)
    kw = {}
    if client:  # the explicit route: an Ember instance instead of the ds_config section
        kw["optimizer"] = ember_ds.Ember(model, **HP, **BODY)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                      config=ds_config(stage, dtype, world, client, offload),
                                      **kw)
    ember = engine.basic_optimizer
    assert isinstance(ember, ember_ds.Ember), type(ember)
    ref_tables = ReferenceEmber([ref.emb.weight, ref.head.weight], **HP)
    ref_body = torch.optim.AdamW([ref.mix.weight, ref.mix.bias, ref.norm.weight, ref.norm.bias],
                                 lr=BODY["body_lr"], betas=BODY["body_betas"],
                                 weight_decay=BODY["body_weight_decay"])
    losses, ref_losses = [], []
    data = list(batches(world))
    for step in range(STEPS):
        ids, tgt = data[step]
        mine = slice(rank * MICRO, (rank + 1) * MICRO)
        loss = loss_fn(engine, ids[mine], tgt[mine])
        engine.backward(loss)
        engine.step()
        t = loss.detach().clone()
        dist.all_reduce(t)
        losses.append(t.item() / world)
        ref.zero_grad(set_to_none=True)
        rl = loss_fn(ref, ids, tgt)
        rl.backward()
        ref_tables.step()
        ref_body.step()
        ref_losses.append(rl.item())
    got = full_params(engine, stage)
    names = [n for n, _ in engine.module.named_parameters()]
    errs = {}
    for n, a, b in zip(names, got, [p.detach() for p in ref.parameters()]):
        errs[n] = ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()
    st = ember.table_state(0)
    result = dict(errs=errs, losses=losses, ref_losses=ref_losses,
                  state_dtype=str(st["r"].dtype), r_sum=st["r"].double().sum().item(),
                  c_sum=st["c"].double().sum().item(), step=st["step"],
                  n_tables=len(ember.token_tables),
                  state_bytes=ember_ds.state_bytes(ember), wrapper=type(engine.optimizer).__name__,
                  cut_rows=sum(1 for _, u in ember._units.values() for sg in u.segments
                               if sg.start_in_table % D or (sg.start_in_table + sg.length) % D))
    if stage in (1, 2, 3) and dtype == "fp32" and not (client or offload or zero_init):
        result["resume"] = resume_check(stage, dtype, world, rank, data)
    return result


def resume_check(stage, dtype, world, rank, data):
    """3 steps, save, 2 more; a fresh engine loads the checkpoint and repeats the last 2."""
    mine = slice(rank * MICRO, (rank + 1) * MICRO)

    def new_engine():
        torch.manual_seed(0)
        model = Net()
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                          config=ds_config(stage, dtype, world))
        return engine

    def train(engine, steps):
        out = []
        for s in steps:
            ids, tgt = data[s]
            loss = loss_fn(engine, ids[mine], tgt[mine])
            engine.backward(loss)
            engine.step()
            out.append(loss.item())
        return out

    path = [tempfile.mkdtemp(prefix="ember_ckpt_") if rank == 0 else None]
    dist.broadcast_object_list(path)
    engine = new_engine()
    train(engine, range(3))
    engine.save_checkpoint(path[0], tag="s3")
    tail = train(engine, range(3, 5))
    engine2 = new_engine()
    engine2.load_checkpoint(path[0], tag="s3")
    st = engine2.basic_optimizer.table_state(0)
    loaded_step, loaded_dtype = st.get("step"), str(st["r"].dtype) if st else None
    tail2 = train(engine2, range(3, 5))
    return dict(tail=tail, tail_resumed=tail2, loaded_step=loaded_step, loaded_dtype=loaded_dtype)


def main():
    rank, world = start_deepspeed_ranks()
    out = {}
    for spec in sys.argv[1:]:
        stage, dtype, *rest = spec.split(":")
        out[spec] = run(int(stage), dtype, rank, world, client="client" in rest,
                        offload="offload" in rest, zero_init="zeroinit" in rest)
    # ds_config mistakes are one-line errors that name the fix
    mistakes = {"bad_key_error": ("params", "beta_2", 0.99), "typo_type": ("type", None, "Embr"),
                "lr_string": ("params", "lr", "3e-3"), "lr_auto": ("params", "lr", "auto"),
                "no_match": ("params", "exclude_tables", ["*.nope"])}
    for label, (where, key, value) in mistakes.items():
        cfg = ds_config(1, "fp32", world)
        if where == "type":
            cfg["optimizer"]["type"] = value
        else:
            cfg["optimizer"]["params"][key] = value
        try:
            deepspeed.initialize(model=Net(), config=cfg)
            out[label] = None
        except ValueError as e:
            out[label] = str(e)
    # the type in any case; HF's "betas" key are the body's betas
    cfg = ds_config(1, "fp32", world)
    cfg["optimizer"]["type"] = "ember"
    cfg["optimizer"]["params"].pop("body_betas", None)
    cfg["optimizer"]["params"]["betas"] = [0.8, 0.9]
    engine, *_ = deepspeed.initialize(model=Net(), config=cfg)
    out["lowercase_type"] = type(engine.basic_optimizer).__name__
    out["betas"] = list(engine.basic_optimizer._body.param_groups[0]["betas"])
    finish(out)


if __name__ == "__main__":
    main()
