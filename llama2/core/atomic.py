"""Atomic writes: user artifacts appear complete or not at all (a temporary sibling renamed into place)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["atomic_dir", "atomic_file", "write_json"]


def _is_nonempty(path: Path) -> bool:
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory that replaces `path` when the block succeeds (removed on failure).

    An existing non-empty `path` is refused unless `overwrite`; then it is moved aside, replaced, and deleted.
    """
    path = Path(path)
    if _is_nonempty(path) and not overwrite:
        raise FileExistsError(f"{path} already exists and is not empty (pass overwrite=True / --force to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if _is_nonempty(path):
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        os.replace(path, old)
    elif path.is_dir():
        path.rmdir()
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str], overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling file name that replaces `path` when the block succeeds (removed on failure)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists (pass overwrite=True / --force to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def write_json(path: str | os.PathLike[str], obj: Any, indent: int | None = 1) -> None:
    """Write `obj` as UTF-8 JSON (non-ASCII kept) atomically."""
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=indent)
        f.write("\n")
