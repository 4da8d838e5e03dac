"""MindSpore `.ckpt` checkpoints with MindFormers' Llama parameter names.

Names follow MindFormers' `convert_weight.py` (HF -> MindSpore) and `convert_reversed.py`:
`model.tok_embeddings.embedding_weight`, `model.layers.N.attention.wq.weight` (wk, wv, wo),
`model.layers.N.feed_forward.w1.weight` (= gate_proj; w2 = down_proj; w3 = up_proj), `...attention_norm.weight`,
`...ffn_norm.weight`, `model.norm_out.weight`, `lm_head.weight`. MindFormers copies HF's q/k unpermuted (its
Llama uses the rotate-half RoPE layout), so no permutation happens here.

`mindspore.load_checkpoint` reads and parses the whole file in memory and `mindspore.save_checkpoint` needs every
tensor at once, so this module reads and writes the same protobuf file format directly: the reader indexes the
file (tag, dims, dtype, byte ranges of the content, skipping the data) and then reads one tensor at a time; the
writer appends one `Checkpoint` message per tensor (sliced like MindSpore does), which MindSpore's loader merges.
Files are interchangeable with MindSpore's own functions (tested both ways). The architecture is stored as a string
entry `llama2_config` (HF config JSON, as `save_checkpoint(append_dict=...)` would); files without it take
`config.json` beside them, or else a config inferred from tensor shapes assuming head_dim 128 (Llama 2's).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from llama2.core.config import ModelConfig
from llama2.core.formats.base import (
    Checkpoint,
    FormatError,
    atomic_dir,
    atomic_file,
    bf16_to_f32,
    canonical_shapes,
    cast,
    checked_tensors,
    copy_tokenizer,
    expect_shape,
    name_table,
)

__all__ = ["MindSporeCheckpoint", "save_mindspore", "find_ckpt", "index_ckpt", "CONFIG_KEY"]

CONFIG_KEY = "llama2_config"
SLICE_BYTES = 512 * 1024 * 1024  # MindSpore slices tensors bigger than this into several messages
_NP = {"Float32": np.float32, "Float16": np.float16, "BFloat16": np.uint16, "Float64": np.float64,
       "Int32": np.int32, "Int64": np.int64}  # fmt: skip
_TYPE_NAME = {"float32": "Float32", "float16": "Float16", "bfloat16": "BFloat16"}


def find_ckpt(path: Path, required: bool = True) -> Path | None:
    """The .ckpt file at `path`, or the single one in the folder (or its rank_0/ subfolder)."""
    if path.is_file():
        return path
    found = sorted(path.glob("*.ckpt")) or sorted(path.glob("rank_0/*.ckpt"))
    if len(found) == 1:
        return found[0]
    if required:
        what = "no .ckpt file" if not found else f"several .ckpt files {[f.name for f in found]}; pass one"
        raise FileNotFoundError(f"{path}: {what}")
    return None


# ---- protobuf wire format ------------------------------------------------------------------------------------
def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _read_varint(f: BinaryIO, source: str, where: str) -> int:
    shift = result = 0
    while True:
        b = f.read(1)
        if not b:
            raise FormatError(f"{source} is truncated while reading {where}")
        result |= (b[0] & 0x7F) << shift
        if not b[0] & 0x80:
            return result
        shift += 7


class _Entry:
    __slots__ = ("tag", "dims", "dtype", "chunks")

    def __init__(self, tag: str, dims: list[int], dtype: str) -> None:
        self.tag, self.dims, self.dtype, self.chunks = tag, dims, dtype, []


def _peek_tag(f: BinaryIO, size: int) -> str | None:
    """The tag of the entry whose value starts at the current position, if it can be read."""
    try:
        if f.read(1) != b"\x0a":
            return None
        n = _read_varint(f, "", "a tag")
        if f.tell() + n > size:
            return None
        return f.read(n).decode()
    except (FormatError, UnicodeDecodeError):
        return None


def index_ckpt(file: Path) -> dict[str, _Entry]:
    """tag -> entry (dims, dtype, content byte ranges) without reading tensor data."""
    size = file.stat().st_size
    entries: dict[str, _Entry] = {}
    src = str(file)
    with open(file, "rb") as f:
        while f.tell() < size:
            start = f.tell()
            key = f.read(1)[0]
            if key != 0x0A:
                f.seek(start)
                if size - start == 17 and f.read(7) == b"crc_num":
                    break  # MindSpore's optional CRC trailer
                raise FormatError(f"{file}: unexpected byte 0x{key:02x} at offset {start}; not a MindSpore .ckpt")
            vlen = _read_varint(f, src, "an entry length")
            vend = f.tell() + vlen
            if vend > size:
                tag = _peek_tag(f, size)
                what = f"tensor {tag!r}" if tag else f"the entry at offset {start}"
                raise FormatError(f"{file} is truncated: {what} ends at byte {vend}, past the end of the file ({size})")
            tag, dims, dtype, chunk = "", [], "", None
            while f.tell() < vend:
                k = _read_varint(f, src, "a field key")
                if k == 0x0A:  # tag
                    tag = f.read(_read_varint(f, src, "a tag")).decode()
                elif k == 0x12:  # TensorProto
                    tend = _read_varint(f, src, "a tensor") + f.tell()
                    while f.tell() < tend:
                        tk = _read_varint(f, src, f"tensor {tag!r}")
                        if tk == 0x08:
                            dims.append(_read_varint(f, src, f"dims of {tag!r}"))
                        elif tk == 0x0A:  # packed dims
                            pend = _read_varint(f, src, f"dims of {tag!r}") + f.tell()
                            while f.tell() < pend:
                                dims.append(_read_varint(f, src, f"dims of {tag!r}"))
                        elif tk == 0x12:
                            dtype = f.read(_read_varint(f, src, f"dtype of {tag!r}")).decode()
                        elif tk == 0x1A:
                            n = _read_varint(f, src, f"content of {tag!r}")
                            chunk = (f.tell(), n)
                            f.seek(n, 1)
                        else:
                            raise FormatError(f"{file}: unexpected field in tensor {tag!r} at offset {f.tell()}")
                elif k == 0x1A:
                    raise FormatError(f"{file}: entry {tag!r} is a MapParameter, which is not supported")
                else:
                    raise FormatError(f"{file}: unexpected field in entry {tag!r} at offset {f.tell()}")
            if f.tell() != vend or chunk is None:
                raise FormatError(f"{file}: malformed or truncated entry {tag!r} at offset {start}")
            entry = entries.get(tag)
            if entry is None:
                entry = entries[tag] = _Entry(tag, [] if dims == [0] and dtype != "str" else dims, dtype)
            entry.chunks.append(chunk)
    return entries


def _read_entry(file: Path, entry: _Entry) -> Any:
    """One entry's value; tensor slices are read straight into a single array (no intermediate copies)."""
    n_bytes = sum(n for _, n in entry.chunks)
    if entry.dtype == "str":
        with open(file, "rb") as f:
            raw = b""
            for off, n in entry.chunks:
                f.seek(off)
                raw += f.read(n)
        return raw.decode("utf-32-le")
    if entry.dtype not in _NP:
        raise FormatError(f"tensor {entry.tag!r} in {file} has dtype {entry.dtype}; expected a float type")
    dtype = np.dtype(_NP[entry.dtype])
    expected = int(np.prod(entry.dims)) * dtype.itemsize
    if n_bytes != expected:
        raise FormatError(f"tensor {entry.tag!r} in {file} has {n_bytes} bytes, expected {expected} for {entry.dims}")
    arr = np.empty(entry.dims, dtype=dtype)
    view = memoryview(arr.reshape(-1)).cast("B")
    pos = 0
    with open(file, "rb") as f:
        for off, n in entry.chunks:
            f.seek(off)
            if f.readinto(view[pos : pos + n]) != n:
                raise FormatError(f"{file} is truncated inside tensor {entry.tag!r}")
            pos += n
    if entry.dtype == "BFloat16":
        return bf16_to_f32(arr)
    return arr.astype(np.float32) if entry.dtype == "Float64" else arr


