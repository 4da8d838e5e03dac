"""Shared pieces of the checkpoint formats: the `Checkpoint` reader base, name tables, RoPE permutations, dtype
helpers, JSON config reading and atomic file/directory writing."""

from __future__ import annotations

import abc
import json
import re
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from llama2.core.atomic import atomic_dir, atomic_file  # noqa: F401  (re-exported for the formats)
from llama2.core.config import ModelConfig
from llama2.core.graph import build_graph, named_params

__all__ = [
    "Checkpoint",
    "FormatError",
    "canonical_shapes",
    "checked_tensors",
    "expect_shape",
    "to_interleaved",
    "to_rotate_half",
    "qk_to_interleaved",
    "qk_to_rotate_half",
    "read_json_file",
    "bf16_to_f32",
    "f32_to_bf16",
    "cast",
    "parse_size",
    "atomic_dir",
    "atomic_file",
    "LAYER_RE",
]

LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")

# Per-layer canonical suffix -> (Meta name, MindFormers name, GGUF name), each without the layer prefix.
LAYER_NAMES: dict[str, tuple[str, str, str]] = {
    "self_attn.q_proj.weight": ("attention.wq.weight", "attention.wq.weight", "attn_q.weight"),
    "self_attn.k_proj.weight": ("attention.wk.weight", "attention.wk.weight", "attn_k.weight"),
    "self_attn.v_proj.weight": ("attention.wv.weight", "attention.wv.weight", "attn_v.weight"),
    "self_attn.o_proj.weight": ("attention.wo.weight", "attention.wo.weight", "attn_output.weight"),
    "mlp.gate_proj.weight": ("feed_forward.w1.weight", "feed_forward.w1.weight", "ffn_gate.weight"),
    "mlp.down_proj.weight": ("feed_forward.w2.weight", "feed_forward.w2.weight", "ffn_down.weight"),
    "mlp.up_proj.weight": ("feed_forward.w3.weight", "feed_forward.w3.weight", "ffn_up.weight"),
    "input_layernorm.weight": ("attention_norm.weight", "attention_norm.weight", "attn_norm.weight"),
    "post_attention_layernorm.weight": ("ffn_norm.weight", "ffn_norm.weight", "ffn_norm.weight"),
}
# Model-level canonical name -> (Meta, MindFormers, GGUF).
GLOBAL_NAMES: dict[str, tuple[str, str, str]] = {
    "model.embed_tokens.weight": (
        "tok_embeddings.weight",
        "model.tok_embeddings.embedding_weight",
        "token_embd.weight",
    ),
    "model.norm.weight": ("norm.weight", "model.norm_out.weight", "output_norm.weight"),
    "lm_head.weight": ("output.weight", "lm_head.weight", "output.weight"),
}
_COLUMN = {"meta": 0, "mindspore": 1, "gguf": 2}


def name_table(fmt: str, config: ModelConfig) -> dict[str, str]:
    """canonical name -> native name of `fmt` ("meta", "mindspore", "gguf") for every parameter of `config`."""
    col = _COLUMN[fmt]
    prefix = {"meta": "layers", "mindspore": "model.layers", "gguf": "blk"}[fmt]
    out: dict[str, str] = {}
    for name in canonical_shapes(config):
        m = LAYER_RE.match(name)
        if m:
            out[name] = f"{prefix}.{m.group(1)}.{LAYER_NAMES[m.group(2)][col]}"
        else:
            out[name] = GLOBAL_NAMES[name][col]
    return out


class FormatError(ValueError):
    """A checkpoint file is malformed, truncated, or does not match its config."""


def canonical_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Canonical (HF) parameter name -> shape, in the graph's stable order."""
    return {name: tuple(spec.shape) for name, spec in named_params(build_graph(config)).items()}


def checked_tensors(
    items: Iterable[tuple[str, np.ndarray]], config: ModelConfig, dest: str
) -> Iterator[tuple[str, np.ndarray]]:
    """Validate a canonical tensor stream for `config` (known names, shapes, no duplicates, nothing missing)."""
    shapes = canonical_shapes(config)
    seen: set[str] = set()
    for name, value in items:
        value = np.asarray(value)
        if name not in shapes:
            raise FormatError(f"unexpected tensor {name!r} for {dest}: the config has no such parameter")
        if name in seen:
            raise FormatError(f"tensor {name!r} given twice for {dest}")
        if tuple(value.shape) != shapes[name]:
            raise FormatError(f"tensor {name!r} for {dest} has shape {tuple(value.shape)}, expected {shapes[name]}")
        if value.dtype.kind != "f":
            raise FormatError(f"tensor {name!r} for {dest} has dtype {value.dtype}; expected a float array")
        seen.add(name)
        yield name, value
        del value  # hold one tensor at a time
    missing = [n for n in shapes if n not in seen]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise FormatError(f"tensor(s) {missing[:5]}{more} missing when writing {dest}")


