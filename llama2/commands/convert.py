"""Convert a checkpoint between formats (hf, meta, mindspore, llama2c; gguf read only), one tensor at a time.

The output format defaults from the output path: *.ckpt -> mindspore, *.bin -> llama2c, otherwise hf.
The tokenizer.model beside the input (or --tokenizer) is copied next to the output weights when the output is a
folder. A GGUF file's embedded vocabulary is not written as tokenizer.model: pass --tokenizer with the original
tokenizer.model (a note says so when none is found).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

COMMAND = "convert"
HELP = "convert weights between HF, Meta, MindSpore (MindFormers), llama2.c and GGUF (read) formats"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from llama2.core.formats import FORMATS, WRITABLE

    p.add_argument("--input", required=True, help="checkpoint file or folder")
    p.add_argument("--output", required=True, help="output file or folder")
    p.add_argument("--from", dest="src_format", choices=FORMATS, help="input format (default: detected)")
    p.add_argument("--to", dest="dst_format", choices=WRITABLE, help="output format (default: from --output)")
    p.add_argument("--max-shard-size", help="hf: split safetensors into shards of at most this size, e.g. 2GB")
    p.add_argument("--model-parallel", type=int, default=1, help="meta: number of consolidated.NN.pth shards")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="stored dtype (default: as read)")
    p.add_argument("--tokenizer", help="tokenizer.model to write beside the output (default: the one beside the input)")
    p.add_argument("--force", action="store_true", help="replace an existing output")


def default_format(output: Path) -> str:
    if output.suffix == ".ckpt":
        return "mindspore"
    if output.suffix == ".bin":
        return "llama2c"
    return "hf"


def run(args: argparse.Namespace) -> int:
    from llama2.core.formats import convert, detect_format

    src, dst = Path(args.input), Path(args.output)
    src_format = args.src_format or detect_format(src)
    dst_format = args.dst_format or default_format(dst)
    options: dict = {"overwrite": args.force}
    if args.max_shard_size:
        if dst_format != "hf":
            raise ValueError("--max-shard-size applies to --to hf only")
        options["max_shard_size"] = args.max_shard_size
    if args.model_parallel != 1:
        if dst_format != "meta":
            raise ValueError("--model-parallel applies to --to meta only")
        options["model_parallel"] = args.model_parallel
    if args.dtype:
        if dst_format == "llama2c":
            raise ValueError("llama2.c files are always float32; drop --dtype")
        options["dtype"] = args.dtype
    if args.tokenizer:
        if dst_format == "llama2c":
            raise ValueError("llama2.c files hold no tokenizer; drop --tokenizer (llama2.c uses its own tokenizer.bin)")
        if not Path(args.tokenizer).is_file():
            raise FileNotFoundError(f"--tokenizer {args.tokenizer}: no such file")
        options["tokenizer_path"] = Path(args.tokenizer)
    elif src_format == "gguf" and dst_format != "llama2c" and not (src.parent / "tokenizer.model").is_file():
        print(
            f"llama2 convert: note: {src.name}'s embedded GGUF vocabulary is not written as tokenizer.model; pass "
            "--tokenizer PATH (the original tokenizer.model) or copy it beside the output",
            file=sys.stderr,
        )
    out = convert(src, dst, src_format=src_format, dst_format=dst_format, **options)
    print(f"converted {src} ({src_format}) -> {out} ({dst_format})")
    return 0
