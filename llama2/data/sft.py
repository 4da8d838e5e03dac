"""Conversations -> supervised finetuning samples (`input_ids`, `labels`), the seed's `qa` mode done exactly.

A conversation (FastChat records: ``{"id", "conversations": [{"from": "human"|"gpt", "value"}...]}``, optional
``"system"``) is rendered with FastChat's own template (`fastchat.conversation.get_conv_template`, default
``vicuna_v1.1``)::

    {system} USER: {q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>

The supervised spans come from that rendering, not from token counts: for assistant turn k, the template renders
the conversation up to "ASSISTANT:" (reply not yet given) and up to the reply and its separator; the text between
the two is the reply span (`" {a_k}</s>"`). The rendered text is cut into alternating prompt / reply segments and
each segment is tokenized on its own, following `Tokenizer`'s rule for special tokens written as text: a segment
that starts the text or follows `</s>` gets SentencePiece's dummy prefix, a reply (which follows "ASSISTANT:")
is encoded as a continuation (its leading space becomes `▁`). The ids therefore equal the tokenization of the
whole rendered prompt with `parse_special=True`, and the label of each token is known from its segment.

- Labels are the token ids on every reply token and on its `</s>` (id 2, once per reply); IGNORE_INDEX (-100)
  on BOS, the system text, every user turn, the role tags and padding. The template's terminator (sep2) is
  tokenized with its special pieces parsed: llama-2's `" </s><s>"` gives `▁` and `</s>` (supervised) and the
  next turn's `<s>` (input, -100). A template whose terminator holds no `</s>` is refused. Text inside messages
  is never parsed for special tokens: a reply containing the characters "</s>" does not produce an extra id 2.
- Labels are aligned with the ids (label[t] == ids[t] where supervised); the trainer shifts once (the model reads
  ids[:-1] and is scored on labels[1:]).
- A sample is `seq_length + 1` tokens (the seed's layout), padded on the right with `pad_id` (labels -100).
  Longer samples are truncated (default) or dropped; a sample left without a supervised token is dropped. Both are
  counted in the report, and so is every record that could not be used (with its index and the reason).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import numpy as np

from llama2.core.backend import IGNORE_INDEX

if TYPE_CHECKING:
    from llama2.data.tokenizer import Tokenizer

__all__ = [
    "DEFAULT_TEMPLATE",
    "Segment",
    "SFTReport",
    "render_segments",
    "parse_conversation",
    "tokenize_conversation",
    "build_sft_samples",
    "load_conversations",
    "prepare_sft",
    "read_sft",
]

DEFAULT_TEMPLATE = "vicuna_v1.1"
_USER_ROLES = ("human", "user")
_ASSISTANT_ROLES = ("gpt", "assistant")


@attrs.frozen
class Segment:
    """A piece of the rendered conversation; `supervised` for an assistant reply (ending with the separator)."""

    text: str
    supervised: bool


@attrs.define
class SFTReport:
    """What `build_sft_samples` did with each record."""

    records: int = 0
    samples: int = 0
    seq_length: int = 0
    template: str = DEFAULT_TEMPLATE
    truncated: int = 0
    dropped_too_long: int = 0
    supervised_tokens: int = 0
    longest: int = 0
    skipped: list[dict[str, Any]] = attrs.field(factory=list)  # {"index", "id", "reason"}
    too_long: list[dict[str, Any]] = attrs.field(factory=list)  # {"index", "id", "tokens", "action"}

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)

    def summary(self) -> str:
        return (
            f"{self.samples} sample(s) of {self.seq_length} + 1 tokens from {self.records} record(s); "
            f"{self.truncated} truncated, {self.dropped_too_long} dropped as too long, {len(self.skipped)} "
            f"unusable record(s); {self.supervised_tokens} supervised tokens; longest {self.longest} tokens"
        )


def _template(name: str) -> Any:
    from fastchat.conversation import get_conv_template

    try:
        return get_conv_template(name)
    except KeyError:
        raise ValueError(f"unknown fastchat conversation template {name!r}") from None


def parse_conversation(record: Any) -> tuple[str | None, list[str]]:
    """(system message or None, alternating user/assistant texts starting with a user turn) of one record.

    Like the seed, a leading assistant turn is dropped; a trailing user turn (no reply to learn) is dropped.
    Raises ValueError with the reason when the record is unusable.
    """
    if not isinstance(record, dict):
        raise ValueError(f"expected an object with 'conversations', got {type(record).__name__}")
    turns = record.get("conversations")
    if not isinstance(turns, list):
        raise ValueError(f"'conversations' must be a list of turns, got {type(turns).__name__}")
    system = record.get("system")
    if system is not None and not isinstance(system, str):
        raise ValueError(f"'system' must be a string, got {type(system).__name__}")
    roles: list[str] = []
    texts: list[str] = []
    for j, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise ValueError(f"turn {j}: expected an object with 'from' and 'value'")
        who, value = turn["from"], turn["value"]
        if not isinstance(value, str):
            raise ValueError(f"turn {j}: 'value' must be a string, got {type(value).__name__}")
        if who == "system" and j == 0:
            system = value
            continue
        if who in _USER_ROLES:
            roles.append("user")
        elif who in _ASSISTANT_ROLES:
            roles.append("assistant")
        else:
            raise ValueError(f"turn {j}: unknown role {who!r}; expected one of {_USER_ROLES + _ASSISTANT_ROLES}")
        texts.append(value)
    if roles and roles[0] == "assistant":
        roles, texts = roles[1:], texts[1:]
    for j, role in enumerate(roles):
        if role != ("user", "assistant")[j % 2]:
            raise ValueError(f"turns must alternate user/assistant; turn {j} is a second {role} turn in a row")
    if len(texts) % 2:
        texts = texts[:-1]
    if not texts:
        raise ValueError("no assistant reply to learn from")
    return system, texts


def render_segments(texts: Sequence[str], system: str | None = None, template: str = DEFAULT_TEMPLATE) -> list[Segment]:
    """The fastchat rendering of alternating user/assistant `texts`, cut into prompt and reply segments.

    The concatenation of the segment texts is exactly `conv.get_prompt()`. Each reply segment is the text the
    template adds for the reply itself, ending with the template's `sep2` (e.g. `" Hello there</s>"`).
    """
    conv = _template(template)
    if system is not None:
        conv.set_system_message(system)
    if not conv.sep2:
        raise ValueError(f"template {template!r} has no turn terminator (sep2); it cannot mark reply ends")

    def render(upto: int, open_reply: bool) -> str:
        conv.messages = []
        for j in range(upto):
            conv.append_message(conv.roles[j % 2], texts[j])
        if open_reply:
            conv.append_message(conv.roles[1], None)
        return conv.get_prompt()

    segments: list[Segment] = []
    done = ""
    for k in range(1, len(texts), 2):
        prefix = render(k, open_reply=True)  # ... USER: q ASSISTANT:
        full = render(k + 1, open_reply=False)  # ... USER: q ASSISTANT: a</s>
        if not (prefix.startswith(done) and full.startswith(prefix)):
            raise ValueError(f"template {template!r} does not render turns as prefixes of each other")
        reply = full[len(prefix) :]
        if not reply.endswith(conv.sep2):
            raise ValueError(f"template {template!r}: reply {k // 2} does not end with the terminator {conv.sep2!r}")
        segments.append(Segment(prefix[len(done) :], False))
        segments.append(Segment(reply, True))
        done = full
    if done != render(len(texts), open_reply=False):
        raise ValueError(f"template {template!r}: the segments do not add up to the rendered conversation")
    return segments


def _encode_plain(tok: Tokenizer, text: str, dummy_prefix: bool) -> list[int]:
    """Ids of `text` with special-token strings kept as plain text."""
    if dummy_prefix:
        return list(tok.sp.encode(text)) if text else []
    return tok.encode_continuation(text)


def _split_terminator(tok: Tokenizer, sep2: str, template: str) -> list[str]:
    """The template's turn terminator cut into text pieces and the BOS/EOS pieces written in it, e.g. llama-2's
    `" </s><s>"` -> `[" ", "</s>", "<s>"]`; ValueError when it writes no EOS piece (no reply end to learn)."""
    specials = [tok.id_to_piece(tok.eos_id), tok.id_to_piece(tok.bos_id)]
    pattern = "(" + "|".join(re.escape(x) for x in specials) + ")"
    parts = [x for x in re.split(pattern, sep2) if x]
    if specials[0] not in parts:
        raise ValueError(
            f"template {template!r}: its turn terminator (sep2) {sep2!r} does not contain the tokenizer's EOS piece "
            f"{specials[0]!r}; SFT supervises the EOS that ends each reply, so use a template whose replies end "
            f"with it (e.g. vicuna_v1.1 or llama-2)"
        )
    return parts


def tokenize_conversation(
    tok: Tokenizer, texts: Sequence[str], system: str | None = None, template: str = DEFAULT_TEMPLATE
) -> tuple[list[int], list[int]]:
    """(ids, labels) of one conversation, unpadded: BOS, then every segment; labels aligned with the ids.

    A reply's terminator is tokenized with its special pieces parsed: the text before the first one joins the
    reply text (llama-2's `" Hello </s><s>"` -> `▁Hello ▁ </s> <s>`), the EOS is supervised, and what follows it
    (llama-2's next-turn BOS) is input (label -100).
    """
    sep2 = _template(template).sep2
    parts = _split_terminator(tok, sep2, template)
    specials = {tok.id_to_piece(tok.eos_id): tok.eos_id, tok.id_to_piece(tok.bos_id): tok.bos_id}
    ids: list[int] = [tok.bos_id]
    labels: list[int] = [IGNORE_INDEX]
    after_special = True  # the text starts a fragment (after BOS): it gets the dummy prefix
    pending = ""  # terminator text after its last special piece: it starts the next prompt segment's fragment
    for seg in render_segments(texts, system, template):
        if not seg.supervised:
            text = pending + seg.text
            pending = ""
            piece = _encode_plain(tok, text, dummy_prefix=after_special)
            ids += piece
            labels += [IGNORE_INDEX] * len(piece)
            after_special = not text and after_special
            continue
        text = seg.text[: len(seg.text) - len(sep2)]
        supervised = True
        for part in parts:
            if part not in specials:
                text += part
                continue
            piece = _encode_plain(tok, text, dummy_prefix=after_special)
            ids += piece
            labels += piece if supervised else [IGNORE_INDEX] * len(piece)
            ids.append(specials[part])
            labels.append(specials[part] if supervised else IGNORE_INDEX)
            supervised = supervised and specials[part] != tok.eos_id
            text, after_special = "", True
        pending = text
    if pending:
        piece = _encode_plain(tok, pending, dummy_prefix=after_special)
        ids += piece
        labels += [IGNORE_INDEX] * len(piece)
    return ids, labels


def build_sft_samples(
    records: Sequence[Any],
    tokenizer: Tokenizer | str | os.PathLike[str],
    seq_length: int,
    *,
    pad_id: int | None = None,
    overflow: str = "truncate",
    template: str = DEFAULT_TEMPLATE,
    system: str | None = None,
    progress: bool = False,
) -> tuple[dict[str, np.ndarray], SFTReport]:
    """({"input_ids", "labels"} int32 arrays (n, seq_length + 1), report) from conversation records.

    overflow: "truncate" keeps the first seq_length + 1 tokens, "drop" drops the sample; either way a sample left
    without a supervised token is dropped and reported. `system` replaces the template's system message for
    records without their own "system". pad_id defaults to the tokenizer's (0 for Llama 2).
    """
    if overflow not in ("truncate", "drop"):
        raise ValueError(f"overflow must be 'truncate' or 'drop', got {overflow!r}")
    if seq_length < 1:
        raise ValueError(f"seq_length must be positive, got {seq_length}")
    tok = _tokenizer(tokenizer)
    pad = tok.pad_id if pad_id is None else int(pad_id)
    if not 0 <= pad < tok.vocab_size:
        raise ValueError(f"pad_id {pad} is outside the vocabulary (0..{tok.vocab_size - 1})")
    width = seq_length + 1
    report = SFTReport(records=len(records), seq_length=seq_length, template=template)
    rows_ids: list[np.ndarray] = []
    rows_labels: list[np.ndarray] = []
    it: Any = enumerate(records)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, total=len(records), desc="tokenize", unit="conv", dynamic_ncols=True)
    for i, rec in it:
        rid = rec.get("id") if isinstance(rec, dict) else None
        try:
            sys_msg, texts = parse_conversation(rec)
            ids, labels = tokenize_conversation(tok, texts, sys_msg if sys_msg is not None else system, template)
        except ValueError as exc:
            report.skipped.append({"index": i, "id": rid, "reason": str(exc)})
            continue
        report.longest = max(report.longest, len(ids))
        if len(ids) > width:
            if overflow == "drop":
                report.dropped_too_long += 1
                report.too_long.append({"index": i, "id": rid, "tokens": len(ids), "action": "dropped"})
                continue
            ids, labels = ids[:width], labels[:width]
            # label 0 is never scored (the model reads ids[:-1] against labels[1:])
            if all(x == IGNORE_INDEX for x in labels[1:]):
                report.dropped_too_long += 1
                report.too_long.append({"index": i, "id": rid, "tokens": len(ids), "action": "dropped: no reply left"})
                continue
            report.truncated += 1
            report.too_long.append({"index": i, "id": rid, "tokens": len(ids), "action": "truncated"})
        row_ids = np.full(width, pad, np.int32)
        row_labels = np.full(width, IGNORE_INDEX, np.int32)
        row_ids[: len(ids)] = ids
        row_labels[: len(labels)] = labels
        report.supervised_tokens += int((row_labels[1:] != IGNORE_INDEX).sum())
        rows_ids.append(row_ids)
        rows_labels.append(row_labels)
    report.samples = len(rows_ids)
    shape = (len(rows_ids), width)
    out = {
        "input_ids": np.stack(rows_ids) if rows_ids else np.zeros(shape, np.int32),
        "labels": np.stack(rows_labels) if rows_labels else np.zeros(shape, np.int32),
    }
    return out, report


def _tokenizer(tokenizer: Tokenizer | str | os.PathLike[str]) -> Tokenizer:
    if isinstance(tokenizer, str | os.PathLike):
        from llama2.data.tokenizer import Tokenizer

        return Tokenizer(tokenizer)
    return tokenizer


def load_conversations(path: str | os.PathLike[str]) -> tuple[list[Any], list[dict[str, Any]]]:
    """(conversation records, problems) from a FastChat conversation file or an Alpaca file (converted)."""
    from llama2.data.alpaca import alpaca_to_conversations, read_json_records

    records = read_json_records(path)
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON array of records, got {type(records).__name__}")
    first = next((r for r in records if isinstance(r, dict)), {})
    if "conversations" not in first and "instruction" in first:
        return alpaca_to_conversations(records, errors="report", source=str(path))
    return records, []


def prepare_sft(
    input_path: str | os.PathLike[str],
    tokenizer: Tokenizer | str | os.PathLike[str],
    seq_length: int,
    output: str | os.PathLike[str],
    *,
    fmt: str | None = None,
    pad_id: int | None = None,
    overflow: str = "truncate",
    template: str = DEFAULT_TEMPLATE,
    system: str | None = None,
    progress: bool = True,
) -> SFTReport:
    """Tokenize a conversation (or Alpaca) file into a records file with columns input_ids and labels.

    The format follows `fmt` or the output suffix: `.mindrecord` (the seed's), `.npy` (one structured numpy array,
    fields input_ids and labels, see `llama2.data.records`) or `.npz`. A report is written beside it as
    OUTPUT.report.json. Raises ValueError when no sample is left.
    """
    from llama2.core.atomic import write_json
    from llama2.data.records import detect_format, write_records

    out = Path(output)
    writer = detect_format(out, fmt)
    records, problems = load_conversations(input_path)
    columns, report = build_sft_samples(
        records,
        tokenizer,
        seq_length,
        pad_id=pad_id,
        overflow=overflow,
        template=template,
        system=system,
        progress=progress,
    )
    report.skipped = [{"index": p["index"], "id": None, "reason": p["reason"]} for p in problems] + report.skipped
    report.records += len(problems)
    if report.samples == 0:
        raise ValueError(f"{input_path}: no usable sample ({report.summary()})")
    write_records(out, columns, fmt=writer.name, description=f"llama2 sft {template} seq_length={seq_length}")
    write_json(out.with_name(out.name + ".report.json"), report.to_dict(), indent=2)
    return report


def read_sft(path: str | os.PathLike[str], fmt: str | None = None) -> dict[str, np.ndarray]:
    """{"input_ids", "labels"} of a file written by `prepare_sft` (2-D int32 arrays): .mindrecord, .npz, or a
    structured .npy; a plain 2-D .npy gives input_ids only."""
    from llama2.data.records import read_columns

    p = Path(path)
    cols = read_columns(p, fmt)
    if "input_ids" not in cols:
        raise ValueError(f"{p}: no 'input_ids' column (found {sorted(cols)})")
    return cols
