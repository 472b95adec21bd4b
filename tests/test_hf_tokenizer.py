"""launch/hf_tokenizer.py: a SentencePiece model trained as launch/data.py trains it (bpe and
unigram; byte fallback at vocab >= 1024, <unk> below) converts to a Hugging Face tokenizer that
``AutoTokenizer.from_pretrained`` loads offline and that gives SentencePiece's ids and decoded
text on rare characters: accents, NFD text, CJK, emoji, characters absent from training, NFKC
forms (full-width, ligatures, half-width kana + sound marks, Arabic presentation forms), runs of
spaces, tabs, newlines, control-piece look-alikes."""
import collections
import json
import random
import unicodedata

import pytest

SYLLABLES = ["ka", "to", "ri", "mé", "ün", "sch", "ßa", "ça", "lo", "pe", "qu", "an", "in", "er",
             "th", "æ", "ø", "å", "ñ", "ži", "ou", "st", "xe"]
CJK = "日本語中文字漢東京大学人生山川水火"

RARE = ("  Leading spaces, café naïve résumé Ångström — 東京 大学 日本語 🙂🚀👩\u200d👩\u200d👧 "
        "ﬁne ﬂow ﬀ ﬃ ＡＢＣ ｆｕｌｌ\u3000ｗｉｄｔｈ ① ㍻ ㈱ ½ x² Ⅻ ℃ № ™ … ‼  multiple   spaces\t"
        "tab\nnew line\r\nCRLF ünïcödé straße ẞ İ ı ǅ Ωmega \u00a0nbsp \u200bzero-width "
        "\u2028line-sep क्षत्रिय ไทย العربية עברית ㄱㄴ 가나다 ｶﾀｶﾅ ﾊﾟﾋﾟﾌﾟ ｶﾞｷﾞ ﾃﾞｰﾀ ～ "
        "ﻻ ﷲ ﺑِﺴْﻢِ Ｊ\u0301 ｅ\u0301 Ａ\u0308 a\u0308 e\u0301 "
        + unicodedata.normalize("NFD", "한국어 Tiếng Việt có dấu") +
        " </s> <s> <unk> <0x41> \u2581x \u2581 end\u2581 trailing   ")


def corpus_lines(seed=0, n=1500, markup=False):
    """Random words; ``markup``: some <words> and a/b, so that every character of the control
    pieces' names (<s>, </s>, <unk>, <0x41>) is in the vocabulary."""
    r = random.Random(seed)
    lines = []
    for _ in range(n):
        words = []
        for _ in range(r.randint(3, 12)):
            w = "".join(r.choice(SYLLABLES) for _ in range(r.randint(1, 4)))
            if r.random() < 0.1:
                w = w.capitalize()
            if r.random() < 0.05:
                w = "".join(r.choice(CJK) for _ in range(r.randint(1, 3)))
            if r.random() < 0.05:
                w += r.choice(",.;:!?")
            if r.random() < 0.03:
                w = str(r.randint(0, 9999))
            if markup and r.random() < 0.03:
                w = r.choice(["<{}>", "</{}>", "{}/"]).format(w)
            words.append(w)
        lines.append(" ".join(words))
    return lines


def rare_texts():
    """One long text (the rare fragments shuffled among corpus-like lines) and its pieces."""
    r = random.Random(1)
    frags = RARE.split(" ")
    mixed = corpus_lines(seed=7, n=60)
    for f in frags:
        mixed.insert(r.randrange(len(mixed) + 1), f)
    long = "\n".join([RARE] + [" ".join(mixed[i:i + 3]) for i in range(0, len(mixed), 3)])
    return [long] + frags + list(RARE) + ["", " ", "  a", "a  ", "\n", "\t x \t", "▁", "x▁▁"]


def train(tmp, kind, vocab, markup):
    """A SentencePiece model trained by launch/data.py's own trainer."""
    from launch import data as D
    text = tmp / "corpus.txt"
    text.write_text("\n\n".join(corpus_lines(markup=markup)) + "\n")
    model = tmp / "tokenizer.model"
    D._train_sentencepiece([text], D.DataSettings(vocab_size=vocab, tokenizer_type=kind),
                           collections.defaultdict(bool), model)
    return model


@pytest.fixture(scope="module", params=[("unigram", 1100, True), ("bpe", 1100, True),
                                        ("bpe", 400, False), ("unigram", 400, False)],
                ids=lambda p: f"{p[0]}{p[1]}")
