"""Hugging Face Llama checkpoints: `config.json` + `model.safetensors` | sharded safetensors with
`model.safetensors.index.json` | `pytorch_model.bin` (+ sharded index).

Safetensors files are read tensor by tensor from their validated header (no full-file load); `.bin` files with
`torch.load(mmap=True, weights_only=True)`. The writer lays every tensor's place out from the config first, so it
writes each arriving tensor straight to its offset and never holds more than one tensor.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from llama2.core.config import ModelConfig
from llama2.core.formats.base import (
    Checkpoint,
    FormatError,
    atomic_dir,
    bf16_to_f32,
    canonical_shapes,
    cast,
    checked_tensors,
    copy_tokenizer,
    parse_size,
    read_json_file,
)

__all__ = ["HFCheckpoint", "save_hf", "is_hf", "read_safetensors_header", "WEIGHT_FILES"]

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# Tensors some HF checkpoints carry that are not parameters (recomputed buffers).
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}
_NP_TO_ST = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def is_hf(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file() and any((path / f).is_file() for f in WEIGHT_FILES)


def read_safetensors_header(file: Path) -> tuple[dict[str, Any], int]:
    """(header dict without __metadata__, data start offset), checking every tensor lies inside the file."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise FormatError(f"{file} is not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise FormatError(f"{file} is truncated: header claims {n} bytes but the file has {size}")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise FormatError(f"{file}: safetensors header is not valid JSON ({exc})") from None
    header.pop("__metadata__", None)
    start = 8 + n
    for name, info in header.items():
        end = start + info["data_offsets"][1]
        if end > size:
            raise FormatError(
                f"tensor {name!r} in {file} is truncated: its data ends at byte {end} but the file has {size} bytes"
            )
        if info["dtype"] not in _ST_DTYPES:
            raise FormatError(f"tensor {name!r} in {file} has dtype {info['dtype']}; expected F32, F16 or BF16")
    return header, start


def _read_st_tensor(file: Path, name: str, info: dict[str, Any], start: int) -> np.ndarray:
    b, e = info["data_offsets"]
    dtype = np.dtype(_ST_DTYPES[info["dtype"]])
    count = (e - b) // dtype.itemsize
    shape = tuple(info["shape"])
    if count != int(np.prod(shape)):
        raise FormatError(f"tensor {name!r} in {file}: {e - b} data bytes do not match shape {shape} {info['dtype']}")
    arr = np.fromfile(file, dtype=dtype, count=count, offset=start + b).reshape(shape)
    if info["dtype"] == "BF16":
        return bf16_to_f32(arr)
    if info["dtype"] == "F64":
        return arr.astype(np.float32)
    return arr


def _torch_to_numpy(t: Any) -> np.ndarray:
    import torch

    if t.dtype == torch.bfloat16 or t.dtype == torch.float64:
        t = t.float()
    return t.numpy()


class HFCheckpoint(Checkpoint):
    format = "hf"

    def __init__(self, path: Path, config: ModelConfig | None = None) -> None:
        path = Path(path)
        folder = path if path.is_dir() else path.parent
        cfg_file = folder / "config.json"
        if config is None:
            hf_cfg = read_json_file(cfg_file, "an HF checkpoint needs config.json beside the weights")
            config = ModelConfig.from_hf(hf_cfg, source=str(cfg_file))
        tok = folder / "tokenizer.model"
        super().__init__(folder, config, tok if tok.is_file() else None)
        self.weight_map = self._weight_map(path)  # canonical-or-native name -> file

    def _weight_map(self, path: Path) -> dict[str, Path]:
        folder = self.path
        if path.is_file():
            files = [path]
        else:
            files = []
            for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
                index = folder / index_name
                if index.is_file() and not (folder / index_name.replace(".index.json", "")).is_file():
                    try:
                        wmap = json.loads(index.read_text())["weight_map"]
                    except (json.JSONDecodeError, KeyError) as exc:
                        raise FormatError(f"{index}: not a valid index (needs a 'weight_map'): {exc}") from None
                    out = {}
                    for name, fname in wmap.items():
                        f = folder / fname
                        if not f.is_file():
                            raise FileNotFoundError(f"{index} maps tensor {name!r} to {f}, which does not exist")
                        out[name] = f
                    self._files = sorted(set(out.values()))
                    return out
            for single in ("model.safetensors", "pytorch_model.bin"):
                if (folder / single).is_file():
                    files = [folder / single]
                    break
            if not files:
                raise FileNotFoundError(f"{folder}: no weights found; looked for {', '.join(WEIGHT_FILES)}")
        self._files = files
        out = {}
        for f in files:
            for name in self._file_names(f):
                out[name] = f
        return out

    def _file_names(self, f: Path) -> list[str]:
        if f.suffix == ".safetensors":
            return list(read_safetensors_header(f)[0])
        return list(self._torch_state(f))

    def _torch_state(self, f: Path) -> dict[str, Any]:
        cache = self.__dict__.setdefault("_torch_cache", {})
        if f not in cache:
            import torch

            try:
                cache[f] = torch.load(f, map_location="cpu", mmap=True, weights_only=True)
            except Exception as exc:  # torch raises many kinds on a bad archive
                raise FormatError(f"cannot read {f} with torch.load ({type(exc).__name__}: {exc})") from None
        return cache[f]

    def _read(self) -> Iterator[tuple[str, np.ndarray, str]]:
        shapes = canonical_shapes(self.config)
        for name, f in self.weight_map.items():
            if name.endswith(_IGNORED_SUFFIXES) or (name == "lm_head.weight" and self.config.tie_embeddings):
                continue
            if name not in shapes:
                raise FormatError(f"unknown tensor {name!r} in {f}: not a Llama parameter of this config")
        headers: dict[Path, tuple[dict[str, Any], int]] = {}
        for name in shapes:
            f = self.weight_map.get(name)
            if f is None:
                where = ", ".join(str(p) for p in self._files)
                raise FormatError(f"tensor {name!r} is missing from {where}")
            if f.suffix == ".safetensors":
                if f not in headers:
                    headers[f] = read_safetensors_header(f)
                header, start = headers[f]
                yield name, _read_st_tensor(f, name, header[name], start), str(f)
            else:
                yield name, _torch_to_numpy(self._torch_state(f)[name]), str(f)

    def close(self) -> None:
        self.__dict__.pop("_torch_cache", None)


