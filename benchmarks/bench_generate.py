"""Prefill and decode throughput on the `small` preset: llama2 backends against HF transformers, same weights.

    python benchmarks/bench_generate.py [--prompt-len 128] [--new-tokens 32] [--batches 1 8] [--modes graph eager]

Prints a table (tokens/s) and ratios llama2 / HF. Both sides are timed the same way, inside their own generate
loop (greedy, EOS off, `new` tokens), with a timestamp per decoding step: HF through a `streamer` (called with the
prompt, then once per new token), llama2 through `core.generation.iter_generate` (one yield per step). Prefill =
batch x prompt tokens / time to the first new token (best of `--repeat` runs); decode = batch / median time between
consecutive steps (over all runs). Best and median rather than means because other processes on a shared machine
only ever add time. A warm-up run first pays MindSpore's one-time `jit` compilation. Not a test: numbers depend on
the machine.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def _hf_model(cfg, seed: int):
    import torch
    import transformers

    torch.manual_seed(seed)
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in cfg.to_hf().items() if k not in ("architectures",)})
    return transformers.LlamaForCausalLM(hf_cfg).float().eval()


class _Stamps:
    """A transformers streamer that only records when each step's tokens arrive."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _rates(run, b: int, prompt_len: int, repeat: int) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s); `run()` returns (start time, [time of each new token])."""
    run()  # warm-up (compilation)
    first, gaps = [], []
    for _ in range(repeat):
        t0, stamps = run()
        first.append(stamps[0] - t0)
        gaps.extend(np.diff(stamps).tolist())
    return b * prompt_len / min(first), b / float(np.median(gaps))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--backends", nargs="+", default=["mindspore", "torch"])
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per measurement (best is kept)")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (HF and llama2/torch) and MindSpore (default: their own defaults)",
    )
    ap.add_argument("--modes", nargs="+", default=["graph"], choices=["graph", "eager"], help="llama2 run modes")
    args = ap.parse_args()

    import torch

    import llama2
    from llama2.core.config import ModelConfig
    from llama2.core.generation import GenerationConfig, iter_generate
    from llama2.core.registry import BACKENDS

    if args.threads:
        torch.set_num_threads(args.threads)
        if "mindspore" in args.backends:
            import mindspore

            mindspore.set_context(runtime_num_threads=args.threads)
    cfg = ModelConfig.from_preset(args.preset)
    hf = _hf_model(cfg, 0)
    tmp = Path(tempfile.mkdtemp())
    hf.save_pretrained(tmp, safe_serialization=True)
    rng = np.random.default_rng(0)
    rows = []
    for b in args.batches:
        ids = rng.integers(3, cfg.vocab_size, size=(b, args.prompt_len))
        prompts = ids.tolist()
        n = args.new_tokens

        def hf_run() -> tuple[float, list[float]]:
            stamps = _Stamps()
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = hf.generate(
                    torch.from_numpy(ids),
                    max_new_tokens=n,
                    min_new_tokens=n,
                    do_sample=False,
                    pad_token_id=0,
                    streamer=stamps,
                )
            assert out.shape == (b, args.prompt_len + n) and len(stamps.times) == n + 1
            return t0, stamps.times[1:]  # the first put is the prompt itself

        result = {"hf": _rates(hf_run, b, args.prompt_len, args.repeat)}
        for name in args.backends:
            if name not in BACKENDS:
                continue
            for mode in args.modes:
                model = llama2.load(tmp, backend=name, mode=mode)
                gen_cfg = GenerationConfig(max_new_tokens=n)

                def run() -> tuple[float, list[float]]:
                    t0 = time.perf_counter()
                    stamps = [time.perf_counter() for _ in iter_generate(model.runtime, prompts, gen_cfg)]
                    assert len(stamps) == n
                    return t0, stamps

                result[f"{name}/{mode}"] = _rates(run, b, args.prompt_len, args.repeat)
        for k, (pre, dec) in result.items():
            hp, hd = result["hf"]
            rows.append((b, k, pre, dec, pre / hp, dec / hd))
    print(
        f"\npreset={args.preset} prompt={args.prompt_len} new={args.new_tokens} repeat={args.repeat} "
        f"torch threads={torch.get_num_threads()} date={time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )
    print(f"{'batch':>5} {'impl':<16} {'prefill tok/s':>14} {'decode tok/s':>13} {'prefill/HF':>10} {'decode/HF':>10}")
    for b, k, pre, dec, rp, rd in rows:
        print(f"{b:>5} {k:<16} {pre:>14.0f} {dec:>13.1f} {rp:>10.2f} {rd:>10.2f}")


if __name__ == "__main__":
    main()
