"""Convert Alpaca instruction data (instruction/input/output JSON) into FastChat conversation records.

The human turn is Stanford Alpaca's prompt with the instruction (and the input, when non-empty), as the seed's
alpaca_converter.py builds it; the gpt turn is the output. Malformed records are skipped and listed with their
index (or, with --strict, the first one is an error). A report is printed and written to OUTPUT.report.json.

With --tokenizer and --seq-length and an output ending in .mindrecord, .npy or .npz, the conversations are also
tokenized into SFT samples in the same step (what `llama2 prepare sft` does with the converted file).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

PREPARE = "alpaca"
HELP = "Alpaca JSON -> FastChat conversations JSON (the seed's alpaca_converter)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=True, help="alpaca_data.json (JSON array or JSON Lines)")
    parser.add_argument("--output", required=True, help="output conversation JSON, e.g. alpaca-conversation.json")
    parser.add_argument("--strict", action="store_true", help="fail on the first malformed record")
    parser.add_argument("--tokenizer", help="tokenize too (needs --seq-length and a .mindrecord/.npy/.npz output)")
    parser.add_argument("--seq-length", type=int, help="positions trained per sample when tokenizing (N + 1 stored)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from llama2.core.atomic import write_json
    from llama2.data.alpaca import convert_alpaca

    if args.tokenizer or args.seq_length:
        return _tokenized(args)
    report = convert_alpaca(args.input, args.output, errors="raise" if args.strict else "report")
    out = Path(args.output)
    write_json(out.with_name(out.name + ".report.json"), report, indent=2)
    for p in report["skipped"][:20]:
        print(f"skipped record {p['index']}: {p['reason']}")
    if len(report["skipped"]) > 20:
        print(f"... and {len(report['skipped']) - 20} more (see {out.name}.report.json)")
    summary = {k: v for k, v in report.items() if k != "skipped"}
    summary["skipped"] = len(report["skipped"])
    print(json.dumps(summary))
    return 0


def _tokenized(args: argparse.Namespace) -> int:
    from llama2.data.alpaca import alpaca_to_conversations, read_json_records
    from llama2.data.sft import prepare_sft

    if not (args.tokenizer and args.seq_length):
        raise ValueError("tokenizing needs both --tokenizer and --seq-length")
    if args.output.lower().endswith((".json", ".jsonl")):
        raise ValueError(f"{args.output}: with --tokenizer the output is SFT records (.mindrecord, .npy or .npz)")
    if args.strict:
        alpaca_to_conversations(read_json_records(args.input), errors="raise", source=args.input)
    report = prepare_sft(args.input, args.tokenizer, args.seq_length, args.output, progress=not args.no_progress)
    for p in report.skipped[:20]:
        print(f"skipped record {p['index']}: {p['reason']}")
    print(f"wrote {args.output}: {report.summary()}")
    return 0
