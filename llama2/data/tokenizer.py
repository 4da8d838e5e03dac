"""SentencePiece tokenizer for Llama 2: encode/decode, special tokens written as text, streaming decode, training.

Conventions (those of Meta's Llama 2 `tokenizer.model`):
- `encode` never adds BOS/EOS unless asked; SentencePiece adds the dummy-prefix `▁` itself (`"Hello"` -> `▁Hello`).
- `parse_special=True` turns the control pieces written as text (`<s>`, `</s>`) into their ids (1, 2). The text
  between two special tokens is encoded as an independent fragment, so it gets its own dummy prefix: `"</s>USER"`
  -> `[2, ▁USER...]`. This is what Hugging Face's (legacy) Llama tokenizer does and what Vicuna/FastChat trained on;
  Meta's chat code also encodes each turn separately. With `parse_special=False` (the default) they are plain text.
- `pad_id`: Llama 2 defines no pad piece (`pad_id() == -1`); like MindFormers we pad with 0 (`<unk>`). Padding is
  always masked by lengths, never recognised by value, so the choice does not change any label or loss.
"""

from __future__ import annotations

import codecs
import io
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece as spm

from llama2.core.atomic import atomic_file

__all__ = ["Tokenizer", "StreamingDecoder", "LLAMA2_TRAINER_SPEC"]

# The trainer settings recorded in Meta's Llama 2 tokenizer.model (trainer_spec / normalizer_spec).
LLAMA2_TRAINER_SPEC: dict[str, object] = {
    "model_type": "bpe",
    "character_coverage": 0.99995,
    "byte_fallback": True,
    "split_digits": True,
    "split_by_unicode_script": True,
    "split_by_whitespace": True,
    "split_by_number": True,
    "allow_whitespace_only_pieces": True,
    "max_sentencepiece_length": 16,
    "max_sentence_length": 4192,
    "normalization_rule_name": "identity",
    "add_dummy_prefix": True,
    "remove_extra_whitespaces": False,
    "treat_whitespace_as_suffix": False,
    "vocabulary_output_piece_score": True,
    "hard_vocab_limit": True,
    "unk_id": 0,
    "bos_id": 1,
    "eos_id": 2,
    "pad_id": -1,
    "unk_surface": " \u2047 ",
}

_REPLACEMENT = "\ufffd"


def _utf8_len(lead: int) -> int:
    """Length of the UTF-8 sequence starting with byte `lead`, 0 when it cannot start one."""
    if lead < 0x80:
        return 1
    if 0xC2 <= lead <= 0xDF:
        return 2
    if 0xE0 <= lead <= 0xEF:
        return 3
    if 0xF0 <= lead <= 0xF4:
        return 4
    return 0


def _could_complete(partial: bytes) -> bool:
    """True when `partial` is a valid, still incomplete, start of one UTF-8 character."""
    try:
        return codecs.getincrementaldecoder("utf-8")().decode(partial, final=False) == ""
    except UnicodeDecodeError:
        return False


def _decode_bytes(buf: bytearray, final: bool) -> str:
    """Decode complete characters from the front of `buf` (consumed in place), SentencePiece style.

    Each byte that does not start a valid character becomes one U+FFFD (SentencePiece replaces per byte, unlike
    Python's maximal-subpart rule). Without `final`, a valid but incomplete tail is kept for later bytes.
    """
    out: list[str] = []
    p = 0
    while p < len(buf):
        n = _utf8_len(buf[p])
        if n == 0:
            out.append(_REPLACEMENT)
            p += 1
            continue
        chunk = bytes(buf[p : p + n])
        if len(chunk) == n:
            try:
                out.append(chunk.decode("utf-8"))
                p += n
            except UnicodeDecodeError:
                out.append(_REPLACEMENT)
                p += 1
            continue
        if not final and _could_complete(chunk):
            break  # wait for the rest of this character
        out.append(_REPLACEMENT)
        p += 1
    del buf[:p]
    return "".join(out)


