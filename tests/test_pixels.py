"""The pixel pipeline: every common transfer syntax, Modality LUT, polarity, padding, refusals."""
from __future__ import annotations

import numpy as np
import pydicom
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from dicom_node.engine.pixels import (
    OUTPUT_MAX,
    Radiograph,
    decode_dataset,
    normalize,
    output_window,
    read_dicom,
    read_image_file,
    to_output_pixels,
)
from dicom_node.errors import UnsupportedImage, UserError
from tests.factory import encode_as, make_dataset, make_non_image, phantom, write

ROWS, COLS = 64, 48


def _dataset_8bit() -> pydicom.Dataset:
    px = phantom(ROWS, COLS, bits=8)
    ds = make_dataset(px, bits_stored=8)
    ds.BitsAllocated = 8
    ds.PixelData = px.astype(np.uint8).tobytes()
    return ds


LOSSLESS = [
    (ImplicitVRLittleEndian, {}),
    (ExplicitVRLittleEndian, {}),
    (ExplicitVRBigEndian, {}),
    (DeflatedExplicitVRLittleEndian, {}),
    (JPEGLossless, {}),
    (JPEGLosslessSV1, {}),
    (JPEGLSLossless, {}),
    (JPEG2000Lossless, {}),
    (RLELossless, {}),
]


@pytest.mark.parametrize("syntax,kwargs", LOSSLESS, ids=[s.name for s, _ in LOSSLESS])
def test_lossless_transfer_syntaxes_round_trip_exactly(tmp_path, syntax, kwargs):
    source = phantom(ROWS, COLS, bits=12, seed=3)
    ds = make_dataset(source, bits_stored=12)
    path = write(encode_as(ds, syntax, **kwargs), tmp_path / "in.dcm")
    read, img = read_dicom(path)
    assert read.file_meta.TransferSyntaxUID == syntax
    assert img.pixels.dtype == np.float32 and img.valid is None
    np.testing.assert_array_equal(img.pixels, source.astype(np.float32))


def test_jpeg_process14_stream_really_uses_a_non_sv1_predictor(tmp_path):
    """Guards the test above: the .57 file must not silently be an SV1 stream."""
    ds = encode_as(make_dataset(phantom(ROWS, COLS, 12), bits_stored=12), JPEGLossless)
    stream = bytes(ds.PixelData)
    sos = stream.index(b"\xff\xda")
    n_components = stream[sos + 4]
    predictor = stream[sos + 5 + 2 * n_components]
    assert predictor == 7


LOSSY = [
    (JPEGBaseline8Bit, {}, 8),
    (JPEGExtended12Bit, {}, 12),
    (JPEGLSNearLossless, {"jls_error": 3}, 12),
    (JPEG2000, {"j2k_cr": [3]}, 12),
]


@pytest.mark.parametrize("syntax,kwargs,bits", LOSSY, ids=[s.name for s, _, _ in LOSSY])
def test_lossy_transfer_syntaxes_decode_close_to_the_source(tmp_path, syntax, kwargs, bits):
    ds = _dataset_8bit() if bits == 8 else make_dataset(phantom(ROWS, COLS, 12), bits_stored=12)
    source = ds.pixel_array.astype(np.float32)
    path = write(encode_as(ds, syntax, **kwargs), tmp_path / "in.dcm")
    read, img = read_dicom(path)
    assert read.file_meta.TransferSyntaxUID == syntax
    err = np.abs(img.pixels - source)
    full_range = 2**bits - 1
    assert err.mean() < 0.01 * full_range
    if syntax == JPEGLSNearLossless:
        assert err.max() <= 3  # near-lossless bound NEAR
    assert not np.array_equal(img.pixels, source) or syntax == JPEGLSNearLossless


def test_bits_stored_below_bits_allocated_ignores_the_high_bits():
    ds = make_dataset(np.zeros((2, 2), np.uint16), bits_stored=12)
    ds.PixelData = np.array([[0xF001, 0x0FFF], [0xA800, 0x1234]], dtype=np.uint16).tobytes()
    np.testing.assert_array_equal(decode_dataset(ds).pixels, [[1, 4095], [2048, 0x234]])


