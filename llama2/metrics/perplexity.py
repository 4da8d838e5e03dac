"""Token-weighted perplexity: exp(total NLL / number of scored tokens), never a mean of per-batch means."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from llama2.core.registry import METRICS
from llama2.metrics.base import IGNORE_INDEX

__all__ = ["Perplexity"]


@METRICS.register("perplexity")
class Perplexity:
    """Sums per-token NLL (float64) and counts scored tokens; `compute` -> {"perplexity", "loss", "tokens"}.

    `loss` is the mean NLL in nats per scored token and `perplexity` = exp(loss). Because the sums are over
    tokens, the result does not depend on how tokens were grouped into windows or batches.
    """

    name = "perplexity"
    feed = "tokens"

    def __init__(self) -> None:
        self.total_nll = 0.0
        self.tokens = 0

    def update(self, *, nll: np.ndarray, labels: np.ndarray, **_: Any) -> None:
        scored = np.asarray(labels) != IGNORE_INDEX
        values = np.asarray(nll, dtype=np.float64)[scored]
        if not np.all(np.isfinite(values)):
            raise ValueError("perplexity: the model returned a non-finite NLL for a scored token")
        self.total_nll += float(values.sum())
        self.tokens += int(scored.sum())

    def compute(self) -> dict[str, float]:
        if self.tokens == 0:
            raise ValueError("perplexity: no token was scored (is the data empty or shorter than 2 tokens?)")
        loss = self.total_nll / self.tokens
        return {"perplexity": math.exp(loss), "loss": loss, "tokens": self.tokens}
