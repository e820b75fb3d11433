"""The pixel pipeline: DICOM/PNG/TIFF -> one float image in one polarity -> model space and back.

This is the ONE place where stored pixels are decoded and normalised; the engine and the
trainer both use it, so a model sees at inference exactly the intensities it saw in training.

Steps (and why):

0. Refuse before decoding what we cannot handle (colour, multi-frame, no pixels, too many
   pixels) and compressed frames that are truncated (JPEG/JPEG-LS without EOI: libjpeg and
   CharLS would decode them silently) or whose own size differs from Rows x Columns (a
   decoder must never allocate for a size the header did not announce).
1. Decode the stored values with pydicom (any transfer syntax it has a decoder plugin for).
   pydicom already masks to BitsStored and sign-extends PixelRepresentation 1.
2. Pixel Padding Value (+ Range Limit) is compared on the *stored* values, as the standard
   says, giving the ``valid`` mask. Padded pixels are excluded from the statistics.
3. Modality LUT (Rescale Slope/Intercept or a Modality LUT Sequence) gives physical units.
4. MONOCHROME1 is mirrored to MONOCHROME2 *within the range of possible modality values*
   (``lo + hi - x``), not negated: the twin MONOCHROME2 image (stored ``max - v``) then gives
   exactly the same float pixels, so the same model input, bit for bit, and values stay in
   the same numeric range. (A plain negation would also give the same *normalised* input,
   because percentile normalisation is invariant to a shift; the mirror is simply exact.)
   Presentation LUT Shape is not applied: in the DX/CR IODs ``INVERSE`` only restates
   MONOCHROME1, applying it again would invert twice.
5. ``normalize``: a robust percentile window of the valid pixels -> [-1, 1] (model space).

The VOI LUT/window of the source is deliberately ignored: it is a display choice that varies
between sites, while the percentile window depends only on the image content.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from .errors import UnsupportedImage, UserError
from .errors import first_line as _first_line
from .defaults import DEFAULT_NORMALIZATION

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_NORMALIZATION",
    "Radiograph",
    "decode_dataset",
    "read_dicom",
    "read_image_file",
    "sniff_format",
    "normalize",
    "to_output_pixels",
    "output_window",
    "OUTPUT_MAX",
]

# 64 Mpixel: a 43x43 cm detector at 0.1 mm is ~18 Mpixel; anything far beyond is an error
# or an attack, and float32 working copies of it would cost several GiB.
DEFAULT_MAX_PIXELS: int = 64 * 1024 * 1024
OUTPUT_MAX = 65535  # output pixels are uint16, model space [-1, 1] -> [0, OUTPUT_MAX]


@dataclass
class Radiograph:
    """A decoded grayscale image in one convention, whatever its source format.

    ``pixels`` are float32 modality-LUT values in MONOCHROME2 polarity (higher = brighter);
    ``valid`` is False where the source marked Pixel Padding (None when every pixel is valid).
    """

    pixels: np.ndarray
    valid: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.pixels.shape  # type: ignore[return-value]


# ---------------------------------------------------------------------------- DICOM decoding


def _check_decodable(ds: Dataset, max_pixels: int) -> None:
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
    return ~padded


def _stored_range(ds: Dataset) -> tuple[int, int]:
    """The smallest and largest value the stored pixels can take (BitsStored, signedness)."""
    bits = int(ds.BitsStored)
    if int(ds.get("PixelRepresentation", 0) or 0) == 1:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def _modality_lut(ds: Dataset, stored: np.ndarray) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut

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
    ts = str(ds.file_meta.get("TransferSyntaxUID", "")) if hasattr(ds, "file_meta") else ""
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
    ts = str(ds.file_meta.get("TransferSyntaxUID", "")) if hasattr(ds, "file_meta") else ""
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


def decode_dataset(ds: Dataset, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Radiograph:
    """Decode a single-frame grayscale DICOM image into a :class:`Radiograph`.

    Raises :class:`UnsupportedImage` (one line) for colour, multi-frame, non-image, too large
    or corrupt pixel data, or a transfer syntax no installed decoder handles.
    """
    _check_decodable(ds, max_pixels)
    _check_stream(ds)
    try:
        stored = _decode_stored(ds)
    except NotImplementedError as exc:  # no decoder plugin for this transfer syntax
        ts = ds.file_meta.get("TransferSyntaxUID", "unknown") if hasattr(ds, "file_meta") else "unknown"
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


def read_dicom(path: str | os.PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[Dataset, Radiograph]:
    """Read and decode a DICOM file. Every problem is one line that starts with the path.

    Raises :class:`UserError` for non-DICOM or unreadable files, :class:`UnsupportedImage`
    (a UserError) for images the engine refuses.
    """
    ds = _dcmread(path)
    try:
        return ds, decode_dataset(ds, max_pixels=max_pixels)
    except UnsupportedImage as exc:
        raise UnsupportedImage(f"{path}: {exc}") from None


def _dcmread(path: str | os.PathLike) -> Dataset:
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(str(path))
        if "SOPInstanceUID" not in ds or "SOPClassUID" not in ds:
            # pydicom drops the whole data set when a file ends inside an undefined-length
            # element (e.g. encapsulated Pixel Data cut short), leaving only the file meta.
            raise UserError(f"{path}: corrupt DICOM file (no SOP Class/Instance UID: truncated?)")
        return ds
    except UserError:
        raise
    except InvalidDicomError:
        pass  # maybe a bare dataset without the 128-byte preamble and file meta: try below
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory") from None
    except Exception as exc:  # noqa: BLE001 - truncated/garbled files raise all sorts
        raise UserError(f"{path}: corrupt DICOM file ({_first_line(exc)})") from None
    try:
        # A bare data set (no preamble, no 'DICM'): only what sniff_format recognises is worth
        # a forced parse of a possibly huge file.
        if sniff_format(path) == "dicom":
            ds = pydicom.dcmread(str(path), force=True)
            if "SOPClassUID" in ds and "SOPInstanceUID" in ds:
                _set_transfer_syntax_from_encoding(ds)
                return ds
    except Exception:  # noqa: BLE001
        pass
    raise UserError(f"{path}: not a DICOM file")


def _set_transfer_syntax_from_encoding(ds: Dataset) -> None:
    """Without file meta, pydicom knows how it parsed the data set but cannot decode pixels."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    if "TransferSyntaxUID" in getattr(ds, "file_meta", {}):
        return
    implicit, little = getattr(ds, "original_encoding", (True, True))
    if not hasattr(ds, "file_meta") or ds.file_meta is None:
        ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit
                                      else ExplicitVRLittleEndian if little else ExplicitVRBigEndian)


