"""Peak memory of `llama2.core.formats.convert` on a generated random model of a few hundred MB.

    python benchmarks/bench_convert_memory.py [--workdir DIR] [--dim 1024] [--layers 8] [--vocab 32000]

Writes a random fp32 HF checkpoint (itself streamed, one tensor at a time), then runs each conversion in a fresh
process that first imports everything it needs (torch included), records its resident set size (VmRSS) as the
baseline, and samples VmRSS and RssAnon (anonymous memory: what the process really allocated, excluding
file-backed pages that the kernel can drop) every 2 ms during the conversion. Prints one row per conversion:
model size, largest tensor, peak VmHWM - baseline, peak RssAnon - baseline. Not a test: numbers depend on the
machine; docs/formats.md records a run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

MB = 1024 * 1024


def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    return out


def child(src: str, dst: str, dst_format: str, options: str) -> None:
    """Run one conversion and print a JSON line with the memory figures."""
    import numpy  # noqa: F401
    import torch  # noqa: F401  (Meta reading/writing needs it: import before the baseline)

    from llama2.core.formats import convert

    base = _status()
    peak = {"VmRSS": base["VmRSS"], "RssAnon": base["RssAnon"]}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            s = _status()
            for k in peak:
                peak[k] = max(peak[k], s[k])
            time.sleep(0.002)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    start = time.perf_counter()
    convert(src, dst, dst_format=dst_format, **json.loads(options))
    seconds = time.perf_counter() - start
    done.set()
    t.join()
    end = _status()
    print(
        json.dumps(
            {
                "baseline_rss": base["VmRSS"],
                "peak_rss_over_baseline": max(end["VmHWM"], peak["VmRSS"]) - base["VmRSS"],
                "peak_anon_over_baseline": peak["RssAnon"] - base["RssAnon"],
                "seconds": seconds,
            }
        )
    )


def _random_hf(path: Path, cfg) -> tuple[int, int]:
    """Stream random fp32 tensors into an HF checkpoint; returns (total bytes, largest tensor bytes)."""
    import numpy as np

    from llama2.core.formats import save_checkpoint
    from llama2.core.formats.base import canonical_shapes

    shapes = canonical_shapes(cfg)
    rng = np.random.default_rng(0)

    def tensors():
        for name, shape in shapes.items():
            yield name, (rng.standard_normal(shape, dtype=np.float32) * 0.02)

    save_checkpoint(path, "hf", cfg, tensors())
    sizes = [4 * int(np.prod(s)) for s in shapes.values()]
    return sum(sizes), max(sizes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one, removed after)")
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=2816)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--child", nargs=4, metavar=("SRC", "DST", "FMT", "OPTIONS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return

    from llama2.core.config import ModelConfig

    cfg = ModelConfig(
        dim=args.dim,
        n_layers=args.layers,
        n_heads=args.heads,
        n_kv_heads=args.kv_heads,
        hidden_dim=args.hidden,
        vocab_size=args.vocab,
        max_seq_len=2048,
    )
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_convert_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        hf = work / "hf"
        if hf.exists():
            shutil.rmtree(hf)
        total, largest = _random_hf(hf, cfg)
        size = f"{total / MB:.0f} MiB fp32, largest tensor {largest / MB:.0f} MiB"
        print(f"model: {cfg.num_parameters():,} parameters, {size}")
        jobs = [
            ("hf -> meta (MP=2)", hf, work / "meta", "meta", {"model_parallel": 2}),
            ("meta (MP=2) -> hf", work / "meta", work / "hf2", "hf", {}),
            ("hf -> mindspore", hf, work / "m.ckpt", "mindspore", {}),
            ("mindspore -> hf (100MB shards)", work / "m.ckpt", work / "hf3", "hf", {"max_shard_size": "100MB"}),
            ("hf -> llama2c", hf, work / "m.bin", "llama2c", {}),
            ("llama2c -> hf", work / "m.bin", work / "hf4", "hf", {}),
        ]
        print(f"{'conversion':34s} {'peak RSS - base':>16s} {'peak anon - base':>17s} {'seconds':>8s}")
        for label, src, dst, fmt, opts in jobs:
            out = subprocess.run(
                [sys.executable, __file__, "--child", str(src), str(dst), fmt, json.dumps(opts)],
                check=True,
                capture_output=True,
                text=True,
                env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
            )
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(
                f"{label:34s} {r['peak_rss_over_baseline'] / MB:13.0f} MiB {r['peak_anon_over_baseline'] / MB:14.0f} "
                f"MiB {r['seconds']:8.1f}"
            )
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
