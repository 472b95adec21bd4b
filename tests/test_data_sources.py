"""Bring your own tokenizer and data (launch/tokenization.py, launch/megatron_data.py, the streaming
and multi-process tokenizing of launch/data.py), on small files made here:

- a Hugging Face tokenizer (byte-level BPE trained here with the ``tokenizers`` library) as a
  tokenizer.json file, as a folder with tokenizer_config.json, and as GPT-2 style vocab.json +
  merges.txt (same token ids); a WordPiece folder read through transformers' AutoTokenizer with
  ``--eod-token``; every bad tokenizer file is a one-line DataError naming it;
- text read in 1 MiB chunks gives the same documents and errors at any chunk size, and the token
  files do not depend on the number of tokenizing processes;
- megatron .bin/.idx prefixes (written with megatron-core's IndexedDatasetBuilder, documents of
  several sequences) blended by weight with ``--data-path``: the split by document, the windows'
  tokens, the blend's proportions, validation interleaving, bad files; and launch/train.py
  training on them end to end (one process).
"""
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT
from launch import data as D

EOT = "<|endoftext|>"


@pytest.fixture(scope="module")
def chapters():
    docs = list(D.iter_file_documents(D.DEFAULT_CORPUS))
    start = random.randrange(0, len(docs) - 80)
    return docs[start:start + 60]


