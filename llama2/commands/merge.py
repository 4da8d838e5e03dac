"""Merge a distributed checkpoint (every rank's part + strategy) into one checkpoint, or re-split it.

Examples:
  llama2 merge --input runs/dp2 --output merged/              # newest runs/dp2/distributed/step_N -> HF dir
  llama2 merge --input runs/dp2/distributed/step_00000100 --output merged.ckpt   # MindSpore .ckpt
  llama2 merge --input merged/ --output split_mp4/ --model-parallel 4            # re-split for 4-way tensor parallel

Without --model-parallel / --pipeline-stage the output is a single checkpoint (format from --output, as
`llama2 convert`); with them, OUTPUT/rank_*/ for that layout (data_parallel 1; see docs/distributed.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path

COMMAND = "merge"
HELP = "merge a distributed (per-rank) checkpoint into one checkpoint, or re-split it for another model_parallel"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from llama2.core.formats import WRITABLE

    p.add_argument("--input", required=True, help="distributed checkpoint dir (rank_*/), or a run dir")
    p.add_argument("--output", required=True, help="output file or folder")
    p.add_argument("--to", dest="fmt", choices=WRITABLE, help="output format (default: from --output, as convert)")
    p.add_argument("--model-parallel", type=int, default=None, help="re-split for this model_parallel size")
    p.add_argument("--pipeline-stage", type=int, default=None, help="re-split for this many pipeline stages")
    p.add_argument("--vocab-emb-dp", choices=("true", "false"), default="true", help="re-split: replicate embedding")
    p.add_argument("--check-replicas", action="store_true", help="verify that every replica is bit-identical")
    p.add_argument("--force", action="store_true", help="replace an existing output")


def run(args: argparse.Namespace) -> int:
    from llama2.commands.convert import default_format
    from llama2.core.dist_checkpoint import merge, split
    from llama2.core.train_config import ParallelConfig

    out = Path(args.output)
    if args.model_parallel or args.pipeline_stage:
        pp = args.pipeline_stage or 1
        par = ParallelConfig(
            model_parallel=args.model_parallel or 1,
            pipeline_stage=pp,
            micro_batch_num=pp,
            vocab_emb_dp=args.vocab_emb_dp == "true",
        )
        if args.fmt:
            raise ValueError("--to applies to a merged checkpoint; a re-split always writes OUTPUT/rank_*/")
        split(args.input, out, par, check_replicas=args.check_replicas, overwrite=args.force)
        print(f"re-split {args.input} for model_parallel={par.model_parallel}, pipeline_stage={pp} -> {out}/rank_*")
        return 0
    fmt = args.fmt or default_format(out)
    path = merge(args.input, out, fmt, check_replicas=args.check_replicas, overwrite=args.force)
    print(f"merged {args.input} -> {path} ({fmt})")
    return 0