def converted(request, tmp_path_factory):
    """(SentencePieceProcessor, AutoTokenizer, folder) of a model converted into a folder."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    from launch.hf_tokenizer import save_hf_tokenizer
    kind, vocab, markup = request.param
    tmp = tmp_path_factory.mktemp(f"{kind}{vocab}")
    model = train(tmp, kind, vocab, markup)
    folder = tmp / "hf"
    save_hf_tokenizer(model, folder, model_max_length=4096)
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")
    try:
        hf = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    finally:
        mp.undo()
    return spm.SentencePieceProcessor(model_file=str(model)), hf, folder


def mismatches(sp, encode, decode, texts):
    bad = []
    for t in texts:
        want = sp.encode(t)
        got = encode(t)
        if got != want:
            bad.append((t, sp.id_to_piece(want), [sp.id_to_piece(i) for i in got]))
        elif decode(want) != sp.decode(want):
            bad.append((t, sp.decode(want), decode(want)))
    return bad


def test_autotokenizer_gives_the_sentencepiece_ids_and_text(converted):
    sp, hf, folder = converted
    texts = rare_texts()
    bad = mismatches(sp, lambda t: hf(t)["input_ids"], hf.decode, texts)
    assert not bad, bad[:5]
    ids = sp.encode(texts[0])
    assert len(texts[0]) > 2000 and len(ids) > 1000
    pieces = set(sp.id_to_piece(ids))
    if sp.get_piece_size() >= 1024:                 # byte fallback happened, and was needed
        assert sum(p.startswith("<0x") for p in pieces) > 20
        assert sp.unk_id() not in ids
    else:
        assert sp.unk_id() in ids and not any(p.startswith("<0x") for p in pieces)
    # the documents training saw: ids as tokenization gave them, no <s> added, </s> is the eos
    assert hf("In the beginning")["input_ids"] == sp.encode("In the beginning")
    assert (hf.bos_token, hf.eos_token, hf.unk_token) == ("<s>", "</s>", "<unk>")
    assert hf.eos_token_id == sp.eos_id() == 2 and hf.model_max_length == 4096
    line = corpus_lines(seed=3, n=1)[0]
    assert hf.decode(sp.encode(line) + [sp.eos_id()], skip_special_tokens=True) == line
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"


def test_each_conversion_step_is_needed(converted):
    """The comparison above fails when a step of the pipeline is dropped: the text exercises
    the character map, NFKC's pre-pass, the whitespace rules, the split of unknown characters,
    the scores that keep control pieces out of text and the decoder."""
    from tokenizers import Tokenizer
    sp, _, folder = converted
    spec = json.loads((folder / "tokenizer.json").read_text())
    texts = rare_texts()

    def drop(where, pred):
        s = json.loads(json.dumps(spec))
        if where == "model":
            pred(s["model"])
        else:
            s[where]["normalizers" if where == "normalizer" else
                     "pretokenizers" if where == "pre_tokenizer" else "decoders"] = [
                step for step in s[where][{"normalizer": "normalizers",
                                           "pre_tokenizer": "pretokenizers",
                                           "decoder": "decoders"}[where]] if not pred(step)]
        tok = Tokenizer.from_str(json.dumps(s))
        return mismatches(sp, lambda t: tok.encode(t, add_special_tokens=False).ids,
                          lambda ids: tok.decode(ids, skip_special_tokens=False), texts)

    def unscored(model):           # control / byte pieces keep SentencePiece's score 0
        if model["type"] == "Unigram":
            for entry in model["vocab"]:
                entry[1] = 0.0 if entry[1] == -1e6 else entry[1]

    assert not drop("normalizer", lambda s: False)
    assert drop("normalizer", lambda s: s["type"] == "Precompiled")
    assert drop("normalizer", lambda s: s["type"] == "NFKC")
    assert drop("normalizer", lambda s: s["type"] == "Prepend")
    assert drop("normalizer", lambda s: s["type"] == "Replace" and s["content"] == "")
    assert drop("decoder", lambda s: s["type"] == "ByteFallback" or s["type"] == "Replace")
    if spec["model"]["type"] == "Unigram":     # (bpe has no merges into control pieces)
        if sp.piece_to_id("<") == sp.unk_id():     # a character of "</s>" is unknown
            assert drop("pre_tokenizer", lambda s: s["type"] == "Split")
        else:
            assert drop("model", unscored)


def test_unsupported_models_are_named(tmp_path):
    from launch.hf_tokenizer import (UnsupportedModel, read_model_proto,
                                     sentencepiece_to_tokenizers)
    import sentencepiece as spm
    import io
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus_lines(n=300)), model_writer=buf,
                                   vocab_size=200, model_type="char", minloglevel=2,
                                   num_threads=1)
    proto = read_model_proto(buf.getvalue())
    assert proto["trainer"]["model_type"] == 4 and proto["normalizer"]["name"] == "nmt_nfkc"
    with pytest.raises(UnsupportedModel, match="model type 4"):
        sentencepiece_to_tokenizers(buf.getvalue())
    with pytest.raises(ValueError):
        read_model_proto(b"\x0a\x05abc")                      # truncated


def test_export_writes_both_tokenizers_and_keeps_a_hugging_face_one_as_is(converted, tmp_path,
                                                                        monkeypatch):
    """launch/export.py's tokenizer step: a SentencePiece model (any file name) lands as
    tokenizer.model + its conversion; a Hugging Face tokenizer.json is copied byte for byte."""
    from transformers import AutoTokenizer

    from launch.export import export_tokenizer
    sp, _, folder = converted
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    given = tmp_path / "given"
    given.mkdir()
    (given / "sp.model").write_bytes(sp.serialized_model_proto())
    export_tokenizer(given / "sp.model", tmp_path / "a", 64)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "special_tokens_map.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json"]
    text = rare_texts()[0]
    tok = AutoTokenizer.from_pretrained(tmp_path / "a", local_files_only=True)
    assert tok(text)["input_ids"] == sp.encode(text)

    hf_json = given / "tokenizer.json"
    hf_json.write_text((folder / "tokenizer.json").read_text())
    (given / "eod_token.txt").write_text("</s>")
    export_tokenizer(hf_json, tmp_path / "b")
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["eod_token.txt",
                                                                 "tokenizer.json"]
    assert (tmp_path / "b" / "tokenizer.json").read_bytes() == hf_json.read_bytes()
    tok = AutoTokenizer.from_pretrained(tmp_path / "b", local_files_only=True)
    assert tok(text)["input_ids"] == sp.encode(text)