class StreamingDecoder:
    """Incremental decoder: `add(id)` returns the newly completed text, `flush()` the rest.

    The concatenation of everything returned equals `Tokenizer.decode(all ids)`: the leading `▁` of the first
    piece is dropped exactly as SentencePiece does, and byte-fallback pieces are held back until they form a whole
    UTF-8 character (an invalid byte becomes U+FFFD, as in the full decode).
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tok = tokenizer
        self._bytes = bytearray()
        self._strip_first_ws = tokenizer._strips_leading_space

    def add(self, token_id: int) -> str:
        tok = self._tok
        token_id = tok._check_id(token_id)
        sp = tok.sp
        if sp.is_control(token_id):
            # A control piece produces no text but ends a run of byte pieces (as in SentencePiece's decoder).
            return _decode_bytes(self._bytes, final=True)
        if sp.is_byte(token_id):
            self._bytes.append(int(sp.id_to_piece(token_id)[3:5], 16))
            self._strip_first_ws = False
            return _decode_bytes(self._bytes, final=False)
        out = _decode_bytes(self._bytes, final=True)
        if sp.is_unknown(token_id):
            text = tok._unk_surface
        else:
            piece = sp.id_to_piece(token_id)
            if self._strip_first_ws and piece.startswith("\u2581"):
                piece = piece[1:]
            text = piece.replace("\u2581", " ")
        self._strip_first_ws = False
        return out + text

    def flush(self) -> str:
        """Text of any bytes still held (incomplete characters become U+FFFD, as in the full decode)."""
        return _decode_bytes(self._bytes, final=True)


class Tokenizer:
    """A SentencePiece model (Llama 2's `tokenizer.model` or one made by `Tokenizer.train`)."""

    def __init__(self, path: str | os.PathLike[str], parse_special: bool = False, *, pad_id: int | None = None):
        p = Path(path)
        if p.is_dir():
            p = p / "tokenizer.model"
        if not p.is_file():
            raise FileNotFoundError(f"tokenizer model not found: {p}")
        data = p.read_bytes()
        sp = spm.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(data)
        except Exception as exc:  # sentencepiece raises RuntimeError/OSError with an unhelpful message
            raise ValueError(f"{p}: not a SentencePiece model file ({exc})") from None
        self.path = p
        self.sp = sp
        self.parse_special = parse_special
        self._spec_from_proto(data)
        self.bos_id: int = sp.bos_id()
        self.eos_id: int = sp.eos_id()
        self.unk_id: int = sp.unk_id()
        model_pad = sp.pad_id()
        self.pad_id: int = pad_id if pad_id is not None else (model_pad if model_pad >= 0 else max(self.unk_id, 0))
        self.vocab_size: int = sp.vocab_size()
        if not 0 <= self.pad_id < self.vocab_size:
            raise ValueError(f"pad_id {self.pad_id} is outside the vocabulary of {p} (size {self.vocab_size})")
        specials = {sp.id_to_piece(i): i for i in range(self.vocab_size) if sp.is_control(i)}
        self._special_ids = specials
        self._sp_no_prefix: spm.SentencePieceProcessor | None = None
        self._special_re = (
            re.compile("|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True))) if specials else None
        )

    def _spec_from_proto(self, data: bytes) -> None:
        from sentencepiece import sentencepiece_model_pb2 as pb

        proto = pb.ModelProto()
        proto.ParseFromString(data)
        norm, trainer = proto.normalizer_spec, proto.trainer_spec
        self._strips_leading_space = (
            norm.add_dummy_prefix or norm.remove_extra_whitespaces
        ) and not trainer.treat_whitespace_as_suffix
        self._unk_surface = trainer.unk_surface if trainer.HasField("unk_surface") else " \u2047 "

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size}, parse_special={self.parse_special})"

    def __len__(self) -> int:
        return self.vocab_size

    # ------------------------------------------------------------------ encode / decode
    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of `text`, with BOS/EOS when asked; special pieces parsed when `parse_special`."""
        if not isinstance(text, str):
            raise TypeError(f"Tokenizer.encode expects str, got {type(text).__name__}")
        ids: list[int] = [self.bos_id] if bos else []
        if self.parse_special and self._special_re is not None:
            pos = 0
            for m in self._special_re.finditer(text):
                if m.start() > pos:
                    ids.extend(self.sp.encode(text[pos : m.start()]))
                ids.append(self._special_ids[m.group()])
                pos = m.end()
            if pos < len(text):
                ids.extend(self.sp.encode(text[pos:]))
        else:
            ids.extend(self.sp.encode(text))
        if eos:
            ids.append(self.eos_id)
        return ids

    def encode_continuation(self, text: str) -> list[int]:
        """Ids of `text` as it tokenizes after a word boundary inside a longer text: no dummy prefix is added.

        Used to tokenize a rendering piece by piece (e.g. an assistant reply `" Hello"` -> `▁Hello`).
        """
        if not isinstance(text, str):
            raise TypeError(f"Tokenizer.encode_continuation expects str, got {type(text).__name__}")
        if not text:
            return []
        if self._sp_no_prefix is None:
            from sentencepiece import sentencepiece_model_pb2 as pb

            proto = pb.ModelProto()
            proto.ParseFromString(self.path.read_bytes())
            proto.normalizer_spec.add_dummy_prefix = False
            sp = spm.SentencePieceProcessor()
            sp.LoadFromSerializedProto(proto.SerializeToString())
            self._sp_no_prefix = sp
        return self._sp_no_prefix.encode(text)

    def _check_id(self, token_id: int) -> int:
        try:
            i = int(token_id)
        except (TypeError, ValueError):
            raise TypeError(f"token id must be an int, got {token_id!r}") from None
        if not 0 <= i < self.vocab_size:
            raise ValueError(f"token id {i} is outside the vocabulary (0..{self.vocab_size - 1}) of {self.path}")
        return i

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids` (control pieces such as BOS/EOS produce no text)."""
        return self.sp.decode([self._check_id(i) for i in ids])

    def decoder(self) -> StreamingDecoder:
        """A fresh streaming decoder (see `StreamingDecoder`)."""
        return StreamingDecoder(self)

    def id_to_piece(self, token_id: int) -> str:
        return self.sp.id_to_piece(self._check_id(token_id))

    def piece_to_id(self, piece: str) -> int:
        return self.sp.piece_to_id(piece)

    # ------------------------------------------------------------------ training
    @classmethod
    def train(
        cls,
        corpus_path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        out_prefix: str | os.PathLike[str],
        vocab_size: int,
        *,
        num_threads: int | None = None,
        input_sentence_size: int = 0,
        verbose: bool = True,
        **overrides: object,
    ) -> Tokenizer:
        """Train a BPE model with Llama 2's trainer settings; writes `<out_prefix>.model` and `.vocab`.

        `overrides` replace entries of `LLAMA2_TRAINER_SPEC` (e.g. `character_coverage=1.0` for a tiny corpus).
        `input_sentence_size=0` uses every line of the corpus; `verbose=False` silences SentencePiece's log.
        """
        paths = [corpus_path] if isinstance(corpus_path, str | os.PathLike) else list(corpus_path)
        for path in paths:
            if not Path(path).is_file():
                raise FileNotFoundError(f"tokenizer training corpus not found: {path}")
        unknown = set(overrides) - set(LLAMA2_TRAINER_SPEC) - {"user_defined_symbols", "seed_sentencepiece_size"}
        if unknown:
            raise ValueError(f"unknown tokenizer trainer option(s): {', '.join(sorted(unknown))}")
        spec = {**LLAMA2_TRAINER_SPEC, **overrides}
        writer = io.BytesIO()
        spm.SentencePieceTrainer.train(
            input=",".join(str(p) for p in paths),
            model_writer=writer,
            vocab_size=int(vocab_size),
            num_threads=num_threads or os.cpu_count() or 1,
            input_sentence_size=input_sentence_size,
            shuffle_input_sentence=True,
            minloglevel=0 if verbose else 2,
            **spec,
        )
        model = writer.getvalue()
        out = Path(out_prefix)
        model_path = out.with_name(out.name + ".model")
        _atomic_write(model_path, model)
        sp = spm.SentencePieceProcessor()
        sp.LoadFromSerializedProto(model)
        vocab = "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.vocab_size()))
        _atomic_write(out.with_name(out.name + ".vocab"), vocab.encode("utf-8"))
        return cls(model_path)


def _atomic_write(path: Path, data: bytes) -> None:
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
