"""Media types of DICOMweb requests: the Content-Type a client sent, and whether its Accept
header takes the DICOM JSON answers this node writes.  Pure functions of header strings.
"""
from __future__ import annotations

__all__ = ["content_type", "accepts_json", "DICOM_JSON", "JSON_RANGES"]

DICOM_JSON = "application/dicom+json"  # the answers' media type (PS3.18 DICOM JSON)
JSON_RANGES = frozenset({DICOM_JSON, "application/json", "application/*", "*/*"})  # Accept ranges that take it


def content_type(header: str) -> tuple[str, dict[str, str]]:
    """A Content-Type header's media type (lower case) and parameters (names lower case)."""
    from email.message import Message

    message = Message()
    message["content-type"] = header
    params = {k.lower(): v for k, v in message.get_params(header="content-type", failobj=[])[1:]}
    return message.get_content_type().lower(), params


def accepts_json(header: str) -> bool:
    """Whether an Accept header lets the answer be ``application/dicom+json``: no header, or a
    media range in :data:`JSON_RANGES` (``application/dicom+json``, ``application/json``,
    ``application/*``, ``*/*``) with a quality above 0.

    Why: PS3.18 lets a STOW-RS client ask for the XML answer (Accept) only; this node writes the
    JSON one, so such a request is refused with 406 before its body is read rather than answered
    in a type the client said it cannot parse."""
    if not header.strip():
        return True
    for item in header.split(","):
        media, _, params = item.strip().partition(";")
        quality = 1.0
        for param in params.split(";"):
            name, _, value = param.strip().partition("=")
            if name.strip().lower() == "q":
                try:
                    quality = float(value.strip())
                except ValueError:
                    quality = 0.0
        if quality > 0 and media.strip().lower() in JSON_RANGES:
            return True
    return False
