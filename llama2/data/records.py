"""Record files of token rows: MindRecord (the seed's format, read by MindSpore's `MindDataset`) and plain numpy.

Every format stores named int32 columns (`input_ids`, optionally `labels`, ...), one row per sample. Formats are
registered in `llama2.core.registry.DATA_FORMATS`:

- ``mindrecord``: `mindspore.mindrecord.FileWriter` with the schema ``{column: {"type": "int32", "shape": [-1]}}``
  (what MindFormers' llama_preprocess.py writes), plus its `.db` index beside it. Rows may differ in length.
- ``npy``: one 2-D int32 array (rows, tokens) for the single column `input_ids`; several equal-shape columns
  (e.g. SFT's `input_ids` + `labels`) as one structured array with an int32 field per column, so
  ``np.load(path)["labels"]`` is the (rows, tokens) label array.
- ``npz``: several equal-shape 2-D int32 columns (`np.savez`, uncompressed).

Writes are atomic: the files are written under a temporary directory next to the target (with the final base
name, which MindRecord records in its header) and renamed into place at the end. Output is deterministic: the same
rows give byte-identical files.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from llama2.core.registry import DATA_FORMATS

__all__ = ["write_records", "read_records", "read_columns", "detect_format", "RecordFormat"]


def _as_columns(columns: Mapping[str, Any] | np.ndarray | list) -> dict[str, list[np.ndarray] | np.ndarray]:
    if not isinstance(columns, Mapping):
        columns = {"input_ids": columns}
    out: dict[str, Any] = {}
    n = None
    for name, value in columns.items():
        if isinstance(value, np.ndarray) and value.ndim == 2:
            rows: Any = value
        else:
            rows = [np.asarray(r).reshape(-1) for r in value]
        if n is not None and len(rows) != n:
            raise ValueError(f"column {name!r} has {len(rows)} rows, the others {n}")
        n = len(rows)
        for r in rows[:1]:
            if not np.issubdtype(np.asarray(r).dtype, np.integer):
                raise ValueError(f"column {name!r}: expected integer token ids, got dtype {np.asarray(r).dtype}")
        out[name] = rows
    if not out or n == 0:
        raise ValueError("no rows to write")
    return out


def _stack(name: str, rows: Any) -> np.ndarray:
    if isinstance(rows, np.ndarray):
        return rows.astype(np.int32, copy=False)
    lengths = {len(r) for r in rows}
    if len(lengths) != 1:
        raise ValueError(f"column {name!r} has rows of different lengths {sorted(lengths)[:5]}; use mindrecord")
    return np.stack(rows).astype(np.int32, copy=False)


class RecordFormat:
    """A record file format: `write(path, columns)` and `read(path) -> {column: list of 1-D int arrays}`."""

    name = "?"
    suffixes: tuple[str, ...] = ()

    def write(self, path: Path, columns: dict[str, Any], description: str = "") -> None:
        raise NotImplementedError

    def read(self, path: Path) -> dict[str, list[np.ndarray] | np.ndarray]:
        raise NotImplementedError


@DATA_FORMATS.register("mindrecord")
class MindRecordFormat(RecordFormat):
    name = "mindrecord"
    suffixes = (".mindrecord",)

    def write(self, path: Path, columns: dict[str, Any], description: str = "") -> None:
        from mindspore.mindrecord import FileWriter

        n_rows = len(next(iter(columns.values())))
        total = sum(int(sum(len(r) for r in rows)) * 4 for rows in columns.values())
        # BLOB pages are padded to page_size: size the page to the data (power of two in [32 KiB, 64 MiB]).
        page = 1 << 15
        while page < total and page < (1 << 26):
            page <<= 1
        writer = FileWriter(str(path), shard_num=1, overwrite=True)
        writer.set_header_size(1 << 20)
        writer.set_page_size(page)
        writer.add_schema({c: {"type": "int32", "shape": [-1]} for c in columns}, description or "llama2")
        chunk = 1024
        for start in range(0, n_rows, chunk):
            stop = min(start + chunk, n_rows)
            batch = [
                {c: np.asarray(rows[i], dtype=np.int32).reshape(-1) for c, rows in columns.items()}
                for i in range(start, stop)
            ]
            writer.write_raw_data(batch)
        writer.commit()

    def read(self, path: Path) -> dict[str, list[np.ndarray]]:
        from mindspore.mindrecord import FileReader

        reader = FileReader(str(path))
        try:
            out: dict[str, list[np.ndarray]] = {}
            for rec in reader.get_next():
                for k, v in rec.items():
                    out.setdefault(k, []).append(np.asarray(v).reshape(-1))
        finally:
            reader.close()
        return out


@DATA_FORMATS.register("npy")
class NpyFormat(RecordFormat):
    name = "npy"
    suffixes = (".npy",)

    def write(self, path: Path, columns: dict[str, Any], description: str = "") -> None:
        arrays = {c: _stack(c, rows) for c, rows in columns.items()}
        if list(arrays) == ["input_ids"]:
            table = arrays["input_ids"]
        else:
            shapes = {a.shape for a in arrays.values()}
            if len(shapes) != 1:
                raise ValueError(f"{path}: npy columns must share one shape, got {sorted(shapes)}")
            n, width = shapes.pop()
            table = np.empty(n, dtype=np.dtype([(c, "<i4", (width,)) for c in arrays]))
            for c, a in arrays.items():
                table[c] = a
        with open(path, "wb") as f:  # np.save on a path would append .npy to the temporary name
            np.save(f, table, allow_pickle=False)

    def read(self, path: Path) -> dict[str, np.ndarray]:
        try:
            arr = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path}: cannot read as npy ({exc})") from None
        if arr.dtype.names:
            return {c: np.ascontiguousarray(arr[c], np.int32) for c in arr.dtype.names}
        if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"{path}: expected a 2-D integer array (rows, tokens), got {arr.dtype} {arr.shape}")
        return {"input_ids": arr}


@DATA_FORMATS.register("npz")
class NpzFormat(RecordFormat):
    name = "npz"
    suffixes = (".npz",)

    def write(self, path: Path, columns: dict[str, Any], description: str = "") -> None:
        arrays = {c: _stack(c, rows) for c, rows in columns.items()}
        with open(path, "wb") as f:  # np.savez on a path would append .npz to the temporary name
            np.savez(f, **arrays)

    def read(self, path: Path) -> dict[str, np.ndarray]:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}


def detect_format(path: str | os.PathLike[str], fmt: str | None = None) -> RecordFormat:
    """The format named `fmt`, else the one whose suffix `path` has (MindRecord also for `.mindrecord0` etc.)."""
    if fmt is not None:
        return DATA_FORMATS.get(fmt)()
    name = Path(path).name.lower()
    for key in DATA_FORMATS.names():
        cls = DATA_FORMATS.get(key)
        if any(name.endswith(s) for s in getattr(cls, "suffixes", ())):
            return cls()
    if ".mindrecord" in name:
        return MindRecordFormat()
    known = ", ".join(f"{k} ({', '.join(DATA_FORMATS.get(k).suffixes)})" for k in DATA_FORMATS.names())
    raise ValueError(f"{path}: cannot tell the record format from the file name; known formats: {known}")


def write_records(
    path: str | os.PathLike[str],
    columns: Mapping[str, Any] | np.ndarray | list,
    fmt: str | None = None,
    description: str = "",
) -> Path:
    """Write token rows atomically; `columns` is {name: rows} or just the `input_ids` rows. Returns the path."""
    path = Path(path)
    writer = detect_format(path, fmt)
    cols = _as_columns(columns)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        target = tmp_dir / path.name
        writer.write(target, cols, description)
        produced = sorted(tmp_dir.iterdir(), key=lambda p: p.name == path.name)  # the main file last
        for f in produced:
            os.replace(f, path.parent / f.name)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return path


def read_records(path: str | os.PathLike[str], fmt: str | None = None) -> list[dict[str, np.ndarray]]:
    """Rows of a record file as a list of {column: 1-D int array}."""
    cols = read_columns(path, fmt, stack=False)
    names = list(cols)
    n = len(cols[names[0]]) if names else 0
    return [{c: np.asarray(cols[c][i]) for c in names} for i in range(n)]


def read_columns(path: str | os.PathLike[str], fmt: str | None = None, stack: bool = True) -> dict[str, Any]:
    """{column: rows} of a record file; with `stack`, each column as one 2-D int32 array (equal row lengths)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"record file {path} not found")
    reader = detect_format(path, fmt)
    try:
        cols = reader.read(path)
    except (OSError, RuntimeError) as exc:
        raise ValueError(f"{path}: cannot read as {reader.name} ({exc})") from None
    if not cols:
        raise ValueError(f"{path}: holds no rows")
    return {c: _stack(c, rows) for c, rows in cols.items()} if stack else cols
