"""DICOM data set -> :class:`Radiograph`: steps 0-4 of the pixel pipeline (``engine.pixels``).

Refuse what the engine does not handle before decoding (colour, multi-frame, no pixels, too
many pixels, truncated or mis-sized compressed frames), decode with the fastest installed
plugin, then Pixel Padding mask, Modality LUT and the MONOCHROME1 mirror.
"""
from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset

from .errors import UnsupportedImage
from .errors import first_line as _first_line
from .radiograph import DEFAULT_MAX_PIXELS, Radiograph

__all__ = ["decode_dataset", "transfer_syntax", "WORKING_BYTES_PER_PIXEL", "DEFAULT_MAX_DECODE_BYTES",
           "processing_bytes", "budget_problem"]

# What one image costs to process, per pixel: float32 (4 bytes) x the working copies the
# decoder, the pixel pipeline, the translation and the fidelity guard hold at once.  Measured
# (peak RSS growth of decode_dataset + translate_radiograph, tiny model, CPU): 95 bytes per
# pixel from 2048x2048 to 4096x4096 (+1.1 GiB for 12.6 Mpixel more); a codec's own buffers
# come on top, so 32 copies (128 bytes) are budgeted.
WORKING_BYTES_PER_PIXEL = 4 * 32
# 50 Mpixel (a 7000x7000 image: a stitched long-leg study fits; a CR or DX is 4-18 Mpixel), while
# the engine's 64 Mpixel limit alone let an 8000x8000 image cost 8.3 GB.  Lower it on small machines.
DEFAULT_MAX_DECODE_BYTES = 6 * 1024**3


def processing_bytes(rows: int, cols: int, frames: int = 1, samples: int = 1) -> int:
    """The memory an image of this declared size needs to be processed (see above)."""
    return int(rows) * int(cols) * max(1, int(frames)) * max(1, int(samples)) * WORKING_BYTES_PER_PIXEL


def budget_problem(rows: int, cols: int, max_bytes: int | None, frames: int = 1, samples: int = 1) -> str | None:
    """Why an image of this declared size cannot be processed within ``max_bytes``, or None.

    Why before decoding: a 2 MB RLE image declaring 8000x8000 cost 8.3 GB and 200 s of worker
    time while the studies behind it waited; the declared size alone says so in advance.
    """
    if not max_bytes:
        return None
    need = processing_bytes(rows, cols, frames, samples)
    if need <= max_bytes:
        return None
    return (f"image too large to process: {rows}x{cols} needs about {need / 2**30:.1f} GiB, "
            f"the budget per image is {max_bytes / 2**30:.1f} GiB")


def transfer_syntax(ds: Dataset) -> str:
    """The Transfer Syntax UID in the data set's file meta, "" when it has none."""
    meta = getattr(ds, "file_meta", None)
    return str(getattr(meta, "TransferSyntaxUID", "") or "")


# ---------------------------------------------------------------------------- DICOM decoding


def _check_decodable(ds: Dataset, max_pixels: int, max_bytes: int | None = None) -> None:
    """Refuse, before decoding anything, what the engine does not handle (one-line reasons)."""
    if "PixelData" not in ds:
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            raise UnsupportedImage("float pixel data is not supported")
        if "Rows" in ds and "Columns" in ds and "BitsAllocated" in ds:
            # An image whose Pixel Data pydicom could not read: a file cut inside it.
            raise UnsupportedImage("corrupt image: Pixel Data is missing or the file is truncated")
        modality = ds.get("Modality", "")
        what = f"{modality} object" if modality else "object"
        raise UnsupportedImage(f"not an image: {what} has no Pixel Data")
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    pi = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if not pi:
        raise UnsupportedImage("corrupt image: PhotometricInterpretation is missing")
    if spp != 1 or pi not in ("MONOCHROME1", "MONOCHROME2"):
        raise UnsupportedImage(f"colour images are not supported (PhotometricInterpretation {pi}, "
                               f"SamplesPerPixel {spp})")
    frames = ds.get("NumberOfFrames", 1)
    try:
        frames = int(frames or 1)
    except (TypeError, ValueError):
        raise UnsupportedImage(f"invalid Number of Frames {frames!r}") from None
    if frames > 1:
        raise UnsupportedImage(f"multi-frame images are not supported yet ({frames} frames)")
    for kw in ("Rows", "Columns", "BitsAllocated", "BitsStored"):
        if ds.get(kw) in (None, "", 0):
            raise UnsupportedImage(f"corrupt image: {kw} is missing or zero")
    rows, cols = int(ds.Rows), int(ds.Columns)
    if rows * cols > max_pixels:
        raise UnsupportedImage(f"image too large: {rows}x{cols} = {rows * cols} pixels > limit {max_pixels}")
    problem = budget_problem(rows, cols, max_bytes)
    if problem:
        raise UnsupportedImage(problem)
    if int(ds.BitsStored) > int(ds.BitsAllocated):
        raise UnsupportedImage(f"corrupt image: BitsStored {ds.BitsStored} > BitsAllocated {ds.BitsAllocated}")


