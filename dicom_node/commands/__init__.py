"""One module per ``dicom-node`` subcommand.

Each module defines ``register(subparsers)``, which adds its parser and sets
``func=run``.  Modules import heavy libraries (torch, pynetdicom) inside ``run`` so that
``dicom-node --help`` stays fast.
"""

# The order here is the order in ``dicom-node --help``.
COMMAND_MODULES = [
    "serve",
    "reload",
    "check_config",
    "status",
    "retry",
    "withheld",
    "audit",
    "hash_password",
    "translate",
    "train",
    "model",
    "demo_data",
    "evaluate",
]
