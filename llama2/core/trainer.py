"""The backend-neutral training loop.

`Trainer` drives a `Runtime`'s `TrainState` with numpy batches: seeded per-epoch data order, data-parallel
sharding by rank, gradient accumulation over micro-batches (token-weighted), warmup + cosine learning rate,
AdamW with clipping (in the backend), a finite-loss check, JSONL metrics, a progress bar, atomic checkpoints every
N steps, and exact resume.

Data parallelism: every rank computes the same global permutation and reads its own contiguous slice of each
global batch. The backend's TrainState sums gradients across ranks in `apply`; if it has
`all_reduce_sum(np.ndarray) -> np.ndarray`, the trainer also sums the loss and token counts for logging (else
rank 0 logs its local loss). Only rank 0 writes metrics and checkpoints; the distributed checkpoint parts
(OUT_DIR/distributed, `llama2 merge`) are written by the ranks of data-parallel index 0 (one replica).

A step whose batch scores no token (every label IGNORE_INDEX, on all ranks) makes no optimizer update: its metrics
record `"skipped": true` and a message is logged (same on every backend and process count).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from llama2.core import run_dir as rd
from llama2.core.backend import IGNORE_INDEX, Runtime, TrainState
from llama2.core.schedule import lr_at
from llama2.core.train_config import TrainConfig
from llama2.core.train_data import DataOrder, TrainData

__all__ = ["TrainData", "DataOrder", "Trainer", "NonFiniteLossError", "detect_rank_world", "METRICS_FILE"]

METRICS_FILE = "metrics.jsonl"


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


def detect_rank_world() -> tuple[int, int]:
    """(rank, world size) of this process: torchrun's RANK/WORLD_SIZE, msrun's RANK_ID/RANK_SIZE, or an
    initialized MindSpore communication group; (0, 1) for a single process."""
    env = os.environ
    if "WORLD_SIZE" in env:
        return int(env.get("RANK", "0")), int(env["WORLD_SIZE"])
    if "RANK_SIZE" in env:
        return int(env.get("RANK_ID", "0")), int(env["RANK_SIZE"])
    comm = sys.modules.get("mindspore.communication")
    if comm is not None:
        try:
            return int(comm.get_rank()), int(comm.get_group_size())
        except Exception:  # not initialized
            pass
    return 0, 1


class Trainer:
    """Trains `runtime` on `data` under `config`, writing metrics and checkpoints into `out_dir` (rank 0)."""

    def __init__(
        self,
        runtime: Runtime,
        config: TrainConfig,
        data: TrainData,
        out_dir: str | Path | None,
        *,
        rank: int | None = None,
        world_size: int | None = None,
        tokenizer_file: str | Path | None = None,
        progress: bool = True,
        log: Callable[[str], None] | None = None,
        model_tensors: Callable[[], Iterable[tuple[str, np.ndarray]]] | None = None,
        on_save: Callable[[Path], None] | None = None,
        extra_state: dict[str, Any] | None = None,
        train_state: TrainState | None = None,
        checkpoint_names: list[str] | None = None,
        save_replicas: bool = False,
        data_path: str | Path | None = None,
    ) -> None:
        """`model_tensors` / `checkpoint_names`: what checkpoints hold (default: every model parameter; an adapter
        run gives its own tensors and their names, and resume then loads exactly those). `save_replicas`: every
        data-parallel rank also writes its copy of the distributed checkpoint (default: only data-parallel index
        0 writes), for `llama2 merge --check-replicas`. `data_path`: the file the data came from, recorded (absolute)
        in trainer_state.json so that resume can read it again."""
        self.runtime = runtime
        self.config = config
        self.data = data
        self.out_dir = Path(out_dir) if out_dir is not None else None
        det_rank, det_world = detect_rank_world()
        self.rank = det_rank if rank is None else rank
        self.world_size = det_world if world_size is None else world_size
        self.tokenizer_file = tokenizer_file
        self.progress = progress
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.model_tensors = model_tensors or runtime.state_dict
        self.on_save = on_save
        self.extra_state = dict(extra_state or {})
        self.checkpoint_names = None if checkpoint_names is None else list(checkpoint_names)
        self.save_replicas = save_replicas
        self.data_path = None if data_path is None else str(Path(data_path).resolve())
        self._fingerprint: str | None = None
        cfg = runtime.config
        data.check(cfg.vocab_size, cfg.max_seq_len)
        self.state = train_state or runtime.train_state(config.optim())
        # which rows this rank reads: its data-parallel index (model-parallel ranks of one index read the same rows)
        self.data_rank, self.data_world = getattr(self.state, "data_shard", None) or (self.rank, self.world_size)
        if config.batch_size % self.data_world:
            raise ValueError(
                f"batch_size {config.batch_size} is not divisible by the data-parallel size {self.data_world}"
            )
        self.per_rank = config.batch_size // self.data_world
        self.micro = config.micro_batch_size or self.per_rank
        if self.per_rank % self.micro:
            raise ValueError(
                f"the per-rank batch ({self.per_rank} = batch_size {config.batch_size} / {self.data_world} ranks) "
                f"is not divisible by micro_batch_size {self.micro}"
            )
        self.fused = bool(getattr(self.state, "fused", False))
        if self.fused and self.micro != self.per_rank:
            raise ValueError(
                f"micro_batch_size {self.micro}: this train state makes one fused step per update over the whole "
                f"per-rank batch ({self.per_rank}); leave micro_batch_size unset"
            )
        self.order = DataOrder(data.n_samples, config.batch_size, config.seed, config.shuffle)
        self.step = 0
        self.last_saved: int | None = None  # the step of the newest save (this process)
        self.elapsed = 0.0
        self.history: list[dict[str, Any]] = []

    @property
    def is_writer(self) -> bool:
        return self.rank == 0 and self.out_dir is not None

    # ---- checkpoints ---------------------------------------------------------------------------------------
    @property
    def data_fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = self.data.fingerprint()
        return self._fingerprint

    def trainer_state(self) -> dict[str, Any]:
        epoch, k = self.order.position(self.step)
        c = self.config
        return {
            "step": self.step,
            "epoch": epoch,
            "batch_in_epoch": k,
            "samples_seen": self.step * c.batch_size,
            "n_samples": self.data.n_samples,
            "seed": c.seed,
            "elapsed": self.elapsed,
            "scheduler": {
                "name": c.schedule,
                "lr": c.lr,
                "min_lr": c.final_lr,
                "warmup_steps": c.warmup_steps,
                "total_steps": c.steps,
                "last_lr": self.lr(max(self.step - 1, 0)),
            },
            "train_config": c.to_dict(),
            "model_config": self.runtime.config.to_dict(),
            "world_size": self.world_size,
            "data": {
                "path": self.data_path,
                "n_samples": self.data.n_samples,
                "seq_length": self.data.seq_length,
                "fingerprint": self.data_fingerprint,
            },
            **self.extra_state,
        }

    def save(self) -> Path | None:
        """Write a checkpoint of the current step (rank 0) and, with several ranks, this rank's part of the
        distributed checkpoint (ranks of data-parallel index 0, or every rank with `save_replicas`); returns the
        checkpoint dir on rank 0, else None."""
        if getattr(self.state, "strategy", None) is not None:
            return self._save_sharded()
        self.last_saved = self.step
        writes_part = False
        if self.world_size > 1 and self.out_dir is not None:
            from llama2.core import dist_checkpoint as dc

            strategy = dc.run_strategy(self.runtime.config, self.extra_state.get("parallel_config"), self.world_size)
            writes_part = self.rank in dc.saved_ranks(strategy, self.save_replicas)
        if not (writes_part or self.is_writer):
            return None
        tensors = list(self.model_tensors())  # built once for both saves
        optimizer_state = self.state.state_dict()
        if writes_part:
            self._write_part(tensors, optimizer_state, self.extra_state.get("parallel_config"))
        return self._write_full(tensors, optimizer_state) if self.is_writer else None

    def _save_sharded(self) -> Path | None:
        """Model-parallel save: each rank of data-parallel index 0 writes its own slices, then (after every rank
        has) rank 0 joins them into the full checkpoints/step_N that resume and `llama2.load` read."""
        from llama2.core import dist_checkpoint as dc

        strategy = self.state.strategy
        self.last_saved = self.step
        if self.out_dir is not None and self.rank in dc.saved_ranks(strategy, self.save_replicas):
            # before the first compiled step the weights are still whole: cut them like a data-parallel save
            self._write_part(self.model_tensors(), self.state.state_dict(), strategy.parallel, self.state.sliced)
        self.state.barrier()  # every part is written
        out = None
        if self.is_writer:
            parts = self.out_dir / dc.DISTRIBUTED / f"step_{self.step:08d}"
            out = self._write_full(dc.merged_tensors(parts), dc.merged_optimizer_state(parts))
        self.state.barrier()  # no rank rewrites or prunes a part while rank 0 still reads it
        return out

    def _write_part(self, tensors: Any, optimizer_state: Any, parallel: Any, local: bool = False) -> None:
        """This rank's part of the distributed checkpoint OUT_DIR/distributed/step_N/rank_R."""
        from llama2.core import dist_checkpoint as dc

        dc.save_rank_checkpoint(
            self.out_dir,
            self.step,
            self.rank,
            self.world_size,
            self.runtime.config,
            tensors,
            parallel=parallel,
            optimizer_state=optimizer_state,
            tokenizer_file=self.tokenizer_file,
            keep=self.config.keep,
            replicas=self.save_replicas,
            local=local,
        )

    def _write_full(self, tensors: Any, optimizer_state: Any) -> Path:
        """The full checkpoint OUT_DIR/checkpoints/step_N (rank 0)."""
        return rd.save_checkpoint(
            self.out_dir,
            self.step,
            config=self.runtime.config,
            tensors=tensors,
            optimizer_state=optimizer_state,
            trainer_state=self.trainer_state(),
            tokenizer_file=self.tokenizer_file,
            on_save=self.on_save,
            keep=self.config.keep,
        )

    def resume(self, run_dir: str | Path | None = None) -> int:
        """Load the newest intact checkpoint of `run_dir` (default out_dir); returns its step (0 if none).

        A checkpoint that fails the integrity check (a missing or truncated file, unreadable safetensors or JSON)
        is reported and skipped, the previous one tried; nothing is moved or deleted. An intact checkpoint that
        does not fit this run (tensor names or shapes, optimizer state) raises ResumeMismatchError naming the file
        and the mismatch, before anything is loaded.
        """
        run_dir = Path(run_dir) if run_dir is not None else self.out_dir
        ckpts = rd.list_checkpoints(run_dir) if run_dir is not None else []
        errors = []
        for path in reversed(ckpts):
            try:
                state, optimizer_state = self._stage(path)
            except rd.CheckpointError as exc:
                errors.append(f"{path.name}: {exc}")
                self.log(f"checkpoint {path.name} is corrupt or unreadable ({exc}); falling back to the previous one")
                continue
            self._load(path, state, optimizer_state)
            self.log(f"resumed from {path} at step {self.step}")
            return self.step
        if errors:
            raise FileNotFoundError(f"cannot resume from {run_dir}: no loadable checkpoint ({'; '.join(errors)})")
        return 0

    def _stage(self, path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """Check checkpoint `path` without touching the runtime; returns (trainer state, optimizer state).

        CheckpointError: an integrity failure. ResumeMismatchError: intact but not this run's.
        """
        state = rd.verify_checkpoint(path)
        if not state:
            raise rd.CheckpointError(f"{path / rd.STATE_FILE}: missing; not a resumable training checkpoint")
        if "step" not in state:
            raise rd.CheckpointError(f"{path / rd.STATE_FILE}: has no 'step' entry")
        mismatch = []
        model_problems = self._check_tensors(rd.read_tensor_shapes(path / rd.MODEL_FILE))
        if model_problems:
            mismatch.append(f"{path / rd.MODEL_FILE}: {_first(model_problems)}")
        optimizer_state = rd.read_optimizer_state(path)
        if optimizer_state is None:
            mismatch.append(f"{path / rd.OPTIMIZER_FILE}: missing (saved without optimizer state)")
        elif opt_problems := self._check_optimizer(optimizer_state):
            mismatch.append(f"{path / rd.OPTIMIZER_FILE}: {_first(opt_problems)}")
        saved_data = state.get("data") if isinstance(state.get("data"), dict) else {}
        if saved_data.get("fingerprint") not in (None, self.data_fingerprint):
            mismatch.append(
                f"{path / rd.STATE_FILE}: the training data differs from the run's ({saved_data.get('n_samples')} "
                f"samples x {saved_data.get('seq_length')} positions from {saved_data.get('path') or 'in-memory data'}"
                f"; now {self.data.n_samples} x {self.data.seq_length} from {self.data_path or 'in-memory data'}); "
                "other data or another seq_length would change what each remaining step reads"
            )
        if mismatch:
            hint = _differences(state, self.trainer_state(), ("finetune", "model_config"))
            raise rd.ResumeMismatchError(
                f"cannot resume from {path.name}: the checkpoint does not fit this run. "
                + ". ".join(mismatch)
                + (f". The run's settings differ: {'; '.join(hint[:6])}" if hint else "")
                + ". Resume with the settings the run was started with, or use a new out_dir."
            )
        return state, optimizer_state

    def _check_tensors(self, shapes: dict[str, tuple[int, ...]]) -> list[str]:
        specs = self.runtime.specs
        wanted = self.checkpoint_names if self.checkpoint_names is not None else list(specs)
        problems = []
        missing = [n for n in wanted if n not in shapes]
        unexpected = sorted(set(shapes) - set(wanted))
        if missing:
            problems.append(f"lacks tensor(s) {missing[:3]}" + (f" (+{len(missing) - 3})" if len(missing) > 3 else ""))
        if unexpected:
            problems.append(f"has unexpected tensor(s) {unexpected[:3]}")
        for name in wanted:
            if name in shapes and name in specs and tuple(shapes[name]) != tuple(specs[name].shape):
                problems.append(f"{name!r} has shape {shapes[name]}, this run's is {tuple(specs[name].shape)}")
        return problems

    def _check_optimizer(self, opt: dict[str, np.ndarray]) -> list[str]:
        if "step" not in opt:
            return ["has no 'step' entry"]
        names = getattr(self.state, "names", None) or self.runtime.trainable_names()
        expected = {f"{kind}.{n}": n for n in names for kind in ("exp_avg", "exp_avg_sq")}
        problems = []
        unexpected = sorted(set(opt) - set(expected) - {"step"})
        if unexpected:
            problems.append(f"holds state of parameter(s) this run does not train: {unexpected[:3]}")
        missing = [k for k in expected if k not in opt]
        if float(np.asarray(opt["step"])) > 0 and missing:
            problems.append(f"lacks state of trained parameter(s) {missing[:3]}")
        for key, name in expected.items():
            shape = tuple(self.runtime.specs[name].shape) if name in self.runtime.specs else None
            if key in opt and shape is not None and tuple(opt[key].shape) != shape:
                problems.append(f"{key!r} has shape {tuple(opt[key].shape)}, this run's is {shape}")
        return problems

    def _load(self, path: Path, st: dict[str, Any], optimizer_state: dict[str, np.ndarray]) -> None:
        """Load a checkpoint that `_stage` accepted into the runtime and optimizer."""
        if st.get("n_samples") not in (None, self.data.n_samples):
            self.log(f"warning: {path.name} was trained on {st['n_samples']} samples, now {self.data.n_samples}")
        saved = st.get("train_config", {})
        for key in ("batch_size", "seed", "shuffle"):
            if key in saved and saved[key] != getattr(self.config, key):
                self.log(f"warning: {key} was {saved[key]!r} in {path.name}, now {getattr(self.config, key)!r}")
        self.runtime.load_state(
            rd.read_model_tensors(path), strict=self.checkpoint_names is None, source=str(path / rd.MODEL_FILE)
        )
        self.state.load_state_dict(optimizer_state)
        self.step = int(st["step"])
        self.elapsed = float(st.get("elapsed", 0.0))
        if self.is_writer:
            self._truncate_metrics(self.step)

    # ---- metrics -------------------------------------------------------------------------------------------
    @property
    def metrics_path(self) -> Path | None:
        return None if self.out_dir is None else self.out_dir / METRICS_FILE

    def _truncate_metrics(self, step: int) -> None:
        """Drop metric lines past `step` (written after the checkpoint we resume from)."""
        path = self.metrics_path
        if path is None or not path.exists():
            return
        keep = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except json.JSONDecodeError:
                continue  # a line cut by the crash
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text("".join(f"{x}\n" for x in keep), encoding="utf-8")
        os.replace(tmp, path)

    def _write_metrics(self, record: dict[str, Any]) -> None:
        if not self.is_writer:
            return
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    # ---- the loop ------------------------------------------------------------------------------------------
    def lr(self, step: int) -> float:
        c = self.config
        return lr_at(
            step, schedule=c.schedule, lr=c.lr, min_lr=c.final_lr, warmup_steps=c.warmup_steps, total_steps=c.steps
        )

    def _reduce(self, values: list[float]) -> list[float]:
        fn = getattr(self.state, "all_reduce_sum", None)
        if fn is None or self.world_size == 1:
            return values
        return [float(v) for v in np.asarray(fn(np.asarray(values, np.float64)))]

    def train_step(self) -> dict[str, Any]:
        """One optimizer update (all micro-batches of this rank's share of the batch); returns its metrics."""
        t0 = time.perf_counter()
        step = self.step
        lr = self.lr(step)
        idx = self.order.indices(step, self.data_rank, self.data_world)
        if self.fused:  # one call for the update; every rank counts the global batch's tokens itself
            ids, labels = self.data.batch(idx)
            n_tok = self.data.scored_tokens(self.order.indices(step))
            sum_nll, norm = self.state.step_batch(ids, labels, lr, n_tok) if n_tok else (0.0, None)
            return self._record(step, lr, t0, sum_nll, n_tok, int(ids.size) * self.data_world, norm)
        sum_nll, n_tok, n_in = 0.0, 0, 0
        for start in range(0, len(idx), self.micro):
            ids, labels = self.data.batch(idx[start : start + self.micro])
            s, n = self.state.accumulate(ids, labels)
            sum_nll += float(s)
            n_tok += int(n)
            n_in += int(ids.size)
        local_tok = n_tok  # apply() takes this rank's count and sums over ranks itself
        sum_nll, n_tok_f = self._reduce([sum_nll, n_tok])
        n_tok = int(round(n_tok_f))
        n_in *= self.world_size  # every rank reads an equal share
        self._check_loss(step, lr, sum_nll, n_tok)
        # n_tok is the global count when it could be summed over ranks: then every rank skips alike
        skip = n_tok == 0 and (self.world_size == 1 or hasattr(self.state, "all_reduce_sum"))
        # skipped: the zero gradients accumulated this step stay in the state and add nothing to the next one
        grad_norm = None if skip else float(self.state.apply(lr, local_tok if self.world_size > 1 else n_tok))
        return self._record(step, lr, t0, sum_nll, n_tok, n_in, grad_norm)

    def _check_loss(self, step: int, lr: float, sum_nll: float, n_tok: int) -> None:
        loss = sum_nll / max(n_tok, 1)
        if not math.isfinite(loss):
            when = "after the fused update; nothing is saved for it" if self.fused else "before the update"
            raise NonFiniteLossError(
                f"training loss is {loss} at step {step + 1} (lr {lr:.3g}); stopping {when}. "
                "Try a lower lr, a smaller grad_clip, or check the data."
            )

    def _record(
        self, step: int, lr: float, t0: float, sum_nll: float, n_tok: int, n_in: int, grad_norm: float | None
    ) -> dict[str, Any]:
        """Advance to step + 1 and return its metrics (grad_norm None: the update was skipped, no scored token)."""
        if self.fused:
            self._check_loss(step, lr, sum_nll, n_tok)
        loss = sum_nll / max(n_tok, 1)
        skip = grad_norm is None
        if skip and self.rank == 0:  # all-zero gradients: no AdamW update, no weight decay, no momentum step
            self.log(
                f"step {step + 1}: the batch scores no token (every label is {IGNORE_INDEX}); "
                "skipping the optimizer update"
            )
        self.step = step + 1
        dt = time.perf_counter() - t0
        self.elapsed += dt
        epoch, _ = self.order.position(step)
        return {
            "step": self.step,
            "epoch": epoch,
            "loss": loss,
            "lr": lr,
            "grad_norm": 0.0 if grad_norm is None else grad_norm,
            "tokens": n_tok,
            "tokens_per_s": n_in / dt if dt > 0 else 0.0,
            "elapsed": round(self.elapsed, 4),
            **({"skipped": True} if skip else {}),
        }

    def fit(self, stop_after: int | None = None) -> list[dict[str, Any]]:
        """Train from the current step to `config.steps` (or stop after step `stop_after`); returns the metrics.

        Saves every `save_every` steps and at the end. Raises NonFiniteLossError on a NaN/inf loss.
        """
        end = self.config.steps if stop_after is None else min(stop_after, self.config.steps)
        if self.is_writer:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        bar = None
        if self.progress and self.rank == 0 and self.step < end:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.config.steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        self.runtime.train(True)
        try:
            while self.step < end:
                rec = self.train_step()
                self.history.append(rec)
                if rec["step"] % self.config.log_every == 0 or rec["step"] == end:
                    self._write_metrics(rec)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(
                        loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}", tok_s=f"{rec['tokens_per_s']:.0f}"
                    )
                every = self.config.save_every
                if (every and self.step % every == 0) or self.step == self.config.steps:
                    self.save()
        finally:
            if bar is not None:
                bar.close()
            self.runtime.train(False)
        return self.history


def _first(problems: list[str], n: int = 3) -> str:
    return "; ".join(problems[:n]) + (f" (and {len(problems) - n} more)" if len(problems) > n else "")


def _differences(saved: dict[str, Any], now: dict[str, Any], keys: tuple[str, ...]) -> list[str]:
    """'key.path: X in the checkpoint, Y now' for the leaves of `keys` that differ between two trainer states."""
    out: list[str] = []

    def walk(a: Any, b: Any, where: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b), key=str):
                walk(a.get(k), b.get(k), f"{where}.{k}" if where else str(k))
        elif a != b:
            out.append(f"{where}: {a!r} in the checkpoint, {b!r} now")

    for key in keys:
        if key in saved and key in now:
            walk(saved[key], now[key], key)
    return out
