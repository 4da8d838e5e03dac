"""A third-party llama2 metric: greedy next-token accuracy over the scored tokens.

It follows llama2.metrics.base.Metric: `feed = "tokens"` makes `llama2.evaluate` cut the data into windows and call
`update` per batch; `needs_logits = True` adds the logits to what `update` receives. Nothing is imported from
llama2: a plugin only has to match the protocol.
"""

from __future__ import annotations

from typing import Any

import numpy as np

IGNORE_INDEX = -100  # llama2.metrics.IGNORE_INDEX: positions that are not scored


class TokenAccuracy:
    """Fraction of scored positions where the argmax of the logits is the next token."""

    name = "token_accuracy"
    feed = "tokens"
    needs_logits = True

    def __init__(self) -> None:
        self.correct = 0
        self.tokens = 0

    def update(self, *, logits: np.ndarray, labels: np.ndarray, **_: Any) -> None:
        scored = np.asarray(labels) != IGNORE_INDEX
        hits = np.asarray(logits).argmax(-1) == np.asarray(labels)
        self.correct += int(hits[scored].sum())
        self.tokens += int(scored.sum())

    def compute(self) -> dict[str, float]:
        if self.tokens == 0:
            raise ValueError("token_accuracy: no token was scored")
        return {"token_accuracy": self.correct / self.tokens, "tokens": self.tokens}
