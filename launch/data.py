"""Training data: text files -> SentencePiece tokenizer -> megatron-core indexed dataset.

    prepared = prepare_data(["my_texts/", "extra.jsonl"], cache_dir, DataSettings(vocab_size=8192))
    train = TokenWindows(prepared.tokens("train"), seq_length=256)
    sampler = DeterministicSampler(len(train), seed, micro_batch, grad_accum, dp_size, dp_rank)
    ids = sampler.micro_batch_indices(step, micro)     # same answer whenever it is asked

Inputs (``--data``): files and folders (searched recursively, hidden entries skipped), default the
shipped corpus ``launch/corpus/kjv.txt.xz``.
  * ``.txt`` / ``.text`` / ``.md``: UTF-8 text, documents separated by one or more blank lines;
  * ``.jsonl`` / ``.ndjson``: one JSON object per line, the document under ``"text"`` (another key
    with ``jsonl_key``), or one JSON string per line;
  * each optionally compressed: ``.gz``, ``.xz``, ``.bz2``.
An explicitly named file with another extension is read as plain text. A missing, empty, binary
(NUL bytes), undecodable (not UTF-8) or corrupt (bad compression / JSON) input stops with a
``DataError`` that names the file (and line). Files are read as a stream of ~1 MiB blocks, so
memory does not grow with the corpus.

Instead of text, ``--data-path [weight] prefix ...`` trains on megatron-preprocessed
``prefix.bin/.idx`` files in place, blended by weight (launch/megatron_data.py; needs
``--tokenizer``). ``--tokenizer`` takes a SentencePiece model, a Hugging Face tokenizer.json or
tokenizer folder, or GPT-2 vocab.json + merges.txt (launch/tokenization.py).

Preparation, once per (input contents, settings):
  1. documents are split into train / validation by document (a seeded choice of
     ``max(1, round(val_fraction * n))`` documents for validation);
  2. a SentencePiece model (``vocab_size``, ``tokenizer_type``) is trained on the train documents,
     or an existing tokenizer is used;
  3. every document is encoded (by ``workers`` processes, same result for any number) and written
     with an end-of-document token (``</s>``, or the existing tokenizer's) through ``megatron.core.datasets.indexed_dataset.IndexedDatasetBuilder``: one
     document per sequence, ``train.bin/.idx`` and ``valid.bin/.idx`` (uint16 tokens when the
     vocabulary fits, else int32) -- the files megatron's own GPTDataset reads.

Cache: ``<cache_dir>/<key>/`` with ``tokenizer.model`` (or ``tokenizer.json``), ``{train,valid}.{bin,idx}`` and
``meta.json``. ``key`` is a hash of the inputs' bytes (not their paths) and of the settings. The
folder is built under a temporary name and renamed into place; ``meta.json`` (the completion
marker, holding the full key) is written last inside it. A folder without a matching marker, or a
leftover temporary folder, is never read: it is rebuilt.

Samples: the token stream of a split (documents back to back, each ending with EOD) is cut into
non-overlapping windows of ``seq_length + 1`` tokens (inputs = window[:-1], labels = window[1:]).
The order is a permutation per epoch drawn from (seed, epoch); the samples of step ``t`` are the
global positions ``t*G .. t*G+G-1`` (G = global batch), micro-batch ``m`` of data-parallel rank
``r`` takes positions ``m*mb*dp + r*mb .. + mb``. So the order depends only on seed and step
(resumable with no loader state) and each rank reads only its own slice.
"""
from __future__ import annotations

import argparse
import bz2
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import sys
import time
import uuid
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

FORMAT_VERSION = 1
CORPUS_DIR = Path(__file__).resolve().parent / "corpus"
DEFAULT_CORPUS = CORPUS_DIR / "kjv.txt.xz"
TEXT_SUFFIXES = (".txt", ".text", ".md")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
COMPRESSORS: dict[str, Callable] = {".gz": gzip.open, ".xz": lzma.open, ".bz2": bz2.open}
TOKENIZER_TYPES = ("bpe", "unigram")
SPLITS = ("train", "valid")


class DataError(ValueError):
    """Bad input data or settings; the message names the file."""


