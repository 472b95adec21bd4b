"""launch/data.py: inputs and their errors, the tokenizer + indexed-dataset cache (atomic, keyed by
inputs and settings), the train/validation split by document, and the deterministic sampler.
Small inputs (a few KJV chapters, vocabulary 256): the whole module runs in seconds."""
import gzip
import json
import lzma
import os

import numpy as np
import pytest

from launch import data as D

SMALL = D.DataSettings(vocab_size=256, val_fraction=0.1)


@pytest.fixture(scope="module")
def chapters():
    """The first 40 chapters of the shipped corpus (also checks it decompresses and parses)."""
    docs = list(D.iter_file_documents(D.DEFAULT_CORPUS))
    assert len(docs) == 1189 and docs[0].startswith("Genesis 1\nIn the beginning")
    return docs[:40]


@pytest.fixture
def corpus_dir(tmp_path, chapters):
    """A folder with a .txt (blank-line separated), a .jsonl.gz and a file to be skipped."""
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("\n\n".join(chapters[:25]) + "\n", encoding="utf-8")
    with gzip.open(folder / "sub" / "b.jsonl.gz", "wt", encoding="utf-8") as fh:
        for c in chapters[25:]:
            fh.write(json.dumps({"text": c, "id": 1}) + "\n")
    (folder / "notes.csv").write_text("ignored,file\n")
    (folder / ".hidden.txt").write_text("ignored")
    return folder


def test_default_corpus_and_folder_inputs(corpus_dir):
    assert D.resolve_inputs(None) == [D.DEFAULT_CORPUS]
    files = D.resolve_inputs([corpus_dir])
    assert [f.name for f in files] == ["a.txt", "b.jsonl.gz"]
    assert len(list(D.iter_documents(files))) == 40


def test_prepare_builds_indexed_dataset_and_caches(tmp_path, corpus_dir, monkeypatch):
    cache = tmp_path / "cache"
    p = D.prepare_data([corpus_dir], cache, SMALL, log=lambda m: None)
    m = p.meta
    assert m["vocab_size"] == 256 and m["train_docs"] + m["valid_docs"] == 40
    assert m["valid_docs"] == 4 and m["dtype"] == "uint16"
    # megatron-core's reader sees one sequence per document, each ending with EOD
    for split, ndocs in (("train", m["train_docs"]), ("valid", m["valid_docs"])):
        ds = p.indexed_dataset(split)
        assert len(ds) == ndocs
        assert int(ds.sequence_lengths.sum()) == m[f"{split}_tokens"] == len(p.tokens(split))
        assert all(int(ds[i][-1]) == p.eod_id for i in range(len(ds)))
    # the split is by document: validation documents are whole chapters absent from train
    sp = p.tokenizer()
    tr, va = p.indexed_dataset("train"), p.indexed_dataset("valid")   # (views into their mmaps)
    train_docs = {sp.decode(tr[i][:-1].tolist()) for i in range(m["train_docs"])}
    valid_docs = [sp.decode(va[i][:-1].tolist()) for i in range(m["valid_docs"])]
    assert all(v.split(" ")[0] in ("Genesis", "Exodus") for v in valid_docs)
    assert not set(valid_docs) & train_docs
    # second call: served from the cache, nothing rebuilt
    monkeypatch.setattr(D, "_build", lambda *a, **k: pytest.fail("rebuilt a complete cache"))
    assert D.prepare_data([corpus_dir], cache, SMALL, log=lambda m: None).path == p.path
    # a different setting or different input bytes -> a different cache entry
    monkeypatch.undo()
    q = D.prepare_data([corpus_dir], cache, D.DataSettings(vocab_size=300, val_fraction=0.1),
                       log=lambda m: None)
    assert q.path != p.path and q.vocab_size == 300
    with open(corpus_dir / "a.txt", "a") as fh:
        fh.write("\nAnd one more line.\n")
    assert D.find_prepared(D.resolve_inputs([corpus_dir]), SMALL, cache) is None


def test_half_written_cache_is_never_used(tmp_path, corpus_dir, monkeypatch):
    cache = tmp_path / "cache"
    files = D.resolve_inputs([corpus_dir])
    key, _ = D.cache_key(files, SMALL)
    final = cache / key[:20]
    # a crash mid-build: the temporary folder stays behind, nothing is published
    real_build = D._build

    def crashing(files_, settings, out, log):
        (out / "train.bin").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(D, "_build", crashing)
    with pytest.raises(KeyboardInterrupt):
        D.prepare_data([corpus_dir], cache, SMALL, log=lambda m: None)
    assert not final.exists()
    # a leftover temp folder and a final folder without its completion marker (e.g. copied
    # half-way) are both ignored: the data is rebuilt and published
    (cache / f".tmp-{key[:20]}-1-dead").mkdir(parents=True)
    final.mkdir()
    (final / "train.bin").write_bytes(b"junk")
    (final / "meta.json").write_text(json.dumps({"key": key, "complete": False}))
    assert D.find_prepared(files, SMALL, cache) is None
    monkeypatch.setattr(D, "_build", real_build)
    p = D.prepare_data([corpus_dir], cache, SMALL, log=lambda m: None)
    assert p.path == final and p.meta["complete"] and len(p.tokens("train")) > 1000


@pytest.mark.parametrize("case", ["missing", "empty", "binary", "latin1", "bad_json",
                                  "no_key", "empty_folder", "one_doc", "corrupt_xz"])
