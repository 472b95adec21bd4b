"""Which parameters Ember factors, on the model families DeepSpeed users train: real
`transformers` models built from configs (no weights), megatron-core's GPTModel, this project's
GPT and plain torch models. Each test asserts the exact set of parameter names."""
import pytest
import torch
import transformers
from torch import nn

from ember_ds import Ember, mark_not_token_table, mark_token_table
from ember_ds.tables import PatternError

SMALL = dict(vocab_size=101)


def factored(model, **kw) -> set:
    """Names of the parameters Ember(model) factors (each Parameter once, by its first name)."""
    opt = Ember(model, lr=1e-3, **kw)
    names = {id(p): n for n, p in model.named_parameters()}
    chosen = {names[id(p)] for p in opt.token_tables}
    assert len(chosen) == len(opt.token_tables)
    return chosen


def gpt2(tied=True):
    cfg = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, n_positions=64,
                                  tie_word_embeddings=tied, **SMALL)
    return transformers.GPT2LMHeadModel(cfg)


def llama(tied):
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2,
                                   tie_word_embeddings=tied, **SMALL)
    return transformers.LlamaForCausalLM(cfg)


HF_CASES = {
    "gpt2-tied": (gpt2, {"transformer.wte.weight"}),
    "gpt2-untied": (lambda: gpt2(tied=False), {"transformer.wte.weight", "lm_head.weight"}),
    "llama-tied": (lambda: llama(True), {"model.embed_tokens.weight"}),
    "llama-untied": (lambda: llama(False), {"model.embed_tokens.weight", "lm_head.weight"}),
    "gpt-neox": (lambda: transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
        hidden_size=32, num_attention_heads=2, num_hidden_layers=1, intermediate_size=64,
        tie_word_embeddings=False, **SMALL)),   # untied head: embed_out before transformers 5
        {"gpt_neox.embed_in.weight", "lm_head.weight"}),
    "opt": (lambda: transformers.OPTForCausalLM(transformers.OPTConfig(
        hidden_size=32, ffn_dim=64, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=64, word_embed_proj_dim=32, **SMALL)),
        {"model.decoder.embed_tokens.weight"}),
    "bert": (lambda: transformers.BertForMaskedLM(transformers.BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, **SMALL)), {"bert.embeddings.word_embeddings.weight"}),
    "bert-base": (lambda: transformers.BertModel(transformers.BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, **SMALL)), {"embeddings.word_embeddings.weight"}),
    "roberta": (lambda: transformers.RobertaForMaskedLM(transformers.RobertaConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, pad_token_id=1, **SMALL)),
        {"roberta.embeddings.word_embeddings.weight"}),
}


@pytest.mark.parametrize("case", list(HF_CASES))
def test_hugging_face_families(case):
    build, expected = HF_CASES[case]
    torch.manual_seed(0)
    assert factored(build()) == expected


def test_position_and_type_tables_stay_body():
    model = HF_CASES["bert"][0]()
    opt = Ember(model)
    emb = model.bert.embeddings
    for p in (emb.position_embeddings.weight, emb.token_type_embeddings.weight):
        assert all(p is not t for t in opt.token_tables)
    # and the body optimizer really steps them (AdamW, not Ember, not frozen)
    body = {id(p) for g in opt.param_groups if not g["token_table"] for p in g["params"]}
    assert id(emb.position_embeddings.weight) in body


class CharGPT(nn.Module):
    """nanoGPT-shaped: a character vocabulary (65) smaller than the positional table (256)."""

    def __init__(self, V=65, T=256, D=16, tied=False):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(wte=nn.Embedding(V, D), wpe=nn.Embedding(T, D),
                                              h=nn.Linear(D, D), ln_f=nn.LayerNorm(D)))
        self.lm_head = nn.Linear(D, V, bias=False)
        if tied:
            self.lm_head.weight = self.transformer.wte.weight


