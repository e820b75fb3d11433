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
5. ``normalize``: the model's window of those values -> [-1, 1] (model space): a fixed window
   per domain (``dicom-node train``'s default) or each image's robust percentiles (older
   models, mixed archives); ``engine.radiograph`` states the rule and why.

The VOI LUT/window of the source is deliberately ignored: it is a display choice that varies
between sites, not part of the values a style maps.

Modules: :mod:`.radiograph` (the image type, model space and output pixels),
:mod:`.dicom_decode` (steps 0-4 for a DICOM data set), this module (recognising and reading
files: DICOM, PNG, TIFF). Every name is importable from here.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from .defaults import DEFAULT_NORMALIZATION
from .dicom_decode import decode_dataset
from .errors import UnsupportedImage, UserError
from .errors import first_line as _first_line
from .radiograph import (
    DEFAULT_MAX_PIXELS,
    FULL_RANGE,
    OUTPUT_MAX,
    OutputScale,
    Radiograph,
    normalize,
    output_scale,
    output_window,
    rewindow,
    target_normalization,
    to_output_pixels,
)

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
    "OutputScale",
    "FULL_RANGE",
    "output_scale",
    "target_normalization",
    "rewindow",
]


# ------------------------------------------------------------------------- reading DICOM


def read_dicom(path: str | os.PathLike[str], *, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[Dataset, Radiograph]:
    """Read and decode a DICOM file. Every problem is one line that starts with the path.

    Raises :class:`UserError` for non-DICOM or unreadable files, :class:`UnsupportedImage`
    (a UserError) for images the engine refuses.
    """
    ds = _dcmread(path)
    try:
        return ds, decode_dataset(ds, max_pixels=max_pixels)
    except UnsupportedImage as exc:
        raise UnsupportedImage(f"{path}: {exc}") from None


def _dcmread(path: str | os.PathLike[str]) -> Dataset:
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


def sniff_format(path: str | os.PathLike[str]) -> str | None:
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


def read_image_file(path: str | os.PathLike[str], *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Radiograph:
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

