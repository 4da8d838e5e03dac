"""Generate continuations of prompts with a checkpoint."""

from __future__ import annotations

import argparse
import json
import sys

COMMAND = "generate"
HELP = "generate text from a checkpoint"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint path (HF dir, run dir, .ckpt, .bin, .gguf, Meta dir)")
    p.add_argument("--tokenizer", help="tokenizer.model (default: the one beside the weights)")
    p.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for a batch")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--stop", action="append", default=[], help="stop string; repeatable")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--backend", default="mindspore")
    p.add_argument("--device", default="cpu")
    p.add_argument("--mode", default="graph", choices=["graph", "eager"])
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"], help="default float32")
    p.add_argument("--stream", action="store_true", help="print text as it is generated (single prompt)")
    p.add_argument("--json", action="store_true", help="print a JSON list of {prompt, completion}")


def run(args: argparse.Namespace) -> int:
    from llama2.api import load

    runtime_options = {"device": args.device, "mode": args.mode}
    if args.dtype is not None:
        runtime_options["dtype"] = args.dtype
    model = load(args.model, backend=args.backend, tokenizer=args.tokenizer, **runtime_options)
    options = dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        stop=tuple(args.stop),
        seed=args.seed,
    )
    if args.stream and not args.json:
        for prompt in args.prompt:
            sys.stdout.write(prompt)
            for piece in model.stream(prompt, **options):
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
        return 0
    outs = model.generate(args.prompt, batch_size=args.batch_size, **options)
    if args.json:
        print(json.dumps([{"prompt": p, "completion": c} for p, c in zip(args.prompt, outs)], ensure_ascii=False))
    else:
        for p, c in zip(args.prompt, outs):
            print(p + c)
    return 0
