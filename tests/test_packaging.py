"""What a built wheel holds: every package folder is listed in pyproject.toml.

Why: the editable install used by the tests finds every folder, so a package missing from
``[tool.setuptools] packages`` passes the whole suite and is absent from a real install
(``dicom_node.destinations`` was, until this test).
"""
from __future__ import annotations

from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_in_the_wheel() -> None:
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    listed = set(setup["packages"])
    found = set()
    for package, folder in setup["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            found.add(".".join((package, *init.parent.relative_to(ROOT / folder).parts)))
    assert found - listed == set(), f"package folders missing from pyproject.toml: {sorted(found - listed)}"
