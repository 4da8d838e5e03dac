"""Run directories: checkpoints written atomically, verified, pruned, and found again for resume or loading.

Layout of OUT_DIR:

    metrics.jsonl                     one JSON object per logged step
    loss.png                          `llama2 plot OUT_DIR`
    checkpoints/step_00000100/        a Hugging Face model dir plus training state:
        config.json                   ModelConfig.to_hf()
        model.safetensors             canonical (HF) tensor names, float32
        optimizer.safetensors         TrainState.state_dict()
        trainer_state.json            step, data position, seed, schedule, configs, file sizes
        tokenizer.model               when the run had a SentencePiece tokenizer
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from llama2.core.atomic import atomic_dir
from llama2.core.config import ModelConfig

__all__ = [
    "resume_point",
    "CheckpointError",
    "ResumeMismatchError",
    "checkpoint_dir_name",
    "list_checkpoints",
    "latest_checkpoint",
    "verify_checkpoint",
    "save_checkpoint",
    "read_trainer_state",
    "read_model_tensors",
    "read_tensor_shapes",
    "read_optimizer_state",
    "read_model_config",
    "prune_checkpoints",
]

CHECKPOINTS = "checkpoints"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.model"
_NAME = re.compile(r"^step_(\d+)$")
# leftovers of an interrupted save (atomic_dir's .tmp-PID / .old-PID) or of older versions (.corrupt-TIME)
_LEFTOVER = re.compile(r"^\.step_(\d+)\.(tmp|old|corrupt)-[^/]*$")


class CheckpointError(ValueError):
    """A checkpoint directory is missing files or has corrupt ones (an integrity failure)."""


class ResumeMismatchError(ValueError):
    """An intact checkpoint that does not fit the run resuming from it (tensor names/shapes, optimizer state)."""


def checkpoint_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _ckpt_root(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoint dirs of a run, oldest first (temporary dirs of an interrupted save are skipped)."""
    root = _ckpt_root(Path(run_dir))
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def verify_checkpoint(path: str | Path) -> dict[str, Any]:
    """Check that a checkpoint dir is complete and readable; returns its trainer state (or {} for a bare HF dir).

    Raises CheckpointError naming the file and what is wrong (missing, size differs from the recorded size,
    unreadable safetensors header).
    """
    from safetensors import safe_open

    path = Path(path)
    for name in (CONFIG_FILE, MODEL_FILE):
        if not (path / name).is_file():
            raise CheckpointError(f"{path / name}: missing")
    state: dict[str, Any] = {}
    if (path / STATE_FILE).is_file():
        try:
            state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path / STATE_FILE}: unreadable ({exc})") from None
        for name, size in state.get("files", {}).items():
            f = path / name
            if not f.is_file():
                raise CheckpointError(f"{f}: missing")
            if f.stat().st_size != size:
                raise CheckpointError(f"{f}: {f.stat().st_size} bytes, but {size} were written (truncated?)")
    for name in (MODEL_FILE, OPTIMIZER_FILE):
        f = path / name
        if f.is_file():
            try:
                with safe_open(str(f), framework="numpy") as h:
                    h.keys()
            except Exception as exc:  # safetensors raises its own error type
                raise CheckpointError(f"{f}: not a readable safetensors file ({exc})") from None
    return state


def latest_checkpoint(run_dir: str | Path, on_skip: Callable[[str], None] | None = None) -> Path:
    """The newest complete, verified checkpoint of a run dir (or `run_dir` itself if it is a checkpoint dir).

    Corrupt checkpoints are skipped (reported through `on_skip`); FileNotFoundError if there is none.
    """
    run_dir = Path(run_dir)
    if (run_dir / MODEL_FILE).is_file() and (run_dir / CONFIG_FILE).is_file():
        verify_checkpoint(run_dir)
        return run_dir
    ckpts = list_checkpoints(run_dir)
    if not ckpts:
        raise FileNotFoundError(f"{run_dir}: no checkpoints (expected {run_dir / CHECKPOINTS}/step_*/{MODEL_FILE})")
    errors = []
    for p in reversed(ckpts):
        try:
            verify_checkpoint(p)
        except CheckpointError as exc:
            errors.append(str(exc))
            if on_skip is not None:
                on_skip(f"checkpoint {p.name} is corrupt ({exc}); falling back to the previous one")
            continue
        return p
    raise FileNotFoundError(f"{run_dir}: every checkpoint is corrupt: " + "; ".join(errors))


def resume_point(out_dir: Path, resume: bool) -> tuple[Path | None, dict[str, Any] | None, str]:
    """(checkpoint to resume from, its trainer state, the source named in messages) for a run in `out_dir`.

    A fresh run (resume=False) in a dir that already holds checkpoints is refused; resume=True on a dir without
    checkpoints starts fresh.
    """
    ckpts = list_checkpoints(out_dir)
    if ckpts and not resume:
        raise ValueError(
            f"{out_dir} already holds checkpoints of an earlier run; pass resume=True (--resume) to continue it, "
            "or use a new out_dir"
        )
    if not ckpts:
        return None, None, str(out_dir)
    resume_from = latest_checkpoint(out_dir)  # the Trainer reports (and skips) corrupt ones
    return resume_from, read_trainer_state(resume_from), str(resume_from / STATE_FILE)


