"""Pack WikiText for pretraining (the seed's `llama_preprocess.py --dataset_type wiki`).

Articles (split at ` = Title = ` headings) become BOS ... EOS, are concatenated and cut into rows of
seq_length + 1 token ids (int32 column `input_ids`); the incomplete last row is dropped.

Example:
  llama2 prepare wiki --input wiki.train.tokens --tokenizer tokenizer.model --seq-length 4096 \
      --output wiki4096.mindrecord
"""

from __future__ import annotations

import argparse

PREPARE = "wiki"
HELP = "pack WikiText into MindRecord / .npy rows of seq_length + 1 tokens"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=True, nargs="+", help="WikiText file(s): wiki.*.tokens or wiki.*.raw")
    parser.add_argument("--tokenizer", required=True, help="SentencePiece tokenizer.model")
    parser.add_argument("--seq-length", type=int, default=4096, help="model positions per row (rows hold +1)")
    parser.add_argument("--output", required=True, help="output file (.mindrecord, .npy or .npz)")
    parser.add_argument("--format", default=None, help="mindrecord, npy or npz (default: from --output)")
    parser.add_argument("--no-clean", action="store_true", help="keep WikiText artefacts (` @-@ `, ...) as they are")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from llama2.data.wikitext import prepare_wiki

    stats = prepare_wiki(
        args.input,
        args.tokenizer,
        args.seq_length,
        args.output,
        fmt=args.format,
        clean=not args.no_clean,
        progress=not args.no_progress,
    )
    print(
        f"{args.output}: {stats.rows} rows x {stats.row_length} tokens from {stats.documents} articles "
        f"({stats.tokens} tokens, {stats.dropped} dropped at the end)"
    )
    return 0