def _as_stored_value(ds: Dataset, value: int) -> int:
    """A padding value as a (signed) stored value: some writers encode a signed image's Pixel
    Padding Value with VR US, e.g. 0xF800 for -2048."""
    bits = int(ds.BitsAllocated)
    if int(ds.get("PixelRepresentation", 0) or 0) == 1 and value >= 1 << (bits - 1):
        return value - (1 << bits)
    return value


def _padding_mask(ds: Dataset, stored: np.ndarray) -> np.ndarray | None:
    """``valid`` mask from Pixel Padding Value (+ Pixel Padding Range Limit), on stored values."""
    ppv = ds.get("PixelPaddingValue")
    if ppv is None or ppv == "" or isinstance(ppv, (bytes, bytearray)):
        return None
    ppv = _as_stored_value(ds, int(ppv))
    limit = ds.get("PixelPaddingRangeLimit")
    if limit is None or limit == "" or isinstance(limit, (bytes, bytearray)):
        padded = stored == ppv
    else:
        lo, hi = sorted((ppv, _as_stored_value(ds, int(limit))))
        padded = (stored >= lo) & (stored <= hi)
    if not padded.any():
        return None
    valid: np.ndarray = ~padded
    return valid


def _stored_range(ds: Dataset) -> tuple[int, int]:
    """The smallest and largest value the stored pixels can take (BitsStored, signedness)."""
    bits = int(ds.BitsStored)
    if int(ds.get("PixelRepresentation", 0) or 0) == 1:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def _modality_lut(ds: Dataset, stored: np.ndarray) -> np.ndarray:
    from pydicom.pixels.processing import apply_modality_lut

    if "ModalityLUTSequence" not in ds and "RescaleSlope" not in ds and "RescaleIntercept" not in ds:
        return stored.astype(np.float32)
    return np.asarray(apply_modality_lut(stored, ds), dtype=np.float32)


def _monochrome1_mirror(ds: Dataset) -> float:
    """``lo + hi`` of the possible modality values, so that MONOCHROME1 ``x`` -> ``lo + hi - x``."""
    s_lo, s_hi = _stored_range(ds)
    if "ModalityLUTSequence" in ds and s_hi - s_lo <= 1 << 16:
        values = _modality_lut(ds, np.arange(s_lo, s_hi + 1, dtype=np.int64))
    else:
        values = _modality_lut(ds, np.array([s_lo, s_hi], dtype=np.int64))
    return float(values.min()) + float(values.max())


# Measured on a 2500x2048 12-bit JPEG-LS image: CharLS (pyjpegls) 0.45 s, pydicom's default
# plugin choice 1.3-2.4 s. Preferred plugins are tried first; pydicom's choice is the fallback.
_PREFERRED_PLUGINS = {
    "1.2.840.10008.1.2.4.80": "pyjpegls",
    "1.2.840.10008.1.2.4.81": "pyjpegls",
}


def _decode_stored(ds: Dataset) -> np.ndarray:
    """The stored values (masked to BitsStored, sign-extended), with the fastest decoder."""
    ts = transfer_syntax(ds)
    plugin = _PREFERRED_PLUGINS.get(ts)
    if plugin:
        try:
            ds.pixel_array_options(decoding_plugin=plugin)
            return ds.pixel_array
        except Exception:  # noqa: BLE001 - plugin missing or failed: let pydicom pick
            ds.pixel_array_options(decoding_plugin="")
    return ds.pixel_array


# ISO 10918 (JPEG) and JPEG-LS streams end with the EOI marker. libjpeg and CharLS decode a
# truncated stream without an error (measured: a stream cut at 90 % decodes, grey below the
# cut), so a missing EOI is the only reliable sign of truncation for these syntaxes.
_JPEG_SYNTAXES = {
    "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57",
    "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81",
}
_J2K_SYNTAXES = {
    "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91",
    "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203",
}
# Start-of-frame markers: ISO 10918 SOF0..SOF15 (not DHT C4, JPG C8, DAC CC) and JPEG-LS SOF55.
_SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7}


