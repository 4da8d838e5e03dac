"""Pretrain a Llama 2 model on packed token rows (`llama2 prepare wiki`), from flags or a YAML run file.

Examples:
  llama2 pretrain --preset tiny --data wiki256.mindrecord --out runs/wiki --steps 500 --batch-size 8 --lr 1e-3
  llama2 pretrain --config pretrain_llama2_7b --data wiki4096.mindrecord --out runs/7b
  llama2 pretrain --out runs/wiki --resume            # continue where the run stopped
  llama2 pretrain --out runs/wiki --resume --steps 1000   # ... and train longer

Flags given on the command line override the YAML file's values. --resume takes the model, data, backend and
training settings recorded in the run's newest checkpoint; flags given override them, except --batch-size,
--seq-length, --seed and other --data (they would change what the remaining steps read).
"""

from __future__ import annotations

import argparse
from typing import Any

COMMAND = "pretrain"
HELP = "pretrain from random init (or resume) on packed token rows"

_FLAGS = (
    ("steps", int),
    ("batch_size", int),
    ("micro_batch_size", int),
    ("seq_length", int),
    ("lr", float),
    ("min_lr", float),
    ("warmup_steps", int),
    ("weight_decay", float),
    ("grad_clip", float),
    ("seed", int),
    ("save_every", int),
    ("keep", int),
    ("log_every", int),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="YAML run file or packaged config name (pretrain_llama2_7b)")
    parser.add_argument("--preset", default=None, help="model preset (tiny, small, llama2-7b, ...)")
    parser.add_argument("--data", default=None, help="packed rows: .mindrecord, .npy or .npz")
    parser.add_argument("--out", "--out-dir", dest="out_dir", default=None, help="run directory")
    parser.add_argument("--tokenizer", default=None, help="tokenizer.model to store with the checkpoints")
    parser.add_argument("--backend", default=None, help="mindspore (default) or torch")
    parser.add_argument("--mode", default=None, choices=("graph", "eager"), help="graph (jit, default) or eager")
    parser.add_argument("--device", default=None, help="cpu (default), gpu/cuda or ascend")
    parser.add_argument("--dtype", default=None, help="float32 (default), float16 or bfloat16")
    parser.add_argument("--vocab-size", type=int, default=None, help="override the preset's vocab_size")
    parser.add_argument("--max-seq-len", type=int, default=None, help="override the preset's max_seq_len")
    for name, typ in _FLAGS:
        parser.add_argument(f"--{name.replace('_', '-')}", type=typ, default=None)
    parser.add_argument(
        "--recompute",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="recompute activations in backward: less memory, slower (default: parallel_config's recompute)",
    )
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    parser.add_argument("--no-progress", action="store_true")


def build_kwargs(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """(model config or preset, keyword arguments for llama2.pretrain) from the YAML file and the flags."""
    from llama2.core.train_config import load_run_config

    model: Any = None
    kwargs: dict[str, Any] = {}
    if args.config:
        rc = load_run_config(args.config)
        model = rc.model
        kwargs.update(rc.pretrain_kwargs())
        kwargs.pop("eval_data", None)
        kwargs.pop("load_checkpoint", None)
    if args.preset:
        model = args.preset
    overrides = {k: v for k, v in (("vocab_size", args.vocab_size), ("max_seq_len", args.max_seq_len)) if v}
    if overrides:
        from llama2.pretraining import resolve_model_config

        if model is None:
            raise ValueError("--vocab-size/--max-seq-len need --preset or --config")
        model = resolve_model_config(model, **overrides)
    for key in ("data", "out_dir", "tokenizer", "backend", "mode", "device", "dtype"):
        if getattr(args, key) is not None:
            kwargs[key] = getattr(args, key)
    for name, _ in _FLAGS:
        if getattr(args, name) is not None:
            kwargs[name] = getattr(args, name)
    if args.recompute is not None:  # the flag wins over the YAML file's parallel_config
        import attrs

        from llama2.core.train_config import ParallelConfig

        par = kwargs.get("parallel", ParallelConfig())  # a YAML file's parallel_config is a ParallelConfig
        kwargs["parallel"] = attrs.evolve(par, recompute=args.recompute)
    if args.resume:
        kwargs["resume"] = True
    if args.no_progress:
        kwargs["progress"] = False
    if "out_dir" not in kwargs:
        raise ValueError("pretrain needs --out (or out_dir: in the YAML file)")
    if "data" not in kwargs and not kwargs.get("resume"):
        raise ValueError("pretrain needs --data (or data: in the YAML file); --resume takes the run's")
    if model is None and not kwargs.get("resume"):
        raise ValueError("pretrain needs --preset or --config with a model section (or --resume)")
    return model, kwargs


def run(args: argparse.Namespace) -> int:
    from llama2.core.trainer import detect_rank_world
    from llama2.pretraining import pretrain

    model, kwargs = build_kwargs(args)
    pretrain(model, **kwargs)
    if detect_rank_world()[0] == 0:  # once per run, not once per torchrun/msrun process
        print(f"checkpoints and metrics.jsonl in {kwargs['out_dir']}; plot with: llama2 plot {kwargs['out_dir']}")
    return 0
