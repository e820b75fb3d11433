"""The ``dicom-node`` command line: one entry point, one module per subcommand.

Exit codes (README): 0 success, 1 user error (one line, no traceback),
2 internal error.  A reader that stops early (``dicom-node audit | head``) ends the command
quietly with 0: the reader had what it wanted.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from dicom_node import __version__
from dicom_node.commands import COMMAND_MODULES, merge_positional
from dicom_node.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dicom-node",
        description="A DICOM node that restyles radiographs to each radiologist's preferred look.",
    )
    parser.add_argument("--version", action="version", version=f"dicom-node {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"dicom_node.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        try:
            return _main(argv)
        finally:
            sys.stdout.flush()  # here, not at exit: a closed pipe is caught below
    except BrokenPipeError:
        # The reader closed the pipe: say nothing more, and let the interpreter's last flush
        # of stdout go nowhere instead of printing "Exception ignored ... BrokenPipeError".
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 0


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on a usage error; here 2 means a bug (README)
        return 1 if exc.code == 2 else int(exc.code or 0)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        merge_positional(args)
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"dicom-node {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        raise  # not a bug: see main()
    except Exception:  # noqa: BLE001 - last resort: a bug, report it fully
        import traceback

        traceback.print_exc()
        print(f"dicom-node {args.command}: internal error (a bug, please report it)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