def _st_header(entries: list[tuple[str, tuple[int, ...], str, int, int]]) -> bytes:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    for name, shape, st_dtype, b, e in entries:
        header[name] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [b, e]}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def save_hf(
    path: Path,
    config: ModelConfig,
    tensors: Iterable[tuple[str, np.ndarray]],
    *,
    max_shard_size: int | str | None = None,
    dtype: str | None = None,
    tokenizer_path: Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Write config.json + model.safetensors (or shards + index when `max_shard_size` is given) atomically.

    dtype: "float32", "float16", "bfloat16", or None to keep the first tensor's dtype.
    """
    path = Path(path)
    shapes = canonical_shapes(config)
    stream = checked_tensors(tensors, config, str(path))
    first = next(stream, None)
    if first is None:
        raise FormatError(f"no tensors given to write {path}")
    if dtype is None:
        dtype = "float16" if first[1].dtype == np.float16 else "float32"
    st_dtype = _NP_TO_ST.get(dtype)
    if st_dtype is None:
        raise ValueError(f"dtype {dtype!r} is not supported for safetensors; expected one of {sorted(_NP_TO_ST)}")
    itemsize = 4 if dtype == "float32" else 2

    # Lay out shards from the config: (file index, offset) per tensor.
    limit = parse_size(max_shard_size) if max_shard_size is not None else None
    shards: list[list[tuple[str, tuple[int, ...], str, int, int]]] = [[]]
    used = 0
    for name, shape in shapes.items():
        nbytes = int(np.prod(shape)) * itemsize
        if limit is not None and shards[-1] and used + nbytes > limit:
            shards.append([])
            used = 0
        shards[-1].append((name, shape, st_dtype, used, used + nbytes))
        used += nbytes
    n = len(shards)
    names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)] if n > 1 else ["model.safetensors"]
    place: dict[str, tuple[int, int]] = {}
    starts = []
    for i, entries in enumerate(shards):
        header = _st_header(entries)
        starts.append(len(header))
        for name, _, _, b, _ in entries:
            place[name] = (i, b)

    with atomic_dir(path, overwrite) as tmp:
        files = [tmp / nm for nm in names]
        for f, entries, start in zip(files, shards, starts):
            with open(f, "wb") as fh:
                fh.write(_st_header(entries))
                fh.truncate(start + (entries[-1][4] if entries else 0))
        handles = [open(f, "r+b") for f in files]
        try:
            head = [first]
            del first
            for name, value in _chain(head, stream):
                i, b = place[name]
                data = cast(np.asarray(value, dtype=np.float32) if dtype == "bfloat16" else value, dtype)
                handles[i].seek(starts[i] + b)
                handles[i].write(memoryview(np.ascontiguousarray(data)).cast("B"))
                del value, data  # hold one tensor at a time
        finally:
            for h in handles:
                h.close()
        if len(files) > 1:
            total = sum(e[4] - e[3] for entries in shards for e in entries)
            index = {
                "metadata": {"total_size": total},
                "weight_map": {e[0]: names[i] for i, entries in enumerate(shards) for e in entries},
            }
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        hf_config = config.to_hf()
        hf_config["torch_dtype"] = dtype
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        copy_tokenizer(tokenizer_path, tmp)
    return path


def _chain(
    head: list[tuple[str, np.ndarray]], rest: Iterator[tuple[str, np.ndarray]]
) -> Iterator[tuple[str, np.ndarray]]:
    yield head.pop()  # popped, so the list does not keep the first tensor alive
    yield from rest


def open_ckpt(path: Path, config: ModelConfig | None = None) -> HFCheckpoint:
    return HFCheckpoint(path, config)


save_ckpt = save_hf
