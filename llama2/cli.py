"""The `llama2` command line. Each subcommand lives in `llama2/commands/<name>.py` and calls the public API.

A command module defines `add_arguments(parser)` and `run(args) -> int`, and either `COMMAND = "name"` (a top
level subcommand) or `PREPARE = "name"` (a `llama2 prepare <name>` data step), plus `HELP = "one line"`.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Sequence

import llama2.commands as commands_pkg


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llama2", description="Llama 2 on MindSpore and PyTorch.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    prepare = sub.add_parser("prepare", help="prepare datasets (wiki, alpaca, sft, squad)")
    prepare_sub = prepare.add_subparsers(dest="prepare_kind", metavar="KIND")
    prepare.set_defaults(func=lambda args: (prepare.print_help(), 2)[1])
    for info in sorted(pkgutil.iter_modules(commands_pkg.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{commands_pkg.__name__}.{info.name}")
        if hasattr(module, "COMMAND"):
            p = sub.add_parser(module.COMMAND, help=getattr(module, "HELP", None), description=module.__doc__)
        elif hasattr(module, "PREPARE"):
            p = prepare_sub.add_parser(module.PREPARE, help=getattr(module, "HELP", None), description=module.__doc__)
        else:
            continue
        module.add_arguments(p)
        p.set_defaults(func=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"llama2 {args.command}: error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
