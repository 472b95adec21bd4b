#!/usr/bin/env python
"""Loss and perplexity of a checkpoint (or an export) on any text or jsonl files.

    python launch/evaluate.py --checkpoint ckpt --data held_out.txt more.jsonl

The files are read like training data (launch/data.py: .txt / .md documents separated by blank
lines, .jsonl with a "text" field, compressed or not), tokenized with the checkpoint's own
tokenizer, each document followed by the end-of-document token, concatenated and cut into
windows of the model's sequence length; every next-token prediction in them is scored once.
Prints one line and, with --json, writes {loss, perplexity, tokens, windows}.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def token_stream(files, tok) -> list[int]:
    from launch.data import iter_documents, resolve_inputs
    ids = []
    for doc in iter_documents(resolve_inputs(files)):
        ids += tok.encode_batch([doc])[0] + [tok.eod_id]
    return ids


def evaluate(checkpoint, files, tokenizer=None, batch=8, max_windows=None) -> dict:
    import torch
    import torch.nn.functional as F

    from launch.consolidate import find_tokenizer
    from launch.generate import load_model
    from launch.tokenization import load_cached
    path = Path(checkpoint)
    model = load_model(path, "evaluate").eval()     # the checkpoint's errors first
    tok_file = find_tokenizer(path, tokenizer)
    tok = load_cached(tok_file.parent, tok_file.name)
    seq = model.config.max_position_embeddings
    ids = token_stream(files, tok)
    if len(ids) < 2:
        raise ValueError("the data holds fewer than 2 tokens")
    if max(ids) >= model.config.vocab_size:
        raise ValueError(f"token id {max(ids)} is outside the model's vocabulary "
                         f"({model.config.vocab_size}): a different tokenizer?")
    # windows of seq + 1 tokens overlapping by one: every position after the first is a target
    windows = [ids[i:i + seq + 1] for i in range(0, len(ids) - 1, seq)]
    windows = windows[:max_windows] if max_windows else windows
    total, count = 0.0, 0
    with torch.no_grad():
        for w in windows:                      # the last window may be shorter: one at a time
            x = torch.tensor([w])
            logits = model(x[:, :-1]).logits
            total += F.cross_entropy(logits[0].float(), x[0, 1:], reduction="sum").item()
            count += x.shape[1] - 1
    loss = total / count
    return dict(loss=loss, perplexity=math.exp(min(loss, 50.0)), tokens=count,
                windows=len(windows))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="a --save folder, a step folder, or an "
                   "export folder")
    p.add_argument("--data", nargs="+", required=True, help="text / jsonl files or folders")
    p.add_argument("--tokenizer", help="default: the one next to the checkpoint")
    p.add_argument("--max-windows", type=int, default=None, help="score only the first N")
    p.add_argument("--json", type=Path, help="also write the result here")
    args = p.parse_args(argv)
    from launch.consolidate import run_reader
    code, r = run_reader(args.checkpoint, lambda: evaluate(
        args.checkpoint, args.data, args.tokenizer, max_windows=args.max_windows))
    if code:
        return code
    print(f"[evaluate] loss {r['loss']:.4f}, perplexity {r['perplexity']:.2f} over "
          f"{r['tokens']:,} tokens ({r['windows']} windows)")
    if args.json:
        args.json.write_text(json.dumps(r, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
