"""Plot a training run's loss curve (and learning rate) from OUT_DIR/metrics.jsonl into OUT_DIR/loss.png.

Example:
  llama2 plot runs/wiki --output loss.png
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from llama2.core.atomic import atomic_file

COMMAND = "plot"
HELP = "write loss.png from a run's metrics.jsonl"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="training run directory (holds metrics.jsonl)")
    parser.add_argument("--output", default=None, help="image path (default RUN_DIR/loss.png)")


def read_metrics(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of RUN_DIR/metrics.jsonl (a line cut by a crash is skipped)."""
    from llama2.core.trainer import METRICS_FILE

    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; is {run_dir} a training run directory?")
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "step" in rec and "loss" in rec:
                out.append(rec)
    if not out:
        raise ValueError(f"{path}: holds no step with a loss")
    return out


def plot_run(run_dir: str | os.PathLike[str], output: str | os.PathLike[str] | None = None) -> Path:
    """Write the loss (and lr) curve of a run to `output` (default RUN_DIR/loss.png), atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = read_metrics(run_dir)
    out = Path(output) if output is not None else Path(run_dir) / "loss.png"
    steps = [r["step"] for r in recs]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, [r["loss"] for r in recs], color="tab:blue", lw=1.2, label="train loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)", color="tab:blue")
    ax.grid(alpha=0.3)
    if all("lr" in r for r in recs):
        ax2 = ax.twinx()
        ax2.plot(steps, [r["lr"] for r in recs], color="tab:orange", lw=0.8, alpha=0.7)
        ax2.set_ylabel("learning rate", color="tab:orange")
    ax.set_title(f"{Path(run_dir).name}: final loss {recs[-1]['loss']:.3f} at step {steps[-1]}")
    fig.tight_layout()
    # The temporary name hides the suffix, so name the format as matplotlib would infer it from `out`.
    fmt = out.suffix[1:] or matplotlib.rcParams["savefig.format"]
    try:
        with atomic_file(out) as tmp:
            fig.savefig(tmp, format=fmt)
    finally:
        plt.close(fig)
    return out


def run(args: argparse.Namespace) -> int:
    print(plot_run(args.run_dir, args.output))
    return 0
