"""evaluate: metrics with known answers, the identity model, JSON + panels, the bundled model."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dicom_node.cli import main
from dicom_node.evaluation import psnr, seam_energy, ssim

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


def _ratio(with_seams: np.ndarray, reference: np.ndarray, tile: int, overlap: float = 0.25) -> float:
    """evaluate's seam ratio for one image: border step energy, tiled over whole-image pass."""
    return seam_energy(with_seams, tile, overlap)[0] / seam_energy(reference, tile, overlap)[0]


def test_seam_energy_finds_tile_steps() -> None:
    """Hard and blended tone steps on the engine's tile layout stand out; smooth anatomy does not."""
    import torch

    from dicom_node.engine.tile_geometry import overlapping_starts as _overlapping_starts
    from dicom_node.engine.tile_geometry import ramp_weights as _ramp_weights
    from dicom_node.engine.tiling import seam_lines

    rng = np.random.default_rng(2)
    n, tile = 512, 128
    yy, xx = np.mgrid[0:n, 0:n]
    smooth = 0.1 * np.sin(xx / 50.0) * np.cos(yy / 65.0) + rng.normal(0, 0.02, (n, n))  # ~ a model's change
    total, count = seam_energy(smooth, tile)
    assert count == 2 * (4 + 3) * (n // 32)  # 4 blend zones + 3 grid lines per axis, one step per 32 px
    noisier = smooth + rng.normal(0, 0.02, (n, n))  # more noise, no seams: the ratio hardly moves
    assert 0.8 < _ratio(noisier, smooth, tile) < 1.25

    # Hard tiles (overlap 0: the tiles abut at the seam lines): one tone offset per tile.
    edges = [0] + [int(c) for c, _w in seam_lines(n, tile, 0.0)] + [n]
    assert edges == [0, 128, 256, 384, 512]
    offsets = rng.normal(0, 0.05, (4, 4))
    hard = smooth + np.kron(offsets, np.ones((tile, tile)))
    assert _ratio(hard, smooth, tile, 0.0) > 8

    # Blended tiles: one offset per tile of a sliding window, raised-cosine ramps over the overlaps.
    starts = _overlapping_starts(n, tile, 0.25)
    assert len(starts) == 5 and len([w for _c, w in seam_lines(n, tile, 0.25) if w]) == 4
    weights = np.zeros((len(starts), n))
    for k, s0 in enumerate(starts):
        weights[k, s0:s0 + tile] = _ramp_weights(starts, k, tile, torch.device("cpu")).numpy()
    weights /= weights.sum(axis=0)
    offsets = rng.normal(0, 0.05, (len(starts), len(starts)))
    blended = smooth + np.einsum("iy,ij,jx->yx", weights, offsets, weights)
    assert _ratio(blended, smooth, tile) > 3


def test_seam_ratio_and_deviation_flag_naive_tiling(tmp_path: Path) -> None:
    """On a real (demo) radiograph: the engine's tiling scores like no tiling, a naive one does not."""
    from dicom_node.engine import load_style_model, translate
    from dicom_node.engine.pixels import normalize, read_dicom
    from dicom_node.engine.tiling import SEAMLESS_MAX_BOUND, translate_naive

    model = load_style_model("default")  # a trained generator, so the change has structure
    assert main(["demo-data", str(tmp_path), "--count", "0", "--test-count", "1", "--size", "512", "--seed", "4"]) == 0
    _, img = read_dicom(tmp_path / "test" / "A" / "0000_chest.dcm")
    x = normalize(img, model.normalization)
    whole = translate(model, x, tile=0)
    seamless = translate(model, x, tile=128)
    naive = translate_naive(model, x, tile=128, overlap=0.0)
    assert np.abs(seamless - whole).max() / 2 < SEAMLESS_MAX_BOUND
    assert np.abs(naive - whole).max() / 2 > SEAMLESS_MAX_BOUND
    assert _ratio(seamless - x, whole - x, 128) == pytest.approx(1.0, abs=1e-3)
    assert _ratio(naive - x, whole - x, 128, 0.0) > 10  # hard seams
    blended = translate_naive(model, x, tile=128, overlap=0.25)
    assert _ratio(blended - x, whole - x, 128) > 2  # per-tile tone smeared over the overlap


def test_identity_model_output_equals_input(pairs_dir: Path, identity_model: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", str(identity_model), str(pairs_dir), "--out", str(out), "--tile", "64",
                 "--preview", str(out / "preview.png")]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("psnr", "ssim", "identity_psnr", "identity_ssim", "seam_ratio", "seam_max_deviation",
                "seam_mean_deviation", "seamless"):
        assert key in line
    assert line["pairs"] == 2 and line["direction"] == "A->B" and line["tile"] == 64 and line["seam_tile"] == 64
    assert line["psnr"] == line["identity_psnr"]
    assert line["ssim"] == line["identity_ssim"]
    assert 10 < line["identity_psnr"] < 35 and line["identity_ssim"] < 0.99  # the styles differ
    assert line["seam_ratio"] == 1.0  # no change at all, so no seams
    assert line["seam_max_deviation"] == 0.0 and line["seamless"] is True
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
    assert line["seam_ratio"] == pytest.approx(1.0, abs=1e-3)
    assert line["seamless"] is True and line["seam_max_deviation"] < 1e-3  # % of the range


def test_default_tiling_gets_a_seam_check_pass(pairs_dir: Path, tiny_model_path: Path, tmp_path: Path,
                                               capsys) -> None:
    """The engine translates these small images in one pass; the seam check tiles them anyway."""
    assert main(["evaluate", "--model", str(tiny_model_path), str(pairs_dir), "--out", str(tmp_path / "t"),
                 "--no-panels"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["tile"] == 0 and line["seam_tile"] == SIZE // 2  # 256 would cover the 128 px image
    assert line["seamless"] is True and line["seam_ratio"] is not None
    assert main(["evaluate", "--model", str(tiny_model_path), str(pairs_dir), "--out", str(tmp_path / "u"),
                 "--no-panels", "--no-seam-check"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["seamless"] is None and line["seam_ratio"] is None and line["seam_max_deviation"] is None


def test_missing_pairs_is_a_user_error(identity_model: Path, tmp_path: Path, capsys) -> None:
    assert main(["evaluate", "--model", str(identity_model), str(tmp_path)]) == 1
    assert "A/ and B/" in capsys.readouterr().err


def test_bundled_model_beats_identity(tmp_path: Path, capsys) -> None:
    """The shipped 'default' model (style A -> B) loads and meets the issue's quality goals on
    held-out demo pairs it never saw (PSNR >= 30 dB and >= identity + 6 dB), seamlessly."""
    from dicom_node.engine import load_style_model
    from dicom_node.engine.model_file import bundled_model_path

    assert bundled_model_path("default").is_file()
    assert bundled_model_path("default").stat().st_size <= 20 * 1024 * 1024
    model = load_style_model("default")
    assert model.name == "default" and model.metadata["direction"] == "A->B"
    pairs = tmp_path / "pairs"
    assert main(["demo-data", str(pairs), "--count", "0", "--test-count", "2", "--size", "512", "--seed", "5"]) == 0
    assert main(["evaluate", "--model", "default", str(pairs), "--out", str(tmp_path / "e"), "--no-panels"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["pairs"] == 2
    assert line["psnr"] >= 30.0 and line["psnr"] >= line["identity_psnr"] + 6.0  # measured 33.5 vs 20.3
    assert line["ssim"] > line["identity_ssim"] + 0.1
    assert line["seamless"] is True


def test_fixed_window_models_are_scored_in_the_targets_window(tmp_path: Path, capsys) -> None:
    """A fixed-window model is scored against the target read through its *output* window, and
    the identity baseline is the input's own values seen through that window: a model that keeps
    every value (the identity in absolute terms) scores exactly its identity baseline, one that
    keeps the model-space numbers across two different windows does not."""
    from dicom_node.engine import new_style_model, save_style_model

    pairs = tmp_path / "pairs"
    assert main(["demo-data", str(pairs), "--count", "0", "--test-count", "2", "--size", str(SIZE),
                 "--seed", "3", "--style-pair", "tone"]) == 0
    window_a = {"method": "fixed", "low": 200.0, "high": 3800.0}
    results = {}
    for name, window_b in (("same", window_a), ("other", {"method": "fixed", "low": 0.0, "high": 4095.0})):
        gen = new_style_model(ngf=4, n_blocks=1, residual=True, seed=0)  # output == input in model space
        path = tmp_path / f"{name}.safetensors"
        save_style_model(gen, path, name=name, normalization=window_a, output={"normalization": window_b})
        assert main(["evaluate", "--model", str(path), str(pairs), "-o", str(tmp_path / name), "--no-seam-check"]) == 0
        results[name] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    same, other = results["same"], results["other"]
    assert same["psnr"] == same["identity_psnr"]  # every value kept: the identity, exactly
    assert other["identity_psnr"] == pytest.approx(same["identity_psnr"], abs=0.5)  # same values, wider window
    assert abs(other["psnr"] - other["identity_psnr"]) > 0.5  # model-space numbers kept, values moved
