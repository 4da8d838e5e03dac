"""Distributed MindSpore: `msrun` data parallel (CPU, GPU, Ascend) and semi-auto parallel sharding (GPU, Ascend).

Data parallel: under `msrun` (which exports MS_ROLE, RANK_ID, RANK_SIZE, MS_SCHED_HOST/PORT) the backend calls
`mindspore.communication.init()` when it builds a runtime (`init_from_env`). `MindSporeTrainState.apply` then sums
the gradients and token counts of all ranks with AllReduce before dividing (a manual all-reduce rather than
ParallelMode.DATA_PARALLEL, so PyNative + `mindspore.jit` work unchanged on CPU), which makes N ranks with
disjoint data step exactly like one process with the global batch. Every rank starts from the same weights
(same seed or the same checkpoint). msrun also runs the command once as its scheduler (MS_ROLE=MS_SCHED): that
process stops inside `init()`, before it could write anything. On GPU/Ascend each worker takes device
`DEVICE_ID` (msrun exports the local rank) unless a device id other than 0 is given (`msrun_device_id`).

Model / pipeline parallel: `configure_parallel` turns the backend-neutral `ParallelStrategy`
(`llama2.core.parallel.derive_strategy`) into MindSpore semi-auto parallel settings from outside the model math:
per cell, `Cell.shard(in_strategy, parameter_plan=...)`, `cell.pipeline_stage` and `cell.recompute()`;
`cell_shard_plan` (plain Python) lists what is applied to which cell. The train step is compiled under
`AutoParallel(..., "sharding_propagation")` (`llama2.backends.mindspore.fused`). This needs GPU or Ascend; on CPU
a sharded layout is a clear error.
"""

from __future__ import annotations

import os
from typing import Any

import attrs

from llama2.core.parallel import COLUMN, ROW, VOCAB, ParallelStrategy, env_device_index
from llama2.core.train_config import ParallelConfig

__all__ = ["under_msrun", "msrun_device_id", "init_from_env", "CellPlan", "cell_shard_plan", "configure_parallel"]


def under_msrun() -> bool:
    """True in a process started by msrun (its dynamic-cluster variables are set)."""
    return "MS_ROLE" in os.environ and "MS_SCHED_PORT" in os.environ


def msrun_device_id(device: str, device_id: int) -> int:
    """The device id a process should use: msrun's DEVICE_ID (the worker's local rank) on GPU/Ascend when
    `device_id` is left at its default 0, else `device_id` unchanged (always on CPU, and outside msrun)."""
    if device == "cpu" or device_id != 0 or not under_msrun() or "DEVICE_ID" not in os.environ:
        return device_id
    return env_device_index("DEVICE_ID", "msrun")


def init_from_env() -> tuple[int, int]:
    """Initialize `mindspore.communication` under msrun (once); returns (rank, world size), (0, 1) otherwise.

    Call after the device is selected. In msrun's scheduler process this call does not return.
    """
    from mindspore.communication import GlobalComm, get_group_size, get_rank, init

    if not GlobalComm.INITED:
        if not under_msrun():
            return 0, 1
        try:
            init()
        except RuntimeError as exc:
            raise RuntimeError(
                f"mindspore.communication.init() failed under msrun (MS_SCHED_HOST="
                f"{os.environ.get('MS_SCHED_HOST')}, MS_SCHED_PORT={os.environ.get('MS_SCHED_PORT')}, "
                f"MS_WORKER_NUM={os.environ.get('MS_WORKER_NUM')}): {exc}"
            ) from exc
    rank, world = int(get_rank()), int(get_group_size())
    env_rank = os.environ.get("RANK_ID")
    if under_msrun() and env_rank is not None and env_rank.strip().isdigit() and int(env_rank) != rank:
        # the trainer slices the data by RANK_ID: a stale one (msrun on several nodes without --node_rank lets
        # MindSpore pick the ranks and leaves RANK_ID unset or inherited) would make ranks read the same samples
        raise RuntimeError(
            f"MindSpore assigned this process rank {rank} but RANK_ID={env_rank}; on several nodes pass msrun "
            "--node_rank (llama2 launch --node-rank / $NODE_RANK does) so that every worker's RANK_ID is its rank"
        )
    return rank, world


