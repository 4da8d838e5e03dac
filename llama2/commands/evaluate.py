"""Evaluate a model: perplexity (packed rows or raw text with a sliding window), SQuAD EM/F1, or a plugin metric.

Examples:
  llama2 evaluate --model ckpt/ --metric perplexity --data wiki.test.raw --seq-length 4096 --stride 2048
  llama2 evaluate --model ckpt/ --metric squad --data squad.jsonl --batch-size 8 --predictions-out preds.json
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

COMMAND = "evaluate"
HELP = "perplexity / SQuAD EM-F1 / plugin metrics"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint path (any format llama2.load reads)")
    parser.add_argument("--metric", default="perplexity", help="perplexity, squad, or an installed plugin metric")
    parser.add_argument("--data", required=True, help="data file (see docs/evaluation.md)")
    parser.add_argument("--backend", default="mindspore", help="mindspore (default) or torch")
    parser.add_argument("--tokenizer", default=None, help="tokenizer.model, if not next to the weights")
    parser.add_argument("--device", default=None, help="cpu, gpu/cuda or ascend")
    parser.add_argument("--dtype", default=None, help="float32, float16 or bfloat16")
    parser.add_argument("--mode", default=None, choices=("graph", "eager"), help="graph (jit, default) or eager")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--seq-length", type=int, default=None, help="perplexity window (default: max_seq_len)")
    parser.add_argument("--stride", type=int, default=None, help="perplexity window stride (default: seq-length)")
    parser.add_argument("--limit", type=int, default=None, help="squad: only the first N questions")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="squad: answer length (default 32)")
    parser.add_argument("--max-length", type=int, default=None, help="squad on raw JSON: prompt+answer tokens")
    parser.add_argument(
        "--predictions-out",
        default=None,
        help="squad: write the official {id: answer} JSON here (default squad_predictions.json)",
    )
    parser.add_argument(
        "--option", action="append", default=[], metavar="KEY=VALUE", help="extra metric option (YAML value)"
    )
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _options(args: argparse.Namespace) -> dict[str, Any]:
    import yaml

    opts: dict[str, Any] = {}
    for key in ("batch_size", "seq_length", "stride", "limit", "max_new_tokens", "max_length", "predictions_out"):
        value = getattr(args, key)
        if value is not None:
            opts[key] = value
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--option {item!r}: expected KEY=VALUE")
        opts[key.strip().replace("-", "_")] = yaml.safe_load(value)
    if args.no_progress:
        opts["progress"] = False
    return opts


def run(args: argparse.Namespace) -> int:
    from llama2.api import load
    from llama2.evaluation import DEFAULT_PREDICTIONS, evaluate
    from llama2.metrics.base import create_metric

    pairs = (("device", args.device), ("dtype", args.dtype), ("mode", args.mode))
    runtime_options = {k: v for k, v in pairs if v is not None}
    model = load(args.model, backend=args.backend, tokenizer=args.tokenizer, **runtime_options)
    options = _options(args)
    result = evaluate(model, args.metric, data=args.data, **options)
    if create_metric(args.metric).feed == "generation":
        print(f"predictions: {options.get('predictions_out', DEFAULT_PREDICTIONS)}", file=sys.stderr)
    if args.json:
        print(json.dumps({"metric": args.metric, **result}))
    else:
        for key, value in result.items():
            print(f"{key:>14}: {value:.4f}" if isinstance(value, float) else f"{key:>14}: {value}")
    return 0
