"""Show a checkpoint's format, architecture and parameter count."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

COMMAND = "info"
HELP = "show a checkpoint's format, config and parameter count"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from llama2.core.formats import FORMATS

    p.add_argument("--model", required=True, help="checkpoint file or folder, or a training run folder")
    p.add_argument("--format", choices=FORMATS, help="checkpoint format (default: detected)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--backend",
        default=None,
        help="also load the weights on this backend (mindspore, torch, plugins) and report it; default: no load",
    )
    p.add_argument("--device", default="cpu", help="device for --backend (cpu, gpu/cuda, ascend)")


def describe(path: Path, fmt: str | None = None) -> dict:
    """Format, path, config, parameter count and tokenizer of the checkpoint at `path`.

    A training run folder (with checkpoints/step_N) is resolved as `llama2.load` does: its newest intact
    checkpoint, reported as `run_dir` and `step`.
    """
    from llama2.api import _run_checkpoint
    from llama2.core.formats import open_checkpoint

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    run: dict = {}
    picked = _run_checkpoint(path)
    if picked is not None and picked != path:
        run = {"run_dir": str(path), "step": _step_of(picked)}
        path = picked
    with open_checkpoint(path, fmt) as ckpt:
        info = {
            "path": str(ckpt.path),
            **run,
            "format": ckpt.format,
            "config": ckpt.config.to_dict(),
            "num_parameters": ckpt.num_parameters(),
            "tokenizer": str(ckpt.tokenizer_path) if ckpt.tokenizer_path else None,
        }
        if ckpt.vocab is not None:
            info["embedded_vocab_size"] = len(ckpt.vocab[0])
    return info


def _step_of(checkpoint: Path) -> int | None:
    """The step of a run's checkpoint folder: trainer_state.json's `step`, else the number in step_N."""
    import re

    from llama2.core.run_dir import read_trainer_state

    try:
        return int(read_trainer_state(checkpoint)["step"])
    except (OSError, ValueError, KeyError, TypeError):
        m = re.fullmatch(r"step_(\d+)", checkpoint.name)
        return int(m.group(1)) if m else None


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
    if "run_dir" in info:
        print(f"run:        {info['run_dir']} (newest intact checkpoint: step {info['step']})")
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
