"""Shared fixtures: tiny style models and synthetic DICOM files made in code."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

INTEROP = os.environ.get("DICOM_NODE_INTEROP") == "1"


def _share_the_cores_between_test_workers() -> None:
    """Give each pytest-xdist worker its share of the cores, for torch here and for the nodes
    and trainers it starts (they inherit OMP_NUM_THREADS).

    Why: left alone, every worker's torch takes every core, and two workers on 2 cores ran
    test_local_tone.py and test_tiling.py in 101 s against 55 s with one thread each. Runs here
    before torch is imported (xdist sets the worker count before it loads this file); an
    OMP_NUM_THREADS of the caller's is kept.
    """
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1 and not os.environ.get("OMP_NUM_THREADS"):
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        os.environ["OMP_NUM_THREADS"] = str(max(1, cores // workers))


_share_the_cores_between_test_workers()


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


def require_file(path: str, package: str) -> str:
    """A file an installed package provides (a plugin): skip when missing, fail under CI."""
    if not Path(path).is_file():
        if INTEROP:
            pytest.fail(f"{path} ({package}) is required when DICOM_NODE_INTEROP=1 but is not installed")
        pytest.skip(f"{package} not installed ({path})")
    return path


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory):
    """An ngf 4 / 1 block style model (a few thousand parameters): residual, its last convolution
    small but not zero, so it changes the image a little and keeps its structure (the fidelity
    guard passes it; tests of flagged outputs use an untrained non-residual model)."""
    import torch

    from dicom_node.engine import new_style_model, save_style_model

    gen = new_style_model(ngf=4, n_blocks=1, residual=True, seed=1)
    last = [m for m in gen.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    with torch.no_grad():
        last.weight.normal_(0.0, 0.002, generator=torch.Generator().manual_seed(1))
    path = tmp_path_factory.mktemp("models") / "tiny.safetensors"
    save_style_model(gen, path, name="tiny", version="1")
    return path


@pytest.fixture(scope="session")
def tiny_model(tiny_model_path):
    from dicom_node.engine import load_style_model

    return load_style_model(tiny_model_path)
