"""Meta's original Llama 2 checkpoints: `params.json` + `consolidated.NN.pth` (one file per model-parallel rank).

Shards are merged on read and split on write as Meta's llama repo does: column-parallel wq/wk/wv/w1/w3 and output
on dim 0, row-parallel wo/w2 on dim 1, tok_embeddings on dim 1, norms replicated. wq/wk are in Meta's interleaved
RoPE layout and are permuted to/from rotate-half (k with n_kv_heads groups). Reading memory-maps every shard
(`torch.load(mmap=True, weights_only=True)`) and concatenates one tensor at a time. Writing streams too: each
arriving tensor's slices are written as storage records of every rank's zip archive at once, and the small pickle
that references them is written last (the archive torch.save produces, loadable by torch.load).
"""

from __future__ import annotations

import collections
import json
import pickle
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from llama2.core.config import ModelConfig
from llama2.core.formats.base import (
    Checkpoint,
    FormatError,
    atomic_dir,
    canonical_shapes,
    checked_tensors,
    copy_tokenizer,
    expect_shape,
    name_table,
    qk_to_interleaved,
    qk_to_rotate_half,
    read_json_file,
)

__all__ = ["MetaCheckpoint", "save_meta", "split_dim", "meta_hidden_dim"]

_DIM0 = ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight", "feed_forward.w1.weight",
         "feed_forward.w3.weight", "output.weight")  # fmt: skip
_DIM1 = ("attention.wo.weight", "feed_forward.w2.weight", "tok_embeddings.weight")


def split_dim(meta_name: str) -> int | None:
    """The dim a Meta tensor is split on across model-parallel ranks (None: replicated)."""
    if meta_name.endswith(_DIM0):
        return 0
    if meta_name.endswith(_DIM1):
        return 1
    return None


def meta_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """SwiGLU width as Meta's llama `FeedForward` computes it."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def _params_for(config: ModelConfig) -> dict[str, Any]:
    """params.json for `config`, with multiple_of / ffn_dim_multiplier that reproduce hidden_dim in Meta's code."""
    c = config
    params: dict[str, Any] = {"dim": c.dim, "n_layers": c.n_layers, "n_heads": c.n_heads}
    if c.n_kv_heads != c.n_heads:
        params["n_kv_heads"] = c.n_kv_heads
    params["vocab_size"] = c.vocab_size
    for multiple_of, mult in ((256, None), (4096, 1.3), (c.hidden_dim, c.hidden_dim / int(8 * c.dim / 3))):
        if meta_hidden_dim(c.dim, multiple_of, mult) == c.hidden_dim:
            params["multiple_of"] = multiple_of
            if mult is not None:
                params["ffn_dim_multiplier"] = mult
            break
    else:  # pragma: no cover - the last candidate always reproduces hidden_dim
        raise ValueError(f"cannot express hidden_dim={c.hidden_dim} with Meta's multiple_of/ffn_dim_multiplier")
    params["norm_eps"] = c.norm_eps
    if c.rope_theta != 10000.0:
        params["rope_theta"] = c.rope_theta
    return params


def _shards(folder: Path) -> list[Path]:
    files = sorted(folder.glob("consolidated.*.pth"))
    if not files:
        raise FileNotFoundError(f"{folder}: no consolidated.*.pth files")
    return files


