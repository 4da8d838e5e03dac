"""Perplexity: token-weighted, exact sliding windows, independent of batch size."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest

from llama2.evaluation import evaluate, token_windows
from llama2.metrics.base import IGNORE_INDEX, batch_windows, sliding_windows


class StubRuntime:
    """Logits that depend on the previous token and the position (right padding leaves both unchanged)."""

    def __init__(self, vocab: int = 11, seed: int = 0, context_free: bool = False, uniform: bool = False) -> None:
        rng = np.random.default_rng(seed)
        self.vocab = vocab
        self.context_free = context_free
        self.table = np.zeros((vocab, vocab)) if uniform else rng.standard_normal((vocab, vocab)) * 2
        self.pos_table = np.zeros((64, vocab)) if uniform or context_free else rng.standard_normal((64, vocab))
        self.calls: list[tuple[int, int]] = []

    def forward(self, ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
        ids = np.asarray(ids)
        rows = self.table[0][None, None, :] if self.context_free else self.table[ids]
        logits = rows + self.pos_table[: ids.shape[1]][None]
        return np.broadcast_to(logits, (*ids.shape, self.vocab)).astype(np.float32)

    def token_nll(self, ids: np.ndarray, labels: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
        self.calls.append(tuple(ids.shape))
        logits = self.forward(ids, attention_mask).astype(np.float64)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        safe = np.where(labels == IGNORE_INDEX, 0, labels)
        nll = -np.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
        return np.where(labels == IGNORE_INDEX, 0.0, nll).astype(np.float32)

    def log_probs(self) -> np.ndarray:
        row = self.table[0] + self.pos_table[0]
        return row - np.log(np.exp(row).sum())


class StubTokenizer:
    bos_id, eos_id, pad_id = 1, 2, -1

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        return ([self.bos_id] if bos else []) + [3 + (ord(c) % 8) for c in text]


def stub_model(runtime: StubRuntime, max_seq_len: int = 64) -> SimpleNamespace:
    return SimpleNamespace(runtime=runtime, tokenizer=StubTokenizer(), config=SimpleNamespace(max_seq_len=max_seq_len))


@pytest.mark.parametrize("stride", [8, 4, 1, 3, 7])
def test_sliding_windows_score_every_token_once(stride: int) -> None:
    doc = list(range(100, 123))  # N = 23 distinct tokens
    targets = []
    for w in sliding_windows(doc, 8, stride):
        assert len(w.ids) <= 8
        for j, lab in enumerate(w.labels):
            assert j == 0 or w.ids[j] == doc[doc.index(int(w.ids[j - 1])) + 1]
            if lab != IGNORE_INDEX:
                assert lab == doc[doc.index(int(w.ids[j])) + 1]  # target follows its input
                targets.append(int(lab))
    assert targets == doc[1:]


@pytest.mark.parametrize("stride", [8, 4, 1])
def test_context_free_model_matches_closed_form(stride: int) -> None:
    rt = StubRuntime(context_free=True, seed=3)
    rng = np.random.default_rng(1)
    doc = rng.integers(0, rt.vocab, size=23).tolist()
    expected = math.exp(-np.mean(rt.log_probs()[doc[1:]]))
    out = evaluate(stub_model(rt), "perplexity", data=[doc], seq_length=8, stride=stride, progress=False)
    assert out["tokens"] == 22
    assert out["perplexity"] == pytest.approx(expected, rel=1e-6)
    assert out["loss"] == pytest.approx(math.log(expected), rel=1e-6)


def test_uniform_logits_give_vocab_size() -> None:
    rt = StubRuntime(vocab=37, uniform=True)
    docs = [list(np.arange(n) % 37) for n in (23, 9, 50)]
    out = evaluate(stub_model(rt), "perplexity", data=docs, seq_length=8, stride=4, batch_size=3, progress=False)
    assert out["perplexity"] == pytest.approx(37.0, rel=1e-6)
    assert out["tokens"] == 22 + 8 + 49


@pytest.mark.parametrize("stride", [16, 5])
def test_batch_size_does_not_change_result(stride: int) -> None:
    rng = np.random.default_rng(7)
    docs = [rng.integers(0, 11, size=n).tolist() for n in (23, 5, 40, 2, 17, 1, 33)]
    results = []
    for bs in (1, 2, 5):
        rt = StubRuntime(seed=5)
        results.append(
            evaluate(
                stub_model(rt), "perplexity", data=docs, seq_length=16, stride=stride, batch_size=bs, progress=False
            )
        )
        assert max(shape[0] for shape in rt.calls) == bs
    assert results[0]["tokens"] == sum(n - 1 for n in (23, 5, 40, 2, 17, 1, 33) if n > 1)
    for r in results[1:]:
        assert r["tokens"] == results[0]["tokens"]
        assert r["perplexity"] == pytest.approx(results[0]["perplexity"], rel=1e-12)


def test_token_weighted_not_mean_of_batch_means() -> None:
    rt = StubRuntime(seed=2)
    docs = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [4, 5]]
    out = evaluate(stub_model(rt), "perplexity", data=docs, seq_length=16, batch_size=1, progress=False)
    w0, w1 = (w for w in token_windows(stub_model(rt), docs, seq_length=16))
    n0 = rt.token_nll(w0.ids[None], w0.labels[None]).astype(np.float64).sum()
    n1 = rt.token_nll(w1.ids[None], w1.labels[None]).astype(np.float64).sum()
    assert out["loss"] == pytest.approx((n0 + n1) / 10, rel=1e-9)
    assert out["loss"] != pytest.approx((n0 / 9 + n1 / 1) / 2, rel=1e-3)


def test_packed_rows_npy_and_jsonl(tmp_path) -> None:
    rng = np.random.default_rng(0)
    rows = rng.integers(0, 11, size=(6, 9))
    np.save(tmp_path / "rows.npy", rows)
    with open(tmp_path / "rows.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps({"input_ids": r.tolist()}) + "\n")
    rt = StubRuntime(seed=4)
    a = evaluate(stub_model(rt), "perplexity", data=tmp_path / "rows.npy", batch_size=4, progress=False)
    b = evaluate(stub_model(rt), "perplexity", data=str(tmp_path / "rows.jsonl"), batch_size=1, progress=False)
    assert a["tokens"] == b["tokens"] == 6 * 8
    assert a["perplexity"] == pytest.approx(b["perplexity"], rel=1e-12)
    # packed rows score tokens 1..n of each row: the same as one window per row
    ref = sum(rt.token_nll(r[None, :-1], r[None, 1:]).astype(np.float64).sum() for r in rows) / 48
    assert a["loss"] == pytest.approx(ref, rel=1e-9)
    with pytest.raises(ValueError, match="seq_length=4"):
        evaluate(stub_model(rt), "perplexity", data=tmp_path / "rows.npy", seq_length=4, progress=False)
    pytest.importorskip("mindspore")
    from llama2.data.records import write_records

    rec = write_records(tmp_path / "wiki.mindrecord", rows.astype(np.int32))  # what `llama2 prepare wiki` writes
    c = evaluate(stub_model(rt), "perplexity", data=rec, batch_size=3, progress=False)
    assert c["tokens"] == 48 and c["perplexity"] == pytest.approx(a["perplexity"], rel=1e-12)


def test_raw_text_file_is_one_document(tmp_path) -> None:
    path = tmp_path / "wiki.test.raw"
    path.write_bytes(b" = Title = \r\n\r\n Some text here .\r\n")
    rt = StubRuntime(seed=1)
    model = stub_model(rt)
    out = evaluate(model, "perplexity", data=path, seq_length=8, stride=4, progress=False)
    ids = StubTokenizer().encode(" = Title = \n\n Some text here .\n", bos=True)
    assert out["tokens"] == len(ids) - 1


def test_bad_options_and_data(tmp_path) -> None:
    model = stub_model(StubRuntime())
    with pytest.raises(TypeError, match="max_new_tokens"):
        evaluate(model, "perplexity", data=[[1, 2, 3]], max_new_tokens=3)
    with pytest.raises(ValueError, match="stride"):
        evaluate(model, "perplexity", data=[[1, 2, 3]], seq_length=4, stride=5, progress=False)
    with pytest.raises(ValueError, match="max_seq_len"):
        evaluate(model, "perplexity", data=[[1, 2, 3]], seq_length=65, progress=False)
    with pytest.raises(ValueError, match="no token"):
        evaluate(model, "perplexity", data=[[1]], progress=False)
    with pytest.raises(FileNotFoundError):
        evaluate(model, "perplexity", data=tmp_path / "missing.txt", progress=False)
    with pytest.raises(KeyError, match="perplexity"):
        evaluate(model, "no-such-metric", data=[[1, 2]])


def test_batch_windows_pad_right() -> None:
    w = sliding_windows([5, 6, 7, 8, 9], 3, 2) + sliding_windows([1, 2], 3)
    (batch,) = list(batch_windows(w, 8, pad_id=0))
    assert batch["ids"].tolist() == [[5, 6, 7], [7, 8, 0], [1, 0, 0]]
    assert batch["labels"].tolist() == [[6, 7, 8], [-100, 9, -100], [2, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0], [1, 0, 0]]


@pytest.mark.parametrize("backend", ["mindspore", "torch"])
def test_real_model_batch_size_independent(backend: str) -> None:
    model_mod = pytest.importorskip("llama2.core.model")
    from llama2.core.config import ModelConfig

    cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, vocab_size=97, max_seq_len=32)
    try:
        model = model_mod.create(cfg, backend=backend, seed=0)
    except (RuntimeError, KeyError, ImportError) as exc:  # backend not installed or not usable here
        pytest.skip(f"{backend} backend not usable: {exc}")
    rng = np.random.default_rng(0)
    docs = [rng.integers(3, 97, size=n).tolist() for n in (40, 7, 25, 3)]
    res = [
        evaluate(model, "perplexity", data=docs, seq_length=16, stride=8, batch_size=bs, progress=False)
        for bs in (1, 2, 5)
    ]
    assert res[0]["tokens"] == 39 + 6 + 24 + 2
    for r in res[1:]:
        assert r["perplexity"] == pytest.approx(res[0]["perplexity"], rel=1e-5)
    assert 50 < res[0]["perplexity"] < 200  # random init: near the vocab size
