"""evaluate: metrics with known answers, the identity model, JSON + panels, the bundled model."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dicom_node.cli import main
from dicom_node.evaluate import psnr, seam_energy, ssim

SIZE = 128


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pairs")
    assert main(["demo-data", str(out), "--count", "0", "--test-count", "2", "--size", str(SIZE), "--seed", "3"]) == 0
    return out


@pytest.fixture(scope="module")
def identity_model(tmp_path_factory) -> Path:
    """A residual generator with a zero last convolution: output == input exactly."""
    from dicom_node.engine import new_style_model, save_style_model

    path = tmp_path_factory.mktemp("idm") / "identity.safetensors"
    save_style_model(new_style_model(ngf=4, n_blocks=1, residual=True, seed=0), path, name="identity")
    return path


def test_psnr_known_noise_level() -> None:
    rng = np.random.default_rng(0)
    x = rng.uniform(-0.8, 0.8, (256, 256))
    sigma = 0.02
    y = x + rng.normal(0, sigma, x.shape)
    assert psnr(x, y) == pytest.approx(10 * math.log10(4 / sigma**2), abs=0.1)  # data range 2
    assert psnr(x, x) == math.inf


def test_ssim_known_answers() -> None:
    rng = np.random.default_rng(1)
    x = rng.uniform(-1, 1, (64, 64))
    assert ssim(x, x) == pytest.approx(1.0, abs=1e-12)
    assert abs(ssim(x, rng.uniform(-1, 1, x.shape))) < 0.1  # unrelated images
    noisy = ssim(x, x + rng.normal(0, 0.3, x.shape))
    assert 0.2 < noisy < 0.95
    # A small constant offset of a mid-grey image only changes the luminance term slightly.
    mid = 0.5 + 0.3 * x
    assert 0.99 < ssim(mid, mid + 0.05) < 1.0


def test_seam_energy_finds_tile_steps() -> None:
    rng = np.random.default_rng(2)
    yy, xx = np.mgrid[0:128, 0:128]
    smooth = 0.3 * np.sin(xx / 9.0) * np.cos(yy / 13.0) + rng.normal(0, 0.002, (128, 128))
    b, nb, o, no = seam_energy(smooth, 32)
    assert 0.6 < (b / nb) / (o / no) < 1.6  # no seams: border steps look like any others
    steps = smooth + np.kron(rng.normal(0, 0.2, (4, 4)), np.ones((32, 32)))  # a tone jump per 32px tile
    b, nb, o, no = seam_energy(steps, 32)
    assert (b / nb) / (o / no) > 20
    assert nb == 2 * 3 * 128  # 3 inner borders per axis, 128 pixels long


def test_identity_model_output_equals_input(pairs_dir: Path, identity_model: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", str(identity_model), str(pairs_dir), "--out", str(out), "--tile", "64",
                 "--preview", str(out / "preview.png")]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("psnr", "ssim", "identity_psnr", "identity_ssim", "seam_ratio"):
        assert key in line
    assert line["pairs"] == 2 and line["direction"] == "A->B" and line["tile"] == 64
    assert line["psnr"] == line["identity_psnr"]
    assert line["ssim"] == line["identity_ssim"]
    assert 10 < line["identity_psnr"] < 35 and line["identity_ssim"] < 0.99  # the styles differ
    assert line["seam_ratio"] == 1.0  # no change at all, so no seams
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["psnr"] == line["psnr"] and len(saved["images"]) == 2
    panels = sorted((out / "panels").glob("*.png"))
    assert len(panels) == 2
    with Image.open(panels[0]) as im:
        assert im.size == (4 * SIZE + 3 * 4, SIZE)
        arr = np.asarray(im).astype(int)
    # input and output panes are identical; the |difference| pane is not empty (output != target).
    assert np.array_equal(arr[:, :SIZE], arr[:, SIZE + 4:2 * SIZE + 4])
    assert arr[:, 3 * (SIZE + 4):].max() > 0
    with Image.open(out / "preview.png") as im:
        assert im.size == (2 * SIZE + 4, SIZE)


def test_identity_direction_b_to_a_and_self_target(pairs_dir: Path, identity_model: Path, tmp_path: Path,
                                                   capsys) -> None:
    # Compare B with itself: evaluate a folder whose A/ and B/ are the same files.
    same = tmp_path / "same"
    for style in ("A", "B"):
        (same / style).mkdir(parents=True)
        for f in (pairs_dir / "test" / "B").glob("*.dcm"):
            (same / style / f.name).write_bytes(f.read_bytes())
    assert main(["evaluate", "--model", str(identity_model), str(same), "--out", str(tmp_path / "e"),
                 "--direction", "B->A", "--no-panels"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["psnr"] is None  # infinite PSNR (identical images) is reported as null
    assert line["ssim"] == pytest.approx(1.0)


def test_seamless_engine_with_tiles(pairs_dir: Path, tiny_model_path: Path, tmp_path: Path, capsys) -> None:
    """A random (non-identity) model tiled at 64 px leaves no tile-shaped steps."""
    assert main(["evaluate", "--model", str(tiny_model_path), str(pairs_dir), "--out", str(tmp_path / "t"),
                 "--tile", "64", "--no-panels"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["psnr"] != line["identity_psnr"]
    assert 0.5 < line["seam_ratio"] < 1.5


def test_missing_pairs_is_a_user_error(identity_model: Path, tmp_path: Path, capsys) -> None:
    assert main(["evaluate", "--model", str(identity_model), str(tmp_path)]) == 1
    assert "A/ and B/" in capsys.readouterr().err


def test_bundled_model_beats_identity(tmp_path: Path, capsys) -> None:
    """The shipped 'default' model (style A -> B) loads and beats returning the input."""
    from dicom_node.engine import load_style_model
    from dicom_node.engine.model_file import bundled_model_path

    assert bundled_model_path("default").is_file()
    assert bundled_model_path("default").stat().st_size <= 20 * 1024 * 1024
    model = load_style_model("default")
    assert model.name == "default" and model.metadata["direction"] == "A->B"
    pairs = tmp_path / "pairs"
    assert main(["demo-data", str(pairs), "--count", "0", "--test-count", "2", "--size", "256", "--seed", "5"]) == 0
    assert main(["evaluate", "--model", "default", str(pairs), "--out", str(tmp_path / "e"), "--no-panels"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["pairs"] == 2
    assert line["psnr"] > line["identity_psnr"] + 1.0
    assert line["ssim"] > line["identity_ssim"]
