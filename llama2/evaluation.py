"""`evaluate(model, metric, data=..., **options)`: run a registered metric over a dataset.

The metric's `feed` (see llama2.metrics.base) decides how the model is driven:

- "tokens" (perplexity, plugin token metrics): data is packed rows (`.npy` 2-D int array, a `.jsonl` of
  ``{"input_ids": [...]}`` rows, or a records file read by llama2.data.records), each row scored on tokens 1..n;
  or raw text (`.txt`/`.raw`/`.tokens`: the whole file is one document; a `.jsonl` of ``{"text": ...}`` lines:
  one document each), tokenized with BOS and scored with a sliding window (`seq_length`, `stride`).
  Options: seq_length, stride, batch_size, format ("auto", "rows", "text"), add_bos, progress.
- "generation" (squad): data is a prepared SQuAD JSONL (`llama2 prepare squad`) or the raw dev-v1.1.json(.zip)
  (prepared in memory with `max_length`, default the model's max_seq_len). Greedy answers, post-processed by
  llama2.metrics.squad.postprocess. Options: limit, batch_size, max_new_tokens, max_length, progress, and
  predictions_out: where the official {id: answer} JSON goes (default `squad_predictions.json` in the current
  directory; None writes nothing).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llama2.core.atomic import write_json
from llama2.metrics.base import Metric, TokenWindow, batch_windows, create_metric, row_windows, sliding_windows

__all__ = ["evaluate", "token_windows", "run_token_metric", "run_generation_metric"]

log = logging.getLogger(__name__)

DEFAULT_PREDICTIONS = "squad_predictions.json"

TEXT_SUFFIXES = (".txt", ".raw", ".tokens", ".text")
_TOKEN_OPTIONS = {"seq_length", "stride", "batch_size", "format", "add_bos", "progress"}
_GENERATION_OPTIONS = {"limit", "batch_size", "max_new_tokens", "max_length", "predictions_out", "progress"}


def evaluate(model: Any, metric: str | Metric, data: Any = None, **options: Any) -> dict[str, float]:
    """Score `model` with `metric` (a registered name such as "perplexity", "squad", a plugin, or an instance).

    `model` is a llama2 Model (or a path, loaded with llama2.api.load; then `backend` is an option).
    Returns the metric's result dict, e.g. {"perplexity", "loss", "tokens"} or {"exact_match", "f1", "total"}.
    """
    if isinstance(model, (str, os.PathLike)):
        from llama2.api import load

        model = load(model, backend=options.pop("backend", "mindspore"))
    if data is None:
        raise ValueError("evaluate: `data` is required (a file path, or in-memory documents/rows/samples)")
    m = create_metric(metric)
    if m.feed == "tokens":
        _check_options(options, _TOKEN_OPTIONS, m)
        windows = token_windows(
            model,
            data,
            seq_length=options.get("seq_length"),
            stride=options.get("stride"),
            format=options.get("format", "auto"),
            add_bos=options.get("add_bos", True),
        )
        return run_token_metric(
            model, m, windows, batch_size=options.get("batch_size", 1), progress=options.get("progress", True)
        )
    _check_options(options, _GENERATION_OPTIONS, m)
    return run_generation_metric(model, m, data, **options)


def _check_options(options: dict[str, Any], allowed: set[str], metric: Metric) -> None:
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise TypeError(
            f"evaluate: option(s) {unknown} do not apply to metric {metric.name!r} (feed {metric.feed!r}); "
            f"allowed: {sorted(allowed)}"
        )


# ---- the "tokens" feed --------------------------------------------------------------------------------------
def token_windows(
    model: Any,
    data: Any,
    *,
    seq_length: int | None = None,
    stride: int | None = None,
    format: str = "auto",
    add_bos: bool = True,
) -> list[TokenWindow]:
    """Model inputs for a token metric: packed rows as they are, documents cut by `sliding_windows`."""
    if format not in ("auto", "rows", "text"):
        raise ValueError(f"format must be 'auto', 'rows' or 'text', got {format!r}")
    max_seq = int(model.config.max_seq_len)
    rows, docs = _read_token_data(model, data, format, add_bos)
    if rows is not None:
        windows = row_windows(rows)
        width = max((len(w.ids) for w in windows), default=0)
        if seq_length is not None and any(len(w.ids) != seq_length for w in windows):
            raise ValueError(f"packed rows hold {width} + 1 tokens, but seq_length={seq_length} was asked")
        if width > max_seq:
            raise ValueError(f"packed rows of {width} + 1 tokens exceed the model's max_seq_len {max_seq}")
        return windows
    seq_length = max_seq if seq_length is None else int(seq_length)
    if seq_length > max_seq:
        raise ValueError(f"seq_length {seq_length} exceeds the model's max_seq_len {max_seq}")
    windows = []
    for i, doc in enumerate(docs):
        windows.extend(sliding_windows(doc, seq_length, stride, doc=i))
    return windows


def _read_token_data(
    model: Any, data: Any, format: str, add_bos: bool
) -> tuple[list[np.ndarray] | None, list[list[int]] | None]:
    """(rows, None) for packed rows or (None, documents as token lists)."""

    def encode_all(texts: Sequence[str]) -> list[list[int]]:
        tok = _tokenizer(model)
        return [tok.encode(t, bos=add_bos) for t in texts]

    if isinstance(data, np.ndarray):
        if data.ndim != 2:
            raise ValueError(f"in-memory rows must be a 2-D int array, got shape {data.shape}")
        return list(data), None
    if isinstance(data, (list, tuple)):
        if not data:
            raise ValueError("evaluate: `data` is an empty list")
        if all(isinstance(d, str) for d in data):
            return None, encode_all(data)
        seqs = [[int(t) for t in d] for d in data]
        return (seqs, None) if format == "rows" else (None, seqs)
    path = Path(data)
    if not path.exists():
        raise FileNotFoundError(f"evaluation data {path} not found")
    suffix = path.suffix.lower()
    if format == "text" or (format == "auto" and suffix in TEXT_SUFFIXES):
        with open(path, encoding="utf-8") as f:  # universal newlines: CRLF files read as LF
            return None, encode_all([f.read()])
    if suffix == ".npy":
        arr = np.load(path)
        if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"{path}: expected a 2-D integer array of packed rows, got {arr.dtype} {arr.shape}")
        return list(arr), None
    if suffix == ".jsonl":
        rows, texts = [], []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                obj = json.loads(line)
                if "input_ids" in obj:
                    rows.append(np.asarray(obj["input_ids"], dtype=np.int64))
                elif "text" in obj:
                    texts.append(obj["text"])
                else:
                    raise ValueError(f"{path}:{n}: expected an 'input_ids' or a 'text' field")
        if rows and texts:
            raise ValueError(f"{path}: mixes 'input_ids' rows and 'text' lines; use one kind")
        return (rows, None) if rows else (None, encode_all(texts))
    return _read_records(path), None


def _read_records(path: Path) -> list[np.ndarray]:
    """Packed rows from a record file (MindRecord, .npz, ...) through llama2.data.records."""
    from llama2.data.records import read_columns

    cols = read_columns(path, stack=False)
    if "input_ids" not in cols:
        raise ValueError(f"{path}: no 'input_ids' column (columns: {sorted(cols)})")
    return [np.asarray(r, dtype=np.int64).reshape(-1) for r in cols["input_ids"]]


def _tokenizer(model: Any) -> Any:
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise ValueError("evaluate: text data needs a tokenizer; load the model with tokenizer=PATH")
    return tok


def run_token_metric(
    model: Any, metric: Metric, windows: Sequence[TokenWindow], *, batch_size: int = 1, progress: bool = True
) -> dict[str, float]:
    """Feed `windows` through the runtime in batches and return `metric.compute()`."""
    if not windows:
        raise ValueError("evaluate: the data gives no token to score (documents shorter than 2 tokens?)")
    runtime = model.runtime
    tok = getattr(model, "tokenizer", None)
    pad_id = getattr(tok, "pad_id", 0) if tok is not None else 0
    pad_id = pad_id if isinstance(pad_id, int) and pad_id >= 0 else 0
    needs_logits = bool(getattr(metric, "needs_logits", False))
    batches = batch_windows(windows, batch_size, pad_id)
    bar = _progress(progress, total=-(-len(windows) // batch_size), desc=metric.name, unit="batch")
    for batch in batches:
        nll = runtime.token_nll(batch["ids"], batch["labels"], batch["attention_mask"])
        extra = {"logits": runtime.forward(batch["ids"], batch["attention_mask"])} if needs_logits else {}
        metric.update(nll=np.asarray(nll), **batch, **extra)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return metric.compute()


def _progress(enabled: bool, **kwargs: Any) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(**kwargs)


# ---- the "generation" feed ----------------------------------------------------------------------------------
def run_generation_metric(
    model: Any,
    metric: Metric,
    data: Any,
    *,
    limit: int | None = None,
    batch_size: int = 1,
    max_new_tokens: int = 32,
    max_length: int | None = None,
    predictions_out: str | os.PathLike[str] | None = DEFAULT_PREDICTIONS,
    progress: bool = True,
) -> dict[str, float]:
    """Greedy answers for every sample, scored by `metric`; writes {id: answer} JSON to `predictions_out`."""
    from llama2.data.squad import build_samples, is_prepared, load_squad, read_prepared
    from llama2.metrics.squad import postprocess

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(data, (list, tuple)):
        samples = list(data)
    elif is_prepared(data):
        samples = read_prepared(data)
    else:
        max_len = int(max_length or model.config.max_seq_len)
        samples, report = build_samples(
            load_squad(data), _tokenizer(model), max_len, answer_tokens=max_new_tokens, limit=limit
        )
        if report["truncated"]:
            log.warning(
                "%d of %d SQuAD contexts truncated to fit %d tokens", report["truncated"], len(samples), max_len
            )
    if limit is not None:
        samples = samples[:limit]
    if not samples:
        raise ValueError("evaluate: no sample to answer")
    _check_prompt_lengths(model, samples, max_new_tokens)
    predictions: dict[str, str] = {}
    bar = _progress(progress, total=len(samples), desc=metric.name, unit="q")
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        texts = _generate(model, chunk, max_new_tokens)
        answers = [postprocess(t) for t in texts]
        ids = [str(s["id"]) for s in chunk]
        predictions.update(zip(ids, answers, strict=True))
        metric.update(
            ids=ids,
            predictions=answers,
            answers=[list(s["answers"]) for s in chunk],
            prompts=[s["prompt"] for s in chunk],
        )
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    result = metric.compute()
    if predictions_out is not None:
        write_json(predictions_out, predictions)
        log.info("wrote %d predictions to %s", len(predictions), predictions_out)
    return result


def _check_prompt_lengths(model: Any, samples: Sequence[dict[str, Any]], max_new_tokens: int) -> None:
    max_seq = int(model.config.max_seq_len)
    lengths = [(len(s["input_ids"]), s["id"]) for s in samples if "input_ids" in s]
    if not lengths:
        return
    longest, qid = max(lengths)
    if longest >= max_seq:
        raise ValueError(
            f"SQuAD prompt {qid} has {longest} tokens, the model's max_seq_len is {max_seq}; "
            f"prepare with --max-length {max_seq} or less"
        )
    short = sum(n + max_new_tokens > max_seq for n, _ in lengths)
    if short:
        log.warning("%d prompt(s) leave fewer than max_new_tokens=%d tokens for the answer", short, max_new_tokens)


def _generate(model: Any, chunk: Sequence[dict[str, Any]], max_new_tokens: int) -> list[str]:
    """Greedy continuations (text) for one batch of samples; uses the stored prompt ids when present."""
    if all("input_ids" in s for s in chunk):
        tok = _tokenizer(model)
        out = model.generate_ids(
            [list(s["input_ids"]) for s in chunk],
            max_new_tokens=max_new_tokens,
            temperature=0.0,
            stop=["\n"],
            eos_id=tok.eos_id,
        )
        return [tok.decode(ids) for ids in out]
    return model.generate([s["prompt"] for s in chunk], max_new_tokens=max_new_tokens, temperature=0.0, stop=["\n"])
