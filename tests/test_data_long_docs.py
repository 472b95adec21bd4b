"""Documents of any length train the tokenizer and are tokenized whole (issue 22, point 1):
SentencePiece's trainer skips every sentence over 4192 bytes, so a corpus of long single-line
documents (scraped or minified text) used to stop with ``[!sentences_.empty()]``. Lines over
the limit are now cut into pieces under it for training only (launch.data.training_pieces);
every data path (launch/data.py, train.py --data, bench/study.py) trains through it."""
import json
import random

import pytest

from launch import data as D

SMALL = D.DataSettings(vocab_size=256)


def _text(rng: random.Random, size: int) -> str:
    """Sentences of made-up words, one line (no newline) of about ``size`` characters."""
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
             for _ in range(400)]
    out, n = [], 0
    while n < size:
        s = " ".join(rng.choice(words) for _ in range(rng.randint(5, 15))).capitalize() + "."
        out.append(s)
        n += len(s) + 1
    return " ".join(out)


def _check(prepared, docs):
    """Every document is tokenized whole (its ids decode to it) and ends with </s>."""
    assert prepared.meta["train_docs"] + prepared.meta["valid_docs"] == len(docs)
    sp = prepared.tokenizer()
    assert sp.get_piece_size() == 256
    ds = prepared.indexed_dataset("train")
    got = {sp.decode(ds[i][:-1].tolist()) for i in range(len(ds))}
    assert all(ds[i][-1] == sp.eos_id() for i in range(len(ds)))
    assert got <= set(docs) and len(got) == prepared.meta["train_docs"]


def test_200_documents_of_8_kb_without_newlines(tmp_path):
    rng = random.Random(0)
    docs = [_text(rng, 8000) for _ in range(200)]
    corpus = tmp_path / "scraped.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    prepared = D.prepare_data([corpus], tmp_path / "cache", SMALL, log=lambda m: None)
    _check(prepared, docs)
    assert prepared.meta["train_tokens"] > 200 * 8000 // 4      # the whole text, not a sample


def test_two_single_line_documents_of_1_5_mb(tmp_path, capsys):
    """Through the CLI of launch/data.py (main), a .txt file of two 1.5 MB lines."""
    rng = random.Random(1)
    docs = [_text(rng, 1_500_000) for _ in range(2)]
    corpus = tmp_path / "minified.txt"
    corpus.write_text("\n\n".join(docs) + "\n")
    assert D.main(["--data", str(corpus), "--cache-dir", str(tmp_path / "cache"),
                   "--vocab-size", "256"]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out[out.rindex("\n{"):])           # after prepare_data's log lines
    assert (summary["train_docs"], summary["valid_docs"]) == (1, 1)
    prepared = D.find_prepared([corpus], SMALL, tmp_path / "cache")
    _check(prepared, docs)


@pytest.mark.parametrize("kind", ["sentences", "words", "no spaces", "cjk"])
def test_training_pieces_stay_under_the_limit_and_cut_at_boundaries(kind):
    rng = random.Random(kind)
    line = {"sentences": _text(rng, 20_000),
            "words": " ".join("wörd" for _ in range(6000)),
            "no spaces": "".join(rng.choice("ab\u00e9\u65e5\U0001F642") for _ in range(9000)),
            "cjk": "".join(rng.choice("\u65e5\u672c\u8a9e") * 30 + "\u3002" for _ in range(200)),
            }[kind]
    pieces = list(D.training_pieces(line))
    assert len(pieces) > 1 and all(0 < len(p.encode()) <= D.SP_MAX_SENTENCE for p in pieces)
    if kind == "sentences":
        assert all(p.endswith(".") for p in pieces[:-1])
        assert " ".join(pieces) == line
    elif kind == "words":
        assert " ".join(pieces) == line
    elif kind == "no spaces":
        assert "".join(pieces) == line                     # cut between characters only
    else:
        assert all(p.endswith("\u3002") for p in pieces[:-1]) and "".join(pieces) == line
    assert list(D.training_pieces("short line")) == ["short line"]


@pytest.mark.parametrize("case", ["vocab too large", "no usable characters"])
def test_a_sentencepiece_refusal_names_the_cause_in_one_line(tmp_path, capsys, case):
    corpus = tmp_path / "c.txt"
    if case == "vocab too large":
        corpus.write_text("In the beginning God created the heaven and the earth.\n\n" * 3)
        vocab, want = "5000", "holds too few distinct pieces for --vocab-size 5000; the most it "
    else:
        corpus.write_text("\x01\x02\x03\n\n\x01\x02\n\n\x03\x03\n")
        vocab, want = "256", "SentencePiece kept none of the"
    assert D.main(["--data", str(corpus), "--cache-dir", str(tmp_path / "cache"),
                   "--vocab-size", vocab]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: training the SentencePiece tokenizer")
    assert want in err[0] and "trainer_interface" not in err[0], err[0]
