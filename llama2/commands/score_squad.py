"""Score a SQuAD v1.1 predictions file ({question_id: answer}) with the official rules; prints the official JSON."""

from __future__ import annotations

import argparse
import json

COMMAND = "score-squad"
HELP = "official SQuAD v1.1 EM/F1 of a predictions file"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="dev-v1.1.json or dev-v1.1.json.zip")
    parser.add_argument("--predictions", required=True, help="JSON object {question_id: answer}")
    parser.add_argument("--strict", action="store_true", help="fail on prediction ids not in the dataset")


def run(args: argparse.Namespace) -> int:
    from llama2.metrics.squad import score_squad

    print(json.dumps(score_squad(args.data, args.predictions, strict=args.strict)))
    return 0
