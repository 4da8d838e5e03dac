"""Training throughput (forward + backward + AdamW) on the `small` preset: llama2 backends against HF transformers.

    python benchmarks/bench_train.py [--preset small] [--batch 4] [--seq 256] [--steps 5] [--repeat 2]

Each configuration runs in its own process (so peak RSS is its own): MindSpore PyNative and graph (jit) mode,
the fused MindSpore step (grad + AdamW in one graph, as model-parallel runs compile it),
llama2's torch backend (eager), and HF `LlamaForCausalLM` + `torch.optim.AdamW` on the same CPU. The cases run
round-robin `--repeat` times, so that a change in the machine's load hits all of them alike. Prints a table of
tokens/s from the fastest step after the warm-up step (the least disturbed by other processes) and from the median
step, the ratio of the fastest to HF's, the first (compiling) step and peak RSS. Not a test: numbers depend on the
machine and on its load.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

CASES = [("mindspore", "eager"), ("mindspore", "graph"), ("mindspore", "fused"), ("torch", "eager"), ("hf", "eager")]


def _one(backend: str, mode: str, preset: str, batch: int, seq: int, steps: int) -> dict:
    import numpy as np

    from llama2.core.config import ModelConfig

    cfg = ModelConfig.from_preset(preset, max_seq_len=max(seq, 256))
    rng = np.random.default_rng(0)
    batches = [rng.integers(3, cfg.vocab_size, size=(batch, seq + 1)) for _ in range(steps + 1)]
    times = []
    if backend == "hf":
        import torch
        import transformers

        torch.manual_seed(0)
        hf_cfg = transformers.LlamaConfig(**{k: v for k, v in cfg.to_hf().items() if k != "architectures"})
        model = transformers.LlamaForCausalLM(hf_cfg).float().train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
        for b in batches:
            t = time.perf_counter()
            ids = torch.from_numpy(b)
            loss = model(input_ids=ids[:, :-1], labels=ids[:, :-1].clone()).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t)
    else:
        from llama2.core.backend import OptimConfig
        from llama2.core.model import build_runtime

        rt = build_runtime(cfg, backend, mode="graph" if mode == "fused" else mode)
        rt.init_weights(0)
        if mode == "fused":  # one graph per update (the semi-auto parallel step), without sharding
            from llama2.core.parallel import derive_strategy
            from llama2.core.train_config import ParallelConfig

            state = rt.train_state(OptimConfig(), strategy=derive_strategy(cfg, ParallelConfig()))
        else:
            state = rt.train_state(OptimConfig())
        for b in batches:
            t = time.perf_counter()
            ids, labels = b[:, :-1].astype(np.int32), b[:, 1:].astype(np.int32)
            if mode == "fused":
                state.step_batch(ids, labels, 1e-4, int(labels.size))
            else:
                _, n = state.accumulate(ids, labels)
                state.apply(1e-4, n)
            times.append(time.perf_counter() - t)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"times": times, "rss_mb": rss_mb}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=1, help="rounds over all cases (best and median over all)")
    ap.add_argument("--case", default=None, help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = ap.parse_args()
    if args.case:
        backend, mode = args.case.split(":")
        print(json.dumps(_one(backend, mode, args.preset, args.batch, args.seq, args.steps)))
        return
    runs: dict[tuple[str, str], list[dict]] = {}
    for _ in range(args.repeat):
        for backend, mode in CASES:
            cmd = [sys.executable, __file__, "--case", f"{backend}:{mode}", "--preset", args.preset]
            cmd += ["--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps)]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                print(f"{backend}/{mode} failed: {res.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
                continue
            runs.setdefault((backend, mode), []).append(json.loads(res.stdout.strip().splitlines()[-1]))
    tokens = args.batch * args.seq
    rows = {}
    for key, rs in runs.items():
        steps = [t for r in rs for t in r["times"][1:]]
        rows[key] = {
            "best": tokens / min(steps),
            "median": tokens / statistics.median(steps),
            "first": statistics.median(r["times"][0] for r in rs),
            "rss_mb": max(r["rss_mb"] for r in rs),
        }
    hf = rows.get(("hf", "eager"), {}).get("best")
    print(
        f"\ntrain step (fwd+bwd+AdamW), preset {args.preset}, batch {args.batch} x seq {args.seq}, "
        f"{args.steps} steps x {args.repeat} round(s)"
    )
    head = ("configuration".ljust(26), "tokens/s best", "tokens/s median", "vs HF (best)", "1st step s")
    print("| " + " | ".join(head) + " | peak RSS MB |")
    print("|" + "|".join("-" * (len(h) + 2) for h in head) + "|-------------|")
    names = {
        "mindspore:eager": "llama2 MindSpore PyNative",
        "mindspore:graph": "llama2 MindSpore graph",
        "mindspore:fused": "llama2 MindSpore fused",
        "torch:eager": "llama2 torch (eager)",
        "hf:eager": "HF LlamaForCausalLM+AdamW",
    }
    for (backend, mode), r in rows.items():
        ratio = f"{r['best'] / hf:.2f}" if hf else "-"
        print(
            f"| {names[f'{backend}:{mode}']:<26} | {r['best']:>13.0f} | {r['median']:>15.0f} | {ratio:>12} | "
            f"{r['first']:>10.2f} | {r['rss_mb']:>11.0f} |"
        )


if __name__ == "__main__":
    main()
