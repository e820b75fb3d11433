"""Exception types that decide how the command line exits.

A :class:`UserError` is something the user can fix (bad input file, bad config, missing
model): the CLI prints its message on one line and exits 1, with no traceback.  Anything
else is a bug and exits 2.
"""


class UserError(Exception):
    """A problem with the user's input, reported as one line."""


class UnsupportedImage(UserError):
    """A DICOM object the engine refuses to translate (colour, multi-frame, no pixels, too large...)."""
