"""The spool: the node's durable on-disk store of received originals and translated outputs.

Why its own module: every file the node acknowledges or produces must survive a crash
(kill -9, power loss) at any instant.  Each write therefore goes to a temporary file in
``tmp/`` on the same filesystem, is fsynced, atomically renamed into place, and the
directory is fsynced, so a file either exists completely under its final name or not at
all.  The spool directory is 0700 and files are 0600 (they hold patient data).

Layout::

    <spool>/state.db            SQLite state (see state.py)
    <spool>/tmp/                partial writes; emptied at start
    <spool>/in/<AE>/<sop>.dcm   received originals, by called AE and SOP Instance UID
    <spool>/out/<id>/<sop>.dcm  translated outputs of instance row <id>
    <spool>/previews/<id>.png   the console's thumbnails

Several nodes on one PostgreSQL database share one spool (a network filesystem mounted at
the same path on every machine); each keeps its own lock, temp folder and files there::

    <spool>/nodes/<name>/lock   held by the running node of that name (a second is refused)
    <spool>/nodes/<name>/tmp/   its partial writes; emptied when it starts

Files of an instance are removed once it is finished (every delivery succeeded); failed,
pending and deliberately kept (unmatched, not forwarded) instances keep theirs.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pydicom at run time only where a dataset is made: status and retry start without it
    from pydicom.dataset import Dataset

    from dicom_node.config import NodeConfig

from dicom_node.engine.atomic import fsync_dir

__all__ = ["Spool", "node_spool"]

_SAFE = re.compile(r"[^A-Za-z0-9._-]")
INFLATE_STEP = 1 << 20  # bytes of inflated output held in memory at once (and free-disk check interval)


def safe_name(text: str) -> str:
    """A file-name-safe rendering of an AE title or UID (UIDs are already safe)."""
    cleaned = _SAFE.sub("_", text.strip())
    return cleaned or "_"


def node_spool(config: NodeConfig) -> Spool:
    """The spool of a node config: with a PostgreSQL database, shared, with this node's own
    lock and temp folder (named ``node.name``, default the host name)."""
    from dicom_node.cluster import node_name

    storage = config.storage
    return Spool(storage.spool_dir, node=node_name(config) if storage.database else None)


class Spool:
    """Atomic, durable files under one root directory.

    ``node``: this node's name when several nodes share the spool (None: the only node; its
    lock, temp folder and files are the spool's own).
    """

    def __init__(self, root: Path, node: str | None = None) -> None:
        self.root = Path(root).resolve()
        self.node = node
        # what only this node writes: the console token, node.json, reload requests
        self.node_dir = self.root if node is None else self.root / "nodes" / safe_name(node)
        self.tmp = self.node_dir / "tmp"
        self.incoming = self.root / "in"
        self.outgoing = self.root / "out"
        self.previews = self.root / "previews"  # the console's thumbnails, kept after delivery

    @property
    def db_path(self) -> Path:
        return self.root / "state.db"

    def database(self, url: str | None) -> "Path | str":
        """Where the state database is: ``url`` (storage.database) or this spool's SQLite file."""
        return url or self.db_path

    def lock(self) -> None:
        """Take the spool for this process; a second node on the same spool is refused.

        The only node (SQLite) holds the spool's lock exclusively: two nodes on one SQLite
        spool would both work the same rows.  Nodes sharing a spool (PostgreSQL) hold it
        shared, and their own name's lock exclusively: two processes with one name would
        share a temp folder.  flock is released by the kernel when the process dies, so
        kill -9 leaves no stale lock.
        """
        import fcntl

        from dicom_node.errors import UserError

        if getattr(self, "_lock_fds", None):
            return  # already ours
        self.root.mkdir(parents=True, exist_ok=True)
        wanted = [(self.root / "lock", fcntl.LOCK_EX if self.node is None else fcntl.LOCK_SH)]
        if self.node is not None:
            self.node_dir.mkdir(parents=True, exist_ok=True)
            wanted.append((self.node_dir / "lock", fcntl.LOCK_EX))
        fds: list[int] = []
        for path, mode in wanted:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            fds.append(fd)
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
            except OSError:
                for f in fds:
                    os.close(f)
                if self.node is None:
                    raise UserError(f"spool {self.root} is in use by another dicom-node process") from None
                if path == self.root / "lock":
                    raise UserError(f"spool {self.root} is in use by a dicom-node on a SQLite state database "
                                    "(only nodes on one PostgreSQL database share a spool)") from None
                raise UserError(f"spool {self.root} is in use by another dicom-node named {self.node!r} "
                                "(give each node its own node.name)") from None
        self._lock_fds = fds

    def unlock(self) -> None:
        for fd in getattr(self, "_lock_fds", None) or []:
            os.close(fd)  # closing releases the flock
        self._lock_fds = []

    def open(self) -> "Spool":
        """Create the layout (0700) and drop partial writes left by a crash."""
        for d in dict.fromkeys((self.root, self.node_dir, self.tmp, self.incoming, self.outgoing, self.previews)):
            d.mkdir(parents=True, exist_ok=True)
            os.chmod(d, 0o700)
        for leftover in self.tmp.iterdir():
            try:
                leftover.unlink()
            except OSError:
                pass
        return self

    def sweep_tmp(self, max_age: float) -> int:
        """Delete files in ``tmp/`` untouched for ``max_age`` seconds; returns how many.

        pynetdicom streams each incoming dataset into ``tmp/`` and deletes the file after the
        handler, but a transfer aborted half-way (sender gone, network timeout) leaves its
        partial file behind.  A transfer in progress writes every few seconds and is aborted
        after the network timeout, so anything much older is garbage.
        """
        import time

        cutoff = time.time() - max_age
        removed = 0
        for f in self.tmp.iterdir():
            try:
                if f.stat().st_mtime < cutoff:
                    f.unlink()
                    removed += 1
            except OSError:
                pass  # vanished meanwhile (finished transfer): fine
        return removed

    def preview_path(self, instance_id: int) -> Path:
        return self.previews / f"{int(instance_id)}.png"

    def sweep_previews(self, max_age: float) -> int:
        """Delete thumbnails older than ``max_age`` seconds (the housekeeper, with old rows)."""
        import time

        cutoff = time.time() - max_age
        removed = 0
        for f in self.previews.glob("*.png") if self.previews.is_dir() else ():
            try:
                if f.stat().st_mtime < cutoff:
                    f.unlink()
                    removed += 1
            except OSError:
                pass
        return removed

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def original_path(self, called_ae: str, sop_uid: str) -> Path:
        return self.incoming / safe_name(called_ae) / f"{safe_name(sop_uid)}.dcm"

    def output_dir(self, instance_id: int) -> Path:
        return self.outgoing / str(instance_id)

    def remove_instance_files(self, instance_id: int, original: Path) -> None:
        """Delete an instance's original and outputs (missing files are fine: idempotent)."""
        original = Path(original)
        if original.is_relative_to(self.incoming):  # never delete outside the spool
            original.unlink(missing_ok=True)
        shutil.rmtree(self.output_dir(instance_id), ignore_errors=True)

    def _mkdirs(self, directory: Path) -> None:
        if not directory.is_dir():
            directory.mkdir(parents=True, exist_ok=True)
            os.chmod(directory, 0o700)
            fsync_dir(directory.parent)

    def _temp(self) -> tuple[int, Path]:
        fd, name = tempfile.mkstemp(prefix="part-", suffix=".dcm", dir=self.tmp)
        os.fchmod(fd, 0o600)
        return fd, Path(name)

    def _commit(self, tmp: Path, final: Path) -> Path:
        self._mkdirs(final.parent)
        os.replace(tmp, final)
        fsync_dir(final.parent)
        return final

    def store_file(self, src: Path, final: Path, *, max_bytes: int | None = None) -> int:
        """Copy ``src`` durably to ``final``; returns its size.

        Raises OSError on any write problem (disk full included), leaving nothing behind.
        """
        fd, tmp = self._temp()
        size = 0
        try:
            with os.fdopen(fd, "wb") as out, open(src, "rb") as inp:
                while True:
                    chunk = inp.read(1 << 20)
                    if not chunk:
                        break
                    size += len(chunk)
                    if max_bytes is not None and size > max_bytes:
                        raise OSError(27, "instance larger than max_instance_bytes")  # EFBIG
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            self._commit(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return size

    def adopt_file(self, src: Path, final: Path) -> int:
        """Move a received temp file into place without copying when it is on the spool's filesystem.

        ``dicom-node serve`` points Python's temp dir at ``<spool>/tmp``, so pynetdicom
        streams each incoming dataset straight onto the spool's disk and this is an fsync
        plus a rename.  Elsewhere (another filesystem) it falls back to a durable copy.
        """
        src = Path(src)
        try:
            same_fs = src.stat().st_dev == self.tmp.stat().st_dev
        except OSError:
            same_fs = False
        if not same_fs:
            return self.store_file(src, final)
        size = src.stat().st_size
        with open(src, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(src, 0o600)
        self._commit(src, final)
        return size

    def inflate(self, src: Path, offset: int, file_meta: Dataset, *, max_bytes: int, min_free: int) -> Path:
        """A temp file holding ``src``'s Deflated Explicit VR Little Endian data set (from ``offset``)
        inflated, as Explicit VR Little Endian; raises OSError when it would pass a limit.

        Why streamed: pydicom inflates a deflated file whole in memory (and keeps a copy), so a
        1 MB deflate bomb that inflates to 1 GiB cost the node 2 GB per association.  Here at most
        ``INFLATE_STEP`` bytes of output exist in memory at once; ``max_bytes``
        (node.max_instance_bytes) caps the inflated size and the free disk is checked every
        ``INFLATE_STEP`` against ``min_free`` (storage.min_free_bytes).  The caller owns the file.
        """
        import zlib

        from pydicom.dataset import FileMetaDataset
        from pydicom.filebase import DicomFileLike
        from pydicom.filewriter import write_file_meta_info
        from pydicom.uid import ExplicitVRLittleEndian

        meta = FileMetaDataset()
        for elem in file_meta:
            meta.add(elem)
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        fd, tmp = self._temp()
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)  # DICOM deflate is raw RFC 1951 (as pydicom reads it)
        written = 0
        try:
            with os.fdopen(fd, "wb") as out, open(src, "rb") as inp:
                out.write(b"\x00" * 128 + b"DICM")
                write_file_meta_info(DicomFileLike(out), meta)
                inp.seek(offset)
                while not inflater.eof:
                    pending = inp.read(INFLATE_STEP // 16)
                    if not pending:
                        break  # a stream cut short: what arrived is parsed (and judged) as it is
                    while pending:
                        data = inflater.decompress(pending, INFLATE_STEP)
                        pending = inflater.unconsumed_tail
                        written += len(data)
                        if written > max_bytes:
                            raise OSError(27, f"inflated data set larger than max_instance_bytes {max_bytes}")
                        if data and written // INFLATE_STEP != (written - len(data)) // INFLATE_STEP:
                            out.flush()
                            if self.free_bytes() - INFLATE_STEP < min_free:
                                raise OSError(28, f"inflating would pass storage.min_free_bytes {min_free}")
                        out.write(data)
                out.write(inflater.flush())
        except zlib.error as exc:  # not a deflate stream: the sender's problem (0xC000)
            tmp.unlink(missing_ok=True)
            raise ValueError(f"corrupt deflate stream ({exc})") from None
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return tmp

    def store_dataset(self, ds: Dataset, final: Path) -> Path:
        """Write a dataset durably (DICOM file format) to ``final``."""
        fd, tmp = self._temp()
        try:
            with os.fdopen(fd, "wb") as out:
                ds.save_as(out, enforce_file_format=True)
                out.flush()
                os.fsync(out.fileno())
            return self._commit(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
