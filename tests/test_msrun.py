"""Data parallel under msrun on CPU: 2 workers == 1 process with the same global batch (pretrain, LoRA finetune);
`llama2 launch`. Each msrun test takes ~30 s on 2 busy cores (the single-process oracle runs meanwhile)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llama2.cli import main
from llama2.commands.launch import msrun_command

REPO = Path(__file__).resolve().parents[1]
TRAIN = dict(steps=3, batch_size=4, seq_length=16, lr=1e-3, save_every=3, grad_clip=0.5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _launch_args(**kw) -> argparse.Namespace:
    base = dict(nproc=2, nnodes=1, node_rank=None, master_addr=None, master_port=None, log_dir="logs")
    base.update(cluster_time_out=60, dry_run=True, rest=["--", "pretrain", "--preset", "tiny"])
    base.update(kw)
    return argparse.Namespace(**base)


def test_launch_builds_msrun_command() -> None:
    cmd = msrun_command(_launch_args(master_port=12345), env={})
    assert Path(cmd[0]).name == "msrun"
    opts = dict(zip(cmd[1:-6:2], cmd[2:-6:2]))
    assert opts["--worker_num"] == "2" and opts["--local_worker_num"] == "2" and opts["--join"] == "True"
    assert opts["--master_addr"] == "127.0.0.1" and opts["--master_port"] == "12345" and opts["--node_rank"] == "0"
    assert cmd[-6] in ("python", "python3") and cmd[-5:] == ["-m", "llama2", "pretrain", "--preset", "tiny"]
    multi = msrun_command(_launch_args(nproc=8, nnodes=2), env={"MASTER_ADDR": "10.0.0.1", "NODE_RANK": "1"})
    opts = dict(zip(multi[1:-6:2], multi[2:-6:2]))
    assert (opts["--worker_num"], opts["--local_worker_num"], opts["--node_rank"]) == ("16", "8", "1")
    assert opts["--master_addr"] == "10.0.0.1" and opts["--master_port"] == "8118"
    with pytest.raises(ValueError, match="node-rank 2 must be in"):
        msrun_command(_launch_args(nnodes=2, node_rank=2), env={})
    with pytest.raises(ValueError, match="needs the command"):
        msrun_command(_launch_args(rest=[]), env={})


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _start_msrun(tmp_path: Path, cli: list[str], tag: str) -> tuple[subprocess.Popen, Path]:
    """Start `llama2 launch --nproc 2 -- CLI` (msrun, 2 CPU workers over loopback) in tmp_path."""
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    env["PYTHONPATH"] = str(REPO)
    for k in ("RANK", "WORLD_SIZE", "RANK_ID", "RANK_SIZE", "MS_ROLE", "DEVICE_ID"):
        env.pop(k, None)
    log_dir = tmp_path / f"logs_{tag}"
    cmd = [sys.executable, "-m", "llama2", "launch", "--nproc", "2", "--master-port", str(_free_port())]
    cmd += ["--log-dir", str(log_dir), "--cluster-time-out", "120", "--", *cli]
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, start_new_session=True, stdout=subprocess.PIPE, text=True)
    return proc, log_dir


def _wait_msrun(proc: subprocess.Popen, log_dir: Path) -> None:
    """Wait for a `_start_msrun` run (killing its process group on timeout); fail with its logs."""
    try:
        out, _ = proc.communicate(timeout=420)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # msrun, its scheduler and workers share this session
            proc.wait()
    logs = "".join(p.read_text(errors="replace")[-3000:] for p in sorted(log_dir.glob("*.log")))
    assert proc.returncode == 0, f"msrun failed:\n{(out or '')[-3000:]}\n{logs}"


def test_two_msrun_workers_match_one_process(tmp_path: Path) -> None:
    """The issue's main test, in graph (jit) mode, the default: 2 msrun workers == 1 process; merge and load."""
    pytest.importorskip("mindspore")
    import llama2
    from llama2.core import dist_checkpoint as dc
    from llama2.core import run_dir as rd

    data = np.random.default_rng(0).integers(3, 4096, size=(16, TRAIN["seq_length"] + 1)).astype(np.int32)
    np.save(tmp_path / "d.npy", data)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TRAIN.items()]
    cli = ["pretrain", "--preset", "tiny", "--data", str(tmp_path / "d.npy"), "--no-progress", "--mode", "graph"]
    run = _start_msrun(tmp_path, [*cli, *flags, "--out", str(tmp_path / "dp")], "pretrain")
    try:  # the single-process oracle runs while msrun starts up
        one = llama2.pretrain("tiny", data=data, out_dir=tmp_path / "one", progress=False, mode="graph", **TRAIN)
    finally:
        _wait_msrun(*run)
    m2, m1 = _metrics(tmp_path / "dp"), _metrics(tmp_path / "one")
    assert [r["step"] for r in m2] == [1, 2, 3]
    np.testing.assert_allclose([r["loss"] for r in m2], [r["loss"] for r in m1], rtol=0, atol=1e-5)
    np.testing.assert_allclose([r["grad_norm"] for r in m2], [r["grad_norm"] for r in m1], rtol=1e-4)
    assert all(r["tokens"] == 4 * TRAIN["seq_length"] for r in m2)  # global token count logged by rank 0

    # rank 0's checkpoint equals the single-process weights; the one saved replica (rank_0) merges and loads
    ck = rd.latest_checkpoint(tmp_path / "dp")
    dp_weights = dict(rd.read_model_tensors(ck))
    for name, value in dp_weights.items():
        np.testing.assert_allclose(value, one.runtime.get_param(name), rtol=0, atol=1e-5, err_msg=name)
    assert main(["merge", "--input", str(tmp_path / "dp"), "--output", str(tmp_path / "merged")]) == 0
    assert sorted(p.name for p in dc.find_distributed(tmp_path / "dp").iterdir()) == ["rank_0"]  # no 2nd copy
    model = llama2.load(tmp_path / "merged", mode="eager")
    for name, value in dp_weights.items():
        assert model.runtime.get_param(name).tobytes() == value.tobytes(), name
    ids = data[:2, :8]
    np.testing.assert_allclose(model.forward(ids), one.forward(ids), rtol=0, atol=1e-4)


