"""A SentencePiece model as a Hugging Face fast tokenizer (tokenizer.json + tokenizer_config.json
+ special_tokens_map.json) that ``transformers.AutoTokenizer.from_pretrained`` loads offline and
that gives the SentencePiece model's own ids.

    from launch.hf_tokenizer import save_hf_tokenizer
    save_hf_tokenizer("tokenizer.model", "hf_model")

Why not transformers' converter: its slow -> fast conversion parses ``tokenizer.model`` with
protobuf, which this project does not install, and it relies on ``tokenizers``' Precompiled
normalizer alone, which drops the combining marks after a character the map changes and does not
compose clusters of 6 bytes or more (measured below). So the model file is read here with a small
protobuf wire-format reader (``read_model_proto``: the handful of ModelProto fields the
conversion needs; nothing else is interpreted) and the ``tokenizers`` pipeline is written to do
what SentencePiece does:

  normalizer  for an NFKC-based map (``nmt_nfkc``, the project's): NFKC first, except for the
              few characters the model's map treats otherwise (found at conversion by asking
              ``sentencepiece`` itself; nmt_nfkc keeps "～"), which pass it disguised as
              noncharacters U+FDD0...; then the model's precompiled character map (none for
              ``identity``); then, as SentencePiece's ``remove_extra_whitespaces`` does, leading
              spaces removed and runs of spaces collapsed to one; the dummy "▁" prefix
              (``add_dummy_prefix``; none on empty text); spaces escaped as "▁"
              (``escape_whitespaces``); trailing "▁"s removed (literal ones too, as SentencePiece).
  pre-tok.    runs of characters outside the vocabulary stand alone (SentencePiece makes them
              one <unk> or their bytes and no piece holds them); then a "▁"-split (Metaspace, no
              prefix of its own) when the model was trained with ``split_by_whitespace`` (no
              piece holds an inner "▁", so splitting cannot change the result and lets the model
              cache words); otherwise the text stays one sequence, as SentencePiece encodes it.
  model       unigram: the pieces and their scores; pieces SentencePiece never matches in text
              (control <s> </s>, <unk>, <0xNN> bytes, unused) get a score no path can prefer, since
              ``tokenizers``' unigram lattice holds every vocabulary entry (where one of their
              characters is unknown the split above keeps them out: an unknown character costs
              the lowest score minus 10 in that lattice, so a score cannot).
              bpe: SentencePiece merges the adjacent pair whose concatenation is the best-scored
              piece; as merges that is every split (a, b) of a normal piece into two normal pieces,
              ranked by the piece's score.
              ``byte_fallback`` as the model says (characters outside the vocabulary -> <0xNN>
              pieces of their UTF-8 bytes); without it a run of unknown characters is one <unk>.
  decoder     <unk> -> SentencePiece's " ⁇ ", byte pieces -> UTF-8 text, "▁" -> " " with the
              dummy prefix's space dropped from the first piece.
No post-processor: the project encodes documents without <s> (training appends only the
end-of-document </s>), so ``tokenizer(text)`` gives exactly the ids training used. <s>, </s>,
<unk> (and <pad> when the model has one) are named as the bos / eos / unk / pad tokens in the
config, for ``generate`` and ``skip_special_tokens``; SentencePiece reads them in text as plain
characters, and so does this tokenizer (``split_special_tokens``).

Measured against ``sentencepiece``'s own normalizer (nmt_nfkc): every assigned character up to
U+2FFFF alone, and all but U+0344 between letters, normalize the same; combining marks out of
canonical order do not (NFKC reorders them, SentencePiece does not), nor 4 in 100,000 random
letter + mark pairs. On the bundled corpus (4.1 M characters, vocab 8192) bpe and unigram give
the same ids and decoded text for every document. Decoding ids that encoding never gives
(sampled ones) can differ: ``tokenizers``' ByteFallback turns a run of byte pieces that is not
valid UTF-8 into one U+FFFD per byte (SentencePiece keeps the valid bytes), and SentencePiece
drops the space of every piece until the text is non-empty (a lone leading "▁", then "▁word"),
the Metaspace decoder only the first piece's.

Models this cannot reproduce (whitespace as suffix, WORD / CHAR model types, user-defined pieces)
raise ``UnsupportedModel``; launch/export.py then keeps ``tokenizer.model`` alone and says so.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

SPACE = "\u2581"                      # "▁", SentencePiece's escaped space
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
UNIGRAM, BPE = 1, 2
UNMATCHABLE = -1e6                    # below any path of real pieces (scores are ~ -20 at worst)
NONCHARACTERS = [chr(c) for c in range(0xFDD0, 0xFDF0)]


class UnsupportedModel(ValueError):
    """A SentencePiece model this converter cannot reproduce exactly."""


# --------------------------------------------------------------------------------------------
# protobuf wire format (just enough for sentencepiece_model.proto)
# --------------------------------------------------------------------------------------------

def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(buf):
            raise ValueError("truncated varint")
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, i


def _fields(buf: bytes):
    """(field number, value) of a message: int for varints / fixed, bytes for length-delimited."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 1:
            value, i = buf[i:i + 8], i + 8
        elif wire == 2:
            n, i = _varint(buf, i)
            value, i = buf[i:i + n], i + n
        elif wire == 5:
            value, i = buf[i:i + 4], i + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire} (field {field})")
        if i > len(buf):
            raise ValueError("truncated protobuf message")
        yield field, value


