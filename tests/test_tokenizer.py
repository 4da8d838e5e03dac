"""Tokenizer: llama.cpp golden cases, round trips, streaming decode, special tokens, training."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llama2 import Tokenizer  # the public name (llama2.data.tokenizer.Tokenizer)
from tests.conftest import data_path

SEP = "\n__ggml_vocab_test__\n"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(data_path("tokenizer/llama2/tokenizer.model"))


@pytest.fixture(scope="module")
def tok_special() -> Tokenizer:
    return Tokenizer(data_path("tokenizer/llama2/tokenizer.model"), parse_special=True)


def _llamacpp_cases() -> list[tuple[str, list[int]]]:
    inp = data_path("tokenizer/llamacpp-tests/ggml-vocab-llama-spm.gguf.inp").read_text(encoding="utf-8")
    out = data_path("tokenizer/llamacpp-tests/ggml-vocab-llama-spm.gguf.out").read_text(encoding="utf-8")
    texts = inp.split(SEP)
    assert texts[-1] == ""
    texts = texts[:-1]
    lines = out.split("\n")
    if lines and lines[-1] == "" and len(lines) == len(texts) + 1:
        lines = lines[:-1]
    assert len(texts) == len(lines) == 46
    return [(t, [int(x) for x in line.split()]) for t, line in zip(texts, lines, strict=True)]


def test_llamacpp_golden_cases(tok: Tokenizer) -> None:
    cases = _llamacpp_cases()
    bad = [(text, want, tok.encode(text)) for text, want in cases if tok.encode(text) != want]
    assert not bad, f"{len(bad)} of {len(cases)} cases differ, first: {bad[0]!r}"
    # The golden ids also decode back to the inputs.
    assert all(tok.decode(want) == text for text, want in cases)


def test_sources_examples(tok: Tokenizer) -> None:
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.unk_id, tok.pad_id) == (32000, 1, 2, 0, 0)
    assert tok.encode("Hello world") == [15043, 3186]
    assert tok.encode("Hello world", bos=True) == [1, 15043, 3186]
    assert tok.encode("Hello world", bos=True, eos=True) == [1, 15043, 3186, 2]
    assert tok.encode(" Hello world") == [29871, 15043, 3186]
    assert tok.encode("The capital of France is Paris.") == [450, 7483, 310, 3444, 338, 3681, 29889]
    assert tok.encode("1234") == [29871, 29896, 29906, 29941, 29946]
    assert tok.encode("héllo 🦙") == [298, 3610, 417, 29871, 243, 162, 169, 156]
    assert len(tok) == 32000 and tok.id_to_piece(15043) == "\u2581Hello" and tok.piece_to_id("<0x0A>") == 13


@pytest.mark.parametrize(
    "text",
    [" leading", "  two leading", "a  b   c", "\n", "line1\nline2\n\n", "\ttab", "emoji 🦙🤖", "中文字符 日本語",
     "mixed Ελληνικά 한국어 ", "trailing  ", "", " "],
)  # fmt: skip
def test_round_trip(tok: Tokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode(text, bos=True, eos=True)) == text


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\u2581\x00"), max_size=40))
def test_round_trip_property(tok: Tokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text)) == text


def _stream(tok: Tokenizer, ids: list[int]) -> list[str]:
    d = tok.decoder()
    return [d.add(i) for i in ids] + [d.flush()]


@pytest.mark.parametrize("text", ["🦙", "héllo 🦙 世界", " 🦙🦙 x", "ἀ 𝔘𝔫𝔦 ٍ ﷺ", "\n\n 🤖\n"])
def test_streaming_never_splits_a_character(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text, bos=True)
    assert any(tok.sp.is_byte(i) for i in ids) or "ἀ" in text
    chunks = _stream(tok, ids)
    assert "".join(chunks) == tok.decode(ids) == text
    assert all("\ufffd" not in c for c in chunks)
    # A byte-fallback character is emitted whole, on its last byte.
    llama = tok.encode("🦙")[1:]
    assert _stream(tok, llama) == ["", "", "", "🦙", ""]


def test_streaming_leading_space_rule(tok: Tokenizer) -> None:
    for ids in ([15043, 3186], [1, 15043], [29871, 15043], [35, 15043], [0, 15043], [15043, 0], [2, 2, 29871]):
        assert "".join(_stream(tok, ids)) == tok.decode(ids), ids
    assert _stream(tok, [1, 15043, 3186]) == ["", "Hello", " world", ""]


_special_ids = st.sampled_from([0, 1, 2])
_bytes = st.integers(3, 258)
_normal = st.sampled_from([29871, 259, 15043, 3186, 13, 29889, 30793, 298, 3610, 417, 1678, 268])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(_special_ids, _bytes, _bytes, _normal), max_size=24))
def test_streaming_equals_full_decode_property(tok: Tokenizer, ids: list[int]) -> None:
    """Any id sequence, valid UTF-8 or not: the stream concatenates to exactly SentencePiece's decode."""
    assert "".join(_stream(tok, ids)) == tok.decode(ids)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(st.integers(0, 511)), max_size=24))
