"""The ``fastsr`` command. Each subcommand lives in :mod:`fastsr.commands` as a module with
``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from . import __version__
from .errors import UserError

COMMANDS = ("upscale", "train", "eval", "demo", "info", "selftest", "convert", "export")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastsr",
        description="Fast SRGAN super-resolution: upscale images of any size, train and evaluate models.",
        epilog="Run 'fastsr COMMAND --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"fastsr {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        # No try: a command that fails to import is a broken install, and its traceback says why.
        module = importlib.import_module(f"fastsr.commands.{name}")
        p = sub.add_parser(name, help=module.HELP, description=module.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(func=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="fastsr: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as exc:
        print(f"fastsr: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fastsr: interrupted", file=sys.stderr)
        return 130
