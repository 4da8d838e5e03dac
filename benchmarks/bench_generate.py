"""Prefill and decode throughput on the `small` preset: llama2 backends against HF transformers, same weights.

    python benchmarks/bench_generate.py [--prompt-len 128] [--new-tokens 32] [--batches 1 8] [--modes graph eager]

Prints a table (tokens/s) and ratios llama2 / HF. Prefill = one forward over the prompt (best of 3); decode =
(generate time - prefill time) / new tokens, for HF `generate` (greedy) and llama2 `generate_ids` alike, after a
warm-up call that pays MindSpore's one-time `jit` compilation. Not a test: numbers depend on the machine.
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


def _time(fn, repeat: int = 3) -> float:
    fn()  # warm-up (compilation)
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--backends", nargs="+", default=["mindspore", "torch"])
    ap.add_argument("--modes", nargs="+", default=["graph"], choices=["graph", "eager"], help="llama2 run modes")
    args = ap.parse_args()

    import torch

    import llama2
    from llama2.core.config import ModelConfig
    from llama2.core.registry import BACKENDS

    torch.set_num_threads(torch.get_num_threads())
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

        def hf_prefill():
            with torch.inference_mode():
                hf(torch.from_numpy(ids))

        def hf_generate():
            with torch.inference_mode():
                hf.generate(torch.from_numpy(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

        t_pre = _time(hf_prefill)
        t_gen = _time(hf_generate, repeat=2)
        result = {"hf": (b * args.prompt_len / t_pre, b * n / max(t_gen - t_pre, 1e-9))}
        for name in args.backends:
            if name not in BACKENDS:
                continue
            for mode in args.modes:
                model = llama2.load(tmp, backend=name, mode=mode)
                rt = model.runtime

                def prefill():
                    cache = rt.new_cache(b, args.prompt_len)
                    rt.decode(
                        cache,
                        ids.astype(np.int32),
                        np.tile(np.arange(args.prompt_len, dtype=np.int32), (b, 1)),
                        np.ones((b, args.prompt_len), np.int32),
                        0,
                    )

                def gen():
                    model.generate_ids(prompts, max_new_tokens=n, eos_id=None)

                tp = _time(prefill)
                tg = _time(gen, repeat=2)
                result[f"{name}/{mode}"] = (b * args.prompt_len / tp, b * n / max(tg - tp, 1e-9))
        for k, (pre, dec) in result.items():
            hp, hd = result["hf"]
            rows.append((b, k, pre, dec, pre / hp, dec / hd))
    print(f"\npreset={args.preset} prompt={args.prompt_len} new={args.new_tokens} threads={torch.get_num_threads()}")
    print(f"{'batch':>5} {'impl':<16} {'prefill tok/s':>14} {'decode tok/s':>13} {'prefill/HF':>10} {'decode/HF':>10}")
    for b, k, pre, dec, rp, rd in rows:
        print(f"{b:>5} {k:<16} {pre:>14.0f} {dec:>13.1f} {rp:>10.2f} {rd:>10.2f}")


if __name__ == "__main__":
    main()
