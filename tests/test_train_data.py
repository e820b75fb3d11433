"""The trainer reads what the node reads (issue 10 item 5).

One recognition rule (``engine.pixels.sniff_format``: DICOM by content first, then PNG/TIFF)
serves ``read_image_file`` (trainer), ``read_dicom`` (bare data sets) and the folder scan of
``dicom-node translate``. Real-world files made in code: a dual-personality DICOM/TIFF file
(PS3.10 7.1), a 15-bit MONOCHROME1 radiograph of ~2000 px, a bare implicit-VR data set.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from dicom_node.cli import main
from dicom_node.commands.translate import collect_inputs
from dicom_node.engine.pixels import (
    DEFAULT_NORMALIZATION,
    Radiograph,
    normalize,
    read_dicom,
    read_image_file,
    sniff_format,
)
from dicom_node.errors import UserError
from dicom_node.train.data import find_image_files, load_domain
from tests.factory import make_dataset, phantom, write

ROWS, COLS = 48, 40
# A little-endian TIFF header (IFD at offset 8, no entries) in the 128-byte preamble.
TIFF_PREAMBLE = b"II*\x00\x08\x00\x00\x00" + bytes(120)


def _dual_personality(path: Path, pixels: np.ndarray) -> Path:
    ds = make_dataset(pixels)
    ds.preamble = TIFF_PREAMBLE
    write(ds, path)
    head = path.read_bytes()[:132]
    assert head[:4] == b"II*\x00" and head[128:132] == b"DICM"
    return path


def _bare(path: Path, pixels: np.ndarray, *, implicit: bool = True) -> Path:
    ds = make_dataset(pixels)
    del ds.file_meta
    ds.save_as(path, implicit_vr=implicit, little_endian=True, enforce_file_format=False)
    head = path.read_bytes()[:132]
    assert head[128:132] != b"DICM" and head[:2] == b"\x08\x00"
    return path


def _load(folder: Path, tmp_path: Path, label: str = "A"):
    return load_domain(folder, label, tmp_path / "cache", dict(DEFAULT_NORMALIZATION))


def _expected(pixels: np.ndarray) -> np.ndarray:
    return normalize(Radiograph(pixels=pixels.astype(np.float32)))


# ------------------------------------------------------------------------ recognition


def test_sniff_format_dicom_first_then_rasters(tmp_path):
    px = phantom(ROWS, COLS, 12)
    Image.fromarray(px.astype(np.uint16)).save(tmp_path / "p", "PNG")
    Image.fromarray(px.astype(np.uint16)).save(tmp_path / "t", "TIFF")
    (tmp_path / "notes.txt").write_text("not an image\n")
    (tmp_path / "tiny").write_bytes(b"\x08\x00")
    cases = {
        "dual": (_dual_personality(tmp_path / "dual", px), "dicom"),
        "part10": (Path(write(make_dataset(px), tmp_path / "part10")), "dicom"),
        "bare_implicit": (_bare(tmp_path / "bare_i", px), "dicom"),
        "bare_explicit": (_bare(tmp_path / "bare_e", px, implicit=False), "dicom"),
        "png": (tmp_path / "p", "png"),
        "tiff": (tmp_path / "t", "tiff"),
        "text": (tmp_path / "notes.txt", None),
        "too_short": (tmp_path / "tiny", None),
        "missing": (tmp_path / "missing", None),
        "folder": (tmp_path, None),
    }
    got = {name: sniff_format(path) for name, (path, _) in cases.items()}
    assert got == {name: want for name, (_, want) in cases.items()}


def test_dual_personality_file_is_dicom_for_reader_trainer_and_translate(tiny_model_path, tmp_path, capsys):
    px = phantom(ROWS, COLS, 12)
    folder = tmp_path / "A"
    folder.mkdir()
    path = _dual_personality(folder / "dual", px)  # no suffix: recognised by content only

    np.testing.assert_array_equal(read_image_file(path).pixels, px.astype(np.float32))
    data = _load(folder, tmp_path)
    assert len(data) == 1 and data.skipped_unreadable == 0
    np.testing.assert_allclose(np.asarray(data.arrays[0], np.float32), _expected(px), atol=1e-3)

    out = tmp_path / "out"
    rc = main(["translate", "--model", str(tiny_model_path), "-o", str(out), str(folder)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "translated 1 of 1 files" in captured.out
    assert len(list(out.glob("*.dcm"))) == 1


def test_15_bit_monochrome1_2000px_is_the_mirrored_twin_of_monochrome2(tmp_path):
    stored = phantom(2048, 2000, 15)
    assert stored.max() > 1 << 14  # really uses the 15th bit
    twin = ((1 << 15) - 1 - stored).astype(np.uint16)
    for sub, pix, pi in (("m1", stored, "MONOCHROME1"), ("m2", twin, "MONOCHROME2")):
        (tmp_path / sub).mkdir()
        write(make_dataset(pix, bits_stored=15, photometric=pi), tmp_path / sub / "cr.dcm")
    m1 = _load(tmp_path / "m1", tmp_path, "M1")
    m2 = _load(tmp_path / "m2", tmp_path, "M2")
    assert len(m1) == len(m2) == 1 and m1.arrays[0].shape == (2048, 2000)
    a1 = np.asarray(m1.arrays[0], np.float32)
    a2 = np.asarray(m2.arrays[0], np.float32)
    assert np.allclose(a1, a2)
    # Mirrored, not taken as stored: bright stored values of MONOCHROME1 are dark.
    assert not np.allclose(a1, _expected(stored), atol=0.1)
    assert np.allclose(a1, _expected(twin), atol=1e-3)


def test_bare_implicit_data_set_loads_and_is_translated(tiny_model_path, tmp_path, capsys):
    px = phantom(ROWS, COLS, 12)
    folder = tmp_path / "A"
    folder.mkdir()
    path = _bare(folder / "IM0001", px)
    np.testing.assert_array_equal(read_image_file(path).pixels, px.astype(np.float32))
    data = _load(folder, tmp_path)
    assert len(data) == 1 and data.skipped_unreadable == 0
    np.testing.assert_allclose(np.asarray(data.arrays[0], np.float32), _expected(px), atol=1e-3)
    # The folder scan of translate finds it by the same rule.
    rc = main(["translate", "--model", str(tiny_model_path), "-o", str(tmp_path / "out"), str(folder)])
    assert rc == 0, capsys.readouterr().err
    assert len(list((tmp_path / "out").glob("*.dcm"))) == 1


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_real_png_and_tiff_still_load_as_rasters(tmp_path, fmt, dtype):
    px = phantom(ROWS, COLS, 8 if dtype == np.uint8 else 16).astype(dtype)
    folder = tmp_path / "B"
    folder.mkdir()
    path = folder / "export.dcm"  # a misleading name: content decides
    Image.fromarray(px).save(path, fmt)
    assert sniff_format(path) == fmt.lower()
    img = read_image_file(path)
    assert img.valid is None
    np.testing.assert_array_equal(img.pixels, px.astype(np.float32))
    data = _load(folder, tmp_path, "B")
    assert len(data) == 1
    np.testing.assert_allclose(np.asarray(data.arrays[0], np.float32), _expected(px), atol=1e-3)


def test_every_file_translate_accepts_is_training_data(tmp_path):
    """The property itself, over a mixed folder: translate's folder scan is a subset of the
    trainer's candidates, and every file read_dicom reads gives the same pixels as training data."""
    px = phantom(ROWS, COLS, 12)
    inp = tmp_path / "in"
    inp.mkdir()
    _dual_personality(inp / "dual", px)
    _bare(inp / "bare_i", px)
    _bare(inp / "bare_e", px, implicit=False)
    write(make_dataset(px), inp / "named.txt")  # a DICOM file with a text suffix
    write(make_dataset(px), inp / "1.2.3.4")
    Image.fromarray(px.astype(np.uint16)).save(inp / "export.png")
    (inp / "notes.txt").write_text("a text file\n")
    (inp / "broken.dcm").write_bytes(b"garbage")

    scanned, skipped = collect_inputs([str(inp)])
    candidates = set(find_image_files(inp))
    assert set(scanned) <= candidates
    assert {p.name for p in scanned} == {"dual", "bare_i", "bare_e", "named.txt", "1.2.3.4", "broken.dcm"}
    assert inp / "notes.txt" not in candidates and skipped == 2  # notes.txt, export.png
    for path in sorted(inp.iterdir()):
        try:
            _, img = read_dicom(path)
        except UserError:
            continue
        np.testing.assert_array_equal(read_image_file(path).pixels, img.pixels)
    data = _load(inp, tmp_path)
    assert len(data) == 6 and data.skipped_unreadable == 1  # broken.dcm only


