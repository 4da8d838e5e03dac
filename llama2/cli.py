"""The `llama2` command line. Each subcommand lives in `llama2/commands/<name>.py` and calls the public API.

A command module defines `add_arguments(parser)` and `run(args) -> int`, and either `COMMAND = "name"` (a top
level subcommand) or `PREPARE = "name"` (a `llama2 prepare <name>` data step), plus `HELP = "one line"`.

User errors (bad options, missing or existing files, unknown names, an unusable device) print one line
`llama2 COMMAND: error: MESSAGE` on stderr and exit with status 2; `--debug` or LLAMA2_DEBUG=1 shows the traceback
instead. Python warnings print as one line `llama2 COMMAND: warning: MESSAGE`.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import pkgutil
import sys
import warnings
from collections.abc import Iterator, Sequence

import llama2.commands as commands_pkg

# What the library raises for a user's mistake: option checks (ValueError, TypeError), files (OSError:
# FileNotFoundError, FileExistsError, PermissionError), registry and preset lookups (KeyError), backend and
# device checks (RuntimeError).
USER_ERRORS = (ValueError, TypeError, OSError, KeyError, RuntimeError)
ERROR_STATUS = 2
DEBUG_ENV = "LLAMA2_DEBUG"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llama2",
        description="Llama 2 on MindSpore and PyTorch.",
        epilog=f"Errors print one line; --debug (or {DEBUG_ENV}=1) shows the Python traceback.",
    )
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks for errors")
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
        # also accepted after the command name; SUPPRESS keeps `llama2 --debug CMD` from being reset to False
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show Python tracebacks")
        p.set_defaults(func=module.run)
    return parser


def _command_name(args: argparse.Namespace) -> str:
    kind = getattr(args, "prepare_kind", None)
    return f"{args.command} {kind}" if args.command == "prepare" and kind else str(args.command)


def _error_message(exc: BaseException, name: str = "") -> str:
    if isinstance(exc, KeyError) and exc.args:  # str(KeyError) is the repr of its argument
        msg = str(exc.args[0])
    else:
        msg = str(exc) or type(exc).__name__
    prefix = f"{name}: "
    return msg[len(prefix) :] if name and msg.startswith(prefix) else msg  # "evaluate: error: evaluate: ..." once


@contextlib.contextmanager
def _one_line_warnings(name: str) -> Iterator[None]:
    """Print warnings as `llama2 NAME: warning: MESSAGE` (no source line), restored on exit."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001 (warnings API)
        kind = "" if category is UserWarning else f"{category.__name__}: "
        try:
            print(f"llama2 {name}: warning: {kind}{message}", file=file or sys.stderr)
        except OSError:  # stderr closed
            pass

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    name = _command_name(args)
    debug = args.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    with _one_line_warnings(name):
        try:
            return int(args.func(args) or 0)
        except USER_ERRORS as exc:
            if debug:
                raise
            print(f"llama2 {name}: error: {_error_message(exc, name)}", file=sys.stderr)
            if not isinstance(exc, ValueError | OSError):  # may also be a bug: say how to see where it came from
                print(f"llama2 {name}: (run with --debug or {DEBUG_ENV}=1 for the traceback)", file=sys.stderr)
            return ERROR_STATUS


if __name__ == "__main__":
    sys.exit(main())
