"""Training samples (`TrainData`) and the order each step reads them in (`DataOrder`)."""

from __future__ import annotations

from typing import Any

import attrs
import numpy as np

from llama2.core.backend import IGNORE_INDEX

__all__ = ["TrainData", "DataOrder"]


@attrs.frozen
class TrainData:
    """Training samples: `input_ids` (n, L) and optional `labels` (n, L) with IGNORE_INDEX on unscored tokens.

    The model reads ids[:, :-1] and is scored on labels[:, 1:] (labels default to the ids), so a sample of
    seq_length + 1 tokens trains seq_length positions, as the seed's preprocessing writes them.
    """

    input_ids: np.ndarray
    labels: np.ndarray | None = None

    @property
    def n_samples(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_length(self) -> int:
        """Positions the model sees per sample (L - 1)."""
        return int(self.input_ids.shape[1]) - 1

    def fingerprint(self) -> str:
        """A hash of the samples (ids and labels, shapes included): equal data gives an equal fingerprint."""
        import hashlib

        h = hashlib.blake2b(digest_size=16)
        for a in (self.input_ids, self.labels):
            if a is not None:
                h.update(repr((a.shape, str(a.dtype))).encode())
                h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()

    def batch(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ids = self.input_ids[indices]
        labels = ids if self.labels is None else self.labels[indices]
        return np.ascontiguousarray(ids[:, :-1], np.int32), np.ascontiguousarray(labels[:, 1:], np.int32)

    def scored_tokens(self, indices: np.ndarray) -> int:
        """How many tokens `batch(indices)` scores (labels other than IGNORE_INDEX), without building the batch."""
        if self.labels is None:
            return len(indices) * self.seq_length
        return int((self.labels[indices][:, 1:] != IGNORE_INDEX).sum())

    @classmethod
    def from_any(cls, data: Any, seq_length: int | None = None, source: str = "data") -> TrainData:
        """From a TrainData, a dict with `input_ids` (+ `labels`), a 2-D array of samples, or a 1-D token stream
        (cut into non-overlapping samples of seq_length + 1 tokens, the remainder dropped)."""
        if isinstance(data, TrainData):
            return data
        labels = None
        if isinstance(data, dict):
            if "input_ids" not in data:
                raise ValueError(f"{source}: expected a field 'input_ids', found {sorted(data)}")
            ids, labels = np.asarray(data["input_ids"]), data.get("labels")
        else:
            ids = np.asarray(data)
        if ids.ndim == 1:
            if seq_length is None:
                raise ValueError(f"{source}: a 1-D token stream needs seq_length to be cut into samples")
            n = ids.shape[0] // (seq_length + 1)
            ids = ids[: n * (seq_length + 1)].reshape(n, seq_length + 1)
        if ids.ndim != 2:
            raise ValueError(f"{source}: expected token ids of shape (samples, tokens), got shape {ids.shape}")
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"{source}: token ids must be integers, got dtype {ids.dtype}")
        if ids.shape[0] == 0 or ids.shape[1] < 2:
            raise ValueError(
                f"{source}: no training samples (shape {ids.shape}); need at least one sample of >= 2 tokens"
                + (f" (seq_length {seq_length} + 1 tokens each)" if seq_length else "")
            )
        if seq_length is not None and ids.shape[1] - 1 != seq_length:
            if ids.shape[1] - 1 < seq_length:
                raise ValueError(
                    f"{source}: samples have {ids.shape[1]} tokens, fewer than seq_length + 1 = {seq_length + 1}"
                )
            ids = ids[:, : seq_length + 1]
            labels = None if labels is None else np.asarray(labels)[:, : seq_length + 1]
        if labels is not None:
            labels = np.asarray(labels)
            if labels.shape != ids.shape:
                raise ValueError(f"{source}: labels have shape {labels.shape}, input_ids {ids.shape}")
        return cls(ids, labels)

    def check(self, vocab_size: int, max_seq_len: int, source: str = "data") -> None:
        """Clear errors for ids outside the vocabulary or samples longer than the model's context."""
        if self.seq_length > max_seq_len:
            raise ValueError(
                f"{source}: samples train {self.seq_length} positions (seq_length), above the model's "
                f"max_seq_len {max_seq_len}; use a smaller seq_length or a model with a longer context"
            )
        lo, hi = int(self.input_ids.min()), int(self.input_ids.max())
        if lo < 0 or hi >= vocab_size:
            raise ValueError(
                f"{source}: token ids range over [{lo}, {hi}] but the model's vocab_size is {vocab_size} "
                "(was the data tokenized with a different tokenizer?)"
            )
        if self.labels is not None:
            lab = self.labels[self.labels != IGNORE_INDEX]
            if lab.size and (lab.min() < 0 or lab.max() >= vocab_size):
                raise ValueError(f"{source}: labels outside [0, {vocab_size}) other than {IGNORE_INDEX}")


@attrs.frozen
class DataOrder:
    """Which samples each step reads: a seeded permutation per epoch; incomplete last batches are dropped."""

    n_samples: int
    batch_size: int
    seed: int = 0
    shuffle: bool = True

    def __attrs_post_init__(self) -> None:
        if self.n_samples < self.batch_size:
            raise ValueError(
                f"the data has {self.n_samples} sample(s), fewer than batch_size {self.batch_size}; "
                "use more data or a smaller batch"
            )

    @property
    def steps_per_epoch(self) -> int:
        return self.n_samples // self.batch_size

    def permutation(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n_samples)
        return np.random.default_rng([self.seed, epoch]).permutation(self.n_samples)

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, batch index within the epoch) of global step `step` (0-based)."""
        return divmod(step, self.steps_per_epoch)

    def indices(self, step: int, rank: int = 0, world_size: int = 1) -> np.ndarray:
        """Sample indices of this rank's share of global step `step`."""
        epoch, k = self.position(step)
        batch = self.permutation(epoch)[k * self.batch_size : (k + 1) * self.batch_size]
        per_rank = self.batch_size // world_size
        return batch[rank * per_rank : (rank + 1) * per_rank]