def test_two_msrun_workers_finetune_lora_match_one_process(tmp_path: Path) -> None:
    """`llama2 finetune --method lora` under msrun: masked labels give each rank a different token count."""
    pytest.importorskip("mindspore")
    from safetensors.numpy import load_file

    import llama2
    from llama2.core import dist_checkpoint as dc
    from llama2.core.model import create
    from llama2.peft.io import WEIGHTS_NAME

    create("tiny", seed=3, mode="eager").save(tmp_path / "base")
    rng = np.random.default_rng(1)
    ids = rng.integers(3, 4096, size=(8, 17)).astype(np.int32)
    labels = ids.copy()
    for i, n_prompt in enumerate(rng.integers(1, 14, size=8)):
        labels[i, :n_prompt] = -100
    np.savez(tmp_path / "sft.npz", input_ids=ids, labels=labels)
    kw = dict(method="lora", steps=2, batch_size=4, lr=1e-3, save_every=2, grad_clip=1.0)
    cli = ["finetune", "--model", str(tmp_path / "base"), "--data", str(tmp_path / "sft.npz"), "--no-progress"]
    cli += ["--method", "lora", "--steps", "2", "--batch-size", "4", "--lr", "1e-3", "--save-every", "2"]
    run = _start_msrun(tmp_path, [*cli, "--out", str(tmp_path / "dp")], "finetune")
    try:
        llama2.finetune(tmp_path / "base", data=tmp_path / "sft.npz", out_dir=tmp_path / "one", progress=False, **kw)
    finally:
        _wait_msrun(*run)
    m2, m1 = _metrics(tmp_path / "dp"), _metrics(tmp_path / "one")
    assert [r["step"] for r in m2] == [1, 2]
    np.testing.assert_allclose([r["loss"] for r in m2], [r["loss"] for r in m1], rtol=0, atol=1e-5)
    assert [r["tokens"] for r in m2] == [r["tokens"] for r in m1]
    a2 = load_file(str(tmp_path / "dp" / "adapter" / WEIGHTS_NAME))
    a1 = load_file(str(tmp_path / "one" / "adapter" / WEIGHTS_NAME))
    assert sorted(a2) == sorted(a1) and a2
    for name in a1:
        np.testing.assert_allclose(a2[name], a1[name], rtol=0, atol=1e-5, err_msg=name)
    merged = dict(dc.merged_tensors(tmp_path / "dp"))  # rank_0's part: the adapter only
    assert sorted(merged) == sorted(a2)
    assert sorted(p.name for p in dc.find_distributed(tmp_path / "dp").iterdir()) == ["rank_0"]
