"""Where style model files are: bundled names such as ``default``, without importing torch.

Why a module of its own: ``check-config``, ``status`` and the other commands that read a node
config resolve model names but never load a model; importing :mod:`.model_file` (torch) for
that made each of them take seconds to start.
"""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["bundled_model_path", "resolve_model_path"]


def bundled_model_path(name: str = "default") -> Path:
    """Where the model shipped with the package under ``name`` lives (it may not exist)."""
    return _package_models_dir() / f"{name}.safetensors"


def resolve_model_path(path_or_name: str | os.PathLike[str]) -> Path:
    """``default`` (or another bundled name) resolves to the model shipped with the package."""
    p = Path(path_or_name)
    if not p.exists() and p.suffix == "" and len(p.parts) == 1:
        candidate = bundled_model_path(str(p))
        if candidate.exists():
            return candidate
    return p


def _package_models_dir() -> Path:
    """The engine's own package data (``engine/models``): the engine loads what it ships, and
    asks nothing of the node above it (tests/test_layering.py)."""
    return Path(__file__).resolve().parent / "models"
