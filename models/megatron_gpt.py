"""Put the Leviathan generator into megatron-core's own GPTModel.

    from megatron.core.models.gpt import GPTModel
    from models.megatron_gpt import use_leviathan_in_gpt_model

    model = GPTModel(config, layer_spec, vocab_size=padded_vocab, max_sequence_length=s, ...)
    generator = use_leviathan_in_gpt_model(model, heads=8, modes=64)

GPTModel's LanguageModelEmbedding calls ``word_embeddings(input_ids [b, s])`` and expects
[b, s, h] (then transposes to [s, b, h], adds nothing for RoPE models, applies the embedding
dropout and, under sequence parallelism, scatters the sequence), or, when it reduce-scatters the
embedding itself (sequence parallelism without a learned position table), expects [s/tp, b, h]
directly. The generator maps ids of any shape to [..., h] already reduced over TP, so it takes
the place of ``word_embeddings``; in the reduce-scatter case it is wrapped so that it sees
[s, b] ids and reduce-scatters its output over the sequence like VocabParallelEmbedding does.
Everything else in LanguageModelEmbedding (position table, dropout, fp32 residual) stays.
"""
from __future__ import annotations

from torch import nn

from ember_ds.tables import mark_token_table


class _SequenceParallelIds(nn.Module):
    """[b, s] ids -> [s/tp, b, h]: transposes the ids for a sequence-parallel generator."""

    def __init__(self, generator: nn.Module):
        super().__init__()
        self.generator = generator

    def forward(self, input_ids):
        return self.generator(input_ids.t().contiguous())

    def materialize(self):
        return self.generator.materialize()


def use_leviathan_in_gpt_model(gpt_model, *, vocab_size: int | None = None,
                               **leviathan_kwargs):
    """Replace ``gpt_model.embedding.word_embeddings`` (a VocabParallelEmbedding) of a
    megatron-core GPTModel by a LeviathanGenerator and return the generator.

    ``vocab_size`` defaults to the model's (padded) vocabulary; ``leviathan_kwargs`` go to
    LeviathanGenerator (coords, seed_dim, heads, knots, modes, init_seed, ...). The generator
    uses the embedding's TP group, the model's params_dtype and its device. The output layer
    (untied LM head) is tagged as a token table for Ember; the generator's parameters are body.
    A model that ties its input and output embeddings cannot drop the input table: that raises
    ValueError.
    """
    from models.leviathan import LeviathanGenerator

    if not getattr(gpt_model, "pre_process", True) or not hasattr(gpt_model, "embedding"):
        raise ValueError("this GPTModel stage has no input embedding (pre_process=False)")
    if getattr(gpt_model, "share_embeddings_and_output_weights", False):
        raise ValueError("the GPTModel ties its input and output embeddings; build it with "
                         "share_embeddings_and_output_weights=False to use Leviathan")
    emb = gpt_model.embedding
    old = emb.word_embeddings
    tp_group = getattr(emb, "tp_group", None) or getattr(old, "tp_group", None)
    reduce_scatter = bool(getattr(emb, "reduce_scatter_embeddings", False))
    leviathan_kwargs.setdefault("params_dtype", gpt_model.config.params_dtype)
    generator = LeviathanGenerator(vocab_size or gpt_model.vocab_size,
                                   gpt_model.config.hidden_size,
                                   tp_group=tp_group if tp_group is not None else "auto",
                                   sequence_parallel=reduce_scatter, **leviathan_kwargs)
    generator.to(device=old.weight.device)
    emb.word_embeddings = _SequenceParallelIds(generator) if reduce_scatter else generator
    _tag_output_layer(gpt_model)
    return generator


def _tag_output_layer(gpt_model) -> None:
    """Tag the untied LM head (a ColumnParallelLinear over the vocabulary) for Ember."""
    head = getattr(gpt_model, "output_layer", None)
    weight = getattr(head, "weight", None)
    if weight is None:
        return
    group = getattr(head, "tp_group", None)
    size = group.size() if group is not None else 1
    rank = group.rank() if group is not None else 0
    rows = weight.shape[0]
    mark_token_table(weight, global_rows=rows * size, row_offset=rows * rank,
                     row_group=group if size > 1 else None, name="output_layer.weight")
