#!/usr/bin/env python
"""Sample text from a launch/train.py checkpoint or a launch/export.py folder.

    python launch/generate.py --checkpoint ckpt --prompt "In the beginning" --max-new-tokens 60
    python launch/generate.py --checkpoint hf_model --prompt "..." --temperature 0.8 --top-p 0.9

The model runs as transformers' LlamaForCausalLM (the export's architecture; a checkpoint is
converted in memory), so decoding uses its KV cache and its samplers (temperature, top-k,
top-p); ``--temperature 0`` is greedy. The tokenizer is the one train.py keeps beside its
checkpoints (``tokenizer.model`` / ``tokenizer.json`` in the --save folder; an export carries a
copy), or ``--tokenizer``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def load_model(path: Path, tool: str = "generate"):
    """LlamaForCausalLM from an export folder, or converted from a checkpoint (a --save folder
    or a step folder, chosen and verified as ``train.py --resume`` does; its notices go to
    stderr as ``[tool] warning: ...``)."""
    from transformers import LlamaForCausalLM
    path = Path(path)
    if (path / "config.json").is_file():
        return LlamaForCausalLM.from_pretrained(path, local_files_only=True)
    from launch.consolidate import load_consolidated, notices
    from launch.export import llama_config, llama_state_dict
    model, _ = load_consolidated(path, notices(tool))
    hf = LlamaForCausalLM(llama_config(model.cfg))
    hf.load_state_dict(llama_state_dict(model), strict=False)
    return hf


def generate(path, prompt: str, max_new_tokens=50, temperature=1.0, top_k=0, top_p=1.0,
             seed=0, tokenizer=None) -> str:
    import torch

    from launch.consolidate import find_tokenizer
    from launch.tokenization import load_cached
    path = Path(path)
    model = load_model(path).eval()     # the checkpoint's errors first
    tok_file = find_tokenizer(path, tokenizer)
    tok = load_cached(tok_file.parent, tok_file.name)
    ids = tok.encode_batch([prompt])[0]
    if not ids:
        raise ValueError("the prompt encodes to no tokens")
    torch.manual_seed(seed)
    sample = temperature > 0
    extra = dict(temperature=temperature, top_k=top_k or None, top_p=top_p) if sample else {}
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens,
                             do_sample=sample, pad_token_id=0, **extra)
    return tok.decode(out[0].tolist())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="a --save folder, a step folder, or an "
                   "export folder")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=50)
    p.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=0, help="0: off")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", help="tokenizer.model / tokenizer.json (default: found next "
                   "to the checkpoint)")
    args = p.parse_args(argv)
    if args.max_new_tokens < 1 or args.temperature < 0 or not 0 < args.top_p <= 1 \
            or args.top_k < 0:
        print("error: --max-new-tokens >= 1, --temperature >= 0, 0 < --top-p <= 1, "
              "--top-k >= 0", file=sys.stderr)
        return 2
    from launch.consolidate import run_reader
    code, text = run_reader(args.checkpoint, lambda: generate(
        args.checkpoint, args.prompt, args.max_new_tokens, args.temperature, args.top_k,
        args.top_p, args.seed, args.tokenizer))
    if code:
        return code
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
