"""Rank script: a small Hugging Face model (LLaMA or GPT-NeoX, untied head, built from a config,
no weights) trained by the real ``transformers.Trainer`` with a ds_config naming Ember whose
optimizer and scheduler params are HF's ``"auto"`` values, on CPU (``use_cpu=True``), gloo.

usage: torchrun --nproc_per_node 2 hf_trainer.py STAGE:MODEL[:accelerate] ...   (llama | neox)

``:accelerate`` runs the same through Accelerate alone (DeepSpeedPlugin, no Trainer).

Cases run one after the other in the same processes (Accelerate's singleton state is reset
between them), which saves a start-up of torch, DeepSpeed and transformers per case.

Writes per rank: the parameter names Ember factors, the losses the Trainer logged, each step's
learning rates (table groups and body groups) and the hyper-parameters Ember's groups hold.
"""
import sys
import tempfile

from _common import finish

import torch

import deepspeed
import ember_ds
import transformers
from transformers import Trainer, TrainerCallback, TrainingArguments

V, T, N_SEQ, MICRO, STEPS = 96, 16, 16, 4, 24
LR, WD, BETAS, EPS = 1e-2, 0.05, (0.8, 0.97), 1e-7
WARMUP = 3


def ds_config(stage):
    return {
        "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto", "gradient_clipping": "auto",
        "optimizer": {"type": "Ember", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                  "weight_decay": "auto"}},
        "scheduler": {"type": "WarmupDecayLR",
                      "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                 "warmup_num_steps": "auto", "total_num_steps": "auto",
                                 "warmup_type": "linear"}},
        "zero_optimization": {"stage": stage, "reduce_bucket_size": "auto",
                              "stage3_prefetch_bucket_size": "auto",
                              "stage3_param_persistence_threshold": "auto"},
        "steps_per_print": 10 ** 9,
    }


def build_model(kind):
    """Built after TrainingArguments, as HF scripts do: under ZeRO-3, ``from_config`` then
    partitions the parameters as they are made (deepspeed.zero.Init)."""
    torch.manual_seed(0)
    if kind == "llama":
        cfg = transformers.LlamaConfig(
            vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=T,
            tie_word_embeddings=False)
        expected = ["lm_head.weight", "model.embed_tokens.weight"]
    else:  # GPT-NeoX: untied head (named lm_head since transformers 5, embed_out before)
        cfg = transformers.GPTNeoXConfig(
            vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=T, tie_word_embeddings=False)
        expected = ["gpt_neox.embed_in.weight", "lm_head.weight"]
    return transformers.AutoModelForCausalLM.from_config(cfg), expected


class Data(torch.utils.data.Dataset):
    """N_SEQ fixed random sequences (same on every rank): a model can only lower its loss by
    learning them, so a falling loss means the optimizer really trains every table."""

    def __init__(self):
        g = torch.Generator().manual_seed(1234)
        self.ids = torch.randint(0, V, (N_SEQ, T), generator=g)

    def __len__(self):
        return N_SEQ

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class RecordLR(TrainerCallback):
    """The lr of every Ember group after each optimizer step, split into tables and body."""

    def __init__(self):
        self.table_lrs, self.body_lrs = [], []

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kw):
        groups = self.trainer.model_wrapped.basic_optimizer.param_groups
        self.table_lrs.append(sorted({g["lr"] for g in groups if g.get("token_table")}))
        self.body_lrs.append(sorted({g["lr"] for g in groups if not g.get("token_table")}))


def run(stage, kind):
    out = tempfile.mkdtemp()
    args = TrainingArguments(
        output_dir=out, deepspeed=ds_config(stage), use_cpu=True, max_steps=STEPS,
        per_device_train_batch_size=MICRO, learning_rate=LR, weight_decay=WD,
        adam_beta1=BETAS[0], adam_beta2=BETAS[1], adam_epsilon=EPS, warmup_steps=WARMUP,
        max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to="none",
        disable_tqdm=True, dataloader_num_workers=0, seed=0)
    print(f"rank {args.process_index}: device {args.device}")  # as HF's run_clm.py: sets up dist
    # On CPU Accelerate initialises torch.distributed but not DeepSpeed's comm layer, which
    # ZeRO-3's zero.Init (inside from_config) reads the world size from: tell DeepSpeed.
    deepspeed.init_distributed(dist_backend="gloo")
    model, expected = build_model(kind)
    rec = RecordLR()
    trainer = Trainer(model=model, args=args, train_dataset=Data(), callbacks=[rec])
    rec.trainer = trainer
    trainer.train()

    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return summarize(trainer.model_wrapped, trainer.model, expected, losses, rec.table_lrs,
                     rec.body_lrs)