def test_bad_inputs_name_the_file(tmp_path, case):
    f = tmp_path / {"bad_json": "x.jsonl", "no_key": "x.jsonl", "corrupt_xz": "x.txt.xz"}.get(
        case, "x.txt")
    if case == "empty":
        f.write_text("  \n\n")
    elif case == "binary":
        f.write_bytes(b"\x7fELF\x02\x01\x01\x00\x00\x00" * 50)
    elif case == "latin1":
        f.write_bytes("Caf\u00e9 cr\u00e8me\n\nsecond doc\n".encode("latin-1"))
    elif case == "bad_json":
        f.write_text('{"text": "fine"}\n{"text": broken\n')
    elif case == "no_key":
        f.write_text('{"content": "no text field"}\n')
    elif case == "empty_folder":
        f = tmp_path / "folder"
        f.mkdir()
        (f / "readme.csv").write_text("a,b\n")
    elif case == "one_doc":
        f.write_text("just one document\nwith two lines\n")
    elif case == "corrupt_xz":
        f.write_bytes(lzma.compress(b"hello\n\nworld\n")[:-12])
    expect = {"missing": "not found", "empty": "is empty", "binary": "binary",
              "latin1": "not valid UTF-8", "bad_json": ":2: not a JSON line",
              "no_key": "no 'text' field", "empty_folder": "no data files",
              "one_doc": "at least 2", "corrupt_xz": "cannot read"}[case]
    with pytest.raises(D.DataError) as e:
        D.prepare_data([f], tmp_path / "cache", SMALL, log=lambda m: None)
    assert expect in str(e.value) and str(f) in str(e.value)
    assert not any(p.name.startswith(".tmp") for p in (tmp_path / "cache").glob("*")) \
        if (tmp_path / "cache").exists() else True


def test_bad_settings():
    with pytest.raises(D.DataError, match="vocab size"):
        D.DataSettings(vocab_size=8).check()
    with pytest.raises(D.DataError, match="val_fraction"):
        D.DataSettings(val_fraction=0.9).check()
    with pytest.raises(D.DataError, match="tokenizer not found"):
        D.DataSettings(tokenizer="/nonexistent.model").check()


def test_windows_and_sampler_are_deterministic_resumable_and_sharded():
    tokens = np.arange(1001, dtype=np.uint16)
    w = D.TokenWindows(tokens, seq_length=10)
    assert len(w) == 100
    ids, labels = w.batch([3, 0])
    assert ids.shape == (2, 10) and ids[0, 0] == 30 and labels[0, -1] == 40
    assert (ids[:, 1:] == labels[:, :-1]).all()
    with pytest.raises(D.DataError, match="fewer than"):
        D.TokenWindows(tokens[:5], seq_length=10, name="validation")

    mb, ga, dp = 3, 2, 2
    ranks = [D.DeterministicSampler(len(w), seed=7, micro_batch=mb, grad_accum=ga, dp_size=dp,
                                    dp_rank=r) for r in range(dp)]
    G = mb * ga * dp
    for step in (0, 5, 16, 17):            # 17 crosses an epoch boundary (100 samples, G = 12)
        per_rank = [np.concatenate([s.micro_batch_indices(step, m) for m in range(ga)])
                    for s in ranks]
        glob = ranks[0].global_batch_indices(step)
        assert sorted(np.concatenate(per_rank).tolist()) == sorted(glob.tolist())
        assert not set(per_rank[0].tolist()) & set(per_rank[1].tolist()) or step == 17
        # a fresh sampler (a resumed run) answers the same, without replaying earlier steps
        fresh = D.DeterministicSampler(len(w), 7, mb, ga, dp, 1)
        assert (fresh.micro_batch_indices(step, 1) == ranks[1].micro_batch_indices(step, 1)).all()
    # one epoch visits every sample once; the next epoch uses another order
    first = np.concatenate([ranks[0].global_batch_indices(s) for s in range(9)])[:100]
    assert sorted(first.tolist()) == list(range(100))
    s0 = D.DeterministicSampler(len(w), 7, mb, ga, dp, 0)
    assert not (s0._perm(0) == s0._perm(1)).all()
    # the global batch of a step does not depend on how it is split into ranks x accumulation
    one = D.DeterministicSampler(len(w), 7, micro_batch=12, grad_accum=1, dp_size=1, dp_rank=0)
    assert (one.global_batch_indices(9) == ranks[0].global_batch_indices(9)).all()
    assert D.DeterministicSampler(len(w), 8, mb, ga, dp, 0).global_batch_indices(0).tolist() != \
        ranks[0].global_batch_indices(0).tolist()
    # validation shares: fixed, disjoint, the same every time
    shares = [D.eval_indices(len(w), 8, 2, r).tolist() for r in range(2)]
    assert shares == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_cli_prepares_and_reports(tmp_path, corpus_dir, capsys):
    rc = D.main(["--data", str(corpus_dir), "--vocab-size", "256", "--cache-dir",
                 str(tmp_path / "c"), "--val-fraction", "0.1"])
    assert rc == 0
    out = capsys.readouterr().out
    report = json.loads(out[out.index("{"):])
    assert report["vocab_size"] == 256 and report["train_docs"] + report["valid_docs"] == 40
    rc = D.main(["--data", str(tmp_path / "nope.txt"), "--cache-dir", str(tmp_path / "c")])
    assert rc == 2 and "not found" in capsys.readouterr().err
    assert os.listdir(tmp_path / "c")
