"""Distributed checkpoints: each model/pipeline slice is saved once with the strategy; `merge` joins them,
`split` re-splits.

Layout of a distributed checkpoint DIR (a training run writes them to OUT_DIR/distributed/step_N):

    rank_0/model.safetensors        this rank's slices of its pipeline stage's parameters (canonical names)
    rank_0/optimizer.safetensors    the same slicing of the optimizer state (exp_avg.<name>, ...), when saved
    rank_0/strategy.json            the `ParallelStrategy` (llama2.core.parallel), the rank, the file sizes
    rank_1/...

A rank's slice of a parameter split on axis a is the mp_index-th of model_parallel equal chunks along a
(`np.split`), so `merge` (concatenation in mp order, one data-parallel replica per (stage, mp_index)) gives back
the full tensors bit for bit. A training run saves one replica: only the ranks of data-parallel index 0 write
(under pure data parallelism that is rank_0 alone); `replicas=True` makes every rank write its copy (so that
`merge --check-replicas` can compare them). strategy.json lists the ranks the save wrote (`ranks`). Each rank
writes its own `rank_R` dir atomically (temp dir + rename), so ranks never touch each other's files.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from llama2.core.atomic import atomic_dir
from llama2.core.config import ModelConfig
from llama2.core.parallel import ParallelStrategy, ParamShard, derive_strategy
from llama2.core.train_config import ParallelConfig

__all__ = [
    "DISTRIBUTED",
    "STRATEGY_FILE",
    "shard_of",
    "rank_part",
    "save_rank_part",
    "save_rank_checkpoint",
    "saved_ranks",
    "run_strategy",
    "find_distributed",
    "read_strategy",
    "merged_tensors",
    "merged_optimizer_state",
    "merge",
    "split",
]

DISTRIBUTED = "distributed"
STRATEGY_FILE = "strategy.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
TOKENIZER_FILE = "tokenizer.model"
_RANK = re.compile(r"^rank_(\d+)$")
_STEP = re.compile(r"^step_(\d+)$")


def shard_of(strategy: ParallelStrategy, name: str) -> ParamShard | None:
    """The ParamShard governing tensor `name`: a parameter, or optimizer state `<prefix>.<parameter>`."""
    if name in strategy.params:
        return strategy.params[name]
    head, _, rest = name.partition(".")
    return strategy.params.get(rest) if rest else None


def _slice(value: np.ndarray, shard: ParamShard | None, mp_index: int, mp: int) -> np.ndarray:
    if shard is None or shard.split_axis is None or mp == 1:
        return value
    return np.split(np.asarray(value), mp, axis=shard.split_axis)[mp_index]


def rank_part(
    tensors: Iterable[tuple[str, np.ndarray]], strategy: ParallelStrategy, rank: int, local: bool = False
) -> Iterator[tuple[str, np.ndarray]]:
    """The slices of `tensors` (full, canonical) that `rank` holds: its stage's parameters, its mp chunk.

    `local`: `tensors` come from a sharded runtime that already holds only this rank's slices; they are kept as
    they are after a check of their shapes against the strategy.
    """
    _, stage, mp_index = strategy.rank_coords(rank)
    mp = strategy.parallel.model_parallel
    for name, value in tensors:
        shard = shard_of(strategy, name)
        if shard is not None and shard.stage != stage:
            continue
        if not local:
            part = np.asarray(_slice(value, shard, mp_index, mp))
        elif shard is not None and np.ndim(value) == len(shard.shape) and np.shape(value) != shard.part_shape(mp):
            raise ValueError(
                f"rank {rank}: tensor {name!r} has shape {np.shape(value)} but its slice under the strategy is "
                f"{shard.part_shape(mp)} (of {shard.shape}, split axis {shard.split_axis})"
            )
        else:
            part = np.asarray(value)
        yield name, part if part.flags.c_contiguous else np.array(part, order="C")  # 0-d arrays stay 0-d


def saved_ranks(strategy: ParallelStrategy, replicas: bool = False) -> list[int]:
    """The ranks that write a part: every rank with `replicas`, else those of data-parallel index 0."""
    if replicas:
        return list(range(strategy.world_size))
    return sorted(r for r in range(strategy.world_size) if strategy.rank_coords(r)[0] == 0)


def save_rank_part(
    out_dir: str | Path,
    rank: int,
    strategy: ParallelStrategy,
    tensors: Iterable[tuple[str, np.ndarray]],
    optimizer_state: dict[str, np.ndarray] | None = None,
    extra: dict[str, Any] | None = None,
    tokenizer_file: str | Path | None = None,
    ranks: Iterable[int] | None = None,
    local: bool = False,
) -> Path:
    """Write OUT_DIR/rank_R (this rank's slices of the full `tensors` + strategy) atomically; returns the dir.

    `ranks`: every rank that writes a part of this checkpoint (recorded in strategy.json); default all.
    `local`: `tensors` and `optimizer_state` are already this rank's slices (a sharded runtime's own).
    """
    from safetensors.numpy import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / f"rank_{rank}"
    with atomic_dir(final, overwrite=True) as tmp:
        part = {n: np.ascontiguousarray(v, dtype=np.float32) for n, v in rank_part(tensors, strategy, rank, local)}
        save_file(part, str(tmp / MODEL_FILE), metadata={"format": "pt"})
        del part
        if optimizer_state is not None:
            opt = {n: np.array(v, order="C") for n, v in rank_part(optimizer_state.items(), strategy, rank, local)}
            save_file(opt, str(tmp / OPTIMIZER_FILE), metadata={"format": "llama2-optimizer"})
        if tokenizer_file is not None and rank == 0:
            shutil.copyfile(tokenizer_file, tmp / TOKENIZER_FILE)
        written = sorted(ranks) if ranks is not None else list(range(strategy.world_size))
        meta = {"rank": rank, "ranks": written, "strategy": strategy.to_dict(), **(extra or {})}
        meta["files"] = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / STRATEGY_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return final


def save_rank_checkpoint(
    run_dir: str | Path,
    step: int,
    rank: int,
    world_size: int,
    config: ModelConfig,
    tensors: Iterable[tuple[str, np.ndarray]],
    *,
    parallel: ParallelConfig | dict | None = None,
    optimizer_state: dict[str, np.ndarray] | None = None,
    tokenizer_file: str | Path | None = None,
    keep: int | None = None,
    replicas: bool = False,
    local: bool = False,
) -> Path | None:
    """A training run's per-rank save: RUN_DIR/distributed/step_N/rank_R; keeps this rank's newest `keep` steps.

    Only the ranks of `saved_ranks` write (data-parallel index 0 unless `replicas`); the others return None
    without writing anything. `local`: the tensors are this rank's own slices (see `save_rank_part`).
    """
    strategy = run_strategy(config, parallel, world_size)
    writers = saved_ranks(strategy, replicas)
    if rank not in writers:
        return None
    root = Path(run_dir) / DISTRIBUTED
    out = save_rank_part(
        root / f"step_{step:08d}",
        rank,
        strategy,
        tensors,
        optimizer_state=optimizer_state,
        extra={"step": step},
        tokenizer_file=tokenizer_file,
        ranks=writers,
        local=local,
    )
    if keep is not None:
        steps = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _STEP.match(p.name)) and p.is_dir())
        for _, old in steps[:-keep] if len(steps) > keep else []:
            shutil.rmtree(old / f"rank_{rank}", ignore_errors=True)
            try:
                old.rmdir()  # the last rank to prune removes the step dir
            except OSError:
                pass
    return out


def run_strategy(config: ModelConfig, parallel: ParallelConfig | dict | None, world_size: int) -> ParallelStrategy:
    """The strategy of a training run (`parallel` None: pure data parallelism over `world_size` ranks)."""
    if isinstance(parallel, dict):
        parallel = ParallelConfig.from_dict(parallel)
    return derive_strategy(config, parallel or ParallelConfig(data_parallel=world_size), world_size=world_size)


def _rank_dirs(path: Path) -> dict[int, Path]:
    return {int(m.group(1)): p for p in path.iterdir() if p.is_dir() and (m := _RANK.match(p.name))}


def _complete(path: Path) -> bool:
    ranks = _rank_dirs(path)
    if not ranks or 0 not in ranks or not (ranks[0] / STRATEGY_FILE).is_file():
        return False
    try:
        meta = _meta(ranks[0])
        expected = _expected_ranks(meta, ParallelStrategy.from_dict(meta["strategy"]))
    except (ValueError, OSError, KeyError):
        return False
    return all(r in ranks and (ranks[r] / STRATEGY_FILE).is_file() for r in expected)


def _expected_ranks(meta: dict[str, Any], strategy: ParallelStrategy) -> list[int]:
    """The ranks whose parts a checkpoint holds (strategy.json `ranks`; every rank for older checkpoints)."""
    return [int(r) for r in meta.get("ranks", range(strategy.world_size))]


def find_distributed(path: str | Path) -> Path:
    """A distributed checkpoint dir: `path` itself, or the newest complete OUT_DIR/distributed/step_N."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such distributed checkpoint or run dir")
    if (path / "rank_0").is_dir():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a distributed checkpoint (expected a folder with rank_*/)")
    root = path / DISTRIBUTED if (path / DISTRIBUTED).is_dir() else path
    steps = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _STEP.match(p.name)) and p.is_dir())
    for _, p in reversed(steps):
        if _complete(p):
            return p
    raise FileNotFoundError(
        f"{path}: no distributed checkpoint found (expected rank_*/{STRATEGY_FILE}, or "
        f"{DISTRIBUTED}/step_N/rank_*/ with every saved rank present)"
    )


