"""Rank script: Hugging Face models (built from configs) with `"optimizer": {"type": "Ember"}`
in a ds_config under ZeRO 1/2/3, compared with a single-process Ember on the full batch.

For each model and stage it records the parameter names Ember factors, the summary rank 0
printed at initialize, and the largest difference of the tables (relative) and of the body
(absolute) from the single-process run after a few steps (fp32; per-rank mean losses averaged over 2 equal
micro-batches are the full-batch mean, so the gradients are the same).

usage: torchrun --nproc_per_node 2 ember_hf.py MODEL:STAGE [MODEL:STAGE ...]
"""
import contextlib
import copy
import io
import sys

from _common import finish, start_deepspeed_ranks

import torch

import deepspeed
import ember_ds
import transformers

V, T, MICRO, STEPS = 211, 12, 2, 3
PARAMS = dict(lr=3e-3, beta2=0.95, weight_decay=0.01, betas=[0.9, 0.95])


def build(name):
    torch.manual_seed(0)
    if name == "gpt2":   # tied head; a learned position table (wpe) that must stay body
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=V, n_embd=32, n_layer=1, n_head=2, n_positions=32, resid_pdrop=0.0,
            embd_pdrop=0.0, attn_pdrop=0.0))
    if name == "llama":  # untied lm_head (an nn.Linear)
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False))
    raise ValueError(name)


def ds_config(stage, world):
    return {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": 1,
            "train_batch_size": MICRO * world, "gradient_clipping": 0.0,
            "optimizer": {"type": "Ember", "params": dict(PARAMS)},
            "zero_optimization": {"stage": stage}, "steps_per_print": 10 ** 9}


def params_of(model, stage):
    ps = list(model.parameters())
    ctx = deepspeed.zero.GatheredParameters(ps) if stage == 3 else contextlib.nullcontext()
    with ctx:
        return {n: p.detach().clone() for n, p in model.named_parameters()}


def run(name, stage, rank, world):
    model = build(name)
    ref = copy.deepcopy(model)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                          config=ds_config(stage, world))
    opt = engine.basic_optimizer
    names = {id(p): n for n, p in engine.module.named_parameters()}
    factored = sorted(names[id(p)] for p in opt.token_tables)

    ref_params = dict(PARAMS)
    ref_params["body_betas"] = ref_params.pop("betas")
    ref_opt = ember_ds.Ember(ref, **ref_params)
    g = torch.Generator().manual_seed(7)
    losses = []
    for _ in range(STEPS):
        ids = torch.randint(0, V, (MICRO * world, T), generator=g)
        mine = ids[rank * MICRO:(rank + 1) * MICRO]
        loss = engine(input_ids=mine, labels=mine).loss
        engine.backward(loss)
        engine.step()
        ref_opt.zero_grad()
        ref_loss = ref(input_ids=ids, labels=ids).loss
        ref_loss.backward()
        ref_opt.step()
        losses.append(ref_loss.item())
    got, want = params_of(engine.module, stage), dict(ref.named_parameters())
    diff = {n: (got[n].double() - want[n].double()).abs().max().item() for n in want}
    table_err = max(diff[n] / want[n].double().abs().max().item() for n in factored)
    # body: absolute (a bias whose gradient is zero in exact arithmetic, like GPT-2's key bias,
    # gets AdamW steps driven by rounding noise, so its relative error means nothing)
    body = [n for n in want if n not in factored]
    moved = max((want[n] - p).abs().max().item() for n, p in build(name).named_parameters())
    return dict(factored=factored, summary=printed.getvalue(), table_err=table_err,
                body_abs=max(diff[n] for n in body), worst=max(body, key=diff.get),
                moved=moved, losses=losses)


def main():
    rank, world = start_deepspeed_ranks()
    out = {}
    for spec in sys.argv[1:]:
        name, stage = spec.split(":")
        out[spec] = run(name, int(stage), rank, world)
    finish(out)


if __name__ == "__main__":
    main()