def default_cache_dir() -> Path:
    """``$EMBER_DATA_CACHE``, else ``$XDG_CACHE_HOME/ember_ds/data`` (``~/.cache/...``)."""
    if os.environ.get("EMBER_DATA_CACHE"):
        return Path(os.environ["EMBER_DATA_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ember_ds" / "data"


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------

def _split_suffix(path: Path) -> tuple[str, Optional[str]]:
    """(format suffix, compression suffix or None) of a file name, lower case."""
    suffixes = [s.lower() for s in path.suffixes]
    comp = suffixes[-1] if suffixes and suffixes[-1] in COMPRESSORS else None
    rest = suffixes[:-1] if comp else suffixes
    return (rest[-1] if rest else ""), comp


def _is_data_file(path: Path) -> bool:
    fmt, _ = _split_suffix(path)
    return fmt in TEXT_SUFFIXES or fmt in JSONL_SUFFIXES


@dataclass(frozen=True)
class MegatronPrefix:
    """One ``weight prefix`` pair of ``--data-path``: ``prefix.bin`` / ``prefix.idx`` written by
    megatron's preprocess_data.py (or any IndexedDatasetBuilder)."""
    weight: float
    prefix: str


def resolve_inputs(paths: Optional[Sequence]) -> list:
    """Expand ``paths`` (files and folders; empty: the shipped corpus) into a sorted,
    de-duplicated list of data files. A missing path, or a folder holding no data file, raises.
    Megatron prefixes (``--data-path``) are checked (both files present, a readable index) and
    returned as given."""
    if paths and any(isinstance(p, MegatronPrefix) for p in paths):
        from launch.megatron_data import check_prefix
        for p in paths:
            check_prefix(p)
        return list(paths)
    if not paths:
        paths = [DEFAULT_CORPUS]
    files: list[Path] = []
    for p in paths:
        p = Path(p).expanduser()
        if not p.exists():
            raise DataError(f"data path not found: {p}")
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and _is_data_file(f)
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            if not found:
                raise DataError(f"no data files under folder {p} (looked for "
                                f"{', '.join(TEXT_SUFFIXES + JSONL_SUFFIXES)}, optionally "
                                f"compressed as {', '.join(COMPRESSORS)})")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"data path is neither a file nor a folder: {p}")
    seen, unique = set(), []
    for f in files:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique


def _open_binary(path: Path):
    _, comp = _split_suffix(path)
    return COMPRESSORS[comp](path, "rb") if comp else open(path, "rb")


def _read_error(path: Path, e: BaseException) -> DataError:
    _, comp = _split_suffix(path)
    return DataError(f"{path}: cannot read{' ' + comp + '-compressed data' if comp else ''} ({e})")


_BLANK_LINES = re.compile(r"\n[ \t\f\v]*\n\s*")
READ_ERRORS = (OSError, EOFError, lzma.LZMAError, zlib.error)
CHUNK = 1 << 20


def iter_blocks(path: Path) -> Iterator[str]:
    """One input file as decoded text blocks of about 1 MiB, each ending at a line end (memory:
    one block, or one line when a line is longer), decoded as UTF-8 while streaming: a BOM is
    dropped, CRLF / CR become LF. Empty (whitespace only), binary (NUL bytes in the first MiB) and
    non-UTF-8 files raise a DataError naming the file (byte offset and line, as if the whole file
    were decoded at once)."""
    try:
        fh = _open_binary(path)
    except READ_ERRORS as e:
        raise _read_error(path, e) from e
    offset, lines, rest, content, first = 0, 0, b"", False, True
    with fh:
        while True:
            try:
                chunk = fh.read(CHUNK)
            except READ_ERRORS as e:
                raise _read_error(path, e) from e
            if first:
                first = False
                nul = chunk.find(b"\x00")
                if nul >= 0:
                    raise DataError(f"{path} looks like a binary file (NUL byte at offset {nul}); "
                                    "expected UTF-8 text (.txt/.md) or JSON lines (.jsonl)")
                if chunk.startswith(b"\xef\xbb\xbf"):
                    chunk, offset = chunk[3:], 3
            if chunk:
                data = rest + chunk
                cut = data.rfind(b"\n") + 1
                if cut == 0:                   # no line end yet: keep reading
                    rest = data
                    continue
                block, rest = data[:cut], data[cut:]
            else:
                block, rest = rest, b""
            if block:
                try:
                    text = block.decode("utf-8")
                except UnicodeDecodeError as e:
                    line = lines + block.count(b"\n", 0, e.start) + 1
                    raise DataError(f"{path} is not valid UTF-8 ({e.reason} at byte "
                                    f"{offset + e.start}, line {line}); convert it first, e.g. "
                                    "`iconv -f latin1 -t utf-8 in.txt > out.txt`") from e
                offset += len(block)
                lines += block.count(b"\n")
                if not content and not text.isspace():
                    content = True
                if "\r" in text:
                    text = text.replace("\r\n", "\n").replace("\r", "\n")
                yield text
            if not chunk:
                break
    if not content:
        raise DataError(f"{path} is empty")


def iter_lines(path: Path) -> Iterator[str]:
    """The lines of one input file (see ``iter_blocks`` for the decoding and its errors)."""
    for block in iter_blocks(path):
        lines = block.split("\n")
        if lines[-1] == "":
            lines.pop()
        yield from lines


def read_text(path: Path) -> str:
    """A whole (small) input file as text: see ``iter_blocks`` for the decoding and errors."""
    return "".join(iter_blocks(path))


def iter_file_documents(path: Path, jsonl_key: str = "text") -> Iterator[str]:
    """The documents of one file, streamed (see the module docstring for the formats)."""
    fmt, _ = _split_suffix(path)
    count = 0
    if fmt in JSONL_SUFFIXES:
        for lineno, line in enumerate(iter_lines(path), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not a JSON line ({e.msg})") from e
            if isinstance(obj, dict):
                if jsonl_key not in obj:
                    raise DataError(f"{path}:{lineno}: no {jsonl_key!r} field (keys: "
                                    f"{', '.join(map(str, list(obj)[:8]))})")
                obj = obj[jsonl_key]
            if not isinstance(obj, str):
                raise DataError(f"{path}:{lineno}: the document must be a string, got "
                                f"{type(obj).__name__}")
            if obj.strip():
                count += 1
                yield obj.strip()
    else:
        # documents are separated by blank lines; the text after the last separator of a block
        # may continue in the next block, so it is carried over
        carry = ""
        for block in iter_blocks(path):
            parts = _BLANK_LINES.split(carry + block)
            carry = parts.pop()
            for doc in parts:
                doc = doc.strip()
                if doc:
                    count += 1
                    yield doc
        carry = carry.strip()
        if carry:
            count += 1
            yield carry
    if count == 0:
        raise DataError(f"{path} holds no non-empty document")


def iter_documents(files: Sequence[Path], jsonl_key: str = "text") -> Iterator[str]:
    for f in files:
        yield from iter_file_documents(f, jsonl_key)


def file_digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Settings, cache key, preparation
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DataSettings:
    vocab_size: int = 8192            # SentencePiece vocabulary (ignored with ``tokenizer``)
    tokenizer_type: str = "bpe"       # "bpe" | "unigram"
    val_fraction: float = 0.05        # share of documents held out for validation
    split_seed: int = 1234            # seeds the train/validation split and tokenizer training
    jsonl_key: str = "text"
    tokenizer: Optional[str] = None   # an existing tokenizer instead of training one (any kind
                                      # launch/tokenization.py reads)
    character_coverage: float = 1.0
    byte_fallback: Optional[bool] = None   # None: on when vocab_size >= 1024
    eod_token: Optional[str] = None   # end-of-document token of an existing tokenizer
    workers: int = 0                  # tokenizing processes; 0: by input size (not in the key)

    def check(self) -> None:
        if self.tokenizer is None:
            if not 64 <= self.vocab_size <= 1_000_000:
                raise DataError(f"vocab size {self.vocab_size} is out of range (64 .. 1,000,000)")
            if self.tokenizer_type not in TOKENIZER_TYPES:
                raise DataError(f"unknown tokenizer type {self.tokenizer_type!r}; choose from "
                                f"{', '.join(TOKENIZER_TYPES)}")
            if self.eod_token is not None:
                raise DataError("--eod-token names a token of an existing --tokenizer; a trained "
                                "SentencePiece model ends documents with </s>")
        else:
            self.load_tokenizer()
        if not 0.0 < self.val_fraction <= 0.5:
            raise DataError(f"val_fraction must be in (0, 0.5], got {self.val_fraction}")
        if self.workers < 0:
            raise DataError(f"workers must be >= 0, got {self.workers}")

    def load_tokenizer(self):
        """The existing tokenizer named by ``tokenizer`` (a DataError names a bad file)."""
        from launch.tokenization import TokenizerError, load_tokenizer
        try:
            return load_tokenizer(self.tokenizer, self.eod_token)
        except TokenizerError as e:
            raise DataError(str(e)) from e

    @property
    def use_byte_fallback(self) -> bool:
        return self.vocab_size >= 1024 if self.byte_fallback is None else bool(self.byte_fallback)


def tokenizer_digest(settings: DataSettings) -> str:
    """Identifies an existing tokenizer: a SentencePiece file's bytes, else the normalized
    tokenizer (its tokenizer.json and end-of-document token)."""
    path = Path(settings.tokenizer).expanduser()
    if path.is_file() and path.suffix == ".model":
        return file_digest(path)
    return settings.load_tokenizer().fingerprint()


def cache_key(files: Sequence[Path], settings: DataSettings) -> tuple[str, dict]:
    """sha256 over the format version, the settings and the inputs' content digests."""
    desc = {"format": FORMAT_VERSION,
            "settings": {**asdict(settings), "tokenizer": None,
                         "byte_fallback": settings.use_byte_fallback},
            "inputs": [file_digest(f) for f in files]}
    for k in ("workers", "eod_token"):          # workers never change the result
        desc["settings"].pop(k)
    if settings.tokenizer:
        desc["tokenizer_digest"] = tokenizer_digest(settings)
        if settings.eod_token is not None:
            desc["eod_token"] = settings.eod_token
        for k in ("vocab_size", "tokenizer_type", "character_coverage", "byte_fallback"):
            desc["settings"].pop(k)
    blob = json.dumps(desc, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest(), desc


@dataclass
class PreparedData:
    """A complete cache folder."""
    path: Path
    meta: dict

    @property
    def tokenizer_path(self) -> Path:
        return self.path / self.meta.get("tokenizer_file", "tokenizer.model")

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def eod_id(self) -> int:
        return int(self.meta["eod_id"])

    @property
    def digest(self) -> str:
        return self.meta["digest"]

    def tokenizer(self):
        """The tokenizer (a SentencePieceProcessor, or a tokenizers.Tokenizer): ``.decode(ids)``."""
        from launch.tokenization import load_cached
        tok = load_cached(self.path, self.tokenizer_path.name)
        return tok.sp if tok.kind == "sentencepiece" else tok.tok

    def prefix(self, split: str) -> str:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}")
        return str(self.path / split)

    def indexed_dataset(self, split: str):
        """megatron-core's IndexedDataset over a split (one sequence per document)."""
        from megatron.core.datasets.indexed_dataset import IndexedDataset
        return IndexedDataset(self.prefix(split))

    def tokens(self, split: str) -> np.ndarray:
        """The split's whole token stream, memory-mapped read-only (the .bin file holds the
        documents back to back, in IndexedDataset's dtype)."""
        n = int(self.meta[f"{split}_tokens"])
        dtype = np.dtype(self.meta["dtype"])
        return np.memmap(self.prefix(split) + ".bin", dtype=dtype, mode="r", shape=(n,))


def _read_marker(folder: Path, key: str) -> Optional[dict]:
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    if meta.get("key") != key or meta.get("complete") is not True:
        return None
    for name in (meta.get("tokenizer_file", "tokenizer.model"), "train.bin", "train.idx",
                 "valid.bin", "valid.idx"):
        if not (folder / name).is_file():
            return None
    return meta


def find_prepared(files: Sequence[Path], settings: DataSettings,
                  cache_dir: str | os.PathLike) -> Optional[PreparedData]:
    key, _ = cache_key(files, settings)
    folder = Path(cache_dir) / key[:20]
    meta = _read_marker(folder, key)
    return PreparedData(folder, meta) if meta else None


def prepare_data(paths: Optional[Sequence] = None,
                 cache_dir: Optional[str | os.PathLike] = None,
                 settings: DataSettings = DataSettings(),
                 log: Callable[[str], None] = print):
    """Return the prepared data for ``paths`` and ``settings``, building it when the cache has no
    complete copy. Safe to call from several processes at once (each builds under its own
    temporary name; the first complete rename wins, the others use it).

    ``paths`` may instead hold megatron-preprocessed prefixes (``--data-path``): those are used
    in place (nothing is built or cached), see launch/megatron_data.py."""
    if paths and any(isinstance(p, MegatronPrefix) for p in paths):
        from launch.megatron_data import prepare_blend
        settings.check()
        return prepare_blend(resolve_inputs(paths), settings, log)
    settings.check()
    files = resolve_inputs(paths)
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    key, desc = cache_key(files, settings)
    final = cache_dir / key[:20]
    meta = _read_marker(final, key)
    if meta:
        return PreparedData(final, meta)

    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".tmp-{key[:20]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    t0 = time.time()
    try:
        meta = _build(files, settings, tmp, log)
        meta.update(key=key, inputs=[str(f) for f in files], description=desc,
                    build_seconds=round(time.time() - t0, 2), complete=True)
        with open(tmp / "meta.json", "w") as fh:     # the completion marker, written last
            json.dump(meta, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        _publish(tmp, final, key)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    meta = _read_marker(final, key)
    if meta is None:            # pragma: no cover - only if the folder vanished under us
        raise DataError(f"prepared data at {final} is incomplete after building it")
    log(f"[data] prepared {meta['train_docs']} train / {meta['valid_docs']} valid documents, "
        f"{meta['train_tokens']:,} / {meta['valid_tokens']:,} tokens, vocabulary "
        f"{meta['vocab_size']} in {time.time() - t0:.1f}s -> {final}")
    return PreparedData(final, meta)


def _publish(tmp: Path, final: Path, key: str) -> None:
    """Rename the finished folder into place; a stale incomplete folder there is moved away
    first; a complete one written meanwhile by another process is kept."""
    for _ in range(3):
        try:
            os.rename(tmp, final)
            return
        except OSError:
            if _read_marker(final, key):
                return                     # another process finished first
            if final.exists():             # incomplete leftover (crash mid-build): discard
                stale = final.with_name(f".stale-{final.name}-{uuid.uuid4().hex[:8]}")
                try:
                    os.rename(final, stale)
                except OSError:
                    continue
                shutil.rmtree(stale, ignore_errors=True)
    raise DataError(f"could not move prepared data into {final}")


# Tokenizing: one process, or a pool of workers each holding the tokenizer; the main process
# streams the documents in batches, keeps at most 2 batches per worker in flight and writes the
# results in order (the output does not depend on the number of workers).
BATCH_DOCS, BATCH_CHARS = 512, 4 << 20
AUTO_WORKERS_BYTES = 64 << 20          # inputs smaller than this are tokenized in-process

_WORKER: dict = {}


def _worker_init(folder: str, file_name: str) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"     # our processes are the parallelism
    from launch.tokenization import load_cached
    _WORKER["tok"] = load_cached(Path(folder), file_name)


def _flat(ids: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Token id lists as one int32 array and the lengths (cheap to send between processes)."""
    import itertools
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32,
                       count=int(lengths.sum()))
    return flat, lengths


def _worker_encode(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    return _flat(_WORKER["tok"].encode_batch(texts))


def _add_documents(builder, flat: np.ndarray, lengths: np.ndarray) -> None:
    """Append documents of one sequence each to an IndexedDatasetBuilder at once (what add_item +
    end_document per document do, without a call and a tensor per document)."""
    builder.data_file.write(np.asarray(flat, dtype=builder.dtype).tobytes(order="C"))
    n0 = len(builder.sequence_lengths)
    builder.sequence_lengths.extend(lengths.tolist())
    builder.document_indices.extend(range(n0 + 1, n0 + 1 + len(lengths)))


def _count_file(args) -> int:
    path, jsonl_key = args
    return sum(1 for _ in iter_file_documents(Path(path), jsonl_key))


def _n_workers(files: Sequence[Path], settings: DataSettings) -> int:
    if settings.workers:
        return settings.workers
    size = sum(f.stat().st_size for f in files)
    return 1 if size < AUTO_WORKERS_BYTES else max(1, min(8, (os.cpu_count() or 1)))


def _doc_batches(files, jsonl_key) -> Iterator[list[str]]:
    batch, chars = [], 0
    for doc in iter_documents(files, jsonl_key):
        batch.append(doc)
        chars += len(doc)
        if len(batch) >= BATCH_DOCS or chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _encoded_batches(files, settings, tok, out: Path, workers: int):
    """(documents, (token ids, lengths)) per batch, in input order."""
    if workers <= 1:
        for batch in _doc_batches(files, settings.jsonl_key):
            yield batch, _flat(tok.encode_batch(batch))
        return
    import collections
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    with ctx.Pool(workers, initializer=_worker_init, initargs=(str(out), tok.file_name)) as pool:
        pending: collections.deque = collections.deque()
        for batch in _doc_batches(files, settings.jsonl_key):
            pending.append((batch, pool.apply_async(_worker_encode, (batch,))))
            if len(pending) >= 2 * workers:
                b, r = pending.popleft()
                yield b, r.get()
        while pending:
            b, r = pending.popleft()
            yield b, r.get()


def _progress(total: int, desc: str):
    """A tqdm bar on stderr when it is a terminal (or EMBER_PROGRESS=1), else a no-op."""
    show = os.environ.get("EMBER_PROGRESS", "")
    try:
        from tqdm import tqdm
    except ImportError:        # pragma: no cover
        tqdm = None
    if tqdm is None or show == "0" or (show != "1" and not sys.stderr.isatty()):
        class _Null:
            def update(self, n=1):
                pass

            def close(self):
                pass
        return _Null()
    return tqdm(total=total, desc=desc, unit="doc", file=sys.stderr, dynamic_ncols=True)


def _build(files: Sequence[Path], settings: DataSettings, out: Path, log) -> dict:
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    workers = _n_workers(files, settings)
    # pass 1: validate every file and count documents (errors name the file before any work)
    if workers > 1 and len(files) > 1:
        import multiprocessing as mp
        with mp.get_context("spawn").Pool(min(workers, len(files))) as pool:
            counts = pool.map(_count_file, [(str(f), settings.jsonl_key) for f in files])
    else:
        counts = [_count_file((f, settings.jsonl_key)) for f in files]
    n_docs = sum(counts)
    if n_docs < 2:
        raise DataError(f"{', '.join(map(str, files))}: only {n_docs} document; at least 2 are "
                        "needed for a train/validation split (in .txt files documents are "
                        "separated by blank lines)")
    n_val = min(n_docs - 1, max(1, round(settings.val_fraction * n_docs)))
    rng = np.random.default_rng(settings.split_seed)
    is_val = np.zeros(n_docs, dtype=bool)
    is_val[rng.choice(n_docs, n_val, replace=False)] = True

    # tokenizer: an existing one, or SentencePiece trained on the train documents' lines
    if settings.tokenizer:
        tok = settings.load_tokenizer()
        tok_file = tok.save(out)
    else:
        _train_sentencepiece(files, settings, is_val, out / "tokenizer.model")
        tok_file = "tokenizer.model"
    from launch.tokenization import load_cached
    tok = load_cached(out, tok_file)
    eod = tok.eod_id if not settings.tokenizer else settings.load_tokenizer().eod_id
    vocab = tok.vocab_size
    dtype = DType.optimal_dtype(vocab)

    # pass 2: encode (workers), one document per sequence, EOD-terminated
    builders = {s: IndexedDatasetBuilder(str(out / f"{s}.bin"), dtype=dtype) for s in SPLITS}
    n_tok = {s: 0 for s in SPLITS}
    n_doc = {s: 0 for s in SPLITS}
    i = 0
    bar = _progress(n_docs, f"tokenizing ({workers} worker{'s' if workers > 1 else ''})")
    try:
        for batch, (flat, lengths) in _encoded_batches(files, settings, tok, out, workers):
            val = is_val[i:i + len(batch)]
            i += len(batch)
            with_eod = lengths + 1
            ends = np.cumsum(with_eod)
            ids = np.empty(int(ends[-1]), dtype=np.int64)
            keep = np.ones(len(ids), dtype=bool)
            keep[ends - 1] = False
            ids[keep] = flat
            ids[ends - 1] = eod
            tok_val = np.repeat(val, with_eod)
            for split, sel, tsel in (("train", ~val, ~tok_val), ("valid", val, tok_val)):
                if sel.any():
                    _add_documents(builders[split], ids[tsel], with_eod[sel])
                    n_tok[split] += int(with_eod[sel].sum())
                    n_doc[split] += int(sel.sum())
            bar.update(len(batch))
    finally:
        bar.close()
    h = hashlib.blake2b(digest_size=16)
    for s in SPLITS:
        builders[s].finalize(str(out / f"{s}.idx"))
    for name in (tok_file, "train.bin", "train.idx", "valid.bin", "valid.idx"):
        h.update(file_digest(out / name).encode())
    return {"complete": False, "format": FORMAT_VERSION, "vocab_size": vocab, "eod_id": eod,
            "dtype": np.dtype(dtype).name, "train_docs": n_doc["train"],
            "valid_docs": n_doc["valid"], "train_tokens": n_tok["train"],
            "valid_tokens": n_tok["valid"], "files": [str(f) for f in files],
            "docs_per_file": counts, "settings": asdict(settings), "tokenizer_file": tok_file,
            "tokenizer_kind": tok.kind, "workers": workers, "digest": h.hexdigest()}


# SentencePiece's trainer skips every sentence longer than its max_sentence_length (4192 bytes
# of UTF-8 by default) and stops with "[!sentences_.empty()]" when it skipped them all.
SP_MAX_SENTENCE = 4192
_SENTENCE_ENDS = (b". ", b"! ", b"? ", b"; ", b"\xe3\x80\x82")     # the last one: CJK full stop


def training_pieces(line: str, limit: int = SP_MAX_SENTENCE) -> Iterator[str]:
    """``line`` cut into pieces of at most ``limit`` UTF-8 bytes for tokenizer training (a line
    within the limit is yielded as it is): each cut is at the last sentence end in the second
    half of the remaining window, else at its last space or tab (dropped), else at the last
    character boundary. Tokenization itself takes documents of any length; only the trainer
    has a limit."""
    data = line.encode("utf-8")
    if len(data) <= limit:
        yield line
        return
    pos, n = 0, len(data)
    while n - pos > limit:
        end = pos + limit
        cut = max(data.rfind(e, pos + limit // 2, end) for e in _SENTENCE_ENDS)
        if cut >= 0:
            cut += 3 if data[cut] == 0xE3 else 1       # keep the full stop, drop the space
            skip = 0 if data[cut - 1] == 0x82 else 1
        else:
            cut = max(data.rfind(b" ", pos + 1, end + 1), data.rfind(b"\t", pos + 1, end + 1))
            skip = 1
            if cut < 0:                                # no whitespace: a character boundary
                cut = end
                while data[cut] & 0xC0 == 0x80:
                    cut -= 1
                skip = 0
        piece = data[pos:cut].decode("utf-8")
        if piece.strip():
            yield piece
        pos = cut + skip
    if data[pos:].strip():
        yield data[pos:].decode("utf-8")


def _sentencepiece_failure(e: BaseException, settings: DataSettings, n_files: int,
                           stats: dict) -> DataError:
    """SentencePiece's error as one line naming the cause (its own text is an assertion)."""
    text = " ".join(str(e).split())
    what = (f"training the SentencePiece tokenizer (vocab {settings.vocab_size}, "
            f"{settings.tokenizer_type}) on {n_files} file(s) failed")
    m = re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)",
                  text)
    if m:
        return DataError(f"{what}: the training text ({stats['lines']:,} lines, "
                         f"{stats['chars']:,} characters) holds too few distinct pieces for "
                         f"--vocab-size {m.group(1)}; the most it supports is {m.group(2)}: give "
                         "a smaller --vocab-size or more text")
    if "sentences_.empty()" in text or "all_chars_count" in text:
        return DataError(f"{what}: SentencePiece kept none of the {stats['lines']:,} training "
                         f"lines ({stats['chars']:,} characters of the train documents; none is "
                         f"over its {SP_MAX_SENTENCE}-byte sentence limit: longer lines are "
                         "split); the text may hold only characters it drops (control "
                         "characters, whitespace)")
    text = re.sub(r"^[A-Z_]+: \S+\.cc\(\d+\) ", "", text)
    return DataError(f"{what}: {text[:400]}")


def _train_sentencepiece(files, settings: DataSettings, is_val, model_path: Path) -> None:
    """SentencePiece trained on the train documents' lines, deterministically (a sample of at
    most 2 M lines is held in memory). Lines over SentencePiece's sentence limit are cut into
    pieces under it (``training_pieces``), so documents of any length train it."""
    import sentencepiece as spm
    stats = {"lines": 0, "chars": 0, "split": 0}

    def lines():
        for i, doc in enumerate(iter_documents(files, settings.jsonl_key)):
            if not is_val[i]:
                for line in doc.split("\n"):
                    if line.strip():
                        stats["lines"] += 1
                        stats["chars"] += len(line)
                        if len(line) * 4 <= SP_MAX_SENTENCE:   # surely within (<= 4 B a char)
                            yield line
                            continue
                        pieces = list(training_pieces(line))
                        stats["split"] += len(pieces) > 1
                        yield from pieces
    spm.set_random_generator_seed(settings.split_seed)
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=lines(), model_writer=buf, vocab_size=settings.vocab_size,
            model_type=settings.tokenizer_type, character_coverage=settings.character_coverage,
            byte_fallback=settings.use_byte_fallback, unk_id=0, bos_id=1, eos_id=2,
            pad_id=-1, input_sentence_size=2_000_000, shuffle_input_sentence=True,
            num_threads=1, minloglevel=2)
    except RuntimeError as e:
        raise _sentencepiece_failure(e, settings, len(files), stats) from None
    model_path.write_bytes(buf.getvalue())


# --------------------------------------------------------------------------------------------
# Samples and their order
# --------------------------------------------------------------------------------------------

class TokenWindows:
    """Non-overlapping windows of ``seq_length + 1`` tokens over a token stream."""

    def __init__(self, tokens: np.ndarray, seq_length: int, name: str = "data"):
        self.tokens = tokens
        self.seq_length = int(seq_length)
        self._samples = None
        if hasattr(tokens, "windows"):          # a blend of megatron prefixes
            self._samples = tokens.windows(self.seq_length, name)
            self.num_samples = len(self._samples)
            return
        self.num_samples = (len(tokens) - 1) // self.seq_length
        if self.num_samples < 1:
            raise DataError(f"the {name} split has {len(tokens)} tokens, fewer than "
                            f"seq_length + 1 = {self.seq_length + 1}: use more text, a larger "
                            "validation fraction or a shorter sequence")

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> np.ndarray:
        if self._samples is not None:
            return self._samples[int(i)]
        start = int(i) * self.seq_length
        return np.asarray(self.tokens[start:start + self.seq_length + 1], dtype=np.int64)

    def batch(self, indices):
        """(input_ids, labels) as int64 torch tensors of shape [len(indices), seq_length]."""
        import torch
        arr = np.stack([self[i] for i in indices]) if len(indices) else \
            np.zeros((0, self.seq_length + 1), dtype=np.int64)
        t = torch.from_numpy(arr)
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()


class DeterministicSampler:
    """Which samples a data-parallel rank reads at (step, micro-step): a pure function of seed
    and position, so resuming at step t needs no loader state, and ranks never coordinate.

    Global position k of the stream maps to sample ``perm(seed, k // N)[k % N]`` (N samples, a
    fresh permutation per epoch). Step t covers positions [t*G, (t+1)*G), G = micro_batch *
    grad_accum * dp_size; inside it micro-step m of rank r takes
    ``t*G + m*micro_batch*dp_size + r*micro_batch + [0, micro_batch)``. The global batch of a step
    is therefore the same set of samples for any split of G into dp_size x grad_accum.
    """

    def __init__(self, num_samples: int, seed: int, micro_batch: int, grad_accum: int,
                 dp_size: int, dp_rank: int):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} outside [0, {dp_size})")
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.micro_batch, self.grad_accum = int(micro_batch), int(grad_accum)
        self.dp_size, self.dp_rank = int(dp_size), int(dp_rank)
        self.global_batch = self.micro_batch * self.grad_accum * self.dp_size
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) >= 2:
                self._perms.pop(min(self._perms))
            rng = np.random.default_rng([self.seed, epoch])
            self._perms[epoch] = rng.permutation(self.num_samples)
        return self._perms[epoch]

    def samples_at(self, positions: np.ndarray) -> np.ndarray:
        positions = np.asarray(positions, dtype=np.int64)
        out = np.empty_like(positions)
        epochs = positions // self.num_samples
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = self._perm(int(e))[positions[sel] % self.num_samples]
        return out

    def micro_batch_indices(self, step: int, micro: int) -> np.ndarray:
        if not 0 <= micro < self.grad_accum:
            raise ValueError(f"micro-step {micro} outside [0, {self.grad_accum})")
        start = (step * self.global_batch + micro * self.micro_batch * self.dp_size
                 + self.dp_rank * self.micro_batch)
        return self.samples_at(np.arange(start, start + self.micro_batch))

    def global_batch_indices(self, step: int) -> np.ndarray:
        start = step * self.global_batch
        return self.samples_at(np.arange(start, start + self.global_batch))


