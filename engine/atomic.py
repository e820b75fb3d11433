"""Atomic, durable file writes: the one implementation the spool, destinations, engine and trainer share.

A file is written under a temporary name in its final folder and renamed over the target,
so a reader never sees a partial file.  "Durable" adds the fsyncs (file, then folder) that
make a crash leave either the old file or the complete new one.
"""
from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import Callable

__all__ = ["atomic_write", "fsync_dir", "umask_mode"]


def umask_mode() -> int:
    """The mode an ordinarily created file gets (0666 minus the umask).

    For files meant to be shared, such as style models: a temp file is 0600, and a model
    copied from it as root into /etc/dicom-node/models would stay unreadable to the service.
    Read from /proc (thread-safe); elsewhere the umask is set and restored.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    current = os.umask(0o022)
    os.umask(current)
    return 0o666 & ~current


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename or creation inside ``path`` durable.

    Filesystems that refuse fsync on a directory (EINVAL/ENOTSUP) are tolerated: the rename
    itself is still atomic there.  Any other error is raised.
    """
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def atomic_write(
    target: str | os.PathLike[str],
    write: Callable[[Path], object],
    *,
    durable: bool = True,
    mode: int | None = None,
) -> Path:
    """Create ``target`` by calling ``write(temp_path)`` and renaming the result into place.

    The temp file is made with mode 0600; ``mode`` sets another before the rename.
    ``durable=False`` skips the fsyncs (caches that can be rebuilt).  On any error the temp
    file is removed and the target is left as it was.
    """
    target = Path(target)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        if mode is not None:
            os.chmod(tmp, mode)
        if durable:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(target.parent)
    return target
