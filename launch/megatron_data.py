"""Training directly on megatron-preprocessed data: ``--data-path [weight] prefix ...`` with
``--tokenizer`` (the tokenizer the files were made with).

Each prefix names ``prefix.bin`` + ``prefix.idx`` as written by megatron's
``tools/preprocess_data.py`` (or any ``IndexedDatasetBuilder``). Nothing is rewritten or cached:
  * the index is read and checked (header, version, dtype, sizes, the .bin size it implies, token
    ids within the tokenizer's vocabulary on the first million tokens); a bad file is a
    ``DataError`` naming it;
  * each prefix's documents are split into train / validation as the text path does (a seeded
    choice of ``max(1, round(val_fraction * documents))`` documents, per prefix);
  * a split of a prefix is the token stream of its documents back to back, cut into windows of
    ``seq_length + 1`` tokens, read from the memory-mapped .bin;
  * the blend (Megatron's semantics: a prefix's weight is its share of the samples) takes
    ``round(w_i * N)`` samples from prefix i, N the total number of windows: a prefix with more
    weight than data is repeated, one with less is subsampled (a seeded spread over its windows,
    no repeats). The sampler's per-epoch permutation then mixes them; the validation windows are
    interleaved in proportion to the weights, so the first ``--eval-samples`` cover every prefix.
"""
from __future__ import annotations

import hashlib
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from launch.data import DataError, DataSettings, MegatronPrefix, SPLITS, file_digest

_HEADER = b"MMIDIDX\x00\x00"
_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64,
           7: np.float32, 8: np.uint16}
CHECK_TOKENS = 1 << 20
MAX_VALID_WINDOWS = 1 << 22


@dataclass
class Index:
    prefix: str
    dtype: np.dtype
    lengths: np.ndarray        # tokens per sequence (int32)
    pointers: np.ndarray       # byte offset of each sequence in the .bin (int64)
    documents: np.ndarray      # sequence index where each document starts, then the count


def _paths(prefix: str) -> tuple[Path, Path]:
    return Path(prefix + ".idx"), Path(prefix + ".bin")


def read_index(prefix: str) -> Index:
    """The index of ``prefix``, checked against its .bin file (DataError naming the file)."""
    idx, bin_ = _paths(prefix)
    for f in (idx, bin_):
        if not f.is_file():
            hint = (" (--data-path takes the prefix, without .bin / .idx)"
                    if prefix.endswith((".bin", ".idx")) else "")
            raise DataError(f"{f} not found: --data-path {prefix} needs {idx.name} and "
                            f"{bin_.name}{hint}")
    size = idx.stat().st_size
    with open(idx, "rb") as fh:
        head = fh.read(34)
    if len(head) < 34 or head[:9] != _HEADER:
        raise DataError(f"{idx} is not a megatron indexed-dataset index (expected the header "
                        f"MMIDIDX, got {head[:9]!r})")
    version, code, n_seq, n_doc = struct.unpack("<QBQQ", head[9:34])
    if version != 1:
        raise DataError(f"{idx}: index version {version}, only version 1 is read")
    if code not in _DTYPES:
        raise DataError(f"{idx}: unknown token dtype code {code}")
    need = 34 + n_seq * 4 + n_seq * 8 + n_doc * 8
    if size < need:
        raise DataError(f"{idx} is truncated ({size:,} bytes, its header announces {n_seq:,} "
                        f"sequences / {n_doc - 1:,} documents = {need:,} bytes)")
    mm = np.memmap(idx, mode="r", dtype=np.uint8)
    lengths = np.frombuffer(mm, dtype=np.int32, count=n_seq, offset=34)
    pointers = np.frombuffer(mm, dtype=np.int64, count=n_seq, offset=34 + 4 * n_seq)
    documents = np.frombuffer(mm, dtype=np.int64, count=n_doc, offset=34 + 12 * n_seq)
    dtype = np.dtype(_DTYPES[code])
    if n_doc < 1 or documents[0] != 0 or documents[-1] != n_seq:
        raise DataError(f"{idx}: inconsistent document index (first {documents[:1].tolist()}, "
                        f"last {documents[-1:].tolist()}, {n_seq} sequences)")
    expect = int(pointers[-1]) + int(lengths[-1]) * dtype.itemsize if n_seq else 0
    actual = bin_.stat().st_size
    if actual != expect:
        raise DataError(f"{bin_} holds {actual:,} bytes, its index {idx.name} expects {expect:,} "
                        "(truncated or from another run: rebuild both)")
    return Index(prefix, dtype, lengths, pointers, documents)


