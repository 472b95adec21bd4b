"""Tokenizers for launch/data.py: SentencePiece models, Hugging Face tokenizers and GPT-2 style BPE
files, behind one small interface (``encode_batch``, ``decode``, ``vocab_size``, ``eod_id``).

``--tokenizer PATH`` accepts
  * a SentencePiece model file (``*.model``);
  * a Hugging Face ``tokenizer.json`` (any name ending in ``.json`` that the ``tokenizers``
    library reads);
  * GPT-2 style BPE files: ``vocab.json`` (``merges.txt`` next to it), or a folder holding both;
    read as GPT-2 does (byte-level BPE, ``<|endoftext|>`` ends documents);
  * a tokenizer folder: ``tokenizer.json`` inside (its ``tokenizer_config.json`` /
    ``special_tokens_map.json`` name the end-of-document token), else ``vocab.json`` +
    ``merges.txt``, else ``tokenizer.model`` (SentencePiece), else whatever
    ``transformers.AutoTokenizer`` reads from it offline (its fast tokenizer is used).
Every Hugging Face / BPE tokenizer is stored in the data cache as one ``tokenizer.json``;
SentencePiece models as ``tokenizer.model``. A file that is not what it claims to be is a
``DataError`` naming it.

End of document: ``eod_token`` when given, else the tokenizer's own (SentencePiece ``</s>``;
the ``eos_token`` of a folder's ``tokenizer_config.json`` / ``special_tokens_map.json``), else the
first of ``<|endoftext|>``, ``</s>``, ``<|end_of_text|>``, ``<eos>`` that the vocabulary holds.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional, Sequence


class TokenizerError(ValueError):
    """A tokenizer path that cannot be used (launch.data turns it into a DataError)."""


EOD_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>")
SP_FILE, HF_FILE = "tokenizer.model", "tokenizer.json"


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


class Tokenizer:
    kind = "?"
    file_name = "?"

    def __init__(self, source: str, eod_id: int, vocab_size: int):
        self.source, self.eod_id, self.vocab_size = source, int(eod_id), int(vocab_size)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:   # pragma: no cover
        raise NotImplementedError

    def decode(self, ids) -> str:                                      # pragma: no cover
        raise NotImplementedError

    def save(self, folder: Path) -> str:                                # pragma: no cover
        """Write the tokenizer into ``folder`` (the data cache); returns the file name."""
        raise NotImplementedError

    def fingerprint(self) -> str:                                       # pragma: no cover
        raise NotImplementedError


class SentencePieceTokenizer(Tokenizer):
    kind, file_name = "sentencepiece", SP_FILE

    def __init__(self, path: str | os.PathLike, eod_token: Optional[str] = None):
        import sentencepiece as spm
        self.path = Path(path)
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (RuntimeError, OSError) as e:
            raise TokenizerError(f"{self.path} is not a SentencePiece model ({_first_line(e)})") from e
        if eod_token is not None:
            eod = self.sp.piece_to_id(eod_token)
            if eod == self.sp.unk_id() and eod_token != self.sp.id_to_piece(eod):
                raise TokenizerError(f"tokenizer {self.path} has no piece {eod_token!r} (--eod-token)")
        else:
            eod = self.sp.eos_id()
            if eod < 0:
                raise TokenizerError(f"tokenizer {self.path} has no </s> (eos) piece to end "
                                     "documents with; name one with --eod-token")
        super().__init__(str(self.path), eod, self.sp.get_piece_size())

    def encode_batch(self, texts):
        return self.sp.encode(list(texts), out_type=int)

    def decode(self, ids):
        return self.sp.decode([int(i) for i in ids])

    def save(self, folder):
        (Path(folder) / SP_FILE).write_bytes(self.path.read_bytes())
        return SP_FILE

    def fingerprint(self):
        return _digest(self.path.read_bytes())


class HFTokenizer(Tokenizer):
    """A ``tokenizers.Tokenizer`` (Hugging Face fast tokenizer); special tokens are not added."""
    kind, file_name = "huggingface", HF_FILE

    def __init__(self, tok, source: str, eod_token: Optional[str] = None,
                 declared_eos: Optional[str] = None):
        self.tok = tok
        vocab = tok.get_vocab(with_added_tokens=True)
        names = [eod_token] if eod_token is not None else \
            ([declared_eos] if declared_eos else []) + list(EOD_CANDIDATES)
        found = next((n for n in names if n in vocab), None)
        if found is None:
            if eod_token is not None:
                raise TokenizerError(f"tokenizer {source} has no token {eod_token!r} (--eod-token)")
            raise TokenizerError(f"tokenizer {source} has no end-of-document token (looked for "
                                 f"{', '.join(names)}); name one with --eod-token")
        self.eod_token = found
        size = max(tok.get_vocab_size(with_added_tokens=True), max(vocab.values()) + 1)
        super().__init__(source, vocab[found], size)

    def encode_batch(self, texts):
        return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids):
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def save(self, folder):
        (Path(folder) / HF_FILE).write_text(self.tok.to_str())
        (Path(folder) / "eod_token.txt").write_text(self.eod_token)
        return HF_FILE

    def fingerprint(self):
        return _digest(self.tok.to_str().encode() + b"\0" + self.eod_token.encode())


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


def _hf_from_file(path: Path):
    from tokenizers import Tokenizer as HFTok
    try:
        return HFTok.from_file(str(path))
    except Exception as e:        # the library raises plain Exception subclasses of its own
        raise TokenizerError(f"{path} is not a Hugging Face tokenizer.json the tokenizers library "
                             f"can read ({_first_line(e)})") from e


def _gpt2_bpe(vocab: Path, merges: Path):
    """GPT-2's byte-level BPE from vocab.json + merges.txt."""
    from tokenizers import Tokenizer as HFTok, decoders, models, pre_tokenizers, processors
    try:
        vocab_map = json.loads(vocab.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise TokenizerError(f"{vocab} is not a JSON vocabulary ({_first_line(e)})") from e
    if not isinstance(vocab_map, dict) or not all(isinstance(v, int) for v in vocab_map.values()):
        raise TokenizerError(f"{vocab} is not a GPT-2 vocab.json (expected an object token -> id)")
    try:
        lines = merges.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{merges} cannot be read as UTF-8 text ({_first_line(e)})") from e
    pairs = []
    for n, line in enumerate(lines, 1):
        if not line.strip() or (n == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise TokenizerError(f"{merges}:{n}: expected two tokens separated by one space, got "
                                 f"{line[:80]!r}")
        pairs.append((parts[0], parts[1]))
    try:
        tok = HFTok(models.BPE(vocab_map, pairs))
    except Exception as e:
        raise TokenizerError(f"{vocab} + {merges}: not a consistent BPE vocabulary and merge list "
                             f"({_first_line(e)})") from e
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def _declared_eos(folder: Path) -> Optional[str]:
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        f = folder / name
        if f.is_file():
            try:
                eos = json.loads(f.read_text(encoding="utf-8")).get("eos_token")
            except (OSError, ValueError, AttributeError) as e:
                raise TokenizerError(f"{f} is not valid JSON ({_first_line(e)})") from e
            if isinstance(eos, dict):
                eos = eos.get("content")
            if isinstance(eos, str) and eos:
                return eos
    return None


def load_tokenizer(path: str | os.PathLike, eod_token: Optional[str] = None) -> Tokenizer:
    """The tokenizer at ``path`` (see the module docstring for what is accepted)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise TokenizerError(f"tokenizer not found: {p}")
    if p.is_dir():
        if (p / HF_FILE).is_file():
            return HFTokenizer(_hf_from_file(p / HF_FILE), str(p), eod_token, _declared_eos(p))
        if (p / "vocab.json").is_file() and (p / "merges.txt").is_file():
            return HFTokenizer(_gpt2_bpe(p / "vocab.json", p / "merges.txt"), str(p), eod_token,
                               _declared_eos(p))
        if (p / SP_FILE).is_file():
            return SentencePieceTokenizer(p / SP_FILE, eod_token)
        return _auto_tokenizer(p, eod_token)
    if p.suffix == ".model":
        return SentencePieceTokenizer(p, eod_token)
    if p.suffix == ".json":
        try:
            head = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise TokenizerError(f"{p} is not a JSON file ({_first_line(e)})") from e
        if isinstance(head, dict) and "model" not in head:       # a GPT-2 vocab.json
            merges = p.with_name("merges.txt")
            if not merges.is_file():
                raise TokenizerError(f"{p} looks like a BPE vocab.json but {merges} is missing "
                                     "(GPT-2 style BPE needs vocab.json and merges.txt together)")
            return HFTokenizer(_gpt2_bpe(p, merges), str(p), eod_token, _declared_eos(p.parent))
        return HFTokenizer(_hf_from_file(p), str(p), eod_token, _declared_eos(p.parent))
    raise TokenizerError(f"{p}: not a tokenizer this project reads (a SentencePiece .model, a "
                         "tokenizer.json, vocab.json + merges.txt, or a folder holding one of them)")


def _auto_tokenizer(folder: Path, eod_token: Optional[str]) -> Tokenizer:
    try:
        from transformers import AutoTokenizer
        t = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:
        raise TokenizerError(f"no tokenizer found in folder {folder} (expected tokenizer.json, "
                             f"vocab.json + merges.txt, or tokenizer.model; transformers: "
                             f"{_first_line(e)})") from e
    backend = getattr(t, "backend_tokenizer", None)
    if backend is None:
        raise TokenizerError(f"transformers reads {folder} only as a slow (Python) tokenizer; "
                             "save it as a fast tokenizer (tokenizer.json) first")
    return HFTokenizer(backend, str(folder), eod_token, getattr(t, "eos_token", None))


def load_cached(folder: Path, file_name: str) -> Tokenizer:
    """A tokenizer written into a cache folder by ``Tokenizer.save``."""
    if file_name == SP_FILE:
        return SentencePieceTokenizer(folder / SP_FILE)
    eod = (folder / "eod_token.txt").read_text() if (folder / "eod_token.txt").is_file() else None
    return HFTokenizer(_hf_from_file(folder / HF_FILE), str(folder), eod)
