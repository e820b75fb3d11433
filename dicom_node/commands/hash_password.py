"""``dicom-node hash-password``: an Argon2id hash for a console user (config ``web.users``)."""
from __future__ import annotations

import argparse
import sys

from dicom_node.errors import UserError

MIN_LENGTH = 12


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("hash-password", help="hash a console password for web.users in the config",
                       description="Prints an Argon2id hash to put under web.users.NAME in the node config. "
                                   "Asks twice on a terminal; reads one line from standard input otherwise.")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dicom_node.web.auth import hash_password

    if sys.stdin.isatty():
        import getpass

        password = getpass.getpass("password: ")
        if getpass.getpass("again: ") != password:
            raise UserError("the two passwords differ")
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if len(password) < MIN_LENGTH:
        raise UserError(f"use at least {MIN_LENGTH} characters")
    print(hash_password(password))
    return 0