class MetaCheckpoint(Checkpoint):
    format = "meta"

    def __init__(self, path: Path, config: ModelConfig | None = None) -> None:
        folder = Path(path) if Path(path).is_dir() else Path(path).parent
        pfile = folder / "params.json"
        params = read_json_file(pfile, "a Meta checkpoint needs params.json")
        self.files = _shards(folder)
        self._states: list[dict[str, Any]] | None = None
        tok = folder / "tokenizer.model"
        super().__init__(folder, config or self._config(params, pfile), tok if tok.is_file() else None)

    def _load(self) -> list[dict[str, Any]]:
        if self._states is None:
            import torch

            states = []
            for f in self.files:
                try:
                    states.append(torch.load(f, map_location="cpu", mmap=True, weights_only=True))
                except Exception as exc:  # torch raises many kinds on a bad archive
                    raise FormatError(f"cannot read {f} with torch.load ({type(exc).__name__}: {exc})") from None
            self._states = states
        return self._states

    def _config(self, params: dict[str, Any], pfile: Path) -> ModelConfig:
        for key in ("dim", "n_layers", "n_heads"):
            if key not in params:
                raise FormatError(f"{pfile}: missing field {key!r}")
        states = self._load()
        first = states[0]
        mp = len(states)
        for key in ("tok_embeddings.weight", "layers.0.feed_forward.w1.weight"):
            if key not in first:
                raise FormatError(f"tensor {key!r} is missing from {self.files[0]}")
        vocab = first["tok_embeddings.weight"].shape[0]
        hidden = first["layers.0.feed_forward.w1.weight"].shape[0] * mp
        if "multiple_of" in params:
            derived = meta_hidden_dim(params["dim"], params["multiple_of"], params.get("ffn_dim_multiplier"))
            if derived != hidden:
                raise FormatError(
                    f"{pfile}: multiple_of/ffn_dim_multiplier give hidden_dim {derived}, but tensor "
                    f"'layers.0.feed_forward.w1.weight' in {self.files[0]} implies {hidden}"
                )
        if params.get("vocab_size", -1) > 0 and params["vocab_size"] != vocab:
            raise FormatError(
                f"{pfile}: vocab_size {params['vocab_size']} but 'tok_embeddings.weight' in {self.files[0]} has {vocab}"
            )
        return ModelConfig(
            dim=params["dim"],
            n_layers=params["n_layers"],
            n_heads=params["n_heads"],
            n_kv_heads=params.get("n_kv_heads") or params["n_heads"],
            vocab_size=vocab,
            hidden_dim=hidden,
            norm_eps=float(params.get("norm_eps", 1e-5)),
            rope_theta=float(params.get("rope_theta", 10000.0)),
            max_seq_len=int(params.get("max_seq_len", 4096)),
            tie_embeddings="output.weight" not in first,
        )

    def _read(self) -> Iterator[tuple[str, np.ndarray, str]]:
        import torch

        states = self._load()
        table = name_table("meta", self.config)
        known = set(table.values()) | {"rope.freqs"}
        for f, state in zip(self.files, states):
            for key in state:
                if key not in known:
                    raise FormatError(f"unknown tensor {key!r} in {f}: not a Llama parameter of this config")
        c = self.config
        shapes = canonical_shapes(c)
        mp = len(self.files)
        for name, meta in table.items():
            parts = []
            dim = split_dim(meta)
            for f, state in zip(self.files, states):
                if meta not in state:
                    raise FormatError(f"tensor {meta!r} ({name}) is missing from {f}")
                want = list(shapes[name])
                if dim is not None:
                    want[dim] //= mp
                expect_shape(state[meta].shape, want, meta, name, str(f))
                parts.append(state[meta])
            t = parts[0] if dim is None or len(parts) == 1 else torch.cat(parts, dim=dim)
            arr = t.float().numpy() if t.dtype in (torch.bfloat16, torch.float64) else t.numpy()
            del t, parts
            arr = qk_to_rotate_half(name, arr, c)
            yield name, arr, str(self.files[0] if dim is None else self.path / "consolidated.*.pth")
            del arr

    def close(self) -> None:
        self._states = None


# ---- streaming torch.save-compatible writer ------------------------------------------------------------------
class _StorageRef:
    def __init__(self, key: str, storage_type: Any, numel: int) -> None:
        self.key, self.storage_type, self.numel = key, storage_type, numel


class _TensorRef:
    """Pickles exactly like a contiguous CPU tensor whose storage record was already written."""

    def __init__(self, storage: _StorageRef, shape: tuple[int, ...]) -> None:
        self.storage, self.shape = storage, shape

    def __reduce_ex__(self, protocol: int) -> Any:
        import torch._utils

        stride = tuple(int(np.prod(self.shape[i + 1 :])) for i in range(len(self.shape)))
        args = (self.storage, 0, self.shape, stride, False, collections.OrderedDict())
        return torch._utils._rebuild_tensor_v2, args