def test_signed_rescaled_padded_image():
    rng = np.random.default_rng(0)
    stored = rng.integers(-1500, 2047, size=(ROWS, COLS)).astype(np.int16)
    stored[:4, :] = -2048  # padding border (collimator) ...
    stored[:, :3] = -2040  # ... and a range of padding values
    raw = stored.astype(np.uint16) & 0x0FFF  # 12-bit two's complement; high bits garbage below
    raw[::2, ::2] |= 0x5000
    ds = make_dataset(np.zeros((ROWS, COLS), np.uint16), bits_stored=12)
    ds.PixelRepresentation = 1
    ds.PixelData = raw.tobytes()
    ds.RescaleSlope = 0.5
    ds.RescaleIntercept = 100
    ds.PixelPaddingValue = -2048
    ds.PixelPaddingRangeLimit = -2030

    img = decode_dataset(ds)
    expected_valid = np.ones((ROWS, COLS), bool)
    expected_valid[:4, :] = False
    expected_valid[:, :3] = False
    np.testing.assert_array_equal(img.valid, expected_valid)
    np.testing.assert_allclose(img.pixels, stored * 0.5 + 100, rtol=0, atol=1e-4)

    x = normalize(img)
    lo, hi = np.percentile(img.pixels[expected_valid], [0.5, 99.5])
    expected = np.clip((img.pixels.astype(np.float64) - lo) * 2 / (hi - lo) - 1, -1, 1)
    np.testing.assert_allclose(x[expected_valid], expected[expected_valid], atol=1e-6)
    assert np.all(x[~expected_valid] == -1.0)


def test_signed_padding_value_written_as_unsigned_is_understood(tmp_path):
    stored = phantom(ROWS, COLS, 11).astype(np.int16) - 1000
    stored[:2] = -2048
    ds = make_dataset(np.zeros((ROWS, COLS), np.uint16), bits_stored=12)
    ds.PixelRepresentation = 1
    ds.PixelData = (stored.astype(np.uint16) & 0x0FFF).tobytes()
    ds.add_new("PixelPaddingValue", "US", 0xF800)  # -2048 as a 16-bit two's complement, VR US
    path = write(ds, tmp_path / "x.dcm")
    _, img = read_dicom(path)
    np.testing.assert_array_equal(img.valid, stored != -2048)


def test_padding_value_alone_marks_only_that_value():
    px = phantom(ROWS, COLS, 12)
    px[0, :] = 0
    ds = make_dataset(px, bits_stored=12)
    ds.PixelPaddingValue = 0
    img = decode_dataset(ds)
    np.testing.assert_array_equal(img.valid, px != 0)


def test_modality_lut_sequence_is_applied():
    px = phantom(ROWS, COLS, 12)
    ds = make_dataset(px, bits_stored=12)
    lut = (np.sqrt(np.arange(4096)) * 100).astype(np.uint16)
    item = pydicom.Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.ModalityLUTType = "US"
    item.LUTData = lut.tolist()
    ds.ModalityLUTSequence = [item]
    np.testing.assert_array_equal(decode_dataset(ds).pixels, lut[px].astype(np.float32))


@pytest.mark.parametrize("bits,slope,intercept", [(12, None, None), (8, None, None), (12, 2.0, -1000.0)])
def test_monochrome1_gives_the_same_model_input_as_its_monochrome2_twin(bits, slope, intercept):
    v2 = phantom(ROWS, COLS, bits, seed=5)
    v1 = (2**bits - 1) - v2  # the same image stored inverted
    twins = []
    for photometric, px in (("MONOCHROME2", v2), ("MONOCHROME1", v1)):
        ds = make_dataset(px, bits_stored=bits, photometric=photometric)
        if slope is not None:
            ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        twins.append(decode_dataset(ds))
    mono2, mono1 = twins
    np.testing.assert_array_equal(mono1.pixels, mono2.pixels)  # exact: mirrored in the value range
    np.testing.assert_array_equal(normalize(mono1), normalize(mono2))
    # Higher = brighter after decoding: the MONOCHROME1 stored minimum is the brightest pixel.
    assert mono1.pixels[np.unravel_index(np.argmin(v1), v1.shape)] == mono1.pixels.max()


def test_percentile_normalisation_of_the_negation_is_the_negation():
    """Why polarity could also be fixed after normalising: norm(-x) == -norm(x) for symmetric p."""
    img = Radiograph(phantom(ROWS, COLS, 12).astype(np.float32))
    neg = Radiograph(-img.pixels)
    np.testing.assert_allclose(normalize(neg), -normalize(img), atol=1e-6)


