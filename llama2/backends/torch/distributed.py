"""Process groups for the torch backend: `torchrun` set-up, bucketed gradient all-reduce, FSDP wrapping.

Data parallel (the default under `torchrun`): every rank holds the whole model; `TorchTrainState.apply` sums the
gradients and token counts over ranks before dividing, so N ranks with disjoint data step exactly like one process
with the global batch. FSDP (`TorchBackend.build(graph, options, fsdp=True)`) shards parameters, gradients and
optimizer state per decoder block (FSDP2 `fully_shard`) for models that do not fit one device; it runs with NCCL
on GPUs and with gloo on CPU (slow; for tests).
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from llama2.core.parallel import env_device_index

__all__ = [
    "DistInfo",
    "init_from_env",
    "torchrun_device_id",
    "is_distributed",
    "world_size",
    "rank",
    "all_reduce_sum_",
    "broadcast_",
    "fsdp_wrap",
]

_BUCKET_BYTES = 25 * 1024 * 1024  # DDP's default bucket size


class DistInfo(NamedTuple):
    rank: int
    world_size: int
    local_rank: int


def init_from_env(backend: str | None = None, timeout_s: float = 1800.0, device_id: int | None = None) -> DistInfo:
    """Initialize the default process group from torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*).

    backend: "nccl" when CUDA is available, else "gloo", unless given. Without WORLD_SIZE (a plain single
    process) nothing is initialized and (0, 1, 0) is returned. Idempotent. With NCCL the current CUDA device is
    `device_id` (the runtime's; see `torchrun_device_id`), LOCAL_RANK when None.
    """
    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank)
    if env_world <= 1:
        return DistInfo(0, 1, 0)
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE={env_world} but {missing} unset in the environment; launch with torchrun")
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed support")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(local_rank if device_id is None else device_id)
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank)


def torchrun_device_id(device: str, device_id: int) -> int:
    """The CUDA device a process should use: torchrun's LOCAL_RANK on GPU when WORLD_SIZE > 1 and `device_id` is
    left at its default 0, else `device_id` unchanged (always on CPU, in a single process, and when one is given)."""
    if device == "cpu" or device_id != 0 or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device_id
    return env_device_index("LOCAL_RANK", "torchrun")


def is_distributed() -> bool:
    """True inside an initialized process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _buckets(tensors: Sequence[torch.Tensor], bucket_bytes: int) -> Iterable[list[torch.Tensor]]:
    bucket: list[torch.Tensor] = []
    size = 0
    for t in tensors:
        if bucket and (t.dtype != bucket[0].dtype or size + t.numel() * t.element_size() > bucket_bytes):
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += t.numel() * t.element_size()
    if bucket:
        yield bucket


def all_reduce_sum_(tensors: Sequence[torch.Tensor], bucket_bytes: int = _BUCKET_BYTES) -> None:
    """Sum `tensors` in place over all ranks, flattened into DDP-sized buckets (one collective per bucket)."""
    if not is_distributed():
        return
    for bucket in _buckets(tensors, bucket_bytes):
        flat = torch.cat([t.reshape(-1) for t in bucket])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for t in bucket:
            n = t.numel()
            t.copy_(flat[offset : offset + n].view_as(t))
            offset += n


def broadcast_(tensors: Iterable[torch.Tensor], src: int = 0) -> None:
    """Copy `src`'s values of `tensors` to every rank (start data parallel from identical weights)."""
    if not is_distributed():
        return
    with torch.no_grad():
        for t in tensors:
            dist.broadcast(t.data, src=src)


def fsdp_wrap(module: nn.Module, device: torch.device) -> nn.Module:
    """Shard `module` with FSDP2 (`fully_shard`), one unit per decoder block plus the root; names are kept.

    Parameters become DTensor shards over the default process group (gloo on CPU, NCCL on GPU); gradients are
    reduce-scattered as means. The module is returned (sharded in place).
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("fsdp=True needs an initialized process group; call distributed.init_from_env() first")
    from torch.distributed.fsdp import fully_shard

    from llama2.backends.torch.lowering import TorchBlock

    for sub in module.modules():
        if isinstance(sub, TorchBlock):
            fully_shard(sub)
    fully_shard(module)
    return module