def _int32(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


# field number -> (name, kind, default) of the TrainerSpec / NormalizerSpec fields used here
_TRAINER = {3: ("model_type", int, UNIGRAM), 22: ("split_by_whitespace", bool, True),
            24: ("treat_whitespace_as_suffix", bool, False),
            26: ("allow_whitespace_only_pieces", bool, False), 35: ("byte_fallback", bool, False),
            40: ("unk_id", int, 0), 41: ("bos_id", int, 1), 42: ("eos_id", int, 2),
            43: ("pad_id", int, -1), 44: ("unk_surface", str, " \u2047 ")}
_NORMALIZER = {1: ("name", str, ""), 2: ("precompiled_charsmap", bytes, b""),
               3: ("add_dummy_prefix", bool, True), 4: ("remove_extra_whitespaces", bool, True),
               5: ("escape_whitespaces", bool, True)}


def _message(buf: bytes, spec: dict) -> dict:
    out = {name: default for name, _, default in spec.values()}
    for field, value in _fields(buf):
        if field in spec:
            name, kind, _ = spec[field]
            out[name] = (value.decode("utf-8") if kind is str else bytes(value) if kind is bytes
                         else bool(value) if kind is bool else _int32(value))
    return out


def read_model_proto(data: bytes) -> dict:
    """{"pieces": [(piece, score, type)], "trainer": {...}, "normalizer": {...}} of a serialized
    SentencePiece ModelProto (fields missing from the file take the proto's defaults)."""
    pieces, trainer, normalizer = [], b"", b""
    for field, value in _fields(data):
        if field == 1:
            piece, score, kind = "", 0.0, NORMAL
            for f, v in _fields(value):
                if f == 1:
                    piece = v.decode("utf-8")
                elif f == 2:
                    score = struct.unpack("<f", v)[0]
                elif f == 3:
                    kind = v
            pieces.append((piece, score, kind))
        elif field == 2:
            trainer = value
        elif field == 3:
            normalizer = value
    if not pieces:
        raise ValueError("not a SentencePiece model (no pieces)")
    return {"pieces": pieces, "trainer": _message(trainer, _TRAINER),
            "normalizer": _message(normalizer, _NORMALIZER)}


# --------------------------------------------------------------------------------------------
# the tokenizers pipeline
# --------------------------------------------------------------------------------------------

def _model(proto: dict):
    from tokenizers import models
    t, pieces = proto["trainer"], proto["pieces"]
    unk = t["unk_id"] if 0 <= t["unk_id"] < len(pieces) else None
    if t["model_type"] == UNIGRAM:
        vocab = [(p, float(s) if kind == NORMAL else UNMATCHABLE) for p, s, kind in pieces]
        return models.Unigram(vocab, unk_id=unk, byte_fallback=t["byte_fallback"])
    normal = {p: i for i, (p, _, kind) in enumerate(pieces) if kind == NORMAL}
    ranked = sorted(normal, key=lambda p: (-pieces[normal[p]][1], normal[p]))
    merges = [(p[:k], p[k:]) for p in ranked for k in range(1, len(p))
              if p[:k] in normal and p[k:] in normal]
    return models.BPE({p: i for i, (p, _, _) in enumerate(pieces)}, merges,
                      unk_token=pieces[unk][0] if unk is not None else None, fuse_unk=True,
                      byte_fallback=t["byte_fallback"])


def _nfkc_exceptions(data: bytes) -> list[str]:
    """The characters NFKC changes but the model's own map treats otherwise (nmt_nfkc keeps the
    full-width tilde "～", for one): for them NFKC must not run first."""
    import sys
    import unicodedata

    import sentencepiece as spm
    norm = spm.SentencePieceNormalizer(model_proto=data)
    chars = [chr(c) for c in range(1, sys.maxunicode + 1) if not 0xD800 <= c < 0xE000]
    chars = [c for c in chars if unicodedata.normalize("NFKC", c) != c]
    direct = norm.normalize(chars)
    after = norm.normalize([unicodedata.normalize("NFKC", c) for c in chars])
    return [c for c, a, b in zip(chars, direct, after) if a != b]


def _normalizer(proto: dict, data: bytes):
    from tokenizers import Regex, normalizers as N
    n = proto["normalizer"]
    space = SPACE if n["escape_whitespaces"] else " "
    steps = []
    if n["precompiled_charsmap"]:
        if "nfkc" in n["name"].lower():
            # tokenizers' Precompiled maps a cluster of a character and its combining marks as
            # one unit (a mapped first character drops the marks) and never composes clusters of
            # 6 bytes or more (half-width kana + sound mark, Hangul jamo); SentencePiece maps
            # character runs by longest match. NFKC first settles both; the characters the
            # model's map keeps from NFKC pass it disguised as noncharacters (U+FDD0...).
            keep = _nfkc_exceptions(data)
            if len(keep) > len(NONCHARACTERS):
                raise UnsupportedModel(f"{len(keep)} characters of the normalizer "
                                       f"{n['name']!r} differ from NFKC")
            hide = list(zip(keep, NONCHARACTERS))
            steps += [N.Replace(c, s) for c, s in hide] + [N.NFKC()]
            steps += [N.Replace(s, c) for c, s in hide]
        steps.append(N.Precompiled(n["precompiled_charsmap"]))
    if n["remove_extra_whitespaces"]:
        steps += [N.Replace(Regex(r"\A +"), ""), N.Replace(Regex(" {2,}"), " ")]
    if n["add_dummy_prefix"]:
        steps.append(N.Prepend(space))           # leaves empty text empty, as SentencePiece
    if n["escape_whitespaces"]:
        steps.append(N.Replace(" ", SPACE))
    if n["remove_extra_whitespaces"]:
        steps.append(N.Replace(Regex(f"{space}+\\z"), ""))
    return N.Sequence(steps)


def _pre_tokenizer(proto: dict):
    from tokenizers import Regex, pre_tokenizers as P
    t, n = proto["trainer"], proto["normalizer"]
    # runs of characters outside the vocabulary stand alone, as in SentencePiece (one <unk> or
    # their bytes); so "<s>" / "<0x41>" in text cannot reach the model whole where a character
    # of it is unknown
    known = sorted({p for p, _, kind in proto["pieces"] if kind == NORMAL and len(p) == 1})
    steps = [P.Split(Regex("[^" + "".join(f"\\x{{{ord(c):X}}}" for c in known) + "]+"),
                     behavior="isolated")]
    if t["split_by_whitespace"] and not t["allow_whitespace_only_pieces"] and \
            n["escape_whitespaces"]:
        steps.append(P.Metaspace(replacement=SPACE, prepend_scheme="never", split=True))
    return P.Sequence(steps)


def _decoder(proto: dict):
    from tokenizers import decoders as D
    t, n = proto["trainer"], proto["normalizer"]
    steps = []
    if 0 <= t["unk_id"] < len(proto["pieces"]):
        steps.append(D.Replace(proto["pieces"][t["unk_id"]][0], t["unk_surface"]))
    steps.append(D.ByteFallback())
    steps.append(D.Metaspace(replacement=SPACE, split=True,
                             prepend_scheme="always" if n["add_dummy_prefix"] else "never"))
    return D.Sequence(steps)


def sentencepiece_to_tokenizers(data: bytes):
    """The ``tokenizers.Tokenizer`` of a serialized SentencePiece model (see the module
    docstring); ``UnsupportedModel`` for models it cannot reproduce."""
    from tokenizers import Tokenizer
    proto = read_model_proto(data)
    t, n = proto["trainer"], proto["normalizer"]
    if t["model_type"] not in (UNIGRAM, BPE):
        raise UnsupportedModel(f"SentencePiece model type {t['model_type']} (only unigram and "
                               "bpe convert)")
    if t["treat_whitespace_as_suffix"]:
        raise UnsupportedModel("treat_whitespace_as_suffix is not supported")
    if any(kind == USER_DEFINED for _, _, kind in proto["pieces"]):
        raise UnsupportedModel("user-defined pieces are not supported")
    tok = Tokenizer(_model(proto))
    tok.normalizer = _normalizer(proto, data)
    tok.pre_tokenizer = _pre_tokenizer(proto)
    tok.decoder = _decoder(proto)
    return tok


def special_tokens(data: bytes) -> dict:
    """bos / eos / unk / pad token names of a serialized SentencePiece model (those it has)."""
    proto = read_model_proto(data)
    out = {}
    for key in ("bos", "eos", "unk", "pad"):
        i = proto["trainer"][f"{key}_id"]
        if 0 <= i < len(proto["pieces"]):
            out[f"{key}_token"] = proto["pieces"][i][0]
    return out


def save_hf_tokenizer(model_file, folder, model_max_length=None) -> list[str]:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json for the
    SentencePiece model ``model_file`` into ``folder`` (``model_max_length``: the model's context,
    when known); returns the names written."""
    data = Path(model_file).read_bytes()
    tok = sentencepiece_to_tokenizers(data)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    specials = special_tokens(data)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **specials,
              "add_bos_token": False, "add_eos_token": False,
              "clean_up_tokenization_spaces": False, "split_special_tokens": True}
    if model_max_length:
        config["model_max_length"] = int(model_max_length)
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2,
                                                             ensure_ascii=False) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2,
                                                               ensure_ascii=False) + "\n")
    return ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