def _infer_config(entries: dict[str, _Entry], file: Path) -> ModelConfig:
    def shape(tag: str) -> list[int]:
        if tag not in entries:
            raise FormatError(f"tensor {tag!r} is missing from {file}")
        return entries[tag].dims

    vocab, dim = shape("model.tok_embeddings.embedding_weight")
    n_layers = 0
    while f"model.layers.{n_layers}.attention.wq.weight" in entries:
        n_layers += 1
    if dim % 128:
        raise FormatError(
            f"{file} has no '{CONFIG_KEY}' entry and no config.json beside it, and dim={dim} is not a multiple of 128 "
            "(Llama 2's head_dim), so n_heads cannot be inferred; put an HF config.json next to it"
        )
    return ModelConfig(
        dim=dim,
        n_layers=n_layers,
        n_heads=dim // 128,
        n_kv_heads=shape("model.layers.0.attention.wk.weight")[0] // 128,
        vocab_size=vocab,
        hidden_dim=shape("model.layers.0.feed_forward.w1.weight")[0],
        tie_embeddings="lm_head.weight" not in entries,
    )


class MindSporeCheckpoint(Checkpoint):
    format = "mindspore"

    def __init__(self, path: Path, config: ModelConfig | None = None) -> None:
        file = find_ckpt(Path(path))
        assert file is not None
        self.file = file
        self.entries = index_ckpt(file)
        if config is None:
            beside = file.parent / "config.json"
            if CONFIG_KEY in self.entries:
                hf = json.loads(_read_entry(file, self.entries[CONFIG_KEY]))
                config = ModelConfig.from_hf(hf, source=f"{file} entry {CONFIG_KEY!r}")
            elif beside.is_file():
                config = ModelConfig.from_hf(json.loads(beside.read_text()), source=str(beside))
            else:
                config = _infer_config(self.entries, file)
        tok = file.parent / "tokenizer.model"
        super().__init__(file, config, tok if tok.is_file() else None)

    def _read(self) -> Iterator[tuple[str, np.ndarray, str]]:
        table = name_table("mindspore", self.config)
        native = set(table.values())
        for tag in self.entries:
            if (tag.startswith("model.") or tag == "lm_head.weight") and tag not in native:
                if not (tag == "lm_head.weight" and self.config.tie_embeddings):
                    raise FormatError(f"unknown tensor {tag!r} in {self.file}: not a Llama parameter of this config")
        shapes = canonical_shapes(self.config)
        for name, tag in table.items():
            entry = self.entries.get(tag)
            if entry is None:
                raise FormatError(f"tensor {tag!r} ({name}) is missing from {self.file}")
            expect_shape(entry.dims, shapes[name], tag, name, str(self.file))
            yield name, _read_entry(self.file, entry), str(self.file)


