"""A training script that never imports ember_ds: DeepSpeed engine from a ds_config naming
Ember (ZeRO-2, one CPU process, gloo), a few steps. Run as a plain ``python`` script by
tests/test_autoload.py, in a fresh interpreter whose site-packages hold ember-ds.

usage: python autoload_script.py OUT.json

Writes what the process saw (whether ember_ds was imported before deepspeed, the optimizer's
class, the tables it factors, the losses) and lets any error propagate.
"""
import importlib
import json
import os
import sys

for k, v in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1").items():
    os.environ.setdefault(k, v)
os.environ.setdefault("MASTER_PORT", sys.argv[2] if len(sys.argv) > 2 else "29533")

import torch  # noqa: E402
from torch import nn  # noqa: E402

result = {"ember_ds_before_deepspeed": "ember_ds" in sys.modules}
import deepspeed  # noqa: E402

result["ember_ds_after_deepspeed"] = "ember_ds" in sys.modules
# Test harness, not the route under test: skip the CPU shared-memory op DeepSpeed compiles
# with g++ at init (about 40 s on a fresh machine); gloo does the collectives.
importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda *a, **k: None

V, D, T, MICRO = 64, 16, 8, 4


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(V, D)
        self.mix = nn.Linear(D, D)
        self.out = nn.Linear(D, V, bias=False)   # untied head, not tagged: plain torch model

    def forward(self, ids):
        return self.out(torch.tanh(self.mix(self.tok(ids))))


def main(out_path):
    torch.manual_seed(0)
    model = Net()
    cfg = {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": 1,
           "optimizer": {"type": "Ember", "params": {"lr": 1e-2, "body_lr": 1e-2}},
           "zero_optimization": {"stage": 2}, "steps_per_print": 10 ** 9}
    deepspeed.init_distributed(dist_backend="gloo")
    with open(out_path, "w") as f:   # what was imported before the engine is built
        json.dump(result, f)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                      config=cfg)
    opt = engine.basic_optimizer
    names = {id(p): n for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (MICRO, T), generator=g)
    before = model.tok.weight.detach().clone()
    losses = []
    for _ in range(6):
        logits = engine(ids[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, V), ids[:, 1:].reshape(-1))
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    result.update(
        optimizer=f"{type(opt).__module__}.{type(opt).__name__}",
        tables=sorted(names.get(id(t), "?") for t in getattr(opt, "token_tables", [])),
        tok_moved=(model.tok.weight.detach() - before).abs().max().item(), losses=losses,
        ember_ds_file=getattr(sys.modules.get("ember_ds"), "__file__", None))
    with open(out_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1])
