"""One module per ``dicom-node`` subcommand.

Each module defines ``register(subparsers)``, which adds its parser and sets
``func=run``.  Modules import heavy libraries (torch, pynetdicom) inside ``run`` so that
``dicom-node --help`` stays fast, and commands that need no model (``status``,
``check-config``, ``audit``, ...) never import torch (``tests/test_cli.py`` checks).

The options every command spells the same way (CONVENTIONS.md) come from the helpers here:
``--config FILE`` wherever a node config is read, ``-o/--output`` for what a command writes.
A positional form that a command had before stays accepted, and so do old option spellings
(``--out``), hidden from ``--help``.
"""
from __future__ import annotations

import argparse

# The order here is the order in ``dicom-node --help``.
COMMAND_MODULES = [
    "serve",
    "reload",
    "check_config",
    "status",
    "retry",
    "reprocess",
    "withheld",
    "audit",
    "hash_password",
    "translate",
    "train",
    "model",
    "demo_data",
    "evaluate",
]

_POSITIONAL = "positional_"  # dest prefix of a positional that stands for an option (merged by merge_positional)
_REQUIRED = "required_"  # dest prefix: the option must be given in one of its forms


def _either(p: argparse.ArgumentParser, dest: str, flag: str, metavar: str, required: bool) -> None:
    """Also accept the option ``dest`` as an optional positional ``metavar``."""
    p.add_argument(f"{_POSITIONAL}{dest}", nargs="?", metavar=metavar, default=None,
                   help=f"the same as {flag} {metavar}")
    if required:
        p.set_defaults(**{f"{_REQUIRED}{dest}": metavar})


def add_config(p: argparse.ArgumentParser, help: str = "node config YAML (default: the embedded config)", *,
               positional: bool = False, required: bool = False) -> None:
    """``--config FILE`` (and with ``positional`` a bare ``FILE`` too)."""
    p.add_argument("--config", metavar="FILE", default=None, required=required and not positional, help=help)
    if positional:
        _either(p, "config", "--config", "FILE", required)


def add_output(p: argparse.ArgumentParser, help: str, *, dest: str = "output", metavar: str = "OUTDIR",
               default: str | None = None, required: bool = False, positional: bool = False,
               aliases: tuple[str, ...] = ("--out",)) -> None:
    """``-o/--output`` for what the command writes; ``aliases``: old spellings, hidden."""
    p.add_argument("-o", "--output", dest=dest, metavar=metavar, default=default,
                   required=required and not positional, help=help)
    for alias in aliases:
        p.add_argument(alias, dest=dest, metavar=metavar, help=argparse.SUPPRESS)
    if positional:
        _either(p, dest, "-o/--output", metavar, required)


def merge_positional(args: argparse.Namespace) -> None:
    """Fold the positional forms into their options (``check-config FILE`` = ``--config FILE``).

    Raises ``UserError`` when both forms name different things, or a required one is missing.
    """
    from dicom_node.errors import UserError

    for key in [k for k in vars(args) if k.startswith(_POSITIONAL)]:
        dest = key[len(_POSITIONAL):]
        bare, option = getattr(args, key), getattr(args, dest, None)
        delattr(args, key)
        if bare is not None and option is not None and bare != option:
            raise UserError(f"{bare} and {option}: name it once (as an argument or with its option)")
        setattr(args, dest, option if option is not None else bare)
    for key in [k for k in vars(args) if k.startswith(_REQUIRED)]:
        dest, metavar = key[len(_REQUIRED):], getattr(args, key)
        delattr(args, key)
        if getattr(args, dest, None) is None:
            flag = "--config" if dest == "config" else "-o/--output"
            raise UserError(f"{metavar} is required ({metavar} or {flag} {metavar})")