def test_streaming_other_model_property(ids: list[int]) -> None:
    """tok512 has remove_extra_whitespaces=True: the same equality holds."""
    t = Tokenizer(data_path("tokenizer/tok512-llama2c-fork/tok512.model"))
    assert "".join(_stream(t, ids)) == t.decode(ids)


def test_parse_special(tok: Tokenizer, tok_special: Tokenizer) -> None:
    text = "Hello</s>USER: hi<s>"
    plain = tok.encode(text)
    assert 1 not in plain and 2 not in plain and tok.decode(plain) == text
    parsed = tok_special.encode(text)
    assert parsed.count(2) == 1 and parsed.count(1) == 1 and parsed[-1] == 1
    # Each fragment between specials is encoded on its own (gets its own dummy prefix).
    assert parsed == tok.encode("Hello") + [2] + tok.encode("USER: hi") + [1]
    assert tok_special.encode("</s>") == [2]
    assert tok_special.encode("x", bos=True, eos=True) == [1, *tok.encode("x"), 2]


def test_encode_continuation(tok: Tokenizer) -> None:
    assert tok.encode_continuation(" Hello") == [15043]
    assert tok.encode_continuation("Hello world") == tok.encode("Hello world")[:0] + [10994, 3186]
    assert tok.encode("x:") + tok.encode_continuation(" Hello") == tok.encode("x: Hello")
    assert tok.encode_continuation("") == []


def test_decode_errors(tok: Tokenizer) -> None:
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([32000])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decoder().add(-100)
    with pytest.raises(TypeError):
        tok.encode(b"bytes")  # type: ignore[arg-type]


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.model"):
        Tokenizer(tmp_path / "nope.model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"this is not a protobuf \xff\xfe")
    with pytest.raises(ValueError, match="bad.model.*not a SentencePiece"):
        Tokenizer(bad)
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        Tokenizer(tmp_path)  # a directory without tokenizer.model


def test_train_llama2_settings(tmp_path: Path) -> None:
    src = data_path("wikitext-2/raw-v1/wiki.valid.raw")
    corpus = tmp_path / "corpus.txt"
    with open(src, encoding="utf-8") as f:
        corpus.write_text("".join(f.readlines()[:600]), encoding="utf-8")
    t = Tokenizer.train(corpus, tmp_path / "out" / "tok", 400, character_coverage=1.0)
    assert (tmp_path / "out" / "tok.model").is_file() and (tmp_path / "out" / "tok.vocab").is_file()
    assert t.vocab_size == 400 and (t.unk_id, t.bos_id, t.eos_id, t.sp.pad_id()) == (0, 1, 2, -1)
    assert t.id_to_piece(3) == "<0x00>" and t.id_to_piece(258) == "<0xFF>"
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString((tmp_path / "out" / "tok.model").read_bytes())
    ts, ns = proto.trainer_spec, proto.normalizer_spec
    assert ts.model_type == pb.TrainerSpec.BPE and ts.byte_fallback and ts.split_digits
    assert ns.name == "identity" and ns.add_dummy_prefix and not ns.remove_extra_whitespaces
    for text in ["Hello 🦙 world", "  spaces\n", "1234"]:
        assert t.decode(t.encode(text)) == text
    assert t.encode("1234")[-4:] == [t.piece_to_id(c) for c in "1234"]
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        Tokenizer.train(tmp_path / "missing.txt", tmp_path / "x", 300)
    with pytest.raises(ValueError, match="bogus"):
        Tokenizer.train(corpus, tmp_path / "x", 300, bogus=1)
