"""``dicom-node translate`` end to end: real files in, SC files (and previews) out, exit codes."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pydicom
from pydicom.uid import JPEG2000Lossless, RLELossless

from dicom_node.cli import main
from dicom_node.engine.model_file import bundled_model_path
from dicom_node.engine.secondary_capture import derived_uid
from tests.factory import PATIENT_ID, PATIENT_NAME, encode_as, make_dataset, make_non_image, phantom, write
from tests.test_secondary_capture import dciodvfy_errors


def _image(path, seed=0, **kwargs):
    ds = make_dataset(phantom(40, 32, 12, seed=seed), **kwargs)
    write(ds, path)
    return ds


def _sr_without_pixels(path):
    ds = make_non_image()
    write(ds, path)
    return ds


def test_folder_with_good_and_bad_files(tiny_model_path, tmp_path, capsys):
    inp = tmp_path / "in"
    (inp / "a" / "b").mkdir(parents=True)
    good = [_image(inp / "one.dcm", seed=1),
            _image(inp / "a" / "two.dcm", seed=2)]
    compressed = encode_as(make_dataset(phantom(40, 32, 12, seed=3)), RLELossless)
    write(compressed, inp / "a" / "b" / "three")  # no extension: found by the DICM magic
    good.append(compressed)
    corrupt = inp / "a" / "corrupt.dcm"
    corrupt.write_bytes((inp / "one.dcm").read_bytes()[:600])
    _sr_without_pixels(inp / "a" / "report.dcm")
    (inp / "README.txt").write_text("not DICOM, silently skipped in folders\n")
    out = tmp_path / "out"

    rc = main(["translate", "--model", str(tiny_model_path), "-o", str(out), str(inp)])
    captured = capsys.readouterr()
    assert rc == 1
    problems = [line for line in captured.err.splitlines() if line.startswith(str(inp))]
    assert len(problems) == 2, captured.err
    assert any(line.startswith(f"{corrupt}: ") for line in problems)
    assert any(line.startswith(f"{inp / 'a' / 'report.dcm'}: ") and "not an image" in line for line in problems)
    assert "translated 3 of 5 files" in captured.out and "1 non-DICOM files skipped" in captured.out
    names = sorted(p.name for p in out.glob("*.dcm"))
    model = __import__("dicom_node.engine", fromlist=["x"]).load_style_model(tiny_model_path)
    assert names == sorted(derived_uid(ds.SOPInstanceUID, model.identity) + ".dcm" for ds in good)
    for path in out.glob("*.dcm"):
        assert dciodvfy_errors(path) == []
    # No patient data on the console.
    assert PATIENT_NAME not in captured.out + captured.err and PATIENT_ID not in captured.out + captured.err


def test_same_input_twice_is_idempotent_and_preview_is_written(tiny_model_path, tmp_path, capsys):
    src = tmp_path / "x.dcm"
    ds = encode_as(make_dataset(phantom(40, 32, 12)), JPEG2000Lossless)
    write(ds, src)
    out = tmp_path / "out"
    args = ["translate", "--model", str(tiny_model_path), "-o", str(out), "--preview", "--full-image", str(src)]
    assert main(args) == 0
    first = {p.name: p.read_bytes() for p in out.iterdir() if p.name != "fidelity.jsonl"}
    assert main(args) == 0
    second = {p.name: p.read_bytes() for p in out.iterdir() if p.name != "fidelity.jsonl"}
    assert sorted(first) == sorted(second) and len(first) == 2  # one .dcm + one .png, same names
    dcm = next(name for name in first if name.endswith(".dcm"))
    a = pydicom.dcmread(out / dcm)
    assert first[dcm.replace(".dcm", ".png")] == second[dcm.replace(".dcm", ".png")]
    from PIL import Image

    with Image.open(out / dcm.replace(".dcm", ".png")) as im:
        # the fidelity banner (22 px) over input | gap | output
        assert im.mode == "RGB" and im.height == 22 + 40 and im.width == 2 * 32 + 4
        pixels = np.asarray(im)
        left = pixels[22:, :32, 0]
    assert left.std() > 0
    assert tuple(pixels[2, 2]) == (30, 160, 60)  # green: the guard found nothing
    assert a.SOPInstanceUID == dcm[:-4]


def test_non_dicom_file_given_explicitly_is_exit_1_one_line(tiny_model_path, tmp_path, capsys):
    txt = tmp_path / "notes.txt"
    txt.write_text("hello\n")
    rc = main(["translate", "--model", str(tiny_model_path), "-o", str(tmp_path / "out"), str(txt)])
    err = capsys.readouterr().err
    assert rc == 1
    assert f"{txt}: not a DICOM file" in err and "Traceback" not in err


def test_refusals_too_large_and_multi_frame(tiny_model_path, tmp_path, capsys):
    big = tmp_path / "big.dcm"
    _image(big)
    multi = tmp_path / "multi.dcm"
    ds = make_dataset(rows=8, cols=8)
    ds.NumberOfFrames = 2
    ds.PixelData = bytes(8 * 8 * 2 * 2)
    write(ds, multi)
    rc = main(["translate", "--model", str(tiny_model_path), "-o", str(tmp_path / "out"),
               "--max-pixels", "1000", str(big), str(multi)])
    err = capsys.readouterr().err
    assert rc == 1
    assert f"{big}: image too large" in err and f"{multi}: multi-frame" in err


def test_bundled_model_name_resolves_and_unknown_name_is_a_clear_error(tmp_path, capsys):
    """``--model default`` is the model shipped in the package; an unknown name is one line, exit 1."""
    assert bundled_model_path().exists(), "the bundled default model must ship with the package"
    _image(tmp_path / "x.dcm")
    rc = main(["translate", "--model", "default", "-o", str(tmp_path / "out"), str(tmp_path / "x.dcm")])
    assert rc == 0 and len(list((tmp_path / "out").glob("*.dcm"))) == 1
    capsys.readouterr()
    rc = main(["translate", "--model", "nosuchstyle", "-o", str(tmp_path / "out2"), str(tmp_path / "x.dcm")])
    err = capsys.readouterr().err
    assert rc == 1 and "nosuchstyle" in err and "not found" in err and len(err.strip().splitlines()) == 1


def test_bad_arguments_are_user_errors(tiny_model_path, tmp_path, capsys):
    _image(tmp_path / "x.dcm")
    base = ["translate", "--model", str(tiny_model_path), "-o", str(tmp_path / "out")]
    assert main(base + ["--tile", "256", "--full-image", str(tmp_path / "x.dcm")]) == 1
    assert main(base + ["--overlap", "1.5", str(tmp_path / "x.dcm")]) == 1
    assert main(base + [str(tmp_path / "missing.dcm")]) == 1
    err = capsys.readouterr().err
    assert "contradict" in err and "--overlap" in err and "missing.dcm: no such file" in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_real_entry_point_exit_code(tiny_model_path, tmp_path):
    """Through the installed ``python -m dicom_node`` as a user runs it (not in-process)."""
    corrupt = tmp_path / "c.dcm"
    corrupt.write_bytes(b"DICM" * 10)
    result = subprocess.run([sys.executable, "-m", "dicom_node", "translate", "--model", str(tiny_model_path),
                             "-o", str(tmp_path / "out"), str(corrupt)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [f"{corrupt}: not a DICOM file"]


def test_monochrome1_and_its_monochrome2_twin_give_the_same_output_pixels(tiny_model_path, tmp_path, capsys):
    v2 = phantom(40, 32, 12, seed=4)
    (tmp_path / "in").mkdir()
    write(make_dataset(v2), tmp_path / "in" / "m2.dcm")
    write(make_dataset(4095 - v2, photometric="MONOCHROME1"), tmp_path / "in" / "m1.dcm")
    out = tmp_path / "out"
    assert main(["translate", "--model", str(tiny_model_path), "-o", str(out), str(tmp_path / "in")]) == 0
    a, b = (pydicom.dcmread(p) for p in sorted(out.glob("*.dcm")))
    assert a.SOPInstanceUID != b.SOPInstanceUID
    assert a.PhotometricInterpretation == b.PhotometricInterpretation == "MONOCHROME2"
    np.testing.assert_array_equal(a.pixel_array, b.pixel_array)


def test_output_folder_inside_the_input_folder_is_not_rescanned(tiny_model_path, tmp_path, capsys):
    study = tmp_path / "study"
    study.mkdir()
    _image(study / "a.dcm")
    args = ["translate", "--model", str(tiny_model_path), "-o", str(study / "out"), str(study)]
    assert main(args) == 0
    assert main(args) == 0
    assert "translated 1 of 1 files" in capsys.readouterr().out.splitlines()[-1]
    assert len(list((study / "out").glob("*.dcm"))) == 1
