"""Checkpoint formats: detect, open (stream canonical HF-layout tensors) and save.

Formats: "hf" (config.json + safetensors / pytorch_model.bin, sharded or not), "meta" (params.json +
consolidated.NN.pth, model-parallel shards), "mindspore" (MindFormers-named .ckpt), "llama2c" (llama2.c version-0
.bin), "gguf" (read only; F32/F16/BF16 tensors). Canonical names and the rotate-half RoPE layout are Hugging Face's;
other layouts are converted at the file boundary. See docs/formats.md.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from llama2.core.config import ModelConfig
from llama2.core.formats.base import Checkpoint, FormatError

__all__ = ["FORMATS", "Checkpoint", "FormatError", "detect_format", "open_checkpoint", "save_checkpoint", "convert"]

FORMATS = ("hf", "meta", "mindspore", "llama2c", "gguf")
WRITABLE = ("hf", "meta", "mindspore", "llama2c")
_MODULES = {
    "hf": "llama2.core.formats.hf",
    "meta": "llama2.core.formats.meta",
    "mindspore": "llama2.core.formats.mindspore_ckpt",
    "llama2c": "llama2.core.formats.llama2c",
    "gguf": "llama2.core.formats.gguf",
}
_LOOKED_FOR = (
    "hf: a directory with config.json and model.safetensors / model.safetensors.index.json / pytorch_model.bin "
    "(or a .safetensors file); meta: a directory with params.json and consolidated.*.pth; mindspore: a .ckpt file or "
    "a directory holding one; llama2c: a .bin file whose 28-byte header matches its size; gguf: a file starting "
    "with the magic 'GGUF'"
)


def _module(fmt: str) -> Any:
    if fmt not in _MODULES:
        raise ValueError(f"unknown checkpoint format {fmt!r}; known formats: {', '.join(FORMATS)}")
    return importlib.import_module(_MODULES[fmt])


def detect_format(path: str | Path) -> str:
    """The format of the checkpoint at `path` ("hf", "meta", "mindspore", "llama2c" or "gguf")."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_dir():
        if _module("hf").is_hf(path):
            return "hf"
        if (path / "params.json").is_file() and any(path.glob("consolidated.*.pth")):
            return "meta"
        if _module("mindspore").find_ckpt(path, required=False) is not None:
            return "mindspore"
    else:
        with open(path, "rb") as f:
            magic = f.read(8)
        if magic[:4] == b"GGUF":
            return "gguf"
        if path.suffix == ".ckpt":
            return "mindspore"
        if path.suffix == ".safetensors" or (path.name.startswith("pytorch_model") and path.suffix == ".bin"):
            return "hf"
        if path.suffix == ".bin" and _module("llama2c").looks_like_llama2c(path):
            return "llama2c"
    raise FormatError(f"cannot tell the checkpoint format of {path}; looked for {_LOOKED_FOR}")


def open_checkpoint(path: str | Path, fmt: str | None = None, *, config: ModelConfig | None = None) -> Checkpoint:
    """Open a checkpoint for streaming reads; `config` overrides what the files say (needed only where they lack it)."""
    path = Path(path)
    fmt = fmt or detect_format(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return _module(fmt).open_ckpt(path, config=config)


def save_checkpoint(
    path: str | Path, fmt: str, config: ModelConfig, tensors: Iterable[tuple[str, np.ndarray]], **options: Any
) -> Path:
    """Write canonical tensors in format `fmt` atomically; options are format-specific (see docs/formats.md).

    hf: max_shard_size, dtype, tokenizer_path, overwrite. meta: model_parallel, dtype, tokenizer_path, overwrite.
    mindspore: dtype, tokenizer_path, overwrite. llama2c: overwrite.
    """
    if fmt not in WRITABLE:
        raise ValueError(f"cannot write format {fmt!r}; writable formats: {', '.join(WRITABLE)}")
    return _module(fmt).save_ckpt(Path(path), config, tensors, **options)


def convert(
    src: str | Path, dst: str | Path, *, src_format: str | None = None, dst_format: str = "hf", **options: Any
) -> Path:
    """Stream `src` into `dst` in `dst_format`; the tokenizer.model beside `src` is copied where `dst` is a folder."""
    with open_checkpoint(src, src_format) as ckpt:
        if ckpt.tokenizer_path is not None and "tokenizer_path" not in options and dst_format != "llama2c":
            options["tokenizer_path"] = ckpt.tokenizer_path
        return save_checkpoint(dst, dst_format, ckpt.config, ckpt.tensors(), **options)