def run_accelerate(stage, kind):
    """The same model, data and hyper-parameters through Accelerate alone: DeepSpeedPlugin with
    the ds_config, DummyOptim / DummyScheduler, a hand-written loop. Accelerate fills "auto"
    only from its own objects (lr and weight_decay from DummyOptim, the scheduler's from
    DummyScheduler, batch sizes from the loader), so betas and eps are numbers here."""
    from accelerate import Accelerator
    from accelerate.utils import (DeepSpeedPlugin, DummyOptim, DummyScheduler,
                                  InitProcessGroupKwargs)
    cfg = ds_config(stage)
    cfg["optimizer"]["params"].update(betas=list(BETAS), eps=EPS)
    cfg["gradient_clipping"] = 1.0
    # On CPU: no cpu=True (Accelerate 1.15 then turns DeepSpeed off) but the gloo backend named,
    # else Accelerate starts no process group on a machine without GPUs.
    accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=cfg),
                              kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
    model, expected = build_model(kind)
    loader = torch.utils.data.DataLoader(Data(), batch_size=MICRO)
    optimizer = DummyOptim(model.parameters(), lr=LR, weight_decay=WD)
    # DummyScheduler's total_num_steps counts over all processes (Accelerate divides it)
    scheduler = DummyScheduler(optimizer, total_num_steps=STEPS * accelerator.num_processes,
                               warmup_num_steps=WARMUP)
    engine, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader,
                                                               scheduler)
    ember = engine.basic_optimizer
    assert isinstance(ember, ember_ds.Ember), type(ember)
    losses, table_lrs, body_lrs = [], [], []
    batches = iter(())
    for _ in range(STEPS):
        batch = next(batches, None)
        if batch is None:
            batches = iter(loader)
            batch = next(batches)
        loss = engine(**batch).loss
        accelerator.backward(loss)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        losses.append(accelerator.reduce(loss.detach(), "mean").item())
        table_lrs.append(sorted({g["lr"] for g in ember.param_groups if g.get("token_table")}))
        body_lrs.append(sorted({g["lr"] for g in ember.param_groups if not g.get("token_table")}))
    return summarize(engine, model, expected, losses, table_lrs, body_lrs)


def summarize(engine, model, expected, losses, table_lrs, body_lrs):
    ember = engine.basic_optimizer
    assert isinstance(ember, ember_ds.Ember), type(ember)
    by_id = {id(p): n for n, p in model.named_parameters()}
    factored = sorted(by_id.get(id(t), f"<unnamed {tuple(t.shape)}>") for t in ember.token_tables)
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()
               if k in ("lr", "weight_decay", "eps", "betas", "beta2", "token_table")}
              for g in ember.param_groups]
    return dict(factored=factored, expected=expected, losses=losses, groups=groups,
                table_lrs=table_lrs, body_lrs=body_lrs,
                wrapper=type(engine.optimizer).__name__, zero_stage=engine.zero_optimization_stage(),
                hp=dict(lr=LR, weight_decay=WD, betas=list(BETAS), eps=EPS, steps=STEPS,
                        warmup=WARMUP))


def reset_accelerate():
    """Forget the previous case's Accelerator (its state, DeepSpeed plugin included, is a
    process-wide singleton); the process group stays."""
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


if __name__ == "__main__":
    ember_ds.disable_cpu_shm_build()
    results = {}
    for spec in sys.argv[1:]:
        stage, kind, *route = spec.split(":")
        results[spec] = (run_accelerate if route == ["accelerate"] else run)(int(stage), kind)
        reset_accelerate()
    finish(results)