class Conditioned(nn.Module):
    """A vocabulary table, a small class-conditioning table and an untied head named 'proj'
    that is the last Linear; an MLP Linear of the same shape as the head is not a head."""

    def __init__(self, V=64, D=16):
        super().__init__()
        self.tok = nn.Embedding(V, D)
        self.cls = nn.Embedding(10, D)
        self.mlp = nn.Linear(D, V)          # same shape as the head, not last, not head-named
        self.back = nn.Linear(V, D)
        self.proj = nn.Linear(D, V)


@pytest.mark.parametrize("model,expected", [
    (CharGPT(), {"transformer.wte.weight", "lm_head.weight"}),
    (CharGPT(tied=True), {"transformer.wte.weight"}),
    (Conditioned(), {"tok.weight", "proj.weight"}),
])
def test_plain_torch_rule(model, expected):
    assert factored(model) == expected


def test_patterns_and_tags_override_the_rules():
    assert factored(gpt2(), exclude_tables=["transformer.wte.weight"]) == set()
    assert factored(gpt2(), tables=["transformer.wpe.weight"]) == \
        {"transformer.wte.weight", "transformer.wpe.weight"}
    model = CharGPT()
    mark_not_token_table(model.lm_head.weight)
    mark_token_table(model.transformer.h.weight, name="h")   # a user's own choice is kept
    assert factored(model) == {"transformer.wte.weight", "transformer.h.weight"}
    with pytest.raises(PatternError, match=r"'\*\.nope' matches no parameter"):
        Ember(gpt2(), exclude_tables=["*.nope"])
    with pytest.raises(ValueError, match="need the model"):
        Ember(list(gpt2().parameters()), tables=["*wte*"])


def test_megatron_gpt_model_tied_and_untied(monkeypatch):
    if not torch.cuda.is_available():   # megatron's rotary embedding asks torch.cuda for a device
        monkeypatch.setattr(torch.cuda, "current_device", lambda: torch.device("cpu"))
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    from models.parallel import init_model_parallel
    init_model_parallel(1)

    def build(tied, pos):
        cfg = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4,
                                use_cpu_initialization=True, add_bias_linear=False,
                                hidden_dropout=0.0, attention_dropout=0.0)
        return GPTModel(cfg, get_gpt_layer_local_spec(), vocab_size=128,
                        max_sequence_length=64, position_embedding_type=pos,
                        share_embeddings_and_output_weights=tied)

    assert factored(build(True, "rope")) == {"embedding.word_embeddings.weight"}
    # learned positions: the position table (an nn.Embedding) stays body
    assert factored(build(False, "learned_absolute")) == \
        {"embedding.word_embeddings.weight", "output_layer.weight"}


@pytest.mark.parametrize("embedding,expected", [
    ("dense", {"embedding.weight", "lm_head.weight"}), ("leviathan", {"lm_head.weight"})])
def test_project_gpt(embedding, expected):
    from models.gpt import GPT, GPTConfig
    cfg = GPTConfig(vocab_size=200, hidden_size=32, num_layers=1, num_heads=4, seq_length=16,
                    embedding=embedding, leviathan=dict(seed_dim=16, heads=2, modes=8))
    assert factored(GPT(cfg)) == expected


def test_summary_names_tables_and_body():
    opt = Ember(llama(False), lr=2e-3)
    text = opt.summary(zero_stage=2, dp_size=2)
    assert "model.embed_tokens.weight" in text and "lm_head.weight" in text
    assert "101 x 32" in text and "ZeRO-2 over 2 ranks" in text
    assert "HF input embeddings" in text and "HF output embeddings" in text
    assert "-> AdamW (lr 0.002, weight decay 0.0)" in text


def test_ember_does_not_import_megatron():
    import subprocess
    import sys
    code = ("import sys, torch, ember_ds; from torch import nn; "
            "ember_ds.Ember(nn.Sequential(nn.Embedding(9, 4), nn.Linear(4, 9))); "
            "print(sorted(m for m in sys.modules if m.startswith('megatron')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"