def check_prefix(p: MegatronPrefix) -> None:
    read_index(p.prefix)


class SegmentStream:
    """The tokens of some documents of one .bin, back to back: ``len()`` and ``[a:b]`` like the
    flat memmap of the text path (the .bin is memory-mapped, nothing is copied)."""

    def __init__(self, bin_path: Path, dtype, starts: np.ndarray, lengths: np.ndarray):
        self.data = np.memmap(bin_path, dtype=dtype, mode="r")
        keep = lengths > 0
        self.starts, self.lengths = starts[keep], lengths[keep]
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, sl: slice) -> np.ndarray:
        a, b = max(0, sl.start or 0), min(len(self), sl.stop)
        if b <= a:
            return np.zeros(0, dtype=np.int64)
        first = int(np.searchsorted(self.offsets, a, side="right")) - 1
        parts, pos, seg = [], a, first
        while pos < b:
            lo = pos - int(self.offsets[seg])
            take = min(b - pos, int(self.lengths[seg]) - lo)
            s = int(self.starts[seg]) + lo
            parts.append(self.data[s:s + take])
            pos += take
            seg += 1
        return np.concatenate(parts).astype(np.int64)


class _Component:
    def __init__(self, name: str, stream: SegmentStream, seq: int, seed: int):
        self.name, self.stream = name, stream
        self.n = max(0, (len(stream) - 1) // seq)
        rng = np.random.default_rng(seed)
        a = int(rng.integers(1, 1 << 40)) | 1
        while self.n and math.gcd(a, self.n) != 1:
            a += 2
        self.a, self.b = a, int(rng.integers(0, max(1, self.n)))

    def window(self, j: int, seq: int) -> np.ndarray:
        w = (self.a * j + self.b) % self.n          # a bijection on [0, n): a spread, no repeats
        return self.stream[w * seq:w * seq + seq + 1]


class BlendWindows:
    """Sample k of a split: which prefix (contiguous blocks in train, interleaved by weight in
    validation) and which window of it."""

    def __init__(self, comps: list[_Component], weights: Sequence[float], seq: int, name: str,
                 interleave: bool):
        self.seq = seq
        live = [(c, w) for c, w in zip(comps, weights) if c.n > 0]
        dead = [c.name for c in comps if c.n == 0]
        if (dead and name == "train") or not live:
            raise DataError(f"the {name} split of {', '.join(dead or [c.name for c in comps])} "
                            f"has fewer than seq_length + 1 = {seq + 1} tokens: use more data, "
                            "a larger validation fraction or a shorter sequence")
        self.comps = [c for c, _ in live]
        total_w = sum(w for _, w in live)
        n_all = sum(c.n for c in self.comps)
        self.counts = np.array([max(1, round(w / total_w * n_all)) for _, w in live], np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)])
        self.order = None
        if interleave:
            n = min(int(self.offsets[-1]), MAX_VALID_WINDOWS)
            times = np.concatenate([(np.arange(min(c, n)) + 0.5) / c for c in self.counts])
            ids = np.concatenate([self.offsets[i] + np.arange(min(c, n))
                                  for i, c in enumerate(self.counts)])
            self.order = ids[np.argsort(times, kind="stable")][:n]

    def __len__(self) -> int:
        return len(self.order) if self.order is not None else int(self.offsets[-1])

    def __getitem__(self, k: int) -> np.ndarray:
        if self.order is not None:
            k = int(self.order[k])
        i = int(np.searchsorted(self.offsets, k, side="right")) - 1
        return self.comps[i].window(k - int(self.offsets[i]), self.seq)


class Blend:
    """One split of the blended prefixes; ``TokenWindows`` asks it for ``windows(seq, name)``."""

    def __init__(self, split: str, streams: list[SegmentStream], names: list[str],
                 weights: list[float], seed: int):
        self.split, self.streams, self.names, self.weights, self.seed = \
            split, streams, names, weights, seed

    def __len__(self) -> int:
        return sum(len(s) for s in self.streams)

    def windows(self, seq: int, name: str) -> BlendWindows:
        comps = [_Component(n, s, seq, [self.seed, i, SPLITS.index(self.split)])
                 for i, (n, s) in enumerate(zip(self.names, self.streams))]
        return BlendWindows(comps, self.weights, seq, name, interleave=self.split == "valid")


