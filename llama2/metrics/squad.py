"""SQuAD v1.1 exact match and F1, following the official `evaluate-v1.1.py` rules (re-implemented from them).

normalize: lower-case -> delete every `string.punctuation` character (deleted, not replaced by a space) -> the
words a/an/the become a space -> collapse whitespace. EM: normalized strings equal. F1: bag-of-tokens overlap
(multiset intersection) of the normalized strings; 0 when nothing is shared (so an empty prediction scores F1 0
even against an answer that normalizes to nothing, while its EM is 1). Per question: max over all gold answers,
separately for EM and F1. Totals: 100 * sum / number of questions in the dataset; unanswered questions score 0.

Generated text is post-processed before scoring (`postprocess`): cut at the first newline (the model starts a new
section after the answer), then strip surrounding whitespace. Generation already stops at EOS.
"""

from __future__ import annotations

import json
import logging
import os
import re
import string
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from llama2.core.registry import METRICS

__all__ = [
    "normalize_answer",
    "exact_match_score",
    "f1_score",
    "max_over_golds",
    "postprocess",
    "SquadMetric",
    "score_squad",
    "load_predictions",
]

log = logging.getLogger(__name__)

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(s: str) -> str:
    """The official v1.1 normalization (lower, drop punctuation, drop articles, collapse whitespace)."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def exact_match_score(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1_score(prediction: str, gold: str) -> float:
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    num_same = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def max_over_golds(prediction: str, golds: Sequence[str]) -> tuple[float, float]:
    """(EM, F1) of one prediction: the max over all gold answers (0, 0 when there is none)."""
    if not golds:
        return 0.0, 0.0
    return max(exact_match_score(prediction, g) for g in golds), max(f1_score(prediction, g) for g in golds)


def postprocess(text: str) -> str:
    """A generated answer as scored: up to the first newline, surrounding whitespace stripped."""
    return text.split("\n", 1)[0].strip()


@METRICS.register("squad")
class SquadMetric:
    """Accumulates per-question (EM, F1); `compute` -> {"exact_match", "f1", "total"} in percent.

    `total` is the number of distinct questions seen, or `total_ids` when given (questions never updated then
    count as unanswered, score 0). A question updated twice keeps its last prediction.
    """

    name = "squad"
    feed = "generation"

    def __init__(self, total_ids: Iterable[str] | None = None) -> None:
        self.scores: dict[str, tuple[float, float]] = {}
        self.total_ids = None if total_ids is None else list(dict.fromkeys(total_ids))

    def update(
        self, *, ids: Sequence[str], predictions: Sequence[str], answers: Sequence[Sequence[str]], **_: Any
    ) -> None:
        if not len(ids) == len(predictions) == len(answers):
            raise ValueError(
                f"squad: ids ({len(ids)}), predictions ({len(predictions)}) and answers ({len(answers)}) "
                "differ in length"
            )
        for qid, pred, golds in zip(ids, predictions, answers, strict=True):
            self.scores[qid] = max_over_golds(pred, golds)

    def compute(self) -> dict[str, float]:
        if self.total_ids is not None:
            total = len(self.total_ids)
            em = sum(self.scores.get(q, (0.0, 0.0))[0] for q in self.total_ids)
            f1 = sum(self.scores.get(q, (0.0, 0.0))[1] for q in self.total_ids)
        else:
            total = len(self.scores)
            em = sum(s[0] for s in self.scores.values())
            f1 = sum(s[1] for s in self.scores.values())
        if total == 0:
            raise ValueError("squad: no question to score")
        return {"exact_match": 100.0 * em / total, "f1": 100.0 * f1 / total, "total": total}


def load_predictions(path: str | os.PathLike[str]) -> dict[str, str]:
    """An official predictions file: a JSON object {question_id: answer_string}."""
    try:
        with open(path, encoding="utf-8") as f:
            preds = json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not JSON ({exc}); expected an object {{question_id: answer}}") from None
    return _check_predictions(preds, str(path))


def _check_predictions(preds: Any, source: str) -> dict[str, str]:
    if not isinstance(preds, Mapping):
        raise ValueError(
            f"{source}: predictions must be a JSON object {{question_id: answer}}, got {type(preds).__name__}"
        )
    bad = [k for k, v in preds.items() if not isinstance(v, str)]
    if bad:
        raise ValueError(f"{source}: the prediction for question {bad[0]!r} is not a string ({len(bad)} such)")
    return dict(preds)


def score_squad(
    dataset: str | os.PathLike[str] | Mapping[str, Any],
    predictions: str | os.PathLike[str] | Mapping[str, str],
    *,
    strict: bool = False,
) -> dict[str, float]:
    """Official v1.1 scores of a predictions mapping/file against a dataset (path to .json/.zip, or loaded).

    Every question of the dataset counts; missing ones score 0 (one warning with the count). Predictions for ids
    not in the dataset are ignored with a warning, as the official script ignores them; `strict=True` makes
    them an error. Returns {"exact_match", "f1"} in percent, as the official script prints.
    """
    from llama2.data.squad import iter_questions, load_squad, validate_squad

    if isinstance(dataset, (str, os.PathLike)):
        data = load_squad(dataset)
    else:
        validate_squad(dataset)
        data = dict(dataset)
        if data.get("version") != "1.1":
            warnings.warn(f"dataset version is {data.get('version')!r}, the rules are for SQuAD v1.1", stacklevel=2)
    if isinstance(predictions, (str, os.PathLike)):
        preds = load_predictions(Path(predictions))
    else:
        preds = _check_predictions(predictions, "predictions")
    known: set[str] = set()
    total = unanswered = 0
    em_sum = f1_sum = 0.0
    for q in iter_questions(data):  # every question counts, duplicates included, as in the official script
        known.add(q.id)
        total += 1
        pred = preds.get(q.id)
        if pred is None:
            unanswered += 1
            continue
        em, f1 = max_over_golds(pred, q.answers)
        em_sum += em
        f1_sum += f1
    unknown = [k for k in preds if k not in known]
    if unknown:
        msg = f"{len(unknown)} prediction id(s) are not in the dataset (e.g. {unknown[:3]})"
        if strict:
            raise ValueError(msg)
        warnings.warn(msg + "; they are ignored", stacklevel=2)
    if unanswered:
        warnings.warn(f"{unanswered} unanswered question(s) receive score 0", stacklevel=2)
    if total == 0:
        raise ValueError("squad: the dataset has no question")
    return {"exact_match": 100.0 * em_sum / total, "f1": 100.0 * f1_sum / total}
