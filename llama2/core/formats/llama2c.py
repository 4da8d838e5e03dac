"""llama2.c version-0 (legacy) `.bin` checkpoints, read and write.

Layout (little-endian): 7 int32 `dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len` (a negative
vocab_size means a separate classifier follows at the end; positive means tied), then float32 arrays grouped by kind
across layers (embedding, attention norms, wq, wk, wv, wo, ffn norms, w1, w2, w3, final norm), two legacy RoPE
tables (seq_len, head_dim/2) which readers skip, and the classifier if untied. wq/wk are in Meta's interleaved RoPE
layout (llama2.c rotates adjacent pairs) and are permuted to/from rotate-half here. llama2.c fixes norm_eps = 1e-5
and rope_theta = 10000.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from llama2.core.config import ModelConfig
from llama2.core.formats.base import (
    Checkpoint,
    FormatError,
    atomic_file,
    checked_tensors,
    qk_to_interleaved,
    qk_to_rotate_half,
)

__all__ = ["Llama2cCheckpoint", "save_llama2c", "looks_like_llama2c", "layout"]

_HEADER = struct.Struct("<7i")
# (canonical per-layer suffix or global name, shape function) in file order; per-layer kinds are stacked.
_LAYER_KINDS = (
    "input_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "post_attention_layernorm.weight",
    "mlp.gate_proj.weight",
    "mlp.down_proj.weight",
    "mlp.up_proj.weight",
)


def _config_from_header(vals: tuple[int, ...], source: str) -> ModelConfig:
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = vals
    try:
        return ModelConfig(
            dim=dim,
            hidden_dim=hidden,
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=n_kv,
            vocab_size=abs(vocab),
            max_seq_len=seq_len,
            tie_embeddings=vocab > 0,
        )
    except (ValueError, TypeError) as exc:
        raise FormatError(f"{source}: llama2.c header {vals} is not a valid Llama config ({exc})") from None


def layout(config: ModelConfig) -> tuple[dict[str, int], int]:
    """(canonical name -> byte offset, total file size) of a version-0 file for `config`."""
    c = config
    offsets: dict[str, int] = {}
    pos = _HEADER.size
    f4 = 4

    def add(name: str, n: int) -> None:
        nonlocal pos
        offsets[name] = pos
        pos += n * f4

    add("model.embed_tokens.weight", c.vocab_size * c.dim)
    sizes = {
        "input_layernorm.weight": c.dim,
        "self_attn.q_proj.weight": c.dim * c.dim,
        "self_attn.k_proj.weight": c.kv_dim * c.dim,
        "self_attn.v_proj.weight": c.kv_dim * c.dim,
        "self_attn.o_proj.weight": c.dim * c.dim,
        "post_attention_layernorm.weight": c.dim,
        "mlp.gate_proj.weight": c.hidden_dim * c.dim,
        "mlp.down_proj.weight": c.dim * c.hidden_dim,
        "mlp.up_proj.weight": c.hidden_dim * c.dim,
    }
    for kind in _LAYER_KINDS:
        for i in range(c.n_layers):
            add(f"model.layers.{i}.{kind}", sizes[kind])
    add("model.norm.weight", c.dim)
    add("_freq_cis", c.max_seq_len * c.head_dim)  # real + imag tables, (seq_len, head_dim/2) each
    if not c.tie_embeddings:
        add("lm_head.weight", c.vocab_size * c.dim)
    offsets.pop("_freq_cis")
    return offsets, pos


def looks_like_llama2c(path: Path) -> bool:
    """True when the file's 28-byte header gives a config whose version-0 size equals the file size."""
    try:
        with open(path, "rb") as f:
            head = f.read(_HEADER.size)
        if len(head) < _HEADER.size:
            return False
        cfg = _config_from_header(_HEADER.unpack(head), str(path))
        return layout(cfg)[1] == path.stat().st_size
    except (FormatError, ValueError, ZeroDivisionError, OverflowError):
        return False