# ------------------------------------------------------------------- recognising a file


_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF, both byte orders
# Explicit VR codes, to tell the first element of a bare explicit-VR data set.
_VRS = frozenset(v.encode() for v in (
    "AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR "
    "US UT UV").split())


def _bare_dataset(head: bytes, size: int) -> bool:
    """Does ``head`` start like a data set written without preamble and file meta?

    Such a file (old devices, some exports) starts with a little-endian group 0008 (or 0002)
    tag, then an explicit VR code or an implicit-VR 32-bit length that fits in the file.
    """
    if len(head) < 8 or head[:2] not in (b"\x08\x00", b"\x02\x00"):
        return False
    if head[4:6] in _VRS:
        return True
    length = int.from_bytes(head[4:8], "little")
    return length == 0xFFFFFFFF or length <= size - 8


def sniff_format(path: str | os.PathLike) -> str | None:
    """``"dicom"``, ``"png"``, ``"tiff"`` or None (unknown or unreadable), from the content alone.

    The ONE recognition rule, used by the trainer (:func:`read_image_file`), by
    ``dicom-node translate`` when it scans folders and by :func:`read_dicom` for bare data
    sets, so that every file the node reads is also training data.

    DICOM is recognised first: a Part 10 file has ``DICM`` at offset 128 whatever its
    128-byte preamble holds, and PS3.10 7.1 lets the preamble carry a TIFF header (a
    dual-personality file), so raster magic at offset 0 is only checked afterwards. A data set
    without preamble and file meta counts as DICOM when it starts like one (see
    :func:`_bare_dataset`).
    """
    try:
        with open(path, "rb") as f:
            head = f.read(132)
            size = os.fstat(f.fileno()).st_size
    except OSError:
        return None
    if head[128:132] == b"DICM":
        return "dicom"
    if head[:8] == _PNG_MAGIC:
        return "png"
    if head[:4] in _TIFF_MAGIC:
        return "tiff"
    if _bare_dataset(head, size):
        return "dicom"
    return None


# --------------------------------------------------------------------- PNG / TIFF (training)


def read_image_file(path: str | os.PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Radiograph:
    """A DICOM, PNG or TIFF (8 or 16 bit grayscale) radiograph, recognised by content.

    Recognition is :func:`sniff_format` (DICOM before raster formats, so a dual-personality
    DICOM/TIFF file is read as the DICOM it is, exactly as the node reads it). Anything not
    recognised as PNG or TIFF goes to :func:`read_dicom`, whose one-line errors say why it is
    unreadable. PNG/TIFF values are taken as MONOCHROME2 (higher = brighter), which is what
    image exports of radiographs use. For training data; the node only reads DICOM.
    """
    p = Path(path)
    if sniff_format(p) in ("png", "tiff"):
        return _read_raster(p, max_pixels)
    return read_dicom(p, max_pixels=max_pixels)[1]


_GRAY_MODES = ("L", "I;16", "I;16B", "I;16L", "I;16N", "I", "F", "1")


def _read_raster(p: Path, max_pixels: int) -> Radiograph:
    """PNG/TIFF grayscale; RGB(A) only when the three channels are equal (a grey export)."""
    from PIL import Image

    try:
        with Image.open(p) as im:
            w, h = im.size  # header only: the size check comes before loading any pixels
            if w * h > max_pixels:
                raise UnsupportedImage(f"{p}: image too large: {h}x{w} = {h * w} pixels > limit {max_pixels}")
            if getattr(im, "n_frames", 1) > 1:
                raise UnsupportedImage(f"{p}: multi-page images are not supported")
            if im.mode == "LA":
                im = im.getchannel("L")
            if im.mode not in _GRAY_MODES + ("RGB", "RGBA"):
                raise UnsupportedImage(f"{p}: colour images are not supported (mode {im.mode})")
            arr = np.asarray(im)
    except UnsupportedImage:
        raise
    except Image.DecompressionBombError:
        raise UnsupportedImage(f"{p}: image too large for the image library's safety limit") from None
    except Exception as exc:  # noqa: BLE001 - pillow raises many types for broken files
        raise UserError(f"{p}: corrupt image file ({_first_line(exc)})") from None
    if arr.ndim == 3:
        rgb = arr[..., :3]
        if not ((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 0] == rgb[..., 2]).all()):
            raise UnsupportedImage(f"{p}: colour images are not supported")
        arr = rgb[..., 0]
    return Radiograph(pixels=np.ascontiguousarray(arr, dtype=np.float32), valid=None)


