"""Constants that the engine, the node, the trainer and the CLI share: one place each.

Light on purpose (no torch): the config schema and the CLI read these without loading the engine.
"""
from __future__ import annotations

import re
from typing import Any

__all__ = ["MODEL_FORMAT", "DEFAULT_NORMALIZATION", "DEFAULT_OVERLAP", "MANUFACTURER", "UID_RE", "CAUTION_LABEL",
           "FIDELITY_ACTIONS", "DEFAULT_FIDELITY_ACTION", "FLAGGED_PREFIX"]

# Names a style model file (safetensors header metadata "format").
MODEL_FORMAT = "dicom-node-style-model"
# Robust percentile window: p_low..p_high of the (modality-LUT'ed, MONOCHROME2) pixels map to -1..1.
DEFAULT_NORMALIZATION: dict[str, Any] = {"method": "percentile", "low": 0.5, "high": 99.5}
# Overlap of the last layer's blended output tiles (fraction of a tile), and of the naive sliding window.
DEFAULT_OVERLAP = 0.25
# Manufacturer of every object the node writes; the worker refuses to restyle its own output by it.
MANUFACTURER = "dicom-node"
# A DICOM UID: digits and dots (length and leading zeros are checked where it matters).
UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
# The caution on every restyled image (ImageComments), unless a route or ``translate`` says
# otherwise: the node's outputs are not a cleared diagnostic device unless a site decides so.
CAUTION_LABEL = ("CAUTION: image restyled by AI software (dicom-node); not cleared for primary diagnosis. "
                 "Read with the source series.")
# What happens to an output the fidelity guard flags: forward and store the scores (record),
# forward marked as flagged (flag), or keep it back for an operator (withhold).
FIDELITY_ACTIONS = ("record", "flag", "withhold")
DEFAULT_FIDELITY_ACTION = "flag"
# SeriesDescription prefix of flagged outputs (which go to a series of their own).
FLAGGED_PREFIX = "FIDELITY CAUTION "
