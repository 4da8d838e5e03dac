"""Data parallel on the torch backend: `torchrun --nproc-per-node 2 -m llama2 pretrain` (gloo, loopback) takes the
same steps as one process with the same global batch; FSDP wraps the model and takes a step on CPU."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
PRETRAIN = ["-m", "llama2", "pretrain", "--preset", "tiny", "--vocab-size", "512", "--max-seq-len", "32"]
PRETRAIN += ["--steps", "3", "--batch-size", "4", "--lr", "3e-3", "--backend", "torch", "--no-progress"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], timeout: float = 300) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


def _losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if "loss" in r]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="torchrun over loopback is tested on Linux")
def test_ddp_two_processes_equal_one_process(tmp_path):
    pytest.importorskip("torch.distributed.run")
    data = np.random.default_rng(0).integers(0, 512, size=(16, 33)).astype(np.int32)
    np.save(tmp_path / "rows.npy", data)
    common = ["--data", str(tmp_path / "rows.npy")]
    _run([sys.executable, *PRETRAIN, *common, "--out", str(tmp_path / "one")])
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2"]
    torchrun += ["--master-addr", "127.0.0.1", "--master-port", str(_free_port())]
    _run([*torchrun, *PRETRAIN, *common, "--out", str(tmp_path / "two")])
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(one) == len(two) == 3
    np.testing.assert_allclose(two, one, rtol=0, atol=1e-5)


def test_fsdp_wrap_and_one_step_on_cpu(tmp_path):
    """FSDP (gloo, one process) wraps each block, keeps canonical names, and steps exactly like the plain module."""
    torch = pytest.importorskip("torch")
    import torch.distributed as dist

    from llama2.core.backend import IGNORE_INDEX, OptimConfig, RuntimeOptions
    from llama2.core.config import ModelConfig
    from llama2.core.graph import build_graph
    from llama2.core.registry import BACKENDS

    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, hidden_dim=64, max_seq_len=16)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 64, size=(2, 12))
    labels = np.roll(ids, -1, axis=1)
    labels[:, -1] = IGNORE_INDEX
    backend = BACKENDS.get("torch")
    plain = backend.build(build_graph(cfg), RuntimeOptions())
    plain.init_weights(3)
    ref_state = plain.train_state(OptimConfig())
    ref_loss, n = ref_state.accumulate(ids, labels)
    ref_state.apply(1e-3, n)
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        try:
            sharded = backend.build(build_graph(cfg), RuntimeOptions(), fsdp=True)
        except (RuntimeError, NotImplementedError) as exc:  # documented in docs/backends.md
            pytest.skip(f"this torch build cannot run FSDP on CPU: {exc}")
        from torch.distributed.fsdp import FSDPModule

        assert sum(isinstance(m, FSDPModule) for m in sharded.net.modules()) == cfg.n_layers + 1  # blocks + root
        assert sorted(sharded.parameters_by_name()) == sorted(plain.parameters_by_name())
        sharded.init_weights(3)
        state = sharded.train_state(OptimConfig())
        loss, n2 = state.accumulate(ids, labels)
        state.apply(1e-3, n2)
        assert n2 == n and abs(loss - ref_loss) <= 1e-4
        for name, value in plain.state_dict():
            np.testing.assert_allclose(sharded.get_param(name), value, atol=1e-6, err_msg=name)
        assert torch.isfinite(torch.as_tensor(sharded.forward(ids))).all()
    finally:
        dist.destroy_process_group()