class _TorchZipWriter:
    """Writes one `torch.save`-format archive record by record."""

    def __init__(self, file: Path) -> None:
        import torch

        self._torch = torch
        self.writer = torch._C.PyTorchFileWriter(str(file))
        self.entries: dict[str, _TensorRef] = {}

    def add(self, name: str, tensor: Any) -> None:
        t = tensor.contiguous()
        nbytes = t.numel() * t.element_size()
        if t.storage_offset() != 0 or t.untyped_storage().nbytes() != nbytes:
            t = t.clone()  # a view into a larger tensor: give it its own storage
        key = str(len(self.entries))
        self.writer.write_record(f"data/{key}", t.untyped_storage(), nbytes)
        storage_type = {
            self._torch.float32: self._torch.FloatStorage,
            self._torch.float16: self._torch.HalfStorage,
            self._torch.bfloat16: self._torch.BFloat16Storage,
        }[t.dtype]
        self.entries[name] = _TensorRef(_StorageRef(key, storage_type, t.numel()), tuple(t.shape))

    def finish(self) -> None:
        import io

        buf = io.BytesIO()

        class _Pickler(pickle.Pickler):
            def persistent_id(self, obj: Any) -> Any:
                if isinstance(obj, _StorageRef):
                    return ("storage", obj.storage_type, obj.key, "cpu", obj.numel)
                return None

        _Pickler(buf, protocol=2).dump(dict(self.entries))
        data = buf.getvalue()
        self.writer.write_record("data.pkl", data, len(data))
        self.writer.write_record(".format_version", "1", 1)
        self.writer.write_record(".storage_alignment", "64", 2)
        self.writer.write_record("byteorder", sys.byteorder, len(sys.byteorder))
        self.writer.write_end_of_file()


def save_meta(
    path: Path,
    config: ModelConfig,
    tensors: Iterable[tuple[str, np.ndarray]],
    *,
    model_parallel: int = 1,
    dtype: str | None = None,
    tokenizer_path: Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Write params.json + consolidated.00..NN.pth (split for `model_parallel` ranks) atomically.

    dtype: "float32", "float16", "bfloat16" (Meta's release dtype), or None to keep the incoming dtype.
    """
    import torch

    path = Path(path)
    c = config
    mp = int(model_parallel)
    shapes = canonical_shapes(c)
    table = name_table("meta", c)
    for name, meta in table.items():
        dim = split_dim(meta)
        if dim is not None and shapes[name][dim] % mp:
            raise ValueError(f"model_parallel={mp} does not divide dim {dim} of {meta} {shapes[name]}")
    if c.n_kv_heads % mp:
        raise ValueError(f"model_parallel={mp} must divide n_kv_heads={c.n_kv_heads} (each rank holds whole kv heads)")
    torch_dtype = {None: None, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in torch_dtype:
        raise ValueError(f"dtype {dtype!r} is not supported; expected float32, float16 or bfloat16")
    with atomic_dir(path, overwrite) as tmp:
        writers = [_TorchZipWriter(tmp / f"consolidated.{r:02d}.pth") for r in range(mp)]
        for name, value in checked_tensors(tensors, c, str(path)):
            arr = qk_to_interleaved(name, np.asarray(value), c)
            meta = table[name]
            dim = split_dim(meta)
            for r, w in enumerate(writers):  # one rank's slice at a time: at most one extra slice in memory
                piece = torch.from_numpy(np.ascontiguousarray(arr if dim is None else np.split(arr, mp, axis=dim)[r]))
                if torch_dtype[dtype] is not None:
                    piece = piece.to(torch_dtype[dtype])
                w.add(meta, piece)
                del piece
            del value, arr  # hold one tensor at a time
        for w in writers:
            w.finish()
        del writers
        (tmp / "params.json").write_text(json.dumps(_params_for(c), indent=2) + "\n")
        copy_tokenizer(tokenizer_path, tmp)
    return path


def open_ckpt(path: Path, config: ModelConfig | None = None) -> MetaCheckpoint:
    return MetaCheckpoint(path, config)


save_ckpt = save_meta