def eval_indices(num_samples: int, max_samples: int, dp_size: int, dp_rank: int) -> np.ndarray:
    """This rank's share of the fixed validation set: the first min(max_samples, N) windows, in
    order, split evenly over the data-parallel ranks (each gets at least one)."""
    n = min(int(max_samples), num_samples)
    per_rank = max(1, n // dp_size)
    return (dp_rank * per_rank + np.arange(per_rank)) % num_samples


# --------------------------------------------------------------------------------------------
# CLI: python launch/data.py --data FILES... [--vocab-size N]  (prepare and print a summary)
# --------------------------------------------------------------------------------------------

class _DataAction(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, "data", None) and any(
                isinstance(v, MegatronPrefix) for v in namespace.data):
            parser.error("give either --data (text files) or --data-path (megatron prefixes)")
        setattr(namespace, "data", values)


class _DataPathAction(argparse.Action):
    """--data-path [weight] prefix [weight prefix ...] (Megatron's blend syntax) -> a list of
    MegatronPrefix in ``args.data``."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, "data", None) and not all(
                isinstance(v, MegatronPrefix) for v in namespace.data):
            parser.error("give either --data (text files) or --data-path (megatron prefixes)")
        try:
            pairs = parse_data_path(values)
        except DataError as e:
            parser.error(str(e))
        setattr(namespace, "data", pairs)


def parse_data_path(values: Sequence[str]) -> list[MegatronPrefix]:
    """Megatron's blend syntax: ``prefix`` alone, or ``weight prefix [weight prefix ...]``."""
    values = list(values)
    if len(values) == 1:
        return [MegatronPrefix(1.0, values[0])]
    if len(values) % 2:
        raise DataError(f"--data-path takes one prefix, or weight / prefix pairs; got {len(values)} "
                        f"values: {' '.join(values)}")
    out = []
    for w, prefix in zip(values[::2], values[1::2]):
        try:
            weight = float(w)
        except ValueError:
            raise DataError(f"--data-path: {w!r} is not a weight (expected weight prefix pairs, "
                            f"e.g. --data-path 0.7 /data/web_text_document 0.3 /data/books_text_document)")
        if not weight > 0:
            raise DataError(f"--data-path: weight {w} of {prefix} must be > 0")
        out.append(MegatronPrefix(weight, prefix))
    return out


def add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", nargs="+", default=None, metavar="PATH", action=_DataAction,
                   help="text files / folders (.txt .md .jsonl, optionally .gz .xz .bz2); "
                        "default: the shipped corpus launch/corpus/kjv.txt.xz")
    g.add_argument("--data-path", nargs="+", action=_DataPathAction, dest="data",
                   metavar="[WEIGHT] PREFIX",
                   help="megatron-preprocessed PREFIX.bin/.idx files trained on in place, blended "
                        "by weight as in Megatron: --data-path 0.7 /d/web_text_document 0.3 "
                        "/d/books_text_document (needs --tokenizer, the one they were made with)")
    g.add_argument("--vocab-size", type=int, default=8192, help="SentencePiece vocabulary size (default 8192)")
    g.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES, default="bpe",
                   help="SentencePiece model type (default bpe)")
    g.add_argument("--tokenizer", default=None,
                   help="use an existing tokenizer instead of training one: a SentencePiece "
                        ".model, a Hugging Face tokenizer.json or tokenizer folder, or GPT-2 BPE "
                        "files (a folder with vocab.json + merges.txt, or the vocab.json)")
    g.add_argument("--eod-token", default=None,
                   help="the token that ends each document, for a --tokenizer whose own "
                        "(eos_token, <|endoftext|>, </s>) is not the one wanted")
    g.add_argument("--val-fraction", type=float, default=0.05,
                   help="share of documents held out for validation (default 0.05)")
    g.add_argument("--jsonl-key", default="text", help="field holding the text in .jsonl files (default text)")
    g.add_argument("--cache-dir", default=None,
                   help="where prepared data is cached (default $EMBER_DATA_CACHE or "
                        "~/.cache/ember_ds/data)")
    g.add_argument("--tokenize-workers", type=int, default=0, metavar="N",
                   help="processes that tokenize the corpus (default: 1 below 64 MiB of input, "
                        "else up to 8)")


