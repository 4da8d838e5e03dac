"""Show a checkpoint's format, architecture and parameter count."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

COMMAND = "info"
HELP = "show a checkpoint's format, config and parameter count"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from llama2.core.formats import FORMATS

    p.add_argument("--model", required=True, help="checkpoint file or folder")
    p.add_argument("--format", choices=FORMATS, help="checkpoint format (default: detected)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def describe(path: Path, fmt: str | None = None) -> dict:
    """Format, path, config, parameter count and tokenizer of the checkpoint at `path`."""
    from llama2.core.formats import open_checkpoint

    with open_checkpoint(path, fmt) as ckpt:
        info = {
            "path": str(ckpt.path),
            "format": ckpt.format,
            "config": ckpt.config.to_dict(),
            "num_parameters": ckpt.num_parameters(),
            "tokenizer": str(ckpt.tokenizer_path) if ckpt.tokenizer_path else None,
        }
        if ckpt.vocab is not None:
            info["embedded_vocab_size"] = len(ckpt.vocab[0])
    return info


def run(args: argparse.Namespace) -> int:
    info = describe(Path(args.model), args.format)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"path:       {info['path']}")
    print(f"format:     {info['format']}")
    print(f"parameters: {info['num_parameters']:,}")
    print(f"tokenizer:  {info['tokenizer'] or '(none beside the weights)'}")
    if "embedded_vocab_size" in info:
        print(f"embedded vocabulary: {info['embedded_vocab_size']} pieces")
    print("config:")
    for key, value in info["config"].items():
        print(f"  {key}: {value}")
    return 0
