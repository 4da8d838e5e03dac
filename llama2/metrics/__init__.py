"""Metrics: the `Metric` protocol and the built-ins ("perplexity", "squad"), registered in `METRICS`.

Third-party metrics register through the `llama2.metrics` entry point group; see docs/evaluation.md.
"""

from llama2.metrics.base import IGNORE_INDEX, Metric, create_metric
from llama2.metrics.perplexity import Perplexity
from llama2.metrics.squad import SquadMetric, exact_match_score, f1_score, normalize_answer, score_squad

__all__ = [
    "IGNORE_INDEX",
    "Metric",
    "Perplexity",
    "SquadMetric",
    "create_metric",
    "exact_match_score",
    "f1_score",
    "normalize_answer",
    "score_squad",
]