def test_normalize_maps_the_percentile_window_to_minus_one_one():
    pixels = np.arange(1000, dtype=np.float32).reshape(25, 40)
    x = normalize(Radiograph(pixels), {"method": "percentile", "low": 10, "high": 90})
    lo, hi = np.percentile(pixels, [10, 90])
    assert x.dtype == np.float32
    assert x[pixels <= lo].max() == -1.0 and x[pixels >= hi].min() == 1.0
    mid = (pixels > lo) & (pixels < hi)
    np.testing.assert_allclose(x[mid], (pixels[mid] - lo) * 2 / (hi - lo) - 1, atol=1e-6)
    unclipped = normalize(Radiograph(pixels), {"method": "percentile", "low": 10, "high": 90, "clip": False})
    assert unclipped.min() < -1.0 and unclipped.max() > 1.0
    flat = normalize(Radiograph(np.full((4, 4), 7, np.float32)))
    assert np.isfinite(flat).all()
    with pytest.raises(UserError, match="unknown normalization"):
        normalize(Radiograph(pixels), {"method": "magic"})


def test_output_pixels_and_window():
    y = np.array([[-2.0, -1.0, 0.0, 1.0, 3.0]], np.float32)
    np.testing.assert_array_equal(to_output_pixels(y), [[0, 0, 32768, OUTPUT_MAX, OUTPUT_MAX]])
    assert to_output_pixels(y).dtype == np.uint16
    # DICOM linear VOI: black at c - 0.5 - (w-1)/2, white at c - 0.5 + (w-1)/2.
    center, width = output_window()
    assert (center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2) == (0.0, OUTPUT_MAX)
    center, width = output_window((-0.5, 0.5))
    black, white = center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
    np.testing.assert_allclose([black, white], to_output_pixels(np.array([-0.5, 0.5])), atol=0.5)
    with pytest.raises(UserError):
        output_window((0.5, -0.5))


# ----------------------------------------------------------------------------- refusals


def test_colour_is_refused():
    ds = make_dataset(rows=8, cols=8)
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelData = bytes(8 * 8 * 3)
    with pytest.raises(UnsupportedImage, match="colour"):
        decode_dataset(ds)


def test_multi_frame_is_refused():
    ds = make_dataset(rows=8, cols=8)
    ds.NumberOfFrames = 2
    ds.PixelData = bytes(8 * 8 * 2 * 2)
    with pytest.raises(UnsupportedImage, match="multi-frame"):
        decode_dataset(ds)


def test_too_large_is_refused_before_decoding():
    ds = make_dataset(rows=ROWS, cols=COLS)
    del ds.PixelData
    ds.PixelData = b"\x00\x00"  # would be corrupt: the size check must come first
    with pytest.raises(UnsupportedImage, match="too large"):
        decode_dataset(ds, max_pixels=ROWS * COLS - 1)
    decode_dataset(make_dataset(rows=ROWS, cols=COLS), max_pixels=ROWS * COLS)


def test_non_image_is_refused():
    with pytest.raises(UnsupportedImage, match="not an image: SR object has no Pixel Data"):
        decode_dataset(make_non_image())


def test_image_header_without_pixel_data_is_corrupt():
    ds = make_dataset(rows=8, cols=8)
    del ds.PixelData
    with pytest.raises(UnsupportedImage, match="corrupt image: Pixel Data is missing"):
        decode_dataset(ds)


TRUNCATED = [ExplicitVRLittleEndian, JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1,
             JPEGLSLossless, JPEGLSNearLossless, JPEG2000Lossless, JPEG2000, RLELossless]


