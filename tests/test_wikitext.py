"""WikiText packing (the seed's llama_preprocess.py --dataset_type wiki) and record files."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import numpy as np
import pytest

from llama2.data.records import read_columns, read_records, write_records
from llama2.data.wikitext import clean_wikitext, pack_documents, pack_wikitext, prepare_wiki, split_articles
from tests.conftest import data_path

BOS, EOS = 1, 2


class WordTokenizer:
    """One id per whitespace-separated word (a=3, b=4, ...): makes packing easy to check by hand."""

    bos_id, eos_id, vocab_size = BOS, EOS, 64

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        return [BOS] * bos + [3 + (ord(w[0]) - ord("a")) % 60 for w in text.split()] + [EOS] * eos


def test_pack_two_documents_block_4() -> None:
    tok = WordTokenizer()
    rows, stats = pack_documents([tok.encode("a b c"), tok.encode("d e")], 4, bos_id=BOS, eos_id=EOS)
    # stream: BOS a b c EOS BOS d e EOS (9 tokens) -> 2 rows of 4, 1 token dropped (documented remainder policy)
    assert rows.dtype == np.int32
    assert rows.tolist() == [[BOS, 3, 4, 5], [EOS, BOS, 6, 7]]
    assert (stats.documents, stats.tokens, stats.rows, stats.dropped) == (2, 9, 2, 1)
    stream = [BOS, 3, 4, 5, EOS, BOS, 6, 7, EOS]
    assert stream[stream.index(5) + 1] == EOS and stream[-1] == EOS  # each document ends with EOS
    again, _ = pack_documents([tok.encode("a b c"), tok.encode("d e")], 4, bos_id=BOS, eos_id=EOS)
    assert np.array_equal(rows, again)
    rows9, stats9 = pack_documents([tok.encode("a b c"), tok.encode("d e")], 9, bos_id=BOS, eos_id=EOS)
    assert rows9.tolist() == [stream] and stats9.dropped == 0


def test_split_articles_at_titles_only() -> None:
    text = " \n = Alpha = \n \n Text a .\n \n = = Section = = \n \n More .\n = Beta = \n \n Text b .\n"
    arts = split_articles(text.replace("\n", "\r\n"))
    assert len(arts) == 2
    assert arts[0].startswith("= Alpha =") and "= = Section = =" in arts[0] and "More ." in arts[0]
    assert arts[1].startswith("= Beta =") and "Text b" in arts[1]
    assert clean_wikitext("1 @,@ 000 @-@ year , ok") == "1,000-year, ok"


def test_pack_wikitext_rows_and_empty_input() -> None:
    tok = WordTokenizer()
    rows, stats = pack_wikitext(" = Alpha = \n a b c \n = Beta = \n d e \n", tok, 3, clean=False)
    # articles "= Alpha = a b c" (6 words) and "= Beta = d e" (5): 2 + 6 + 2 + 5 = 15 tokens -> 3 rows of 4 + 3
    assert stats.documents == 2 and stats.tokens == 15 and rows.shape == (3, 4) and stats.dropped == 3
    assert rows[0, 0] == BOS and rows[1, 3] == EOS and rows[2, 0] == BOS  # Alpha ends at token 8, Beta starts
    with pytest.raises(ValueError, match="empty"):
        pack_wikitext(" \n \n", tok, 3)
    with pytest.raises(ValueError, match="do not fill one row"):
        pack_wikitext(" = A = \n a \n", tok, 100)


@pytest.mark.parametrize("suffix", [".mindrecord", ".npy", ".npz"])
def test_records_roundtrip_deterministic_atomic(tmp_path, suffix: str) -> None:
    rows = np.random.default_rng(0).integers(0, 32000, size=(7, 9)).astype(np.int32)
    cols = {"input_ids": rows, "labels": rows[:, ::-1].copy()}
    path = write_records(tmp_path / f"data{suffix}", cols)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    write_records(path, cols)  # same rows, same file name -> byte-identical
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    back = read_columns(path)
    assert set(back) == set(cols) and all(np.array_equal(back[k], cols[k]) for k in cols)
    assert back["input_ids"].dtype == np.int32
    assert len(read_records(path)) == 7
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


@pytest.mark.parametrize("fmt", ["npy", "npz"])
def test_explicit_format_on_another_suffix_writes_the_given_path(tmp_path, fmt: str) -> None:
    """np.save/np.savez append .npy/.npz when given a path; write_records must still return an existing file."""
    rows = np.arange(12, dtype=np.int32).reshape(3, 4)
    path = write_records(tmp_path / "rows.bin", rows, fmt=fmt)
    assert path == tmp_path / "rows.bin" and path.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.bin"]
    assert np.array_equal(read_columns(path, fmt)["input_ids"], rows)


def test_mindrecord_readable_by_minddataset(tmp_path) -> None:
    ds = pytest.importorskip("mindspore.dataset")
    rows = np.arange(3 * 5, dtype=np.int32).reshape(3, 5)
    path = write_records(tmp_path / "wiki.mindrecord", rows)
    data = ds.MindDataset(str(path), columns_list=["input_ids"], shuffle=False)
    got = [r["input_ids"] for r in data.create_dict_iterator(output_numpy=True)]
    assert [g.dtype for g in got] == [np.int32] * 3 and np.array_equal(np.stack(got), rows)


def test_real_valid_split_llama_tokenizer(tmp_path, llama_tokenizer_path) -> None:
    src = data_path("wikitext-2/tokens-v1/valid.txt")
    out = tmp_path / "wiki4096.npy"
    cmd = [sys.executable, "-m", "llama2", "prepare", "wiki", "--input", str(src), "--tokenizer"]
    cmd += [str(llama_tokenizer_path), "--seq-length", "4096", "--output", str(out), "--no-progress"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = np.load(out)
    # Pinned: 60 articles, 283,354 Llama 2 tokens after the seed's cleaning (with BOS/EOS per article),
    # 69 rows of 4097, the last 661 tokens dropped.
    assert "69 rows x 4097 tokens from 60 articles (283354 tokens, 661 dropped" in res.stdout
    assert rows.shape == (69, 4097) and rows.dtype == np.int32
    assert rows[0, 0] == BOS and (rows == BOS).sum() >= 59 and (rows == EOS).sum() >= 59
    # the seed's format: the same rows in MindRecord, byte-identical on a second run, readable by MindDataset
    recs = []
    for sub in ("a", "b"):
        recs.append(tmp_path / sub / "wiki4096.mindrecord")
        stats = prepare_wiki(src, llama_tokenizer_path, 4096, recs[-1], progress=False)
        assert stats.tokens == 283354 and stats.rows == 69
    assert recs[0].read_bytes() == recs[1].read_bytes()
    assert (recs[0].parent / "wiki4096.mindrecord.db").read_bytes() == (
        recs[1].parent / "wiki4096.mindrecord.db"
    ).read_bytes()
    ds = pytest.importorskip("mindspore.dataset")
    data = ds.MindDataset(str(recs[0]), columns_list=["input_ids"], shuffle=False)
    got = np.stack([r["input_ids"] for r in data.create_dict_iterator(output_numpy=True)])
    assert got.dtype == np.int32 and np.array_equal(got, rows)