@attrs.frozen
class CellPlan:
    """What semi-auto parallel gets for one cell (dotted path as in `net.cells_and_names()`)."""

    in_strategy: tuple[tuple[int, ...], ...] | None  # Cell.shard in_strategy (None: no shard call)
    parameter_plan: dict[str, tuple[int, ...]]  # full parameter name -> layout
    stage: int | None  # cell.pipeline_stage (None: inherit)
    recompute: bool = False


def _layout(shape: tuple[int, ...], axis: int | None, mp: int) -> tuple[int, ...]:
    return tuple(mp if i == axis else 1 for i in range(len(shape)))


def cell_shard_plan(strategy: ParallelStrategy) -> dict[str, CellPlan]:
    """Per-cell shard settings for the MindSpore lowering of the base graph (plain Python; testable on CPU).

    Linear cells get their input layout (batch over data_parallel; the feature axis over model_parallel for a
    row-parallel layer, whose input arrives split) and their weight's layout; embeddings take (batch, seq) ids;
    norms are replicated. Decoder blocks carry their pipeline stage and the recompute flag.
    """
    p = strategy.parallel
    dp, mp = p.data_parallel, p.model_parallel
    plans: dict[str, CellPlan] = {}
    for name, shard in strategy.params.items():
        cell, _, _ = name.rpartition(".")
        layout = _layout(shard.shape, shard.split_axis, mp)
        if cell == "model.embed_tokens":
            in_strategy: tuple[tuple[int, ...], ...] | None = ((dp, 1),)
        elif len(shard.shape) == 1:  # RMSNorm: (batch, seq, dim) in
            in_strategy = ((dp, 1, 1),)
        elif shard.role == ROW:
            in_strategy = ((dp, 1, mp),)
        elif shard.role in (COLUMN, VOCAB) or shard.split_axis is None:
            in_strategy = ((dp, 1, 1),)
        else:
            in_strategy = None
        if cell in plans:  # several parameters in one cell (adapters): merge their plans
            old = plans[cell]
            plans[cell] = attrs.evolve(old, parameter_plan={**old.parameter_plan, name: layout})
        else:
            plans[cell] = CellPlan(in_strategy, {name: layout}, shard.stage)
    for i, stage in enumerate(strategy.layer_stages):
        plans[f"model.layers.{i}"] = CellPlan(None, {}, stage, strategy.layer_recompute[i])
    return plans


def configure_parallel(net: Any, strategy: ParallelStrategy, device: str) -> tuple[int, int]:
    """Apply `strategy`'s per-cell shards, pipeline stages and recompute flags to a lowered network; returns this
    process's (rank, world size). The train step is then compiled under `AutoParallel` (`FusedTrainState`).

    Data parallel only (model_parallel == pipeline_stage == 1) shards nothing: it only joins the process group
    (`init_from_env`). Raises ValueError on CPU for a sharded layout, RuntimeError when the group does not match.
    """
    p: ParallelConfig = strategy.parallel
    if not p.sharded:
        return init_from_env()
    if device == "cpu":
        raise ValueError(
            f"ParallelConfig: model_parallel={p.model_parallel}, pipeline_stage={p.pipeline_stage} need GPU or "
            "Ascend devices (MindSpore semi-auto parallel); on CPU only data_parallel is supported"
        )
    rank, world = init_from_env()
    if world != p.device_count:
        raise RuntimeError(
            f"ParallelConfig asks for {p.device_count} devices but {world} process(es) are initialized; launch "
            f"with msrun --worker_num {p.device_count}"
        )
    cells = dict(net.cells_and_names())
    for path, plan in cell_shard_plan(strategy).items():
        cell = cells.get(path)
        if cell is None:
            raise RuntimeError(f"configure_parallel: the network has no cell {path!r} (lowering names changed?)")
        if plan.in_strategy is not None:
            cell.shard(in_strategy=plan.in_strategy, parameter_plan=plan.parameter_plan)
        if plan.stage is not None and p.pipeline_stage > 1:
            cell.pipeline_stage = plan.stage
        if plan.recompute:
            from llama2.backends.mindspore.runtime import recompute_once

            recompute_once(cell)
    return rank, world