@pytest.mark.parametrize("syntax", TRUNCATED, ids=lambda s: s.name)
def test_truncated_pixel_data_is_refused_with_one_line(tmp_path, syntax):
    """Cut at 90 %: libjpeg and CharLS would silently decode such a stream (grey below the cut)."""
    ds = _dataset_8bit() if syntax == JPEGBaseline8Bit else make_dataset(phantom(ROWS, COLS, 12), bits_stored=12)
    kwargs = {"jls_error": 2} if syntax == JPEGLSNearLossless else {"j2k_cr": [5]} if syntax == JPEG2000 else {}
    ds = encode_as(ds, syntax, **kwargs)
    if syntax.is_encapsulated:
        from pydicom.encaps import encapsulate, generate_frames

        frame = next(generate_frames(ds.PixelData, number_of_frames=1))
        ds.PixelData = encapsulate([frame[: len(frame) * 9 // 10]])
    else:
        ds.PixelData = ds.PixelData[: len(ds.PixelData) * 9 // 10]
    path = write(ds, tmp_path / "bad.dcm")
    with pytest.raises(UnsupportedImage) as err:
        read_dicom(path)
    message = str(err.value)
    assert message.startswith(f"{path}: corrupt pixel data") and "\n" not in message


@pytest.mark.filterwarnings("ignore:End of file reached before delimiter")  # pydicom says so, expected
@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, JPEGLSLossless, RLELossless], ids=lambda s: s.name)
def test_file_cut_inside_pixel_data_is_corrupt_not_a_non_image(tmp_path, syntax):
    path = write(encode_as(make_dataset(phantom(ROWS, COLS, 12), bits_stored=12), syntax), tmp_path / "x.dcm")
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) * 9 // 10])
    with pytest.raises(UserError, match="corrupt") as err:
        read_dicom(path)
    assert "not an image" not in str(err.value)


@pytest.mark.parametrize("syntax", [JPEGLosslessSV1, JPEGLSLossless, JPEG2000Lossless], ids=lambda s: s.name)
def test_compressed_frame_larger_than_the_header_is_refused_before_decoding(syntax):
    """A small Rows x Columns over a bigger stream: refused from the stream header, no decode."""
    ds = encode_as(make_dataset(phantom(ROWS, COLS, 12), bits_stored=12), syntax)
    ds.Rows = ROWS // 2
    with pytest.raises(UnsupportedImage, match=f"compressed frame is {ROWS}x{COLS}, the header says {ROWS // 2}x"):
        decode_dataset(ds)


@pytest.mark.parametrize("implicit", [True, False], ids=["implicit", "explicit"])
def test_bare_data_set_without_preamble_or_file_meta_is_read(tmp_path, implicit):
    """Old devices and some exports write the data set alone (no 'DICM', no group 0002)."""
    px = phantom(ROWS, COLS, 12)
    ds = make_dataset(px)
    del ds.file_meta
    path = tmp_path / "bare.dcm"
    ds.save_as(path, implicit_vr=implicit, little_endian=True, enforce_file_format=False)
    assert open(path, "rb").read(132)[128:132] != b"DICM"
    _, img = read_dicom(path)
    np.testing.assert_array_equal(img.pixels, px.astype(np.float32))


def test_non_dicom_and_truncated_files_are_user_errors(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a radiograph\n")
    with pytest.raises(UserError, match="not a DICOM file"):
        read_dicom(text)
    good = write(make_dataset(phantom(ROWS, COLS, 12)), tmp_path / "good.dcm")
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(open(good, "rb").read()[:700])
    with pytest.raises(UserError) as err:
        read_dicom(cut)
    assert str(err.value).startswith(str(cut)) and "\n" not in str(err.value)


# ------------------------------------------------------------------ PNG / TIFF (trainer)


@pytest.mark.parametrize("fmt,dtype", [("PNG", np.uint8), ("PNG", np.uint16), ("TIFF", np.uint8),
                                       ("TIFF", np.uint16)])
def test_read_image_file_png_tiff(tmp_path, fmt, dtype):
    from PIL import Image

    bits = 8 if dtype == np.uint8 else 16
    px = phantom(ROWS, COLS, bits).astype(dtype)
    path = tmp_path / "image.bin"  # recognised by content, not by name
    Image.fromarray(px).save(path, fmt)
    img = read_image_file(path)
    assert img.valid is None and img.pixels.dtype == np.float32
    np.testing.assert_array_equal(img.pixels, px.astype(np.float32))


def test_read_image_file_reads_dicom_by_content(tmp_path):
    px = phantom(ROWS, COLS, 12)
    path = write(make_dataset(px), tmp_path / "looks_like.png")
    np.testing.assert_array_equal(read_image_file(path).pixels, px.astype(np.float32))


def test_read_image_file_refuses_colour_png_but_reads_grey_rgb(tmp_path):
    from PIL import Image

    colour = np.zeros((8, 8, 3), np.uint8)
    colour[2, 3] = (10, 20, 30)
    path = tmp_path / "colour.png"
    Image.fromarray(colour).save(path)
    with pytest.raises(UnsupportedImage, match="colour"):
        read_image_file(path)
    grey = phantom(ROWS, COLS, 8).astype(np.uint8)
    Image.fromarray(np.stack([grey] * 3, axis=-1)).save(path)  # viewers often export grey as RGB
    np.testing.assert_array_equal(read_image_file(path).pixels, grey.astype(np.float32))


def test_read_image_file_size_limit_and_corrupt_png(tmp_path):
    from PIL import Image

    path = tmp_path / "x.png"
    Image.fromarray(phantom(ROWS, COLS, 8).astype(np.uint8)).save(path)
    with pytest.raises(UnsupportedImage, match="too large"):
        read_image_file(path, max_pixels=ROWS * COLS - 1)
    path.write_bytes(path.read_bytes()[:60])
    with pytest.raises(UserError, match="corrupt image file"):
        read_image_file(path)


DCMTK = [(["dcmcjpeg", "+e1"], 12, True), (["dcmcjpeg", "+el"], 12, True), (["dcmcjpeg", "+ee"], 12, False),
         (["dcmcjpeg", "+eb"], 8, False), (["dcmcjpls", "+el"], 12, True), (["dcmcjpls", "+en"], 12, False),
         (["dcmcrle"], 12, True)]


@pytest.mark.interop
@pytest.mark.parametrize("cmd,bits,lossless", DCMTK, ids=[" ".join(c) for c, _, _ in DCMTK])
def test_streams_from_dcmtk_encoders_decode(tmp_path, cmd, bits, lossless):
    """An independent encoder (dcmtk), odd image sizes: what real modalities send."""
    import subprocess

    from tests.conftest import require_tool

    tool = require_tool(cmd[0])
    px = phantom(63, 47, bits, seed=9)
    ds = make_dataset(px, bits_stored=bits)
    if bits == 8:
        ds.BitsAllocated = 8
        ds.PixelData = px.astype(np.uint8).tobytes() + b"\0"  # even length
    src, dst = write(ds, tmp_path / "raw.dcm"), tmp_path / "enc.dcm"
    subprocess.run([tool, *cmd[1:], src, str(dst)], check=True, capture_output=True, timeout=60)
    read, img = read_dicom(dst)
    assert read.file_meta.TransferSyntaxUID.is_compressed
    if lossless:
        np.testing.assert_array_equal(img.pixels, px.astype(np.float32))
    else:
        # dcmtk's lossy path rescales stored values to their min..max range (its +sp default),
        # so compare what the model sees: the percentile normalisation absorbs gain/offset.
        model_input = normalize(img)
        assert np.abs(model_input - normalize(Radiograph(px.astype(np.float32)))).mean() < 0.03


@settings(max_examples=30, deadline=None)
@given(bits=st.integers(2, 16), signed=st.booleans(), slope=st.sampled_from([1.0, 0.5, 2.0, 1.25]),
       intercept=st.integers(-3000, 3000), seed=st.integers(0, 2**16))
def test_property_decoding_and_monochrome1_twin(bits, signed, slope, intercept, seed):
    """Any BitsStored/signedness/rescale: exact stored values, and the MONOCHROME1 twin's model
    input equals the MONOCHROME2 one (to float32 rounding for non-integer slopes)."""
    rng = np.random.default_rng(seed)
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    values = rng.integers(lo, hi + 1, size=(9, 7))
    garbage = rng.integers(0, 1 << 16, size=values.shape) & ~((1 << bits) - 1) & 0xFFFF
    twins = []
    for photometric, v in (("MONOCHROME2", values), ("MONOCHROME1", lo + hi - values)):
        ds = make_dataset(np.zeros(values.shape, np.uint16), bits_stored=bits, photometric=photometric)
        ds.PixelRepresentation = int(signed)
        ds.PixelData = ((v.astype(np.int64) & ((1 << bits) - 1)) | garbage).astype(np.uint16).tobytes()
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        twins.append(decode_dataset(ds))
    mono2, mono1 = twins
    np.testing.assert_allclose(mono2.pixels, values * slope + intercept, rtol=0, atol=1e-3)
    np.testing.assert_allclose(mono1.pixels, mono2.pixels, rtol=0, atol=1e-3)
    np.testing.assert_allclose(normalize(mono1), normalize(mono2), rtol=0, atol=1e-5)
