"""The ``folder`` destination kind: one file per instance in a folder, written atomically.

YAML: ``{type: folder, path}``; files land at ``<path>/<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm``.
A resend is harmless: an identical file already there counts as delivered.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from dicom_node.config.fields import folder_path
from dicom_node.config.probes import check_writable
from dicom_node.config.settings import DestinationSettings, NodeConfig
from dicom_node.engine.atomic import atomic_write, fsync_dir
from dicom_node.engine.yaml_config import Problems, join_path

from .base import DeliveryResult, DestinationKind, register, valid_uid

__all__ = ["FolderDestination", "FolderKind", "KIND", "deliver_folder"]


@dataclass
class FolderDestination(DestinationSettings):
    """A folder the node writes the instances into (atomically, one file each)."""

    name: str
    type: str = "folder"
    path: Path | None = None


class FolderKind(DestinationKind[FolderDestination]):
    type = "folder"
    keys = frozenset({"path"})
    required = frozenset({"path"})

    def parse(self, name: str, raw: dict[str, Any], path: str, problems: Problems,
              base_dir: Path) -> FolderDestination:
        raw = self.fields(raw, path, problems)
        return FolderDestination(name=name, path=folder_path(raw, "path", path, problems, base_dir, None))

    def finish(self, dest: FolderDestination, cfg: NodeConfig, path: str, problems: Problems) -> None:
        """The folder must not overlap the spool (the node would deliver into its own queue)."""
        if dest.path is None:
            return
        spool = Path(os.path.abspath(cfg.storage.spool_dir))
        out = Path(os.path.abspath(dest.path))
        if out == spool or spool in out.parents or out in spool.parents:
            problems.add(join_path(path, "path"), f"overlaps storage.spool_dir {spool} (keep them apart)")

    def check(self, dest: FolderDestination, path: str, problems: Problems) -> None:
        if dest.path is not None:
            check_writable(dest.path, join_path(path, "path"), problems)

    def describe(self, dest: FolderDestination) -> str:
        return str(dest.path or "")

    def deliver(self, dest: FolderDestination, files: Sequence[Path], *, calling_ae: str,
                timeout: float) -> list[DeliveryResult]:
        return deliver_folder(dest, files)


def deliver_folder(dest: FolderDestination, files: Sequence[Path]) -> list[DeliveryResult]:
    """Copy each file to ``<path>/<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm``, atomically."""
    if dest.path is None:
        return [DeliveryResult(Path(f), False, error="folder destination has no path") for f in files]
    return [_copy_one(Path(dest.path), Path(f)) for f in files]


def _copy_one(root: Path, src: Path) -> DeliveryResult:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(
            str(src), stop_before_pixels=True,
            specific_tags=["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"],
        )
    except FileNotFoundError:
        return DeliveryResult(src, False, error="file not found")
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        return DeliveryResult(src, False, error=f"cannot read DICOM file ({exc.__class__.__name__})")
    uids = [ds.get(k) for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")]
    uids = [str(u).strip() if u is not None else None for u in uids]
    if not all(valid_uid(u) for u in uids):
        # Never build a path from anything but a strict UID: no traversal, no odd names.
        return DeliveryResult(src, False, error="refused: Study/Series/SOP Instance UID missing or not a valid UID")
    folder = root.joinpath(uids[0], uids[1])
    final = folder / f"{uids[2]}.dcm"
    try:
        if final.is_file() and _same_content(src, final):
            return DeliveryResult(src, True)  # already delivered: idempotent resend
        _mkdirs(root, folder)
        atomic_write(final, lambda tmp: shutil.copyfile(src, tmp), mode=0o644)
    except OSError as exc:
        return DeliveryResult(src, False, error=f"cannot write to folder destination: {exc.strerror or exc}")
    return DeliveryResult(src, True)


def _mkdirs(root: Path, folder: Path) -> None:
    """Create the study/series folders and make their directory entries durable."""
    created = []
    for p in (root, folder.parent, folder):
        if not p.is_dir():
            p.mkdir(parents=True, exist_ok=True)
            created.append(p)
    for p in created:
        fsync_dir(p.parent)


def _same_content(a: Path, b: Path) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            chunk_a, chunk_b = fa.read(1 << 20), fb.read(1 << 20)
            if chunk_a != chunk_b:
                return False
            if not chunk_a:
                return True


KIND = register(FolderKind())
