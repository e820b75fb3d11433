"""The body part a radiograph shows, from its header: one rule for the trainer and the guard.

Why: a style model learns from the distributions of its training images, and a chest's
histogram is not a knee's.  The trainer weighs each body part alike in both domains
(``train/exam_mix.py``) and records each domain's mix in the model
(``provenance.data.A.body_parts``); the fidelity guard flags an input of a body part that the
model's input domain never held, where a model has learnt nothing (``engine/fidelity.py``).
Modalities name one part in several ways (``THORAX`` for ``CHEST``, ``L-SPINE``, an empty
BodyPartExamined beside a coded Anatomic Region), so names are compared by what they mean.

The rule:

* the name is BodyPartExamined (0018,0015); when that is absent or empty, the first item of
  Anatomic Region Sequence (0008,2218): its Code Meaning, else its SNOMED CT code;
* it is upper-cased and trimmed;
* a name that is one of the radiographic Defined Terms of PS3.16 Annex L once spaces, hyphens
  and underscores are dropped is that term (``L-SPINE`` -> ``LSPINE``);
* a name whose words name a SNOMED CT concept in pydicom's code dictionary, or a SNOMED CT
  code, that one of those Defined Terms stands for is that term (``THORAX`` and ``Chest`` ->
  ``CHEST``, ``LUMBAR SPINE`` -> ``LSPINE``, code 70258002 -> ``ANKLE``);
* any other name is kept, at most 16 characters of letters, digits, spaces and underscores
  (anything else shown as ``?``, so a damaged header cannot put control characters in a log);
* :data:`UNKNOWN` when the header names no part.
"""
from __future__ import annotations

import functools
import re
from typing import Any, Mapping

from .training_data import input_domain

__all__ = ["UNKNOWN", "body_part", "examined_body_part", "trained_body_parts", "unseen_body_part"]

UNKNOWN = ""  # the body part of an image that names none
_NAME_LENGTH = 16  # a CS value's longest (PS3.5 6.2)

# The Defined Terms of BodyPartExamined (PS3.16 Annex L) that projection radiographs use, each
# with the name of the SNOMED CT concept Annex L gives it in pydicom's code dictionary.
_DEFINED_TERMS: dict[str, str] = {
    "ABDOMEN": "Abdomen", "ABDOMENPELVIS": "AbdomenAndPelvis", "ANKLE": "AnkleJoint",
    "BREAST": "Breast", "CHEST": "Chest", "CHESTABDOMEN": "ChestAndAbdomen",
    "CLAVICLE": "Clavicle", "COCCYX": "Coccyx", "CSPINE": "CervicalSpine",
    "ELBOW": "ElbowJoint", "FEMUR": "Femur", "FINGER": "Finger", "FOOT": "Foot",
    "FOREARM": "Forearm", "HAND": "Hand", "HIP": "HipJoint", "HUMERUS": "Humerus",
    "KNEE": "Knee", "LEG": "LowerLeg", "LSPINE": "LumbarSpine", "MANDIBLE": "Mandible",
    "PELVIS": "Pelvis", "RIB": "Rib", "SACRUM": "Sacrum", "SCAPULA": "Scapula",
    "SHOULDER": "Shoulder", "SKULL": "Skull", "SPINE": "Spine", "STERNUM": "Sternum",
    "TOE": "Toe", "TSPINE": "ThoracicSpine", "WRIST": "WristJoint",
}
# Concepts a coded Anatomic Region names where Annex L names the region around them.
_ALSO: dict[str, str] = {"KneeJoint": "KNEE", "Hip": "HIP"}


@functools.lru_cache(maxsize=1)
def _term_by_code() -> dict[str, str]:
    """SNOMED CT code -> Defined Term, for the concepts of :data:`_DEFINED_TERMS` and :data:`_ALSO`."""
    from pydicom.sr.codedict import codes

    pairs = [(concept, term) for term, concept in _DEFINED_TERMS.items()] + list(_ALSO.items())
    return {getattr(codes.SCT, concept).value: term for concept, term in pairs}


@functools.lru_cache(maxsize=1024)
def _concept_code(words: tuple[str, ...]) -> str | None:
    """The SNOMED CT code pydicom's dictionary gives the concept these words name, or None."""
    from pydicom.sr.codedict import codes

    try:
        return str(getattr(codes.SCT, "".join(w.capitalize() for w in words)).value)
    except (AttributeError, ValueError, TypeError):
        return None


def body_part(value: object) -> str:
    """A body-part name (BodyPartExamined, a Code Meaning or a SNOMED CT code) as the rule
    compares it (module docstring)."""
    text = "" if value is None else str(value).strip().upper()
    compact = re.sub(r"[\s_-]+", "", text)
    if compact in _DEFINED_TERMS:
        return compact
    words = tuple(w for w in re.split(r"[^A-Z0-9]+", text) if w)
    if len(words) == 1 and words[0].isdigit():
        code: str | None = words[0]
    else:
        code = _concept_code(words) if words and len(text) <= 64 else None
    if code is not None and code in _term_by_code():
        return _term_by_code()[code]
    pairs = {(a, b) for a, b in zip(words, words[1:]) if a + b in _DEFINED_TERMS}  # "C SPINE"
    inside = {w for pair in pairs for w in pair}
    named = {a + b for a, b in pairs} | {w for w in words if w in _DEFINED_TERMS and w not in inside}
    if len(named) == 1 and len(words) <= 3:  # "PA CHEST", "KNEE JOINT", "HAND LEFT"
        return named.pop()
    return "".join(c if c.isalnum() or c in " _" else "?" for c in text[:_NAME_LENGTH])


def examined_body_part(ds: Any) -> str:
    """The body part a DICOM data set names (module docstring), :data:`UNKNOWN` for none."""
    part = body_part(ds.get("BodyPartExamined"))
    if part != UNKNOWN:
        return part
    try:
        region = ds.AnatomicRegionSequence[0]
        meaning = body_part(region.get("CodeMeaning"))
        return meaning if meaning != UNKNOWN else body_part(region.get("CodeValue"))
    except Exception:  # noqa: BLE001 - absent, empty or damaged: the header names no part
        return UNKNOWN


def trained_body_parts(metadata: Mapping[str, Any]) -> set[str]:
    """The named body parts of the model's input domain in training (``A`` for an A->B model),
    read by today's rule; empty when the model does not know them (PNG or TIFF training data,
    models written before the trainer recorded them)."""
    parts = input_domain(metadata).get("body_parts")
    if not isinstance(parts, Mapping):
        return set()
    return {body_part(p) for p in parts if p != "unknown"} - {UNKNOWN}


def unseen_body_part(metadata: Mapping[str, Any], part: str) -> str | None:
    """Why an input of body ``part`` is one the model never saw, or None: an input that names
    its part, for a model that knows the parts it was trained on, none of them this one."""
    trained = trained_body_parts(metadata)
    if part == UNKNOWN or not trained or part in trained:
        return None
    return f"body part {part} was not in the model's training data ({', '.join(sorted(trained))})"
