"""Start a `llama2` command on N processes per node with MindSpore's msrun (data parallel on CPU/GPU/Ascend).

Examples:
  llama2 launch --nproc 8 -- pretrain --config pretrain_llama2_7b --data wiki4096.mindrecord --out runs/7b
  # two nodes x 8 devices (run on each node; MASTER_ADDR / NODE_RANK may also come from the environment):
  llama2 launch --nproc 8 --nnodes 2 --node-rank 0 --master-addr 10.0.0.1 -- pretrain ...
  llama2 launch --nproc 2 --dry-run -- pretrain ...     # print the msrun command only

It runs `msrun --worker_num NNODES*NPROC --local_worker_num NPROC --master_addr A --master_port P --node_rank R
--log_dir DIR --join True python -m llama2 COMMAND ...` with this interpreter's folder first on PATH (msrun starts
every worker with that command). Worker logs: DIR/worker_<rank>.log, scheduler: DIR/scheduler.log.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

COMMAND = "launch"
HELP = "run a llama2 command on several processes / nodes with msrun (data parallel)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nproc", type=int, required=True, help="processes (devices) on this node")
    p.add_argument("--nnodes", type=int, default=1, help="number of nodes (default 1)")
    p.add_argument("--node-rank", type=int, default=None, help="this node's index (default: $NODE_RANK or 0)")
    p.add_argument("--master-addr", default=None, help="scheduler host (default: $MASTER_ADDR or 127.0.0.1)")
    p.add_argument("--master-port", type=int, default=None, help="scheduler port (default: $MASTER_PORT or 8118)")
    p.add_argument("--log-dir", default="msrun_log", help="worker logs go here (default msrun_log)")
    p.add_argument("--cluster-time-out", type=int, default=600, help="seconds to wait for every worker to join")
    p.add_argument("--dry-run", action="store_true", help="print the msrun command and exit")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...] (e.g. -- pretrain --preset tiny ...)")


def msrun_command(args: argparse.Namespace, env: dict[str, str] | None = None) -> list[str]:
    """The msrun argv for `args` (environment defaults: MASTER_ADDR, MASTER_PORT, NODE_RANK)."""
    env = dict(os.environ if env is None else env)
    rest = list(args.rest)
    if rest and rest[0] == "--":
        rest = rest[1:]
    if not rest:
        raise ValueError("launch needs the command to run after --, e.g. llama2 launch --nproc 2 -- pretrain ...")
    if args.nproc < 1 or args.nnodes < 1:
        raise ValueError(f"--nproc and --nnodes must be >= 1, got {args.nproc} and {args.nnodes}")
    node_rank = args.node_rank if args.node_rank is not None else int(env.get("NODE_RANK", "0"))
    if not 0 <= node_rank < args.nnodes:
        raise ValueError(f"--node-rank {node_rank} must be in [0, {args.nnodes})")
    addr = args.master_addr or env.get("MASTER_ADDR", "127.0.0.1")
    port = args.master_port or int(env.get("MASTER_PORT", "8118"))
    bin_dir = Path(sys.executable).parent
    msrun = shutil.which("msrun", path=str(bin_dir)) or shutil.which("msrun") or "msrun"
    # msrun runs `python <script> ARGS`, or the command as given when it starts with python/python3 (found on PATH,
    # where `run` puts this interpreter's folder first). `-m llama2` rather than llama2/__main__.py as the script:
    # a script puts its own folder (the package) first on sys.path, where llama2/data, llama2/metrics, ... would
    # shadow top-level modules of the same names.
    python = "python" if (bin_dir / "python").exists() or not (bin_dir / "python3").exists() else "python3"
    return [
        msrun,
        "--worker_num", str(args.nproc * args.nnodes),
        "--local_worker_num", str(args.nproc),
        "--master_addr", addr,
        "--master_port", str(port),
        "--node_rank", str(node_rank),
        "--log_dir", str(args.log_dir),
        "--cluster_time_out", str(args.cluster_time_out),
        "--join", "True",
        python, "-m", "llama2",
        *rest,
    ]  # fmt: skip


def run(args: argparse.Namespace) -> int:
    cmd = msrun_command(args)
    print(" ".join(shlex.quote(c) for c in cmd), flush=True)
    if args.dry_run:
        return 0
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    rc = subprocess.call(cmd, env=env)
    if rc:
        print(f"llama2 launch: msrun exited with {rc}; see {args.log_dir}/worker_*.log", file=sys.stderr)
    return rc