@pytest.fixture(scope="module")
def hf(tmp_path_factory, chapters):
    """A byte-level BPE (GPT-2 style) trained here: folder/tokenizer.json (+ config naming the
    eos token), and gpt2/vocab.json + gpt2/merges.txt of the same model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    d = tmp_path_factory.mktemp("hf")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=random.randint(300, 400), special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(chapters, trainer)
    (d / "folder").mkdir()
    tok.save(str(d / "folder" / "tokenizer.json"))
    (d / "folder" / "tokenizer_config.json").write_text(json.dumps({"eos_token": EOT}))
    (d / "gpt2").mkdir()
    tok.model.save(str(d / "gpt2"))
    assert {p.name for p in (d / "gpt2").iterdir()} == {"vocab.json", "merges.txt"}
    return dict(dir=d, tok=tok, vocab=tok.get_vocab_size(), eot=tok.token_to_id(EOT))


@pytest.fixture
def corpus(tmp_path, chapters):
    f = tmp_path / "texts.txt"
    f.write_text("\n\n".join(chapters[:40]) + "\n", encoding="utf-8")
    return f


def settings(**kw):
    return D.DataSettings(**{"val_fraction": 0.1, **kw})


def test_hugging_face_and_gpt2_bpe_tokenizers(tmp_path, corpus, hf, chapters):
    cache = tmp_path / "cache"
    folder = D.prepare_data([corpus], cache, settings(tokenizer=str(hf["dir"] / "folder")),
                            log=lambda m: None)
    m = folder.meta
    assert (m["vocab_size"], m["eod_id"], m["tokenizer_kind"]) == (hf["vocab"], hf["eot"], "huggingface")
    assert folder.tokenizer_path.name == "tokenizer.json"
    ds = folder.indexed_dataset("train")
    tok = folder.tokenizer()
    docs = {tok.decode(ds[i][:-1].tolist()) for i in range(len(ds))}
    assert docs <= set(chapters[:40]) and len(docs) == m["train_docs"]   # exact round trip
    assert all(int(ds[i][-1]) == hf["eot"] for i in range(len(ds)))
    # the same model as a tokenizer.json file, and as GPT-2 vocab.json + merges.txt: same tokens
    for source in (hf["dir"] / "folder" / "tokenizer.json", hf["dir"] / "gpt2",
                   hf["dir"] / "gpt2" / "vocab.json"):
        other = D.prepare_data([corpus], tmp_path / "c2", settings(tokenizer=str(source)),
                               log=lambda m: None)
        assert other.meta["eod_id"] == hf["eot"], source
        assert (other.path / "train.bin").read_bytes() == (folder.path / "train.bin").read_bytes()
    # cached: no rebuild; another end-of-document token is another cache entry
    assert D.prepare_data([corpus], cache, settings(tokenizer=str(hf["dir"] / "folder")),
                          log=lambda m: None).path == folder.path
    other_eod = D.prepare_data([corpus], cache, settings(tokenizer=str(hf["dir"] / "folder"),
                                                         eod_token="e"), log=lambda m: None)
    assert other_eod.path != folder.path and other_eod.eod_id == hf["tok"].token_to_id("e")


def test_transformers_folder_with_eod_token(tmp_path, corpus):
    """A WordPiece (BERT) folder has no tokenizer.json: transformers builds the fast tokenizer;
    it has no end-of-document token of its own, so --eod-token names one."""
    words = sorted({w for w in corpus.read_text().lower().split() if w.isalpha()})
    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
                                                + words) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "BertTokenizer", "do_lower_case": True}))
    with pytest.raises(D.DataError, match=f"tokenizer {folder} has no end-of-document token"):
        D.DataSettings(tokenizer=str(folder)).check()
    p = D.prepare_data([corpus], tmp_path / "cache", settings(tokenizer=str(folder),
                                                              eod_token="[SEP]"), log=lambda m: None)
    assert p.eod_id == 3 and p.vocab_size == len(words) + 5
    ds = p.indexed_dataset("valid")       # (ids is a view into its memory map: keep ds)
    ids = ds[0]
    assert int(ids[-1]) == 3
    assert p.tokenizer().decode(ids[:5].tolist()).split()[0].isalpha()


@pytest.mark.parametrize("case", ["missing", "garbage_json", "not_tokenizer", "vocab_no_merges",
                                  "bad_merges", "bad_model", "empty_folder", "no_eod", "bad_eod"])
def test_bad_tokenizer_files_name_the_file(tmp_path, hf, case):
    path = tmp_path / "tok"
    if case == "garbage_json":
        path = tmp_path / "tokenizer.json"
        path.write_text("{not json")
    elif case == "not_tokenizer":
        path = tmp_path / "tokenizer.json"
        path.write_text(json.dumps({"model": {"type": "Nope"}, "version": "1.0"}))
    elif case == "vocab_no_merges":
        path = tmp_path / "vocab.json"
        path.write_text(json.dumps({"a": 0, "b": 1}))
    elif case == "bad_merges":
        path.mkdir()
        (path / "vocab.json").write_text(json.dumps({"a": 0, "b": 1, "ab": 2}))
        (path / "merges.txt").write_text("#version: 0.2\na b\na b c\n")
    elif case == "bad_model":
        path = tmp_path / "sp.model"
        path.write_bytes(os.urandom(64))
    elif case == "empty_folder":
        path.mkdir()
    elif case == "no_eod":
        path.mkdir()
        t = hf["tok"].to_str().replace(EOT, "<|custom|>")
        (path / "tokenizer.json").write_text(t)
    elif case == "bad_eod":
        path = hf["dir"] / "folder"
    expect = {"missing": "tokenizer not found", "garbage_json": "is not a JSON file",
              "not_tokenizer": "is not a Hugging Face tokenizer.json",
              "vocab_no_merges": "merges.txt is missing", "bad_merges": ":3: expected two tokens",
              "bad_model": "is not a SentencePiece model", "empty_folder": "no tokenizer found",
              "no_eod": "has no end-of-document token", "bad_eod": "has no token 'NOPE'"}[case]
    with pytest.raises(D.DataError) as e:
        D.DataSettings(tokenizer=str(path), eod_token="NOPE" if case == "bad_eod" else None).check()
    msg = str(e.value)
    assert expect in msg and str(path) in msg and "\n" not in msg, msg


def test_streaming_reads_any_chunk_size_and_workers_do_not_change_the_tokens(
        tmp_path, chapters, monkeypatch):
    folder = tmp_path / "in"
    folder.mkdir()
    text = "\n\n".join(chapters[:30]).replace("LORD", "L\u00d6RD \u2014 \u4e2d")    # multi-byte
    (folder / "a.txt").write_text(text + "\r\n\r\n", encoding="utf-8")
    import gzip
    with gzip.open(folder / "b.jsonl.gz", "wt", encoding="utf-8") as fh:
        for c in chapters[30:]:
            fh.write(json.dumps({"text": c}) + "\n")
    files = D.resolve_inputs([folder])
    whole = list(D.iter_documents(files))
    for chunk in (random.randint(3, 17), 4096):
        monkeypatch.setattr(D, "CHUNK", chunk)
        assert list(D.iter_documents(files)) == whole
    # an error deep in the file: byte offset and line as in a whole-file read
    bad = tmp_path / "bad.txt"
    raw = ("x" * 50 + "\n") * 40 + "caf\u00e9\n"
    bad.write_bytes(raw.encode("latin-1"))
    monkeypatch.setattr(D, "CHUNK", 64)
    with pytest.raises(D.DataError, match=rf"bad.txt is not valid UTF-8 \(.* at byte "
                                          rf"{51 * 40 + 3}, line 41\)"):
        list(D.iter_file_documents(bad))
    monkeypatch.undo()
    one = D.prepare_data([folder], tmp_path / "c1", settings(vocab_size=300, workers=1),
                         log=lambda m: None)
    two = D.prepare_data([folder], tmp_path / "c2", settings(vocab_size=300, workers=2),
                         log=lambda m: None)
    assert one.meta["workers"] == 1 and two.meta["workers"] == 2
    assert one.path.name == two.path.name                    # workers are not part of the key
    for name in ("tokenizer.model", "train.bin", "train.idx", "valid.bin", "valid.idx"):
        assert (one.path / name).read_bytes() == (two.path / name).read_bytes(), name
    assert one.meta["train_docs"] + one.meta["valid_docs"] == len(whole)


# ------------------------------------------------------------------------------------------
# megatron prefixes

def write_prefix(prefix, docs, dtype=np.uint16):
    """docs: list of documents, each a list of sequences (token lists), as megatron's
    preprocess_data.py writes them (with --split-sentences a document has several)."""
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    b = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=dtype)
    for doc in docs:
        flat = [t for s in doc for t in s]
        b.add_document(torch.tensor(flat, dtype=torch.int64), [len(s) for s in doc])
    b.finalize(str(prefix) + ".idx")


def random_docs(rng, n, vocab, tag):
    """Documents whose tokens say where they come from: doc i of prefix ``tag`` holds
    [tag, i, 0, 1, 2, ...] split into 1-3 sequences (vocab >= 1000)."""
    docs = []
    for i in range(n):
        toks = [tag, 10 + i] + rng.integers(100, vocab, int(rng.integers(5, 60))).tolist()
        cuts = sorted(rng.choice(np.arange(1, len(toks)), size=int(rng.integers(0, 3)), replace=False))
        docs.append([list(s) for s in np.split(np.array(toks), cuts)])
    return docs


@pytest.fixture
def prefixes(tmp_path, hf):
    rng = np.random.default_rng()
    vocab = hf["vocab"]
    a = random_docs(rng, 80, vocab, 1)
    b = random_docs(rng, 30, vocab, 2)
    write_prefix(tmp_path / "a_text_document", a)
    write_prefix(tmp_path / "b_text_document", b)
    return tmp_path / "a_text_document", tmp_path / "b_text_document", a, b


def test_data_path_syntax():
    assert D.parse_data_path(["/d/x"]) == [D.MegatronPrefix(1.0, "/d/x")]
    assert D.parse_data_path(["0.3", "/a", "0.7", "/b"]) == [D.MegatronPrefix(0.3, "/a"),
                                                             D.MegatronPrefix(0.7, "/b")]
    for bad, msg in ((["0.3", "/a", "/b"], "weight / prefix pairs"),
                     (["/a", "0.3"], "'/a' is not a weight"), (["0", "/a", "1", "/b"], "must be > 0")):
        with pytest.raises(D.DataError, match=msg):
            D.parse_data_path(bad)
    import argparse
    p = argparse.ArgumentParser()
    D.add_data_args(p)
    assert p.parse_args(["--data-path", "2", "/a", "1", "/b"]).data == \
        [D.MegatronPrefix(2.0, "/a"), D.MegatronPrefix(1.0, "/b")]
    assert p.parse_args(["--data", "x.txt"]).data == ["x.txt"]
    for argv in (["--data", "x.txt", "--data-path", "/a"], ["--data-path", "/a", "--data", "x"]):
        with pytest.raises(SystemExit):
            p.parse_args(argv)


def test_blended_prefixes_split_window_and_mix(prefixes, hf):
    pa, pb, docs_a, docs_b = prefixes
    wa, wb = random.choice([(0.5, 0.5), (0.8, 0.2), (0.1, 0.9)])
    s = settings(tokenizer=str(hf["dir"] / "folder"), val_fraction=0.2)
    paths = D.parse_data_path([str(wa), str(pa), str(wb), str(pb)])
    p = D.prepare_data(paths, None, s, log=lambda m: None)
    assert p.vocab_size == hf["vocab"] and p.eod_id == hf["eot"]
    assert p.meta["train_docs"] + p.meta["valid_docs"] == 110
    assert D.prepare_data(paths, None, s, log=lambda m: None).digest == p.digest
    seq = 16
    train = D.TokenWindows(p.tokens("train"), seq, "train")
    valid = D.TokenWindows(p.tokens("valid"), seq, "validation")
    # the stream of each prefix's train (valid) documents, back to back, as the files hold them:
    # whole documents (each starts with [tag, 10 + i]), split by document, none lost
    streams = {}
    for docs, tag in ((docs_a, 1), (docs_b, 2)):
        seen = {}
        for split in ("train", "valid"):
            comp = p.tokens(split).streams[tag - 1]
            ids = comp[0:len(comp)]
            streams[(tag, split)] = ids
            parts = np.split(ids, np.flatnonzero(ids == tag)[1:])
            got = {int(part[1]) - 10: part.tolist() for part in parts}
            assert len(got) == len(parts)
            for i, toks in got.items():
                assert toks == [t for seq_ in docs[i] for t in seq_]
            seen[split] = set(got)
        assert seen["train"] | seen["valid"] == set(range(len(docs)))
        assert not seen["train"] & seen["valid"]
        assert len(seen["valid"]) == max(1, round(0.2 * len(docs)))
    train_a, train_b = ((len(streams[(t, "train")]) - 1) // seq for t in (1, 2))
    assert len(train) == sum(max(1, round(w / (wa + wb) * (train_a + train_b)))
                             for w in (wa, wb))
    # every window is a slice of one prefix's train stream; the shares follow the weights
    which = []
    for k in range(len(train)):
        w = train[k].tolist()
        assert len(w) == seq + 1
        hits = [t for t in (1, 2) if _is_slice(w, streams[(t, "train")].tolist(), seq)]
        assert len(hits) == 1, k
        which.append(hits[0])
    share_a = which.count(1) / len(which)
    assert abs(share_a - wa / (wa + wb)) < 1.5 / len(which) + 1e-9
    # a prefix weighted above its size is repeated, one below it is subsampled without repeats
    for t, n_t in ((1, train_a), (2, train_b)):
        picked = [tuple(train[k].tolist()) for k in range(len(train)) if which[k] == t]
        assert len(set(picked)) == min(len(picked), n_t)
    # validation: interleaved, the first windows already hold both prefixes
    first = [1 if _is_slice(valid[k].tolist(), streams[(1, "valid")].tolist(), seq) else 2
             for k in range(min(len(valid), 6))]
    assert len(set(first)) == 2 or min(wa, wb) / (wa + wb) < 1 / 6


def _is_slice(window, stream, seq):
    return any(stream[i:i + seq + 1] == window for i in range(0, len(stream) - seq, seq))


@pytest.mark.parametrize("case", ["no_tokenizer", "missing_idx", "bin_suffix", "bad_header",
                                  "truncated_bin", "vocab_too_small", "one_document"])
def test_bad_prefixes_name_the_file(tmp_path, prefixes, hf, case):
    pa = str(prefixes[0])
    tok = str(hf["dir"] / "folder")
    given = pa
    if case == "missing_idx":
        os.remove(pa + ".idx")
    elif case == "bin_suffix":
        given = pa + ".bin"
    elif case == "bad_header":
        with open(pa + ".idx", "r+b") as fh:
            fh.write(b"NOTANIDX!")
    elif case == "truncated_bin":
        with open(pa + ".bin", "r+b") as fh:
            fh.truncate(os.path.getsize(pa + ".bin") - 6)
    elif case == "vocab_too_small":
        small = tmp_path / "small"
        small.mkdir()
        from tokenizers import Tokenizer, models
        t = Tokenizer(models.WordLevel({"a": 0, EOT: 1}, unk_token="a"))
        t.save(str(small / "tokenizer.json"))
        tok = str(small)
    elif case == "one_document":
        write_prefix(tmp_path / "one", [[[1, 2, 3]]])
        given = str(tmp_path / "one")
    expect = {"no_tokenizer": "--data-path needs --tokenizer",
              "missing_idx": f"{pa}.idx not found", "bin_suffix": "without .bin / .idx",
              "bad_header": f"{pa}.idx is not a megatron indexed-dataset index",
              "truncated_bin": f"{pa}.bin holds", "vocab_too_small": f"{pa}.bin holds token id",
              "one_document": "only 1 document"}[case]
    s = settings(tokenizer=None if case == "no_tokenizer" else tok)
    with pytest.raises(D.DataError) as e:
        D.prepare_data(D.parse_data_path([given]), None, s, log=lambda m: None)
    assert expect in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.dist
def test_train_on_megatron_prefixes_with_a_hf_tokenizer(tmp_path, prefixes, hf):
    """launch/train.py --data-path w1 p1 w2 p2 --tokenizer <HF folder>: trains, the model's
    vocabulary is the tokenizer's, and a bad prefix stops the CLI with a one-line error."""
    pa, pb = map(str, prefixes[:2])
    out = tmp_path / "run"
    leviathan = json.dumps({"seed_dim": 16, "modes": 8, "heads": 2, "knots": 4})
    args = [sys.executable, str(ROOT / "launch" / "train.py"), "--data-path", "0.6", pa, "0.4", pb,
            "--tokenizer", str(hf["dir"] / "folder"), "--val-fraction", "0.2", "--out", str(out),
            "--steps", "2", "--model", "hidden_size=32", "--model", "num_layers=1",
            "--model", "num_heads=2", "--model", "ffn_hidden_size=64", "--model",
            "seq_length=16", "--model", f"leviathan={leviathan}", "--eval-samples", "4",
            "--ds", "train_micro_batch_size_per_gpu=2", "--no-progress",
            "--deepspeed_config", str(ROOT / "ds_configs" / "ember_zero1_fp32.json")]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["vocab_size"] == hf["vocab"] and len(s["train_losses"]) == 2
    assert all(np.isfinite(s["train_losses"]))
    bad = subprocess.run(args[:3] + [pa + "_nope"] + args[7:], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert f"error: {pa}_nope.idx not found" in bad.stderr