class Checkpoint(abc.ABC):
    """An opened checkpoint: its config and a one-tensor-at-a-time reader of canonical (HF-layout) tensors.

    `tensors()` yields float32 arrays, or float16 where the file stores float16 (bfloat16 becomes float32, as numpy
    has no bfloat16). Only the tensor being yielded is held in memory (plus memory-mapped file pages).
    """

    format: str = "?"

    def __init__(self, path: Path, config: ModelConfig, tokenizer_path: Path | None = None) -> None:
        self.path = Path(path)
        self.config = config
        self.tokenizer_path = tokenizer_path
        self.vocab: tuple[list[str], list[float]] | None = None  # (pieces, scores) where the file embeds them

    @abc.abstractmethod
    def _read(self) -> Iterator[tuple[str, np.ndarray, str]]:
        """(canonical name, array, file it came from) in any order."""

    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """(canonical name, array) pairs; raises naming tensor and file on unknown, misshaped or missing tensors."""
        shapes = canonical_shapes(self.config)
        seen: set[str] = set()
        for name, value, source in self._read():
            if name not in shapes:
                raise FormatError(f"unknown tensor {name!r} in {source}: not a parameter of this config")
            if tuple(value.shape) != shapes[name]:
                raise FormatError(
                    f"tensor {name!r} in {source} has shape {tuple(value.shape)}, "
                    f"expected {shapes[name]} from the config"
                )
            seen.add(name)
            yield name, value
            del value  # hold one tensor at a time
        missing = [n for n in shapes if n not in seen]
        if missing:
            more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
            raise FormatError(f"checkpoint {self.path} is missing tensor(s) {missing[:5]}{more}")

    def num_parameters(self) -> int:
        return self.config.num_parameters()

    def close(self) -> None:
        """Release open files (the default reader keeps none)."""
        return None

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.format} {self.path}>"


def expect_shape(actual: Iterable[int], shape: Iterable[int], native: str, canonical: str, source: str) -> None:
    """Raise a FormatError naming the tensor and file when a stored tensor (before any layout permutation) has
    shape `actual` instead of `shape`."""
    if tuple(actual) != tuple(shape):
        raise FormatError(
            f"tensor {native!r} ({canonical}) in {source} has shape {tuple(actual)}, expected {tuple(shape)} "
            "from the config"
        )


# ---- RoPE layouts ---------------------------------------------------------------------------------------------
def to_interleaved(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF rotate-half q/k weight -> Meta interleaved layout (`n_heads` = heads of this projection: n_kv_heads for k)."""
    out, inp = w.shape
    return np.ascontiguousarray(w.reshape(n_heads, 2, out // n_heads // 2, inp).swapaxes(1, 2).reshape(out, inp))


def to_rotate_half(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Meta interleaved q/k weight -> HF rotate-half layout; inverse of `to_interleaved`."""
    out, inp = w.shape
    return np.ascontiguousarray(w.reshape(n_heads, out // n_heads // 2, 2, inp).swapaxes(1, 2).reshape(out, inp))


def _qk_heads(name: str, config: ModelConfig) -> int | None:
    """Head groups of canonical tensor `name` if it is a q/k projection (k: n_kv_heads), else None."""
    if name.endswith("q_proj.weight"):
        return config.n_heads
    if name.endswith("k_proj.weight"):
        return config.n_kv_heads
    return None


def qk_to_interleaved(name: str, w: np.ndarray, config: ModelConfig) -> np.ndarray:
    """`to_interleaved` for canonical q_proj/k_proj weights (k with n_kv_heads groups); other tensors pass through."""
    heads = _qk_heads(name, config)
    return w if heads is None else to_interleaved(w, heads)


def qk_to_rotate_half(name: str, w: np.ndarray, config: ModelConfig) -> np.ndarray:
    """`to_rotate_half` for canonical q_proj/k_proj weights (k with n_kv_heads groups); other tensors pass through."""
    heads = _qk_heads(name, config)
    return w if heads is None else to_rotate_half(w, heads)


# ---- dtypes -------------------------------------------------------------------------------------------------
def bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    """uint16 bfloat16 bit patterns -> float32."""
    return (raw.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> uint16 bfloat16 bit patterns, round to nearest even (NaN stays NaN)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + (((u >> 16) & 1) + 0x7FFF)) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        rounded[nan] = 0x7FC0
    return rounded


DTYPES = ("float32", "float16", "bfloat16")


def cast(x: np.ndarray, dtype: str | None) -> np.ndarray:
    """Cast to "float32"/"float16" (numpy dtype) or "bfloat16" (uint16 bit patterns); None keeps x."""
    if dtype is None:
        return x
    if dtype == "bfloat16":
        return f32_to_bf16(x)
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; expected one of {DTYPES}")
    return np.ascontiguousarray(x, dtype=dtype)


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like "2GB" (10^9), "500MiB" (2^20), "1e9"."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]?i?B)?\s*", str(size), flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot parse size {size!r}; expected e.g. 2GB, 500MB, 1GiB or a byte count")
    unit = (m.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = "BKMGT".index(unit[0]) if unit[0] != "B" else 0
    return int(float(m.group(1)) * base**power)


def read_exact(f: Any, n: int, what: str, source: str) -> bytes:
    """Read exactly n bytes or raise a FormatError naming `what` and `source` (truncated file)."""
    data = f.read(n)
    if len(data) != n:
        raise FormatError(f"{source} is truncated: needed {n} bytes for {what}, got {len(data)}")
    return data


def read_json_file(path: str | Path, what: str, error: type[Exception] = FormatError) -> Any:
    """Parse the UTF-8 JSON file `path`.

    Raises FileNotFoundError "`path` not found: `what`" when it is absent, and `error` naming the file and the parse
    problem when it is not valid JSON.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {what}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{path} is not valid JSON ({exc})") from None


def copy_tokenizer(tokenizer_path: Path | None, out_dir: Path) -> None:
    """Copy a tokenizer.model next to written weights (if given)."""
    if tokenizer_path is not None:
        shutil.copyfile(tokenizer_path, out_dir / "tokenizer.model")