class Llama2cCheckpoint(Checkpoint):
    format = "llama2c"

    def __init__(self, path: Path, config: ModelConfig | None = None) -> None:
        path = Path(path)
        with open(path, "rb") as f:
            head = f.read(_HEADER.size)
        if head[:4] == b"ak42":
            raise FormatError(f"{path} is a llama2.c version 1/2 export (magic 'ak42'); only version 0 is supported")
        if len(head) < _HEADER.size:
            raise FormatError(f"{path} is truncated: shorter than the 28-byte llama2.c header")
        file_cfg = _config_from_header(_HEADER.unpack(head), str(path))
        tok = path.parent / "tokenizer.model"
        super().__init__(path, config or file_cfg, tok if tok.is_file() else None)
        self.offsets, self.size = layout(self.config)

    def _read(self) -> Iterator[tuple[str, np.ndarray, str]]:
        from llama2.core.formats.base import canonical_shapes

        actual = self.path.stat().st_size
        shapes = canonical_shapes(self.config)
        if actual != self.size:
            order = sorted(self.offsets, key=self.offsets.get)
            cut = [n for n in order if self.offsets[n] + 4 * int(np.prod(shapes[n])) > actual]
            hint = f"; tensor {cut[0]!r} is the first one cut off" if cut else ""
            raise FormatError(f"{self.path} has {actual} bytes but its header implies {self.size}{hint}")
        c = self.config
        for name, shape in shapes.items():  # np.fromfile: no mapping, so only this tensor is resident
            arr = np.fromfile(self.path, dtype="<f4", count=int(np.prod(shape)), offset=self.offsets[name])
            arr = arr.astype(np.float32, copy=False).reshape(shape)
            arr = qk_to_rotate_half(name, arr, c)
            yield name, arr, str(self.path)
            del arr


def save_llama2c(
    path: Path, config: ModelConfig, tensors: Iterable[tuple[str, np.ndarray]], *, overwrite: bool = False
) -> Path:
    """Write a llama2.c version-0 file (float32) atomically; each tensor goes straight to its offset."""
    path = Path(path)
    if config.norm_eps != 1e-5 or config.rope_theta != 10000.0:
        raise ValueError(
            f"llama2.c fixes norm_eps=1e-5 and rope_theta=10000; this config has norm_eps={config.norm_eps}, "
            f"rope_theta={config.rope_theta}"
        )
    c = config
    offsets, total = layout(c)
    vocab = c.vocab_size if c.tie_embeddings else -c.vocab_size
    header = _HEADER.pack(c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, vocab, c.max_seq_len)
    with atomic_file(path, overwrite) as tmp:
        with open(tmp, "wb") as f:
            f.write(header)
            f.truncate(total)
            # Legacy RoPE tables right after the final norm: cos and sin of pos * 10000^(-2i/head_dim).
            half = c.head_dim // 2
            freqs = 1.0 / (10000.0 ** (np.arange(0, c.head_dim, 2, dtype=np.float64)[:half] / c.head_dim))
            angles = np.outer(np.arange(c.max_seq_len, dtype=np.float64), freqs)
            f.seek(offsets["model.norm.weight"] + 4 * c.dim)
            f.write(np.cos(angles).astype("<f4").tobytes())
            f.write(np.sin(angles).astype("<f4").tobytes())
            for name, value in checked_tensors(tensors, c, str(path)):
                arr = qk_to_interleaved(name, np.asarray(value, dtype=np.float32), c)
                f.seek(offsets[name])
                f.write(memoryview(np.ascontiguousarray(arr, dtype="<f4")).cast("B"))
                del value, arr  # hold one tensor at a time
    return path


def open_ckpt(path: Path, config: ModelConfig | None = None) -> Llama2cCheckpoint:
    return Llama2cCheckpoint(path, config)


save_ckpt = save_llama2c
