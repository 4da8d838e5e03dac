"""The metric plugin protocol and the token windows that feed token-level metrics.

A metric accumulates (`update`, any number of times) and then reports (`compute`). It never runs the model
itself: `llama2.evaluate` reads the data, runs the model and calls `update` with one of two *feeds*, named by the
metric's `feed` attribute:

``feed = "tokens"`` (perplexity, token accuracy, ...)
    `evaluate` cuts the data into windows (packed rows, or raw text with a sliding window) and, per batch, calls
    ``update(ids=, labels=, attention_mask=, nll=)`` with numpy arrays of shape (batch, seq): `labels` aligned
    with `ids` (label[t] is the target after ids[..t]; `IGNORE_INDEX` where a position is not scored), `nll` the
    per-token negative log-likelihood from `Runtime.token_nll` (0 where not scored). A metric that sets
    ``needs_logits = True`` also gets ``logits=`` (batch, seq, vocab) float32.

``feed = "generation"`` (SQuAD, ...)
    `evaluate` reads prompts with reference answers, generates greedily and calls
    ``update(ids=[question ids], predictions=[post-processed answers], answers=[[gold answers], ...],
    prompts=[prompt texts])``.

A plugin is a class (or any zero-argument factory) registered in `llama2.core.registry.METRICS`, directly with
``@METRICS.register("name")`` or through an entry point in the group ``llama2.metrics``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

import attrs
import numpy as np

from llama2.core.registry import METRICS

__all__ = [
    "IGNORE_INDEX",
    "FEEDS",
    "Metric",
    "TokenWindow",
    "create_metric",
    "sliding_windows",
    "row_windows",
    "batch_windows",
]

IGNORE_INDEX = -100
FEEDS = ("tokens", "generation")


@runtime_checkable
class Metric(Protocol):
    """Accumulate with `update`, then `compute` a flat dict of floats. `feed` says what `update` receives."""

    name: str
    feed: str

    def update(self, **batch: Any) -> None: ...

    def compute(self) -> dict[str, float]: ...


def create_metric(metric: str | Metric) -> Metric:
    """A fresh metric instance from a registered name (built-in or plugin), or `metric` itself if an instance."""
    if isinstance(metric, str):
        factory = METRICS.get(metric)
        # a class or factory function makes a fresh metric; a registered instance is copied (no shared state)
        obj = factory() if isinstance(factory, type) or not hasattr(factory, "update") else copy.deepcopy(factory)
    else:
        obj = metric
    missing = [a for a in ("feed", "update", "compute") if not hasattr(obj, a)]
    if missing:
        raise TypeError(f"metric {metric!r} does not follow llama2.metrics.Metric: it lacks {missing}")
    if obj.feed not in FEEDS:
        raise ValueError(f"metric {metric!r} has feed {obj.feed!r}; expected one of {FEEDS}")
    if not getattr(obj, "name", None):
        obj.name = metric if isinstance(metric, str) else type(obj).__name__
    return obj


@attrs.frozen
class TokenWindow:
    """One model input: `ids` and the aligned `labels` (IGNORE_INDEX where not scored); `doc` = source index."""

    ids: np.ndarray
    labels: np.ndarray
    doc: int = 0

    @property
    def n_scored(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


def sliding_windows(
    tokens: Sequence[int], seq_length: int, stride: int | None = None, doc: int = 0
) -> list[TokenWindow]:
    """Windows over one document that score every token after the first exactly once.

    Window k feeds tokens[b : b + seq_length] (b = k * stride) and predicts tokens b+1 .. b+seq_length; only the
    targets that no earlier window predicted are scored, so each scored token sees at least
    `seq_length - stride` tokens of context (except near the start). stride == seq_length gives
    non-overlapping windows; stride must be in [1, seq_length].
    """
    stride = seq_length if stride is None else stride
    if seq_length < 1:
        raise ValueError(f"seq_length must be >= 1, got {seq_length}")
    if not 1 <= stride <= seq_length:
        raise ValueError(f"stride must be between 1 and seq_length={seq_length}, got {stride}")
    arr = np.asarray(tokens, dtype=np.int64)
    n = len(arr)
    windows: list[TokenWindow] = []
    last_scored = 0  # index of the last target already scored (token 0 is never a target)
    begin = 0
    while last_scored < n - 1:
        end = min(begin + seq_length, n - 1)  # inputs tokens[begin:end], targets tokens[begin+1:end+1]
        ids = arr[begin:end]
        labels = arr[begin + 1 : end + 1].copy()
        # target index of labels[j] is begin + 1 + j; keep only those > last_scored
        n_old = last_scored - begin
        if n_old > 0:
            labels[:n_old] = IGNORE_INDEX
        windows.append(TokenWindow(ids, labels, doc))
        last_scored = end
        begin += stride
    return windows


def row_windows(rows: Iterable[Sequence[int]]) -> list[TokenWindow]:
    """Packed rows of seq_length + 1 tokens: inputs row[:-1], every target row[1:] scored (the seed's way)."""
    out = []
    for i, row in enumerate(rows):
        arr = np.asarray(row, dtype=np.int64).reshape(-1)
        if len(arr) < 2:
            raise ValueError(f"packed row {i} has {len(arr)} token(s); a row needs at least 2")
        out.append(TokenWindow(arr[:-1], arr[1:].copy(), i))
    return out


def batch_windows(windows: Sequence[TokenWindow], batch_size: int, pad_id: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Right-padded batches: ids (pad_id), labels (IGNORE_INDEX) and attention_mask (0) on padding.

    Right padding never changes the real tokens' logits (attention is causal), so results do not depend on
    how windows are grouped into batches.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, len(windows), batch_size):
        chunk = windows[start : start + batch_size]
        width = max(len(w.ids) for w in chunk)
        ids = np.full((len(chunk), width), pad_id, dtype=np.int64)
        labels = np.full((len(chunk), width), IGNORE_INDEX, dtype=np.int64)
        mask = np.zeros((len(chunk), width), dtype=np.int64)
        for r, w in enumerate(chunk):
            n = len(w.ids)
            ids[r, :n] = w.ids
            labels[r, :n] = w.labels
            mask[r, :n] = 1
        yield {"ids": ids, "labels": labels, "attention_mask": mask}
