"""The translation engine: style models, the pixel pipeline, seamless tiled inference, SC output.

Public API (stable, see docs/architecture.md and docs/seamless.md): :func:`load_style_model`, :func:`translate`.

The engine is the ground floor: it imports nothing from the node (``dicom_node.*``) or the
trainer (``dicom_node.train``); both import it (tests/test_layering.py checks this).
Names are imported lazily, so ``dicom_node.engine.errors`` and friends stay light (no torch).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what __getattr__ hands out, as mypy should see it (nothing imported at run time)
    from .generator import ResnetGenerator
    from .model_file import StyleModel, load_style_model, new_style_model, save_style_model
    from .tiling import translate

__all__ = ["ResnetGenerator", "StyleModel", "load_style_model", "save_style_model", "new_style_model", "translate"]

_HOME = {
    "ResnetGenerator": "generator",
    "StyleModel": "model_file",
    "load_style_model": "model_file",
    "save_style_model": "model_file",
    "new_style_model": "model_file",
    "translate": "tiling",
}


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{home}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
