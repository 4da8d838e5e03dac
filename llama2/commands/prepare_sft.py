"""Tokenize conversations (FastChat records, or Alpaca records converted on the fly) into SFT samples.

Each sample is seq_length + 1 tokens: BOS + the fastchat-rendered conversation (vicuna_v1.1 by default), padded
on the right. Columns: input_ids and labels (the seed's `qa` mode); labels are -100 on the system text, user
turns, role tags and padding, and equal the ids on each reply and its `</s>`. Output format from the suffix:
.mindrecord (the seed's), .npy (one structured array, fields input_ids and labels) or .npz. A report
(truncated / dropped / unusable records with their index) is printed and written to OUTPUT.report.json.
"""

from __future__ import annotations

import argparse
import json

PREPARE = "sft"
HELP = "conversations JSON -> SFT samples with input_ids and labels (MindRecord, npy or npz)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=True, help="conversation JSON (llama2 prepare alpaca) or Alpaca JSON")
    parser.add_argument("--tokenizer", required=True, help="SentencePiece tokenizer.model (or its folder)")
    parser.add_argument("--seq-length", type=int, required=True, help="positions trained per sample (N + 1 stored)")
    parser.add_argument("--output", required=True, help="output .mindrecord, .npy or .npz")
    parser.add_argument("--format", dest="fmt", choices=["mindrecord", "npy", "npz"], help="default: from --output")
    parser.add_argument("--template", default="vicuna_v1.1", help="fastchat conversation template")
    parser.add_argument("--system", default=None, help="replace the template's system message")
    parser.add_argument("--pad-id", type=int, default=None, help="padding id (default: the tokenizer's, 0)")
    parser.add_argument(
        "--overflow", choices=["truncate", "drop"], default="truncate", help="too-long samples (default truncate)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from llama2.data.sft import prepare_sft

    report = prepare_sft(
        args.input,
        args.tokenizer,
        args.seq_length,
        args.output,
        fmt=args.fmt,
        pad_id=args.pad_id,
        overflow=args.overflow,
        template=args.template,
        system=args.system,
        progress=not args.no_progress,
    )
    for p in report.skipped[:20]:
        print(f"skipped record {p['index']}: {p['reason']}")
    print(json.dumps({k: v for k, v in report.to_dict().items() if k not in ("skipped", "too_long")}))
    print(f"wrote {args.output}: {report.summary()}")
    return 0
