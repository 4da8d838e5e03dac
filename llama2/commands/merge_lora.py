"""Merge a LoRA adapter into its base weights and write a full checkpoint (W' = W + scale * B @ A).

Streams the base checkpoint one tensor at a time (no model is built). The adapter must be LoRA only and must have
been saved for the base's architecture.
"""

from __future__ import annotations

import argparse
from pathlib import Path

COMMAND = "merge-lora"
HELP = "merge a LoRA adapter folder into a base checkpoint and write a full checkpoint"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from llama2.core.formats import WRITABLE

    p.add_argument("--model", required=True, help="base checkpoint (any readable format)")
    p.add_argument("--adapter", required=True, help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--output", required=True, help="output file or folder")
    p.add_argument("--to", dest="fmt", choices=WRITABLE, help="output format (default: from --output, as convert)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="stored dtype (default float32)")
    p.add_argument("--force", action="store_true", help="replace an existing output")


def run(args: argparse.Namespace) -> int:
    from llama2.commands.convert import default_format
    from llama2.peft.merge import merge_lora_checkpoint

    out = Path(args.output)
    fmt = args.fmt or default_format(out)
    options: dict = {"overwrite": args.force}
    if args.dtype:
        if fmt == "llama2c":
            raise ValueError("llama2.c files are always float32; drop --dtype")
        options["dtype"] = args.dtype
    path = merge_lora_checkpoint(args.model, args.adapter, out, fmt, **options)
    print(f"merged {args.adapter} into {args.model} -> {path} ({fmt})")
    return 0
