"""What a style model records of the data it was trained on: one reader for the guard's checks.

Why: the trainer writes each domain's summary into the model (``provenance.data.A`` and ``B``:
images, body parts, pixel sizes), and the fidelity guard judges an input against the domain
the model reads (A for an A->B model). Model files come from anywhere, so any other shape is
read as "not recorded", never as an error.
"""
from __future__ import annotations

from typing import Any, Mapping

__all__ = ["input_domain"]


def input_domain(metadata: Mapping[str, Any]) -> Mapping[str, Any]:
    """The summary of the model's input domain in training (``provenance.data.A``, ``B`` for a
    B->A model); empty when not recorded or of another shape."""
    domain = "B" if str(metadata.get("direction", "A->B")).startswith("B") else "A"
    found: object = metadata
    for key in ("provenance", "data", domain):
        found = found.get(key) if isinstance(found, Mapping) else None
    return found if isinstance(found, Mapping) else {}