class PreparedBlend:
    """What ``prepare_data`` returns for ``--data-path``: the PreparedData interface that
    training uses (vocab_size, eod_id, digest, tokens(split), tokenizer(), path, meta)."""

    def __init__(self, path: Path, meta: dict, splits: dict, tokenizer):
        self.path, self.meta, self._splits, self._tok = path, meta, splits, tokenizer

    vocab_size = property(lambda self: int(self.meta["vocab_size"]))
    eod_id = property(lambda self: int(self.meta["eod_id"]))
    digest = property(lambda self: self.meta["digest"])

    def tokens(self, split: str) -> Blend:
        return self._splits[split]

    def tokenizer(self):
        t = self._tok
        return t.sp if t.kind == "sentencepiece" else t.tok


def prepare_blend(prefixes: list[MegatronPrefix], settings: DataSettings, log) -> PreparedBlend:
    if not settings.tokenizer:
        raise DataError("--data-path needs --tokenizer: the tokenizer the .bin/.idx files were "
                        "made with (its vocabulary sizes the model)")
    tok = settings.load_tokenizer()
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{tok.fingerprint()} {settings.val_fraction} {settings.split_seed}".encode())
    streams = {s: [] for s in SPLITS}
    n_docs = {s: 0 for s in SPLITS}
    for i, p in enumerate(prefixes):
        index = read_index(p.prefix)
        idx, bin_ = _paths(p.prefix)
        h.update(f"{p.weight} {file_digest(idx)} {bin_.stat().st_size}".encode())
        data = np.memmap(bin_, dtype=index.dtype, mode="r")
        head = np.asarray(data[:CHECK_TOKENS])
        if head.size and (int(head.max()) >= tok.vocab_size or int(head.min()) < 0):
            bad = int(head.max()) if int(head.max()) >= tok.vocab_size else int(head.min())
            raise DataError(f"{bin_} holds token id {bad}, outside the vocabulary of tokenizer "
                            f"{settings.tokenizer} ({tok.vocab_size} tokens): the files were made "
                            "with another tokenizer")
        docs = index.documents
        n = len(docs) - 1
        if n < 2:
            raise DataError(f"{idx}: only {n} document; at least 2 are needed for a "
                            "train/validation split")
        # a document = its sequences, contiguous in the .bin
        first_seq = docs[:-1]
        nonempty = docs[1:] > docs[:-1]
        starts = np.zeros(n, dtype=np.int64)
        starts[nonempty] = index.pointers[first_seq[nonempty]] // index.dtype.itemsize
        seq_tokens = np.concatenate([[0], np.cumsum(index.lengths, dtype=np.int64)])
        lengths = seq_tokens[docs[1:]] - seq_tokens[docs[:-1]]
        n_val = min(n - 1, max(1, round(settings.val_fraction * n)))
        is_val = np.zeros(n, dtype=bool)
        is_val[np.random.default_rng([settings.split_seed, i]).choice(n, n_val, replace=False)] = True
        for split, sel in (("train", ~is_val), ("valid", is_val)):
            streams[split].append(SegmentStream(bin_, index.dtype, starts[sel], lengths[sel]))
            n_docs[split] += int(sel.sum())
    names = [p.prefix for p in prefixes]
    weights = [p.weight for p in prefixes]
    splits = {s: Blend(s, streams[s], names, weights, settings.split_seed) for s in SPLITS}
    meta = {"kind": "megatron", "vocab_size": tok.vocab_size, "eod_id": tok.eod_id,
            "files": names, "weights": weights, "train_docs": n_docs["train"],
            "valid_docs": n_docs["valid"], "train_tokens": len(splits["train"]),
            "valid_tokens": len(splits["valid"]), "tokenizer": settings.tokenizer,
            "tokenizer_kind": tok.kind, "digest": h.hexdigest()}
    log(f"[data] {len(prefixes)} megatron prefix(es), weights "
        f"{', '.join(f'{w:g}' for w in weights)}: {meta['train_docs']} train / "
        f"{meta['valid_docs']} valid documents, {meta['train_tokens']:,} / "
        f"{meta['valid_tokens']:,} tokens, vocabulary {tok.vocab_size} ({tok.kind})")
    return PreparedBlend(Path(os.path.dirname(os.path.abspath(names[0]))), meta, splits, tok)