def settings_from_args(args, split_seed: int = 1234) -> DataSettings:
    return DataSettings(vocab_size=args.vocab_size, tokenizer_type=args.tokenizer_type,
                        val_fraction=args.val_fraction, split_seed=split_seed,
                        jsonl_key=args.jsonl_key, tokenizer=args.tokenizer,
                        eod_token=getattr(args, "eod_token", None),
                        workers=getattr(args, "tokenize_workers", 0) or 0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Prepare (tokenize and cache) training data.")
    add_data_args(p)
    p.add_argument("--split-seed", type=int, default=1234)
    args = p.parse_args(argv)
    try:
        prepared = prepare_data(args.data, args.cache_dir, settings_from_args(args, args.split_seed))
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    m = prepared.meta
    print(json.dumps({"path": str(prepared.path), "vocab_size": m["vocab_size"],
                      "train_docs": m["train_docs"], "valid_docs": m["valid_docs"],
                      "train_tokens": m["train_tokens"], "valid_tokens": m["valid_tokens"],
                      "files": m["files"]}, indent=1))
    return 0


if __name__ == "__main__":
    # run as launch.data (not __main__), so that its classes and errors are the ones the helper
    # modules (launch.tokenization, launch.megatron_data) and worker processes use
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from launch.data import main as _main
    sys.exit(_main())