def _write_entry(f: BinaryIO, tag: str, dims: list[int], dtype: str, data: memoryview) -> None:
    """Append one entry as MindSpore does: one Checkpoint message per content slice."""
    tag_b = tag.encode()
    type_b = dtype.encode()
    dims_b = b"".join(b"\x08" + _varint(d) for d in dims)
    for start in range(0, max(len(data), 1), SLICE_BYTES):
        piece = data[start : start + SLICE_BYTES]
        tensor_len = len(dims_b) + 1 + len(_varint(len(type_b))) + len(type_b)
        tensor_len += 1 + len(_varint(len(piece))) + len(piece)
        value_head = b"\x0a" + _varint(len(tag_b)) + tag_b + b"\x12" + _varint(tensor_len)
        value_len = len(value_head) + tensor_len
        f.write(b"\x0a" + _varint(value_len) + value_head + dims_b)
        f.write(b"\x12" + _varint(len(type_b)) + type_b + b"\x1a" + _varint(len(piece)))
        f.write(piece)


def _write_ckpt(file: Path, config: ModelConfig, tensors: Iterable[tuple[str, np.ndarray]], dtype: str | None) -> None:
    table = name_table("mindspore", config)
    with open(file, "wb") as f:
        for name, value in checked_tensors(tensors, config, str(file)):
            want = dtype or ("float16" if value.dtype == np.float16 else "float32")
            if want not in _TYPE_NAME:
                raise ValueError(f"dtype {want!r} is not supported; expected one of {sorted(_TYPE_NAME)}")
            data = cast(np.asarray(value, dtype=np.float32) if want == "bfloat16" else value, want)
            data = np.ascontiguousarray(data)
            _write_entry(f, table[name], list(data.shape), _TYPE_NAME[want], memoryview(data).cast("B"))
            del value, data  # hold one tensor at a time
        cfg = json.dumps(config.to_hf()).encode("utf-32-le")
        _write_entry(f, CONFIG_KEY, [0], "str", memoryview(cfg))


def save_mindspore(
    path: Path,
    config: ModelConfig,
    tensors: Iterable[tuple[str, np.ndarray]],
    *,
    dtype: str | None = None,
    tokenizer_path: Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a MindFormers-named .ckpt atomically: to `path` itself if it ends in .ckpt, else `path`/model.ckpt
    plus config.json (and tokenizer.model when given). dtype: "float32", "float16", "bfloat16" or None (keep)."""
    path = Path(path)
    if path.suffix == ".ckpt":
        with atomic_file(path, overwrite) as tmp:
            _write_ckpt(tmp, config, tensors, dtype)
        return path
    with atomic_dir(path, overwrite) as tmp:
        _write_ckpt(tmp / "model.ckpt", config, tensors, dtype)
        (tmp / "config.json").write_text(json.dumps(config.to_hf(), indent=2) + "\n")
        copy_tokenizer(tokenizer_path, tmp)
    return path


def open_ckpt(path: Path, config: ModelConfig | None = None) -> MindSporeCheckpoint:
    return MindSporeCheckpoint(path, config)


save_ckpt = save_mindspore