def read_trainer_state(path: str | Path) -> dict[str, Any]:
    f = Path(path) / STATE_FILE
    if not f.is_file():
        raise FileNotFoundError(f"{f}: missing; {path} is not a resumable training checkpoint")
    return json.loads(f.read_text(encoding="utf-8"))


def read_model_tensors(path: str | Path) -> Iterator[tuple[str, np.ndarray]]:
    """(canonical name, array) pairs of a checkpoint's model.safetensors, one tensor at a time."""
    from safetensors import safe_open

    f = Path(path) / MODEL_FILE
    with safe_open(str(f), framework="numpy") as h:
        for name in h.keys():
            yield name, h.get_tensor(name)


def read_tensor_shapes(file: str | Path) -> dict[str, tuple[int, ...]]:
    """{name: shape} from a safetensors file's header (no tensor data is read); CheckpointError if unreadable."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="numpy") as h:
            return {name: tuple(h.get_slice(name).get_shape()) for name in h.keys()}
    except Exception as exc:  # safetensors raises its own error type
        raise CheckpointError(f"{file}: not a readable safetensors file ({exc})") from None


def read_optimizer_state(path: str | Path) -> dict[str, np.ndarray] | None:
    """The optimizer state of a checkpoint (None if it has no optimizer.safetensors); CheckpointError if unreadable."""
    from safetensors.numpy import load_file

    f = Path(path) / OPTIMIZER_FILE
    if not f.is_file():
        return None
    try:
        return load_file(str(f))
    except Exception as exc:  # safetensors raises its own error type
        raise CheckpointError(f"{f}: not a readable safetensors file ({exc})") from None


def read_model_config(path: str | Path) -> ModelConfig:
    f = Path(path) / CONFIG_FILE
    return ModelConfig.from_hf(json.loads(f.read_text(encoding="utf-8")), source=str(f))


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    config: ModelConfig,
    tensors: Iterable[tuple[str, np.ndarray]],
    optimizer_state: dict[str, np.ndarray] | None = None,
    trainer_state: dict[str, Any] | None = None,
    tokenizer_file: str | Path | None = None,
    config_json: dict[str, Any] | None = None,
    on_save: Callable[[Path], None] | None = None,
    keep: int | None = None,
) -> Path:
    """Write OUT_DIR/checkpoints/step_N atomically (a temp dir renamed into place); prune to the newest `keep`.

    `on_save(tmp_dir)` may add files (adapter weights, ...) before the rename. Returns the final dir.
    """
    from safetensors.numpy import save_file

    root = _ckpt_root(Path(run_dir))
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_dir_name(step)
    # re-saving a step after a resume replaces the old dir
    with atomic_dir(final, overwrite=True) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(config_json or config.to_hf(), indent=2) + "\n", encoding="utf-8")
        weights = {name: np.ascontiguousarray(a, dtype=np.float32) for name, a in tensors}
        save_file(weights, str(tmp / MODEL_FILE), metadata={"format": "pt"})
        del weights
        if optimizer_state is not None:
            opt = {k: np.array(v, order="C") for k, v in optimizer_state.items()}  # keeps 0-d arrays 0-d
            save_file(opt, str(tmp / OPTIMIZER_FILE), metadata={"format": "llama2-optimizer"})
        if tokenizer_file is not None:
            shutil.copyfile(tokenizer_file, tmp / TOKENIZER_FILE)
        if on_save is not None:
            on_save(tmp)
        state = dict(trainer_state or {})
        state["step"] = step
        state["files"] = {
            p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file() and p.name != STATE_FILE
        }
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if keep is not None:
        prune_checkpoints(run_dir, keep)
    return final


def prune_checkpoints(run_dir: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` checkpoints (by step, intact or not); returns the deleted dirs.

    Leftovers (`.step_N.tmp-*` / `.step_N.old-*` of an interrupted save, `.step_N.corrupt-*` of older versions)
    are deleted when step N is older than every kept checkpoint, and a `.tmp-*` / `.old-*` one also when step_N
    itself is complete. An `.old-*` dir whose step_N is missing (a save interrupted between its two renames) is
    the only copy of that step: it is kept unless pruned by age.
    """
    if keep <= 0:
        raise ValueError(f"keep must be positive, got {keep}")
    ckpts = list_checkpoints(run_dir)
    gone = ckpts[:-keep] if len(ckpts) > keep else []
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    kept = {int(_NAME.match(p.name).group(1)) for p in ckpts[-keep:]}
    root = _ckpt_root(Path(run_dir))
    for p in list(root.iterdir()) if root.is_dir() and kept else []:
        m = _LEFTOVER.match(p.name)
        if m is None:
            continue
        step, kind = int(m.group(1)), m.group(2)
        if step < min(kept) or (kind in ("tmp", "old") and step in kept):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            gone.append(p)
    return gone