# ----------------------------------------------------------------------------- model space


def _window_values(img: Radiograph, normalization: Mapping[str, Any]) -> tuple[float, float]:
    """The two pixel values that ``normalization`` maps to -1 and +1."""
    method = str(normalization.get("method", "percentile"))
    values = img.pixels if img.valid is None else img.pixels[img.valid]
    if values.size == 0:
        raise UnsupportedImage("every pixel is padding")
    if method == "percentile":
        low = float(normalization.get("low", 0.5))
        high = float(normalization.get("high", 99.5))
        lo, hi = np.percentile(values, [low, high])
    elif method == "minmax":
        lo, hi = values.min(), values.max()
    elif method == "fixed":  # absolute values, e.g. a known detector range
        lo, hi = normalization["low"], normalization["high"]
    else:
        raise UserError(f"unknown normalization method {method!r}")
    return float(lo), float(hi)


def normalize(img: Radiograph, normalization: Mapping[str, Any] | None = None) -> np.ndarray:
    """Map a radiograph to model space: float32, the window's low..high -> -1..1.

    ``normalization`` comes from the model metadata (default: 0.5..99.5 percentile of the
    valid pixels). Values outside the window are clipped to [-1, 1] (the generator's output
    range, so that input and output live in the same space) unless ``"clip": false``.
    Padded pixels become -1 (they carry no anatomy and must not produce extreme inputs).
    """
    norm = dict(DEFAULT_NORMALIZATION if normalization is None else normalization)
    lo, hi = _window_values(img, norm)
    scale = 2.0 / (hi - lo) if hi > lo else 1.0
    # float32 throughout (a 20 Mpixel image costs 80 MB per copy, not 160); the same pixels
    # always give the same result, which is what the MONOCHROME1/2 twin property needs.
    x = img.pixels.astype(np.float32, copy=True)
    x -= np.float32(lo)
    x *= np.float32(scale)
    x -= np.float32(1.0)
    if norm.get("clip", True):
        np.clip(x, -1.0, 1.0, out=x)
    if img.valid is not None:
        x[~img.valid] = -1.0
    return x


def to_output_pixels(y: np.ndarray) -> np.ndarray:
    """Model space -> uint16 MONOCHROME2: -1..1 -> 0..65535 (clipped, rounded)."""
    out = np.clip(np.asarray(y, dtype=np.float32), -1.0, 1.0)
    out += np.float32(1.0)
    out *= np.float32(OUTPUT_MAX / 2.0)
    np.rint(out, out=out)  # float32 is exact to < 0.01 here; rounding is to the nearest level
    return out.astype(np.uint16)


def output_window(model_range: tuple[float, float] | None = None) -> tuple[float, float]:
    """(WindowCenter, WindowWidth) for the uint16 output, so it displays like the target style.

    Why the full range by default: the model was trained on the target style normalised the
    same way, so in model space the target style's own p_low..p_high percentiles are -1..1.
    Showing -1..1 as black..white therefore shows the output exactly as the target style's
    images look under the same robust auto-window. A model whose target style is usually
    displayed with a different window records it in model space as metadata
    ``output.window = [low, high]`` (e.g. [-0.9, 0.8]); pass it here.

    The DICOM linear VOI function maps ``c - 0.5 - (w - 1) / 2`` to black and
    ``c - 0.5 + (w - 1) / 2`` to white, so stored values a..b need ``w = b - a + 1`` and
    ``c = (a + b) / 2 + 0.5`` (for 0..65535: center 32768, width 65536).
    """
    low, high = (-1.0, 1.0) if model_range is None else (float(model_range[0]), float(model_range[1]))
    if not high > low:
        raise UserError(f"invalid output window {model_range!r}: high must be above low")
    a, b = ((np.clip([low, high], -1.0, 1.0) + 1.0) * (OUTPUT_MAX / 2.0)).tolist()
    return (a + b) / 2.0 + 0.5, b - a + 1.0
