"""Exception types that decide how the command line exits.

A :class:`UserError` is something the user can fix (bad input file, bad config, missing
model): the CLI prints its message on one line and exits 1, with no traceback.  Anything
else is a bug and exits 2.
"""


__all__ = ["UserError", "UnsupportedImage", "first_line"]


def first_line(exc: BaseException, limit: int = 240) -> str:
    """An exception as one short line for a message (decoder and network errors span several lines)."""
    text = " ".join(str(exc).split())
    if not text:
        return exc.__class__.__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


class UserError(Exception):
    """A problem with the user's input, reported as one line."""


class UnsupportedImage(UserError):
    """A DICOM object the engine refuses to translate (colour, multi-frame, no pixels, too large...)."""
