"""Shared fixtures: tiny style models and synthetic DICOM files made in code."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

INTEROP = os.environ.get("DICOM_NODE_INTEROP") == "1"


def require_tool(name: str) -> str:
    """Path of an external tool; skip when missing, fail under DICOM_NODE_INTEROP=1 (CI).

    The virtual environment's own bin/ is skipped: pynetdicom installs apps named like
    dcmtk's (storescp, storescu, echoscu, ...), which shadow the real dcmtk tools once the
    venv is activated.
    """
    venv_bin = Path(sys.prefix, "bin").resolve()
    search = os.pathsep.join(d for d in os.environ.get("PATH", "").split(os.pathsep)
                             if d and Path(d).resolve() != venv_bin)
    path = shutil.which(name, path=search)
    if path is None:
        if INTEROP:
            pytest.fail(f"{name} is required when DICOM_NODE_INTEROP=1 but is not installed")
        pytest.skip(f"{name} not installed")
    return path


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory):
    """A freshly initialised ngf 4 / 1 block style model (a few thousand parameters)."""
    from dicom_node.engine import new_style_model, save_style_model

    path = tmp_path_factory.mktemp("models") / "tiny.safetensors"
    save_style_model(new_style_model(ngf=4, n_blocks=1, seed=1), path, name="tiny", version="1")
    return path


@pytest.fixture(scope="session")
def tiny_model(tiny_model_path):
    from dicom_node.engine import load_style_model

    return load_style_model(tiny_model_path)