def _meta(rank_dir: Path) -> dict[str, Any]:
    f = rank_dir / STRATEGY_FILE
    if not f.is_file():
        raise FileNotFoundError(f"{f}: missing (the rank's save did not finish?)")
    try:
        return json.loads(f.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{f}: unreadable JSON ({exc})") from None


def read_strategy(path: str | Path) -> tuple[ParallelStrategy, dict[int, Path]]:
    """(strategy, rank -> rank dir) of a distributed checkpoint; checks that every saved rank is there and agrees.

    The dict holds the ranks the save wrote (strategy.json `ranks`): one replica (data-parallel index 0) for a
    training run's default save, every rank for `split` or a save with replicas=True.
    """
    path = find_distributed(path)
    ranks = _rank_dirs(path)
    meta0 = _meta(ranks[0])
    strategy = ParallelStrategy.from_dict(meta0["strategy"], str(ranks[0] / STRATEGY_FILE))
    expected = _expected_ranks(meta0, strategy)
    missing = [r for r in expected if r not in ranks]
    if missing:
        raise FileNotFoundError(f"{path}: rank dir(s) {[f'rank_{r}' for r in missing]} missing")
    for r in expected:
        meta = meta0 if r == 0 else _meta(ranks[r])
        if meta["strategy"] != meta0["strategy"]:
            raise ValueError(f"{ranks[r] / STRATEGY_FILE}: strategy differs from rank 0's")
        for name, size in meta.get("files", {}).items():
            f = ranks[r] / name
            if not f.is_file() or f.stat().st_size != size:
                raise ValueError(f"{f}: missing or truncated (expected {size} bytes)")
    return strategy, {r: ranks[r] for r in expected}


def _merged(path: str | Path, file: str, check_replicas: bool) -> Iterator[tuple[str, np.ndarray]]:
    from safetensors import safe_open

    strategy, ranks = read_strategy(path)
    p = strategy.parallel
    dps = sorted({strategy.rank_coords(r)[0] for r in ranks})
    if check_replicas and len(dps) < p.data_parallel:
        raise ValueError(
            f"{path}: holds {len(dps)} of {p.data_parallel} data-parallel replicas (a training run saves one by "
            "default), so there is nothing to compare; --check-replicas needs a save with replicas=True "
            "(Trainer(save_replicas=True)) or a `split` output"
        )
    handles: dict[int, Any] = {}
    try:
        for r, d in ranks.items():
            if not (d / file).is_file():
                if file == OPTIMIZER_FILE:
                    return
                raise FileNotFoundError(f"{d / file}: missing")
            handles[r] = safe_open(str(d / file), framework="numpy")
        names: list[str] = []
        for stage in range(p.pipeline_stage):
            names += [n for n in handles[strategy.rank_of(0, stage, 0)].keys() if n not in names]
        for name in names:
            shard = shard_of(strategy, name)
            stage = shard.stage if shard is not None else 0
            replicas = range(p.data_parallel) if check_replicas else (0,)
            full = None
            for dp in replicas:
                pieces = [handles[strategy.rank_of(dp, stage, m)].get_tensor(name) for m in range(p.model_parallel)]
                if shard is None or shard.split_axis is None:
                    value = pieces[0]
                    if check_replicas and any(not np.array_equal(value, x, equal_nan=True) for x in pieces[1:]):
                        raise ValueError(f"{path}: replicated tensor {name!r} differs across model-parallel ranks")
                else:
                    value = np.concatenate(pieces, axis=shard.split_axis)
                if full is None:
                    full = value
                elif not np.array_equal(full, value, equal_nan=True):
                    raise ValueError(
                        f"{path}: tensor {name!r} differs between data-parallel replicas 0 and {dp} "
                        "(the ranks did not stay in sync)"
                    )
            yield name, full
    finally:
        handles.clear()


def merged_tensors(path: str | Path, check_replicas: bool = False) -> Iterator[tuple[str, np.ndarray]]:
    """Full canonical model tensors of a distributed checkpoint, one at a time.

    check_replicas also compares every data-parallel (and model-parallel replicated) copy, bit for bit.
    """
    return _merged(path, MODEL_FILE, check_replicas)


def merged_optimizer_state(path: str | Path) -> dict[str, np.ndarray] | None:
    """The merged optimizer state, or None when the ranks saved none."""
    out = dict(_merged(path, OPTIMIZER_FILE, False))
    return out or None


def merge(
    path: str | Path,
    output: str | Path,
    fmt: str = "hf",
    *,
    check_replicas: bool = False,
    overwrite: bool = False,
    **options: Any,
) -> Path:
    """Join a distributed checkpoint (or a run dir's newest one) into one checkpoint in `fmt` (default HF dir)."""
    from safetensors import safe_open

    from llama2.core.formats import save_checkpoint

    src = find_distributed(path)
    strategy, ranks = read_strategy(src)
    unknown: list[str] = []
    for stage in range(strategy.parallel.pipeline_stage):
        with safe_open(str(ranks[strategy.rank_of(0, stage, 0)] / MODEL_FILE), framework="numpy") as f:
            unknown += [n for n in f.keys() if n not in strategy.params]
    if unknown:
        raise ValueError(
            f"{src}: holds tensors that are not parameters of the model ({sorted(unknown)[:3]}): the adapter-only "
            "checkpoint of a `finetune --method lora/prefix` run; use the run's adapter/ folder (`llama2 merge-lora` "
            "folds it into the base model), or read the parts with llama2.core.dist_checkpoint.merged_tensors"
        )
    tok = ranks[0] / TOKENIZER_FILE
    if tok.is_file() and fmt != "llama2c":
        options.setdefault("tokenizer_path", tok)
    tensors = merged_tensors(src, check_replicas=check_replicas)
    return save_checkpoint(output, fmt, strategy.model, tensors, overwrite=overwrite, **options)


def split(
    source: str | Path,
    output: str | Path,
    parallel: ParallelConfig,
    *,
    check_replicas: bool = False,
    overwrite: bool = False,
) -> Path:
    """Re-split a checkpoint (any readable format, or a distributed one) for `parallel`; writes OUTPUT/rank_*."""
    source, output = Path(source), Path(output)
    if output.exists() and any(output.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{output} exists and is not empty; pass overwrite=True (--force) to replace it")
        shutil.rmtree(output)
    tok: Path | None = None
    try:
        dist = find_distributed(source)
    except FileNotFoundError:
        dist = None
    if dist is not None:
        strategy, ranks = read_strategy(dist)
        config = strategy.model
        tok = ranks[0] / TOKENIZER_FILE if (ranks[0] / TOKENIZER_FILE).is_file() else None
        tensors = dict(merged_tensors(dist, check_replicas=check_replicas))
    else:
        from llama2.core.formats import open_checkpoint

        with open_checkpoint(source) as ckpt:
            config, tok = ckpt.config, ckpt.tokenizer_path
            tensors = dict(ckpt.tensors())
    new = derive_strategy(config, parallel)
    for rank in range(new.world_size):
        save_rank_part(output, rank, new, tensors.items(), tokenizer_file=tok)
    return output
