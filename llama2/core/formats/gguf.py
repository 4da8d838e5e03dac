"""GGUF (llama.cpp) checkpoints, read only: header, metadata and tensor infos parsed here with numpy.

F32, F16 and BF16 tensors are supported (quantized types raise an error naming the tensor and type). GGUF lists dims
innermost-first, so a [8, 32000] `token_embd.weight` is a (32000, 8) array. llama.cpp's HF converter permutes q/k
into Meta's interleaved RoPE layout; that permutation is undone here (k with n_kv_heads groups). The embedded
vocabulary (`tokenizer.ggml.tokens` / `scores`) is exposed as `Checkpoint.vocab`; it is not turned into a
tokenizer.model on conversion (`llama2 convert --tokenizer` copies the original one).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from llama2.core.config import ModelConfig
from llama2.core.formats.base import (
    Checkpoint,
    FormatError,
    bf16_to_f32,
    canonical_shapes,
    expect_shape,
    name_table,
    qk_to_rotate_half,
    read_exact,
)

__all__ = ["GGUFCheckpoint", "read_gguf", "GGML_TYPES"]

GGML_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1", 10: "Q2_K",
              11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS",
              19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32",
              27: "I64", 28: "F64", 29: "IQ1_M", 30: "BF16"}  # fmt: skip
_FLOAT = {0: np.float32, 1: np.float16, 30: np.uint16}
# Metadata value types: id -> struct format (scalars); 8 = string, 9 = array.
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NP_SCALAR = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<?", 10: "<u8", 11: "<i8",
              12: "<f8"}  # fmt: skip


class _Reader:
    def __init__(self, f: BinaryIO, source: str) -> None:
        self.f, self.source = f, source

    def read(self, n: int, what: str) -> bytes:
        return read_exact(self.f, n, what, self.source)

    def unpack(self, fmt: str, what: str) -> Any:
        return struct.unpack(fmt, self.read(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.unpack("<Q", f"the length of {what}")
        return self.read(n, what).decode("utf-8", errors="replace")

    def value(self, vtype: int, what: str) -> Any:
        if vtype in _SCALAR:
            return self.unpack(_SCALAR[vtype], what)
        if vtype == 8:
            return self.string(what)
        if vtype == 9:
            etype = self.unpack("<I", f"the element type of {what}")
            n = self.unpack("<Q", f"the length of {what}")
            if etype in _NP_SCALAR:
                dt = np.dtype(_NP_SCALAR[etype])
                return np.frombuffer(self.read(n * dt.itemsize, what), dtype=dt).tolist()
            return [self.value(etype, f"{what}[{i}]") for i in range(n)]
        raise FormatError(f"{self.source}: unknown GGUF metadata type {vtype} for {what}")


def read_gguf(file: Path) -> tuple[dict[str, Any], dict[str, tuple[tuple[int, ...], int, int]], int]:
    """(metadata, tensor name -> (numpy shape, ggml type, absolute data offset), version) of a GGUF v2/v3 file."""
    with open(file, "rb") as f:
        r = _Reader(f, str(file))
        if r.read(4, "the magic") != b"GGUF":
            raise FormatError(f"{file} is not a GGUF file (magic is not 'GGUF')")
        version = r.unpack("<I", "the version")
        if version not in (2, 3):
            raise FormatError(f"{file}: GGUF version {version} is not supported (expected 2 or 3)")
        n_tensors = r.unpack("<Q", "the tensor count")
        n_kv = r.unpack("<Q", "the metadata count")
        meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key = r.string("a metadata key")
            meta[key] = r.value(r.unpack("<I", f"the type of {key}"), key)
        infos = []
        for _ in range(n_tensors):
            name = r.string("a tensor name")
            n_dims = r.unpack("<I", f"the rank of tensor {name!r}")
            dims = [r.unpack("<Q", f"the dims of tensor {name!r}") for _ in range(n_dims)]
            ggml_type = r.unpack("<I", f"the type of tensor {name!r}")
            offset = r.unpack("<Q", f"the offset of tensor {name!r}")
            infos.append((name, tuple(reversed(dims)), ggml_type, offset))
        align = int(meta.get("general.alignment", 32))
        data_start = f.tell() + (-f.tell() % align)
    return meta, {n: (shape, t, data_start + off) for n, shape, t, off in infos}, version


class GGUFCheckpoint(Checkpoint):
    format = "gguf"

    def __init__(self, path: Path, config: ModelConfig | None = None) -> None:
        path = Path(path)
        self.metadata, self.infos, self.version = read_gguf(path)
        arch = self.metadata.get("general.architecture")
        if arch != "llama":
            raise FormatError(f"{path}: general.architecture is {arch!r}; only 'llama' is supported")
        tokens = self.metadata.get("tokenizer.ggml.tokens")
        tok = path.parent / "tokenizer.model"
        super().__init__(path, config or self._config(path, tokens), tok if tok.is_file() else None)
        if tokens is not None:
            scores = self.metadata.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
            self.vocab = (list(tokens), [float(s) for s in scores])

    def _config(self, path: Path, tokens: list[str] | None) -> ModelConfig:
        m = self.metadata

        def need(key: str) -> Any:
            if f"llama.{key}" not in m:
                raise FormatError(f"{path}: metadata 'llama.{key}' is missing")
            return m[f"llama.{key}"]

        n_heads = int(need("attention.head_count"))
        if "token_embd.weight" in self.infos:
            vocab = self.infos["token_embd.weight"][0][0]
        else:
            vocab = int(m.get("llama.vocab_size") or len(tokens or []))
        return ModelConfig(
            dim=int(need("embedding_length")),
            n_layers=int(need("block_count")),
            n_heads=n_heads,
            n_kv_heads=int(m.get("llama.attention.head_count_kv", n_heads)),
            vocab_size=vocab,
            hidden_dim=int(need("feed_forward_length")),
            # float32 metadata: 1e-5 is stored as 9.99999974e-06; 7 significant digits recover the written value
            norm_eps=float(f"{m.get('llama.attention.layer_norm_rms_epsilon', 1e-5):.7g}"),
            rope_theta=float(m.get("llama.rope.freq_base", 10000.0)),
            max_seq_len=int(m.get("llama.context_length", 4096)),
            tie_embeddings="output.weight" not in self.infos,
        )

    def _read(self) -> Iterator[tuple[str, np.ndarray, str]]:
        table = name_table("gguf", self.config)
        known = set(table.values()) | {"rope_freqs.weight"}
        for name in self.infos:
            if name not in known:
                raise FormatError(f"unknown tensor {name!r} in {self.path}: not a Llama parameter of this config")
        size = self.path.stat().st_size
        c = self.config
        shapes = canonical_shapes(c)
        for name, gname in table.items():
            if gname not in self.infos:
                raise FormatError(f"tensor {gname!r} ({name}) is missing from {self.path}")
            shape, ggml_type, offset = self.infos[gname]
            expect_shape(shape, shapes[name], gname, name, str(self.path))
            if ggml_type not in _FLOAT:
                tname = GGML_TYPES.get(ggml_type, f"type {ggml_type}")
                raise FormatError(
                    f"tensor {gname!r} in {self.path} is {tname}; only F32, F16 and BF16 tensors can be read "
                    "(dequantize with llama.cpp first)"
                )
            dtype = np.dtype(_FLOAT[ggml_type])
            count = int(np.prod(shape))
            if offset + count * dtype.itemsize > size:
                raise FormatError(
                    f"tensor {gname!r} in {self.path} is truncated: its data ends at byte "
                    f"{offset + count * dtype.itemsize} but the file has {size} bytes"
                )
            arr = np.fromfile(self.path, dtype=dtype, count=count, offset=offset).reshape(shape)
            if ggml_type == 30:
                arr = bf16_to_f32(arr)
            arr = qk_to_rotate_half(name, arr, c)
            yield name, arr, str(self.path)
            del arr


def open_ckpt(path: Path, config: ModelConfig | None = None) -> GGUFCheckpoint:
    return GGUFCheckpoint(path, config)
