"""WikiText packing for pretraining (the seed's `llama_preprocess.py --dataset_type wiki`).

Pipeline: the file is split into articles at the title headings (a line ` = Title = `, one `=` on each side;
section headings ` = = Section = = ` stay inside their article); each article is optionally cleaned with the seed's
`clean_wikitext` rules, tokenized as BOS + article + EOS, and all articles are concatenated in file order into one
token stream that is cut into rows of `seq_length + 1` ids (the model reads ids[:-1] and predicts ids[1:]).

Remainder policy: the last `len(stream) % (seq_length + 1)` tokens do not fill a row and are dropped (as in the
seed); `pack_documents` reports how many. Rows may start in the middle of an article and hold the end of one
article and the start of the next (EOS then BOS in between), as in the seed's concatenated packing.

Differences from the seed: the seed splits at blank lines and drops headings, adding BOS (no EOS) per paragraph;
here every article keeps its headings and ends with EOS, as the Llama 2 pretraining recipe does. A literal
`<unk>` in the tokenized WikiText files is encoded as text.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np

__all__ = ["split_articles", "clean_wikitext", "pack_documents", "pack_wikitext", "prepare_wiki", "PackStats"]

_TITLE = re.compile(r"^ ?= (?!=)(.*\S) (?<!=)= ?$")


def split_articles(text: str) -> list[str]:
    """Articles of a WikiText file, each starting at its ` = Title = ` line (stripped of outer whitespace).

    Text before the first title (if not blank) is an article of its own. CRLF line ends are read as LF.
    """
    text = text.replace("\r\n", "\n")
    articles: list[list[str]] = []
    current: list[str] = []
    for line in text.split("\n"):
        if _TITLE.match(line) and current:
            articles.append(current)
            current = []
        current.append(line)
    articles.append(current)
    out = ["\n".join(lines).strip() for lines in articles]
    return [a for a in out if a]


def clean_wikitext(string: str) -> str:
    """The seed's `clean_wikitext`: undo WikiText's tokenization artefacts (` @-@ `, ` , `, `= =`, ...)."""
    string = string.replace("s '", "s'")
    string = re.sub(r"/' [0-9]/", r"/'[0-9]/", string)
    string = string.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
    for p in (":", ";", ".", "!", "?", ","):
        string = string.replace(f" {p} ", f"{p} ")
    string = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", string)
    string = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", string)
    string = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", string)
    string = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', string)
    string = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", string)
    string = string.replace("= = = =", "====").replace("= = =", "===").replace("= =", "==")
    string = string.replace(" " + chr(176) + " ", chr(176))
    string = string.replace(" \n", "\n").replace("\n ", "\n")
    string = string.replace(" N ", " 1 ").replace(" 's", "'s")
    return string


@attrs.frozen
class PackStats:
    """What packing did: documents, tokens in the stream, rows written, tokens dropped at the end."""

    documents: int
    tokens: int
    rows: int
    row_length: int
    dropped: int


def pack_documents(
    docs: Iterable[Sequence[int]], row_length: int, *, bos_id: int | None = None, eos_id: int | None = None
) -> tuple[np.ndarray, PackStats]:
    """Concatenate [BOS] + doc + [EOS] for every doc and cut into int32 rows of `row_length` (remainder dropped)."""
    if row_length < 2:
        raise ValueError(f"row length must be >= 2 (seq_length + 1), got {row_length}")
    parts: list[np.ndarray] = []
    n_docs = 0
    for doc in docs:
        ids = list(doc)
        if bos_id is not None:
            ids.insert(0, bos_id)
        if eos_id is not None:
            ids.append(eos_id)
        parts.append(np.asarray(ids, dtype=np.int64))
        n_docs += 1
    stream = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    if stream.size and (stream.min() < 0 or stream.max() > np.iinfo(np.int32).max):
        raise ValueError("token ids must fit in int32")
    n_rows = stream.size // row_length
    rows = stream[: n_rows * row_length].reshape(n_rows, row_length).astype(np.int32)
    stats = PackStats(n_docs, int(stream.size), n_rows, row_length, int(stream.size - n_rows * row_length))
    return rows, stats


def _load_tokenizer(tokenizer: Any) -> Any:
    if isinstance(tokenizer, str | os.PathLike):
        from llama2.data.tokenizer import Tokenizer

        return Tokenizer(tokenizer)
    return tokenizer


def pack_wikitext(
    text: str,
    tokenizer: Any,
    seq_length: int,
    *,
    clean: bool = True,
    progress: bool = False,
    source: str = "text",
) -> tuple[np.ndarray, PackStats]:
    """Rows (n, seq_length + 1) int32 of WikiText `text`; see the module docstring for the rules."""
    if seq_length < 1:
        raise ValueError(f"seq_length must be >= 1, got {seq_length}")
    tok = _load_tokenizer(tokenizer)
    articles = split_articles(text)
    if not articles:
        raise ValueError(f"{source}: no text to pack (the input is empty or only whitespace)")
    it: Iterable[str] = articles
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(articles, desc="tokenize", unit="article")
    docs = (tok.encode(clean_wikitext(a) if clean else a) for a in it)
    rows, stats = pack_documents(docs, seq_length + 1, bos_id=tok.bos_id, eos_id=tok.eos_id)
    if stats.rows == 0:
        raise ValueError(
            f"{source}: {stats.tokens} tokens do not fill one row of seq_length + 1 = {seq_length + 1}; "
            "use more text or a smaller seq_length"
        )
    return rows, stats


def prepare_wiki(
    input: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    tokenizer: Any,
    seq_length: int,
    output: str | os.PathLike[str],
    *,
    fmt: str | None = None,
    clean: bool = True,
    progress: bool = True,
) -> PackStats:
    """Pack WikiText file(s) (concatenated in the given order) into a record file (`input_ids` int32 column)."""
    from llama2.data.records import write_records

    paths = [input] if isinstance(input, str | os.PathLike) else list(input)
    texts = []
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise FileNotFoundError(f"WikiText input {p} not found")
        with open(p, encoding="utf-8") as f:  # universal newlines: CRLF copies read as LF
            texts.append(f.read())
    src = ", ".join(str(p) for p in paths)
    rows, stats = pack_wikitext("\n".join(texts), tokenizer, seq_length, clean=clean, progress=progress, source=src)
    write_records(output, {"input_ids": rows}, fmt, description="wikitext")
    return stats
