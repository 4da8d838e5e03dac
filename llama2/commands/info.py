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
    p.add_argument(
        "--backend",
        default=None,
        help="also load the weights on this backend (mindspore, torch, plugins) and report it; default: no load",
    )
    p.add_argument("--device", default="cpu", help="device for --backend (cpu, gpu/cuda, ascend)")


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


def load_on_backend(path: Path, backend: str, fmt: str | None = None, device: str = "cpu") -> dict:
    """Load the checkpoint on `backend` and report the backend and the parameter count it holds."""
    from llama2.api import load

    model = load(path, backend=backend, fmt=fmt, device=device)
    describe_fn = getattr(model.runtime, "describe", None)
    details = describe_fn() if describe_fn else {"backend": model.backend, "device": device}
    return {**details, "loaded_parameters": model.num_parameters()}


def run(args: argparse.Namespace) -> int:
    info = describe(Path(args.model), args.format)
    if getattr(args, "backend", None):
        info["backend"] = load_on_backend(Path(args.model), args.backend, args.format, args.device)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"path:       {info['path']}")
    print(f"format:     {info['format']}")
    print(f"parameters: {info['num_parameters']:,}")
    print(f"tokenizer:  {info['tokenizer'] or '(none beside the weights)'}")
    if "embedded_vocab_size" in info:
        print(f"embedded vocabulary: {info['embedded_vocab_size']} pieces")
    if "backend" in info:
        be = info["backend"]
        print(f"loaded on:  {be['backend']} ({be.get('device', '?')}), {be['loaded_parameters']:,} parameters")
    print("config:")
    for key, value in info["config"].items():
        print(f"  {key}: {value}")
    return 0
