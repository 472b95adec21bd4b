#!/usr/bin/env python
"""Export a launch/train.py checkpoint (any TP / PP shape; dense or Leviathan) as a Hugging Face
``LlamaForCausalLM`` folder (config.json + model.safetensors) that ``from_pretrained`` loads
offline.

    python launch/export.py --checkpoint ckpt --out hf_model [--tokenizer tokenizer.model]

The project's GPT is LLaMA's architecture (RMSNorm, rotate-half RoPE, SwiGLU, grouped-query
attention, untied head), so the export is a renaming: qkv splits into q/k/v_proj, gate_up into
gate/up_proj, and a Leviathan generator is materialised into the dense V x D table it defines
(the same logits; the generator itself is not a transformers module). The vocabulary padding is
dropped. The tokenizer train.py keeps in the --save folder (or ``--tokenizer``) is copied beside
the weights (``tokenizer.model`` for SentencePiece, ``tokenizer.json`` for a Hugging Face one);
launch/generate.py reads it from there. A SentencePiece model is also written as a Hugging Face
fast tokenizer (tokenizer.json + tokenizer_config.json, launch/hf_tokenizer.py) with the same ids,
so ``AutoTokenizer.from_pretrained(out)`` works offline too.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def llama_config(cfg):
    """The transformers LlamaConfig of a GPTConfig."""
    from transformers import LlamaConfig
    return LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_query_groups,
        head_dim=cfg.head_dim, max_position_embeddings=cfg.seq_length, rms_norm_eps=cfg.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_base},
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False, hidden_act="silu",
        bos_token_id=1, eos_token_id=2)


def llama_state_dict(model) -> dict:
    """LlamaForCausalLM's state dict from a TP = 1 GPT (models.gpt.GPT)."""
    import torch
    cfg = model.cfg
    V, H, G, hd, Fh = (cfg.vocab_size, cfg.num_heads, cfg.num_query_groups, cfg.head_dim,
                       cfg.ffn_hidden_size)
    with torch.no_grad():
        table = (model.embedding.materialize() if model.embedding_kind == "leviathan"
                 else model.embedding.weight[:V])
        sd = {"model.embed_tokens.weight": table, "model.norm.weight": model.norm.weight,
              "lm_head.weight": model.lm_head.weight[:V]}
        for i, layer in enumerate(model.layers):
            p = f"model.layers.{i}."
            q, k, v = layer.attn.qkv.weight.split([H * hd, G * hd, G * hd], dim=0)
            gate, up = layer.mlp.gate_up.weight.split([Fh, Fh], dim=0)
            sd.update({
                p + "input_layernorm.weight": layer.attn_norm.weight,
                p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k,
                p + "self_attn.v_proj.weight": v, p + "self_attn.o_proj.weight": layer.attn.proj.weight,
                p + "post_attention_layernorm.weight": layer.mlp_norm.weight,
                p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up,
                p + "mlp.down_proj.weight": layer.mlp.down.weight})
    return {k: t.detach().float().contiguous().clone() for k, t in sd.items()}


# what an export writes (removed first from a folder exported into again with --overwrite, so
# that no file of the previous export, e.g. another tokenizer, stays beside the new one)
EXPORT_FILES = ("config.json", "generation_config.json", "model.safetensors",
                "model.safetensors.index.json", "tokenizer.model", "tokenizer.json",
                "tokenizer_config.json", "special_tokens_map.json", "eod_token.txt")


def check_out(checkpoint, out, overwrite: bool = False) -> None:
    """Refuse (ValueError, one line) an --out that would write into the checkpoint (the same
    folder, or one inside it), or into a folder holding files, unless ``overwrite``."""
    ckpt, dest = Path(checkpoint).resolve(), Path(out).resolve()
    if dest == ckpt or ckpt in dest.parents:
        where = "the checkpoint folder" if dest == ckpt else "inside the checkpoint folder"
        raise ValueError(f"--out {out} is {where} {checkpoint}: export somewhere else "
                         "(nothing was written)")
    if dest.exists() and not dest.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    if dest.is_dir() and any(dest.iterdir()) and not overwrite:
        held = sorted(p.name for p in dest.iterdir())
        raise ValueError(f"--out {out} already holds {len(held)} file(s) ({', '.join(held[:4])}"
                         f"{', ...' if len(held) > 4 else ''}); give --overwrite to replace an "
                         "earlier export there, or another folder")


