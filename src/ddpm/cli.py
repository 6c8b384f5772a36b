"""`ddpm` command line: a thin layer over the library.

Each subcommand parses its arguments, builds configs and calls one library function;
everything here can be done from a notebook with the same call. A user's mistake (`UserError`)
is printed as one line on stderr with exit status 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import sys

from .errors import UserError

_COMMANDS: dict[str, tuple] = {}


def command(name: str, help: str):
    """Register `fn(args)` as subcommand `name`; `fn.add_arguments(parser)` declares its flags."""

    def wrap(fn):
        _COMMANDS[name] = (help, fn)
        return fn

    return wrap


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ddpm", description="Denoising Diffusion Probabilistic Models (Ho et al. 2020)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_, fn) in _COMMANDS.items():
        sp = sub.add_parser(name, help=help_, description=help_)
        getattr(fn, "add_arguments", lambda _: None)(sp)
        sp.set_defaults(_fn=fn)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_fn", None):
        parser.print_help()
        return 2
    try:
        rc = args._fn(args)
    except UserError as e:
        print(f"ddpm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ddpm {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


# ---------------------------------------------------------------------------------------------
# Subcommands. Each is a few lines over one library function.
# ---------------------------------------------------------------------------------------------
