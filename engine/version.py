"""The package version, in the lowest layer so the engine and the trainer can name it.

Keep it equal to ``version`` in pyproject.toml.
"""

__version__ = "0.1.0"
