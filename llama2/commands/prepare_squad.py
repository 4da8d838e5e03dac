"""Prepare SQuAD v1.1 for generative evaluation: one prompt per question (all questions, all gold answers).

Writes a JSONL of {"id", "prompt", "input_ids", "answers", "truncated"} and OUTPUT.report.json; contexts too long
for --max-length minus --answer-tokens are cut at a word boundary, the question is always kept.
"""

from __future__ import annotations

import argparse
import json

PREPARE = "squad"
HELP = "SQuAD v1.1 -> prompt JSONL for `llama2 evaluate --metric squad`"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=True, help="dev-v1.1.json or dev-v1.1.json.zip")
    parser.add_argument("--tokenizer", required=True, help="SentencePiece tokenizer.model (or its folder)")
    parser.add_argument("--max-length", type=int, default=2048, help="prompt + answer tokens (default 2048)")
    parser.add_argument("--answer-tokens", type=int, default=32, help="tokens kept free for the answer (default 32)")
    parser.add_argument("--output", required=True, help="output .jsonl")
    parser.add_argument("--limit", type=int, default=None, help="only the first N questions")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from llama2.data.squad import prepare_squad

    report = prepare_squad(
        args.input,
        args.tokenizer,
        args.max_length,
        args.output,
        answer_tokens=args.answer_tokens,
        limit=args.limit,
        progress=not args.no_progress,
    )
    print(json.dumps(report, indent=2))
    print(
        f"wrote {report['questions']} questions ({report['answers']} gold answers) to {args.output}; "
        f"{report['truncated']} context(s) truncated to fit {args.max_length - args.answer_tokens} prompt tokens"
    )
    return 0