# ------------------------------------------------------------------------ clear errors


def _unreadable_folder(folder: Path) -> Path:
    folder.mkdir()
    (folder / "x.dcm").write_bytes(b"garbage")
    (folder / "y.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    (folder / "IM0001").write_bytes(bytes(300))
    return folder


def _empty_folder(folder: Path) -> Path:
    (folder / "sub").mkdir(parents=True)
    (folder / "README.txt").write_text("no images here\n")
    return folder


def test_empty_and_unreadable_domains_are_one_line_user_errors(tmp_path, caplog):
    empty = _empty_folder(tmp_path / "empty")
    with pytest.raises(UserError) as err:
        _load(empty, tmp_path, "A")
    msg = str(err.value)
    assert "\n" not in msg and "domain A" in msg and str(empty) in msg and "no image files" in msg

    bad = _unreadable_folder(tmp_path / "bad")
    with pytest.raises(UserError) as err:
        _load(bad, tmp_path, "B")
    msg = str(err.value)
    assert "\n" not in msg and "domain B" in msg and str(bad) in msg
    assert "0 usable image(s)" in msg and "3 unreadable of 3 files" in msg
    assert "first: IM0001: not a DICOM file" in msg  # the first file's reason, without its long path
    # No warning per file before that error: the one line says it all ...
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    # ... but once a file is readable, the skipped ones before it are reported.
    write(make_dataset(phantom(ROWS, COLS, 12)), bad / "z.dcm")
    assert len(_load(bad, tmp_path, "B")) == 1
    warned = " ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert all(f"skipping unreadable file {name}" in warned for name in ("IM0001", "x.dcm", "y.png"))


def _train_config(tmp_path: Path, a: Path, b: Path) -> Path:
    cfg = {
        "data": {"a": str(a), "b": str(b)},
        "model": {"ngf": 4, "n_blocks": 1, "ndf": 4},
        "train": {"patch_size": 64, "batch_size": 1, "steps": 2, "pool_size": 2, "threads": 1},
        "output": {"dir": str(tmp_path / "run"), "sample_every": 1, "checkpoint_every": 2},
    }
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture
def good_domain(tmp_path) -> Path:
    folder = tmp_path / "good"
    folder.mkdir()
    write(make_dataset(phantom(64, 64, 12)), folder / "g.dcm")
    return folder


@pytest.mark.parametrize("case", ["empty_a", "unreadable_b"])
def test_train_cli_bad_domain_exit_1_one_line(tmp_path, good_domain, capsys, case):
    if case == "empty_a":
        a, b, label = _empty_folder(tmp_path / "bad"), good_domain, "A"
    else:
        a, b, label = good_domain, _unreadable_folder(tmp_path / "bad"), "B"
    cfg = _train_config(tmp_path, a, b)
    assert main(["train", "--config", str(cfg), "--no-progress"]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("dicom-node train: error:"), err
    assert f"domain {label}" in err[0] and str(tmp_path / "bad") in err[0]
    assert "Traceback" not in err[0]


@pytest.mark.parametrize("case", ["empty_a", "unreadable_b"])
def test_train_entry_point_bad_domain_stderr_is_one_line(tmp_path, good_domain, case):
    """The real process: its stderr (log warnings included) is the one error line."""
    if case == "empty_a":
        a, b, label = _empty_folder(tmp_path / "bad"), good_domain, "A"
    else:
        a, b, label = good_domain, _unreadable_folder(tmp_path / "bad"), "B"
    cfg = _train_config(tmp_path, a, b)
    result = subprocess.run([sys.executable, "-m", "dicom_node", "train", "--config", str(cfg), "--no-progress"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    err = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and "Traceback" not in result.stderr, result.stderr
    assert err[0].startswith(f"dicom-node train: error: domain {label}") and str(tmp_path / "bad") in err[0]