def export(checkpoint, out, tokenizer=None, overwrite: bool = False, log=None) -> Path:
    """Write the HF folder ``out`` from ``checkpoint`` (a --save folder or a step folder,
    chosen and verified as ``train.py --resume`` does); returns ``out``. The files are written
    into a temporary folder beside ``out`` and moved into it at the end: a failure leaves
    ``out`` as it was."""
    from transformers import LlamaForCausalLM

    from launch.consolidate import checkpoint_folder, find_tokenizer, load_folder, notices
    check_out(checkpoint, out, overwrite)
    folder = checkpoint_folder(checkpoint, log or notices("export"))
    check_out(folder.parent if (folder.parent / "latest").is_file() else folder, out, overwrite)
    if tokenizer:                     # named by the user: it must exist (checked before writing)
        tok = find_tokenizer(None, tokenizer)
    else:
        try:
            tok = find_tokenizer(folder)
        except FileNotFoundError:
            tok = None                # weights only; say so
            print("[export] no tokenizer found next to the checkpoint: weights only "
                  "(give --tokenizer)")
    model, state = load_folder(folder)
    hf = LlamaForCausalLM(llama_config(model.cfg))
    missing, unexpected = hf.load_state_dict(llama_state_dict(model), strict=False)
    missing = [m for m in missing if "rotary" not in m]
    if missing or unexpected:
        raise RuntimeError(f"export mapping is incomplete: missing {missing}, unexpected "
                           f"{unexpected}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".tmp-export-{out.name}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        hf.save_pretrained(staging, safe_serialization=True)
        if tok is not None:
            export_tokenizer(tok, staging, model.cfg.seq_length)
        if not out.exists():
            os.rename(staging, out)
        else:                          # --overwrite: the earlier export's files go first
            for name in EXPORT_FILES:
                (out / name).unlink(missing_ok=True)
            for f in out.glob("model-*-of-*.safetensors"):
                f.unlink()
            for f in staging.iterdir():
                os.replace(f, out / f.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def export_tokenizer(tok, out, model_max_length=None) -> None:
    """Put the tokenizer file ``tok`` into the export folder ``out`` under its canonical name: a
    Hugging Face tokenizer.json as is (with eod_token.txt when there is one); a SentencePiece
    model as tokenizer.model and, converted by launch/hf_tokenizer.py, as tokenizer.json +
    tokenizer_config.json + special_tokens_map.json that AutoTokenizer loads (same ids)."""
    from launch.hf_tokenizer import UnsupportedModel, save_hf_tokenizer
    tok, out = Path(tok), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if tok.suffix == ".model":
        shutil.copyfile(tok, out / "tokenizer.model")
        try:
            save_hf_tokenizer(out / "tokenizer.model", out, model_max_length)
        except UnsupportedModel as e:
            print(f"[export] tokenizer.model only: not converted for AutoTokenizer ({e})")
        return
    shutil.copyfile(tok, out / ("tokenizer.json" if tok.suffix == ".json" else tok.name))
    eod = tok.parent / "eod_token.txt"
    if eod.is_file():
        shutil.copyfile(eod, out / eod.name)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True,
                   help="a --save folder (its latest checkpoint) or one step folder")
    p.add_argument("--out", required=True, help="the Hugging Face folder to write")
    p.add_argument("--tokenizer", help="tokenizer file, or a folder holding tokenizer.model / "
                   "tokenizer.json, to copy beside the weights (default: the one in the "
                   "checkpoint's --save folder)")
    p.add_argument("--overwrite", action="store_true", help="export into a folder that holds "
                   "files (an earlier export's files are replaced, others kept)")
    args = p.parse_args(argv)
    from launch.consolidate import run_reader
    code, out = run_reader(args.checkpoint, lambda: export(
        args.checkpoint, args.out, args.tokenizer, args.overwrite))
    if code:
        return code
    print(f"[export] {out}: LlamaForCausalLM (safetensors + config.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
