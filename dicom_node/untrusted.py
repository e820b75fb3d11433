"""What a peer sends before we trust it: AE titles and pynetdicom's own log lines about them.

Why its own module: a peer on the network chooses the bytes of its AE titles.  pynetdicom
refuses a title with a control character while *decoding* the A-ASSOCIATE-RQ, logs the raw
value (a newline forges log lines, an ESC sequence rewrites the operator's terminal) and a
20-line traceback, and aborts instead of rejecting.  Here decoding accepts any title, the
listener rejects an invalid one itself (A-ASSOCIATE-RJ, one escaped log line), and every
pynetdicom log record is made one escaped line without a traceback.
"""
from __future__ import annotations

import logging
import re

__all__ = ["escaped", "invalid_ae_title", "install_guards"]

_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")


def escaped(text: object) -> str:
    """``text`` with every character outside printable ASCII as a Python escape (``\\n``, ``\\x1b``):
    peer-supplied text in a log line stays one line and cannot drive a terminal."""
    text = str(text)
    if not _UNPRINTABLE.search(text):
        return text
    return _UNPRINTABLE.sub(lambda m: ascii(m.group())[1:-1], text)


def invalid_ae_title(title: str) -> str | None:
    """Why ``title`` is not a valid AE title (PS3.5: at most 16 characters of printable ASCII,
    no backslash, not only spaces), or None."""
    if _UNPRINTABLE.search(title):
        return "control or non-ASCII character"
    if "\\" in title:
        return "backslash"
    if len(title.strip()) > 16:
        return "longer than 16 characters"
    return None


def _decode_any_ae(value: object) -> tuple[bool, str]:
    """pynetdicom's AE validator while decoding: any text; the listener judges it (see above)."""
    return (True, "") if isinstance(value, str) else (False, "must be str")


class _OneEscapedLine(logging.Filter):
    """A pynetdicom record as one escaped line; a traceback shrinks to its exception's first line."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            first = str(exc).splitlines()[0] if str(exc) else ""
            message = f"{message} ({exc.__class__.__name__}: {first})" if first not in message else message
        record.msg, record.args = escaped(message), None
        record.exc_info = record.exc_text = record.stack_info = None
        return True


_FILTER = _OneEscapedLine()


def install_guards() -> None:
    """Apply the above to pynetdicom (process-wide, idempotent): called when the listener starts.

    Our own outgoing AE titles are validated by the config loader, so relaxing pynetdicom's
    validator loses nothing.  Non-ASCII title bytes still fail pynetdicom's decoding (an A-ABORT,
    logged on one line by the filter).
    """
    from pynetdicom import _config

    _config.VALIDATORS["AE"] = _decode_any_ae
    names = [n for n in list(logging.Logger.manager.loggerDict) if n == "pynetdicom" or n.startswith("pynetdicom.")]
    for name in names:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
