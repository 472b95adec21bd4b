"""Rank script: Ember on vocab-parallel tables (megatron-core VocabParallelEmbedding and a
column-parallel LM head) at TP = 2, alone and with DeepSpeed ZeRO at TP = 2 x DP = 2, against
a TP = 1 single-process reference (dense Ember math + torch AdamW) on the full tables.

usage: torchrun --nproc_per_node N ember_tp.py MODE [MODE ...]  (plain | zero1 | zero2 | zero3)
"""
import copy
import sys

from _common import finish

import torch
import torch.distributed as dist
from torch import nn

V, D, T, MICRO, STEPS = 96, 20, 10, 3, 5  # 96 rows: 48 per TP rank, cut mid-row by ZeRO
HP = dict(lr=2e-3, beta2=0.95, eps=1e-8, weight_decay=0.01)
BODY = dict(body_lr=1e-3, body_betas=[0.9, 0.95], body_weight_decay=0.02)


def build(tp_rank, tp_size):
    from megatron.core import ModelParallelConfig
    from megatron.core.tensor_parallel import ColumnParallelLinear, VocabParallelEmbedding
    from ember_ds import mark_token_table

    g = torch.Generator().manual_seed(7)
    full_emb, full_head = torch.randn(V, D, generator=g), torch.randn(V, D, generator=g) * 0.2
    body = nn.Linear(D, D)
    with torch.no_grad():
        body.weight.copy_(torch.randn(D, D, generator=g) * 0.3)
        body.bias.copy_(torch.randn(D, generator=g) * 0.1)
    cfg = ModelParallelConfig(tensor_model_parallel_size=tp_size, use_cpu_initialization=True,
                              perform_initialization=True)
    init = nn.init.zeros_

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = VocabParallelEmbedding(V, D, init_method=init, config=cfg)
            self.body = body
            self.head = ColumnParallelLinear(D, V, config=cfg, init_method=init, bias=False,
                                             gather_output=False)
            rows = V // tp_size
            with torch.no_grad():
                self.emb.weight.copy_(full_emb[tp_rank * rows:(tp_rank + 1) * rows])
                self.head.weight.copy_(full_head[tp_rank * rows:(tp_rank + 1) * rows])
            # the head's row split is read from megatron's tensor_model_parallel attributes;
            # the embedding is found as a VocabParallelEmbedding, untagged
            mark_token_table(self.head.weight, name="head")

        def forward(self, ids, tgt):
            from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
            h = torch.tanh(self.body(self.emb(ids)))
            logits, _ = self.head(h)
            return vocab_parallel_cross_entropy(logits.float(), tgt).mean()

    ref = nn.ModuleDict(dict(emb=nn.Embedding(V, D), body=copy.deepcopy(body),
                             head=nn.Linear(D, V, bias=False)))
    with torch.no_grad():
        ref.emb.weight.copy_(full_emb)
        ref.head.weight.copy_(full_head)
    return Net(), ref


def ref_loss(ref, ids, tgt):
    logits = ref.head(torch.tanh(ref.body(ref.emb(ids))))
    return nn.functional.cross_entropy(logits.reshape(-1, V), tgt.reshape(-1))


def run(mode):
    import ember_ds
    from ember_ds import Ember
    from models.parallel import MegatronMPU, init_model_parallel
    from megatron.core import parallel_state as ps
    from tests.ember_reference import ReferenceEmber

    ember_ds.disable_cpu_shm_build()
    init_model_parallel(tensor_parallel=2)
    torch.manual_seed(0)
    tp_rank, dp_rank = ps.get_tensor_model_parallel_rank(), ps.get_data_parallel_rank()
    dp = ps.get_data_parallel_world_size()
    model, ref = build(tp_rank, 2)
    if mode == "plain":
        engine, opt = model, Ember(model, **HP, **BODY)
    else:
        import deepspeed
        stage = int(mode[-1])
        cfg = {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": 1,
               "train_batch_size": MICRO * dp, "gradient_clipping": 0.0,
               "optimizer": {"type": "Ember", "params": {**HP, **BODY}},
               "zero_optimization": {"stage": stage}, "steps_per_print": 10 ** 9}
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                          config=cfg, mpu=MegatronMPU())
        opt = engine.basic_optimizer
    ref_t = ReferenceEmber([ref.emb.weight, ref.head.weight], **HP)
    ref_b = torch.optim.AdamW(ref.body.parameters(), lr=BODY["body_lr"],
                              betas=BODY["body_betas"], weight_decay=BODY["body_weight_decay"])
    g = torch.Generator().manual_seed(11)
    for _ in range(STEPS):
        ids = torch.randint(0, V, (MICRO * dp, T), generator=g)
        tgt = torch.randint(0, V, (MICRO * dp, T), generator=g)
        mine = slice(dp_rank * MICRO, (dp_rank + 1) * MICRO)
        loss = engine(ids[mine], tgt[mine])
        if mode == "plain":
            opt.zero_grad()
            loss.backward()
            opt.step()
        else:
            engine.backward(loss)
            engine.step()
        ref.zero_grad()
        ref_loss(ref, ids, tgt).backward()
        ref_t.step()
        ref_b.step()

    rows = V // 2
    sl = slice(tp_rank * rows, (tp_rank + 1) * rows)
    params = dict(emb=model.emb.weight, head=model.head.weight, body=model.body.weight)
    if mode == "zero3":
        import deepspeed
        with deepspeed.zero.GatheredParameters(list(params.values())):
            got = {k: v.detach().clone() for k, v in params.items()}
    else:
        got = {k: v.detach().clone() for k, v in params.items()}
    want = dict(emb=ref.emb.weight[sl], head=ref.head.weight[sl], body=ref.body.weight)
    errs = {k: ((got[k].double() - want[k].double()).abs().max()
                / want[k].double().abs().max()).item() for k in got}
    moved = ((got["emb"] - build(tp_rank, 2)[0].emb.weight).abs().max()).item()
    st = opt.table_state(0)
    return dict(errs=errs, moved=moved, tp_rank=tp_rank, dp_rank=dp_rank,
                r_len=int(st["r"].numel()), c_sum=st["c"].double().sum().item(),
                global_rows=[opt._table_info(t)[2] for t in range(len(opt.token_tables))],
                n_tables=len(opt.token_tables))


if __name__ == "__main__":
    finish({mode: run(mode) for mode in sys.argv[1:]})