def _jpeg_size(stream: bytes) -> tuple[int, int] | None:
    """(rows, columns) from a JPEG / JPEG-LS frame header, None when not found."""
    i = 2 if stream[:2] == b"\xff\xd8" else -1
    while 0 <= i < len(stream) - 8:
        if stream[i] != 0xFF:
            return None
        marker = stream[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        length = int.from_bytes(stream[i + 2:i + 4], "big")
        if marker in _SOF_MARKERS:
            return int.from_bytes(stream[i + 5:i + 7], "big"), int.from_bytes(stream[i + 7:i + 9], "big")
        if marker == 0xDA:  # start of scan before any frame header
            return None
        i += 2 + length
    return None


def _j2k_size(stream: bytes) -> tuple[int, int] | None:
    """(rows, columns) from a JPEG 2000 SIZ marker segment (raw codestream or JP2)."""
    i = stream.find(b"\xff\x4f\xff\x51")
    if i < 0 or len(stream) < i + 24:
        return None
    x, y, x0, y0 = (int.from_bytes(stream[i + 8 + 4 * k:i + 12 + 4 * k], "big") for k in range(4))
    return y - y0, x - x0


def _check_stream(ds: Dataset) -> None:
    """Before decoding: the compressed frame must match the header and (JPEG) be complete.

    A frame whose own size differs from Rows x Columns is refused without decoding it, so
    a small header over a huge stream cannot make a decoder allocate gigabytes.
    """
    ts = transfer_syntax(ds)
    if ts not in _JPEG_SYNTAXES and ts not in _J2K_SYNTAXES:
        return
    from pydicom.encaps import generate_frames

    try:
        frame = bytes(next(generate_frames(ds.PixelData, number_of_frames=1)))
    except Exception as exc:  # noqa: BLE001 - broken encapsulation
        raise UnsupportedImage(f"corrupt pixel data: {_first_line(exc)}") from None
    size = _jpeg_size(frame) if ts in _JPEG_SYNTAXES else _j2k_size(frame)
    expected = (int(ds.Rows), int(ds.Columns))
    # JPEG allows height 0 in the frame header (defined later by a DNL marker).
    if size is not None and size != expected and not (ts in _JPEG_SYNTAXES and size[0] == 0):
        raise UnsupportedImage(f"corrupt pixel data: the compressed frame is {size[0]}x{size[1]}, "
                               f"the header says {expected[0]}x{expected[1]}")
    # Encapsulation pads odd lengths with one 0x00; tolerate a few bytes of trailing padding.
    if ts in _JPEG_SYNTAXES and b"\xff\xd9" not in frame[-16:]:
        raise UnsupportedImage("corrupt pixel data: the compressed stream is truncated (no end-of-image marker)")


def decode_dataset(ds: Dataset, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                   max_bytes: int | None = None) -> Radiograph:
    """Decode a single-frame grayscale DICOM image into a :class:`Radiograph`.

    Raises :class:`UnsupportedImage` (one line) for colour, multi-frame, non-image, too large
    (``max_pixels``, or more than ``max_bytes`` to process: :func:`budget_problem`) or corrupt
    pixel data, or a transfer syntax no installed decoder handles.
    """
    _check_decodable(ds, max_pixels, max_bytes)
    _check_stream(ds)
    try:
        stored = _decode_stored(ds)
    except NotImplementedError as exc:  # no decoder plugin for this transfer syntax
        ts = transfer_syntax(ds) or "unknown"
        raise UnsupportedImage(f"cannot decode transfer syntax {ts}: {_first_line(exc)}") from None
    except Exception as exc:  # noqa: BLE001 - every decoder failure means corrupt/unreadable pixels
        raise UnsupportedImage(f"corrupt pixel data: {_first_line(exc)}") from None
    if stored.ndim != 2 or stored.shape != (int(ds.Rows), int(ds.Columns)):
        raise UnsupportedImage(f"corrupt pixel data: decoded shape {stored.shape} "
                               f"does not match {ds.Rows}x{ds.Columns}")
    valid = _padding_mask(ds, stored)
    try:
        pixels = _modality_lut(ds, stored)
        if str(ds.PhotometricInterpretation).strip().upper() == "MONOCHROME1":
            pixels = np.float32(_monochrome1_mirror(ds)) - pixels
    except (ValueError, TypeError, IndexError, KeyError) as exc:
        raise UnsupportedImage(f"invalid Modality LUT: {_first_line(exc)}") from None
    return Radiograph(pixels=np.ascontiguousarray(pixels, dtype=np.float32), valid=valid)
