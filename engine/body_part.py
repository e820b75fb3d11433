"""The body part a radiograph shows, from its header: one rule for the trainer and the guard.

Why: a style model learns from the distributions of its training images, and a chest's
histogram is not a knee's.  The trainer weighs each body part alike in both domains
(``train/exam_mix.py``) and records each domain's mix in the model
(``provenance.data.A.body_parts``); the fidelity guard flags an input of a body part that the
model's input domain never held, where a model has learnt nothing (``engine/fidelity.py``).

The rule: BodyPartExamined (0018,0015) in upper case, trimmed, at most 16 characters of
letters, digits, spaces and underscores (anything else shown as ``?``, so a damaged header
cannot put control characters in a log); :data:`UNKNOWN` when absent or empty.  Names are
compared as they are: ``CHEST`` and ``THORAX`` are two parts.
"""
from __future__ import annotations

from typing import Any, Mapping

__all__ = ["UNKNOWN", "body_part", "trained_body_parts", "unseen_body_part"]

UNKNOWN = ""  # the body part of an image that names none
_NAME_LENGTH = 16  # a CS value's longest (PS3.5 6.2)


def body_part(value: object) -> str:
    """A BodyPartExamined value as the rule compares it (module docstring)."""
    text = "" if value is None else str(value).strip().upper()[:_NAME_LENGTH]
    return "".join(c if c.isalnum() or c in " _" else "?" for c in text)


def trained_body_parts(metadata: Mapping[str, Any]) -> set[str]:
    """The named body parts of the model's input domain in training (``A`` for an A->B model);
    empty when the model does not know them (PNG or TIFF training data, models written
    before the trainer recorded them)."""
    domain = "B" if str(metadata.get("direction", "A->B")).startswith("B") else "A"
    parts: object = metadata
    for key in ("provenance", "data", domain, "body_parts"):  # any other shape: not known
        parts = parts.get(key) if isinstance(parts, Mapping) else None
    return {str(p) for p in parts if p != "unknown"} if isinstance(parts, Mapping) else set()


def unseen_body_part(metadata: Mapping[str, Any], part: str) -> str | None:
    """Why an input of body ``part`` is one the model never saw, or None: an input that names
    its part, for a model that knows the parts it was trained on, none of them this one."""
    trained = trained_body_parts(metadata)
    if part == UNKNOWN or not trained or part in trained:
        return None
    return f"body part {part} was not in the model's training data ({', '.join(sorted(trained))})"
