"""Checks of a received data set before it is acknowledged: structure, UIDs, Pixel Data.

Why before: a C-STORE answered "Success" tells the modality it may delete its copy, so what
cannot be processed must get a failure status *now* (0xC000, or 0xA700 for what is too big
to process here), never be acknowledged and fail later in the worker.  Split from
:mod:`dicom_node.scp`, which receives and keeps; this only reads and judges.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["read_header", "pixel_data_problem", "budget_problem", "IMAGE_SIZE_KEYWORDS", "watch_arriving",
           "ArrivalWatch", "RefusedWhileReceiving", "content_digest"]

IMAGE_SIZE_KEYWORDS = ("Rows", "Columns", "NumberOfFrames", "SamplesPerPixel")


def read_header(src: Path, keywords: set[str], affected_sop: str, affected_class: str) -> tuple[dict[str, Any], str | None]:
    """The attributes routing needs, or why the dataset is not acceptable.

    One parse of the whole file with large values deferred (only their position is
    recorded), so a 100 MB radiograph is checked without being loaded: structure,
    UIDs, and the plausibility of its Pixel Data (:func:`pixel_data_problem`).
    """
    import warnings

    import pydicom
    from pydicom.uid import UID

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = pydicom.dcmread(src, defer_size=1024)
            attrs: dict[str, Any] = {kw: ds.get(kw) for kw in keywords}
            raw_pixels = ds.get_item(0x7FE00010, keep_deferred=True)
    except Exception as exc:  # noqa: BLE001 - anything unparsable is the sender's problem
        return {}, f"unparsable dataset ({exc.__class__.__name__})"
    for kw in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        value = attrs.get(kw)
        text = str(value or "").strip()
        if not text:
            return {}, f"missing {kw}"
        if not isinstance(value, str) or not UID(text).is_valid:
            return {}, f"invalid {kw}"
        attrs[kw] = text
    if affected_sop and attrs["SOPInstanceUID"] != affected_sop.strip():
        return {}, "SOPInstanceUID differs from the C-STORE request"
    if affected_class and attrs["SOPClassUID"] != affected_class.strip():
        return {}, "SOPClassUID differs from the C-STORE request"
    if any("End of file reached before delimiter" in str(w.message) for w in caught):
        return {}, "encapsulated pixel data cut short"
    problem = pixel_data_problem(ds, raw_pixels, src.stat().st_size)
    if problem:
        return {}, problem
    attrs["Modality"] = str(attrs.get("Modality") or "").strip()
    return attrs, None


def pixel_data_problem(ds: Any, raw: Any, file_size: int) -> str | None:
    """Why the Pixel Data of a received dataset cannot be right, or None when it is plausible.

    Why here: a dataset cut short, one whose declared length points past what arrived, or
    one whose Rows/Columns have a wrong VR must get a failure status *now*, not be
    acknowledged and fail later in the worker after the modality deleted its copy.  The
    declared length is compared with the file size and with what Rows x Columns x ... need;
    compressed pixel data is only checked structurally (its items were read to the
    delimiter), decoding it is the engine's job.  (Contributed by the interop suite.)
    """
    import math

    from pydicom.dataelem import RawDataElement

    if raw is None:
        # No pixels is fine for a structured report, but an image's Rows/Columns/BitsAllocated
        # without Pixel Data means an element before it swallowed it: a wrong VR with a 4-byte
        # length (US recoded as OB/UN/UT/...) reads the rest of the data set as its value.
        present = [kw for kw in ("Rows", "Columns", "BitsAllocated") if kw in ds]
        return f"{', '.join(present)} without Pixel Data (an element with a wrong VR or length)" if present else None
    dims: dict[str, int] = {}
    for kw, default in (("Rows", None), ("Columns", None), ("BitsAllocated", None), ("SamplesPerPixel", 1),
                        ("NumberOfFrames", 1)):
        try:
            value = ds.get(kw, default)
            number = int(value) if isinstance(value, (int, str)) and str(value).strip() else None
        except Exception:  # noqa: BLE001 - a value pydicom cannot convert (wrong VR or length)
            number = None
        if number is None or number <= 0 or (isinstance(value, str) and kw != "NumberOfFrames"):
            return f"invalid {kw}"
        dims[kw] = number
    if not isinstance(raw, RawDataElement) or raw.length == 0xFFFFFFFF:
        return None  # encapsulated (compressed) pixel data: its items were read to the delimiter
    if raw.value_tell + raw.length > file_size:
        return "pixel data shorter than its declared length"
    needed = math.ceil(dims["Rows"] * dims["Columns"] * dims["SamplesPerPixel"] * dims["NumberOfFrames"]
                       * dims["BitsAllocated"] / 8)
    if raw.length < needed:
        return f"pixel data has {raw.length} bytes, the image needs {needed}"
    return None


def content_digest(path: Path) -> str:
    """SHA-256 of the data set in a received file: a resend with the same SOP Instance UID and
    another digest is a correction (processed again), with the same digest a duplicate.  (The
    same data set in another transfer syntax also counts as a correction: processing it again
    changes nothing.)

    Without the File Meta Information: whoever wrote the file wrote it (pynetdicom for a C-STORE,
    the client for a STOW-RS part), so the same data set over the other protocol, or from another
    STOW-RS client, would otherwise count as a correction and be translated again.
    """
    import hashlib

    try:
        from pynetdicom.dsutils import split_dataset

        _, offset = split_dataset(path)
    except Exception:  # noqa: BLE001 - no readable meta: the whole file (read_header judges it)
        offset = 0
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def budget_problem(attrs: dict[str, Any], max_bytes: int | None) -> str | None:
    """Why an image to be translated needs more memory than node.max_decode_bytes (None: the
    engine's default budget), from its declared size alone; None when it fits or has no pixels.

    Checked at C-STORE: the 0xA700 tells the sender now, instead of a worker spending minutes
    and gigabytes on it while the studies behind it wait (the worker checks again).
    """
    from dicom_node.engine.dicom_decode import DEFAULT_MAX_DECODE_BYTES
    from dicom_node.engine.dicom_decode import budget_problem as engine_budget_problem

    try:
        rows, cols = int(attrs.get("Rows") or 0), int(attrs.get("Columns") or 0)
        frames, samples = int(attrs.get("NumberOfFrames") or 1), int(attrs.get("SamplesPerPixel") or 1)
    except (TypeError, ValueError):
        return None  # no image, or one pixel_data_problem judged already
    if rows <= 0 or cols <= 0:
        return None
    return engine_budget_problem(rows, cols, max_bytes or DEFAULT_MAX_DECODE_BYTES, frames, samples)


# -- while it arrives --------------------------------------------------------------------------
CHECK_EVERY = 4 * 1024 * 1024  # bytes received between two looks at the free disk


class RefusedWhileReceiving:
    """Stands in for pynetdicom's temp file once an arriving data set is refused: the rest is
    read from the network and dropped, so the sender still gets a C-STORE status (0xA700) on a
    usable association instead of an abort, and the disk is not filled."""

    def __init__(self, real: Any, reason: str) -> None:
        self.name, self.reason, self.file = real.name, reason, self

    def write(self, data: bytes) -> int:
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def tell(self) -> int:
        return 0


class ArrivalWatch:
    """The limits on one data set while it arrives (C-STORE or a STOW-RS part): larger than
    ``max_bytes`` (0: no limit), or the free disk (``free_bytes()``, looked at every
    :data:`CHECK_EVERY` bytes) would drop below ``min_free`` before the next look."""

    def __init__(self, *, max_bytes: int, free_bytes: Any, min_free: int) -> None:
        self.max_bytes, self.free_bytes, self.min_free = max_bytes, free_bytes, min_free
        self._checked: int | None = None  # the size at the last look at the disk

    def problem(self, size: int) -> str | None:
        """Why the data set must be refused now that ``size`` bytes of it arrived, or None."""
        if self.max_bytes and size > self.max_bytes:
            return f"larger than max_instance_bytes {self.max_bytes}"
        if self._checked is None or size - self._checked >= CHECK_EVERY:
            self._checked = size
            free = self.free_bytes()
            if free - CHECK_EVERY < self.min_free:
                return f"disk full while receiving ({free} bytes free, min_free_bytes {self.min_free})"
        return None


def watch_arriving(message: Any, *, max_bytes: int, free_bytes: Any, min_free: int) -> str | None:
    """Look at the data set pynetdicom is streaming to disk for ``message`` (its DIMSE message in
    progress); when it passes ``max_bytes`` or the free disk would drop below ``min_free`` before
    the next look, empty its file, drop the rest, and return why.

    Why: pynetdicom writes every received byte to its temp file and the handler sees the file
    only when it is complete: a 60 MB instance into 12 MB of free spool filled the disk, and the
    state database, the other associations and acknowledged work failed with it.  Called for
    each PDU received (EVT_PDU_RECV, in the association's DUL thread, which is also the writer).
    """
    f = getattr(message, "_data_set_file", None)
    if f is None or isinstance(f, RefusedWhileReceiving):
        return None
    watch = getattr(message, "_dicom_node_watch", None)
    if watch is None:
        watch = message._dicom_node_watch = ArrivalWatch(max_bytes=max_bytes, free_bytes=free_bytes,
                                                         min_free=min_free)
    reason = watch.problem(f.tell())
    if reason is None:
        return None
    try:
        f.truncate(0)
        f.close()
    except OSError:
        pass
    message._data_set_file = RefusedWhileReceiving(f, reason)
    return reason
