"""The GPT of models/gpt.py as a DeepSpeed pipeline: its layers split over PP stages.

    from models.pipeline import gpt_pipeline
    module = gpt_pipeline(cfg, pp=2)                       # a deepspeed.pipe.PipelineModule
    engine, *_ = deepspeed.initialize(model=module, model_parameters=module.parameters(),
                                      config=ds_config, mpu=...)  # a PipelineEngine
    loss = engine.train_batch(data_iter)                 # data_iter yields (ids, labels)

Why DeepSpeed's pipeline engine (and not megatron-core's schedules): the rest of the stack is
a DeepSpeed engine (ZeRO-1, checkpoints, the ds_config's micro-batches and gradient
accumulation, Ember registered as its optimizer); the pipeline engine keeps all of that, and
the micro-batches per step are the ds_config's ``gradient_accumulation_steps``, as DeepSpeed
and Megatron-DeepSpeed users expect. Megatron-DeepSpeed's GPTModelPipe is the precedent.

The stages: the input embedding (dense vocab-parallel table or Leviathan) on the first, the
decoder blocks split evenly, the final norm, the LM head and the loss on the last. Activations
between stages are the residual stream [s, b, D] (the full sequence: sequence parallelism is
not combined with PP here). Tensor parallelism works inside every stage as in GPT.

Weights are GPT's: the layers are taken from a GPT built with the same config, so a pipeline
starts from exactly the weights of the single-stage model (each rank keeps only its stage's
layers; the others are freed once the pipeline is built).
"""
from __future__ import annotations

import torch
from torch import nn

from models.gpt import GPT, GPTConfig


class EmbeddingStage(nn.Module):
    """ids [b, s] -> residual stream [s, b, D]."""

    def __init__(self, gpt: GPT):
        super().__init__()
        self.embedding = gpt.embedding
        self.kind = gpt.embedding_kind

    def forward(self, ids):
        return self.embedding(ids.t().contiguous())


class BlockStage(nn.Module):
    """One decoder block; carries its own rotary tables (each stage needs them)."""

    def __init__(self, gpt: GPT, index: int):
        super().__init__()
        self.block = gpt.layers[index]
        self.full_recompute = gpt.cfg.recompute == "full"
        self.register_buffer("rope_cos", gpt.rope_cos, persistent=False)
        self.register_buffer("rope_sin", gpt.rope_sin, persistent=False)

    def forward(self, x):
        if self.full_recompute and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint
            return checkpoint(self.block, x, self.rope_cos, self.rope_sin, use_reentrant=False)
        return self.block(x, self.rope_cos, self.rope_sin)


class HeadStage(nn.Module):
    """Final norm and the untied LM head: [s, b, D] -> this rank's logits [s, b, V/tp]
    (padded vocabulary columns -inf)."""

    def __init__(self, gpt: GPT):
        super().__init__()
        self.norm = gpt.norm
        self.lm_head = gpt.lm_head
        self._mask = gpt._mask_padded_vocab

    def forward(self, x):
        logits, _ = self.lm_head(self.norm(x))
        return self._mask(logits)


def lm_loss(logits, labels):
    """Mean token loss of [s, b, V/tp] logits against [b, s] labels (vocab-parallel)."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
    return vocab_parallel_cross_entropy(logits.float(), labels.t().contiguous()).mean()


def pipeline_layers(gpt: GPT) -> list:
    return [EmbeddingStage(gpt), *(BlockStage(gpt, i) for i in range(len(gpt.layers))),
            HeadStage(gpt)]


def gpt_pipeline(cfg: GPTConfig, pp: int):
    """A deepspeed PipelineModule of ``pp`` stages over megatron-core parallel_state's layout
    (TP fastest, then DP, then PP: the rank order megatron and DeepSpeed's
    PipeModelDataParallelTopology share). parallel_state must be initialised with
    pipeline_model_parallel_size = pp."""
    from deepspeed.pipe import PipelineModule
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
    from megatron.core import parallel_state as ps

    if cfg.num_layers % pp:
        raise ValueError(f"--pp {pp} does not divide num_layers {cfg.num_layers} (each stage "
                         f"takes the same number of decoder layers)")
    if cfg.sequence_parallel and ps.get_tensor_model_parallel_world_size() > 1:
        raise ValueError("sequence parallelism is not supported with pipeline parallelism")
    import deepspeed
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    tp = ps.get_tensor_model_parallel_world_size()
    dp = ps.get_data_parallel_world_size()
    topo = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp)
    gpt = GPT(cfg)
    module = PipelineModule(pipeline_layers(gpt), topology=topo, loss_fn=lm_loss,
                            partition_method="type:BlockStage")
    module.gpt_config = cfg
    module.param_counts = gpt.param_counts()     # global counts, before the other stages go
    return module




def stage_param_groups(module: nn.Module) -> list:
    """This stage's parameters as groups, the same number on every rank of the world: the token
    tables (if any) and the body, the body split further where a stage has fewer groups.

    DeepSpeed's ZeRO-1 computes the gradient norm group by group, each with an all-reduce over
    the model-parallel group, which spans the pipeline stages: stages with different numbers of
    groups (a stage holding a table gets Ember's table group, a middle stage none) would wait
    on each other forever. Splitting a body group changes no update (same hyperparameters)."""
    import torch.distributed as dist

    from ember_ds.tables import is_token_table
    params = [p for p in module.parameters() if p.requires_grad]
    tables = [p for p in params if is_token_table(p)]
    body = [p for p in params if not is_token_table(p)]
    groups = ([{"params": tables}] if tables else []) + [{"params": body}]
    count = torch.tensor([len(groups)], dtype=torch.int64)
    if dist.is_initialized():
        if dist.get_backend() == "nccl":
            count = count.cuda()
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
    while len(groups) < int(count.item()):
        if len(groups[-1]["params"]) < 2:
            raise ValueError("a pipeline stage has too few parameters to match the other "
                             "stages' parameter groups")
        groups.insert(-1, {"params": groups[-1]["params"][:1]})
        groups[-1]["params"] = groups[-1]["params"][1:]
    return groups


def gpt_name(pipe_name: str, num_layers: int) -> str:
    """The GPT parameter name of a pipeline parameter ("3.block.mlp.down.weight" ->
    "layers.2.mlp.down.weight"): checkpoints and comparisons speak GPT's names."""
    index, rest = pipe_name.split(".", 1)
    index = int(index)
    if index == 0:
        return rest                                   # embedding.*
    if index <= num_layers:
        return f"layers.{index - 1}.{rest.removeprefix('block.')}"
    return rest                                       # norm.*, lm_head.*


__all__ = ["BlockStage", "EmbeddingStage", "HeadStage", "gpt_name", "gpt_pipeline", "lm_loss",
           "pipeline_layers", "stage_param_groups"]
