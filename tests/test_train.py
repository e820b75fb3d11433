"""The trainer end to end: tiny CycleGAN runs on generated DICOM and 16-bit PNG data.

Every run uses ngf 8 / 2 blocks / patch 64 and one CPU thread (fastest on a busy 2-core box),
so the whole file takes seconds, not minutes.
"""
from __future__ import annotations

import csv
import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from factory import PATIENT_ID, PATIENT_NAME, make_dataset, phantom, write
from PIL import Image

from dicom_node.cli import main
from dicom_node.config import ConfigError
from dicom_node.engine import load_style_model, translate
from dicom_node.engine.pixels import normalize, read_image_file
from dicom_node.train.config import load_train_config, parse_train_config
from dicom_node.train.export import latest_checkpoint, load_checkpoint

REPO = Path(__file__).resolve().parents[1]
SIZE = 96


def style_b(stored: np.ndarray) -> np.ndarray:
    """A different 'look' of the same 12-bit image: a gamma curve, as 16-bit values."""
    x = stored.astype(np.float64) / 4095.0
    return np.round(65535 * x**0.6).astype(np.uint16)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A/ 3 DICOM, B/ 3 16-bit PNG (+ one unreadable file), val/A + val/B 2 DICOM pairs."""
    root = tmp_path_factory.mktemp("traindata")
    for sub in ("A", "B", "val/A", "val/B", "paired/A", "paired/B"):
        (root / sub).mkdir(parents=True)
    for i in range(3):
        write(make_dataset(rows=SIZE, cols=SIZE, seed=i), root / "A" / f"a{i}.dcm")
        Image.fromarray(style_b(phantom(SIZE, SIZE, 12, seed=10 + i))).save(root / "B" / f"b{i}.png")
        pix = phantom(SIZE, SIZE, 12, seed=20 + i)
        write(make_dataset(pix, seed=20 + i), root / "paired" / "A" / f"p{i}.dcm")
        Image.fromarray(style_b(pix)).save(root / "paired" / "B" / f"p{i}.png")
    (root / "B" / "broken.dcm").write_bytes(b"this is not DICOM")
    for i in range(2):
        pix = phantom(SIZE, SIZE, 12, seed=30 + i)
        write(make_dataset(pix, seed=30 + i), root / "val" / "A" / f"v{i}.dcm")
        # B's values as DICOM (training B is PNG): a domain's images share one value scale
        write(make_dataset(style_b(pix), bits_stored=16, seed=30 + i), root / "val" / "B" / f"v{i}.dcm")
    return root


def write_config(tmp_path: Path, data: Path, *, a: str = "A", b: str = "B", val: str | None = "val",
                 residual: bool = False, model: dict | None = None, **train) -> Path:
    cfg = {
        "data": {"a": str(data / a), "b": str(data / b), **({"val": str(data / val)} if val else {})},
        "model": {"ngf": 8, "n_blocks": 2, "ndf": 8, "residual": residual, **(model or {})},
        "train": {"patch_size": 64, "batch_size": 1, "steps": 20, "pool_size": 4, "threads": 1, **train},
        "output": {"dir": str(tmp_path / "run"), "sample_every": 10, "checkpoint_every": 10, "log_every": 5},
    }
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def read_metrics(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_example_config_loads_with_the_trainer_loader():
    cfg = load_train_config(REPO / "config" / "train.example.yaml")
    assert (cfg.model.ngf, cfg.model.n_blocks, cfg.train.patch_size) == (64, 9, 256)
    assert cfg.train.decay_from == 100000 and cfg.data.val is not None


def test_config_problems_are_listed_with_their_paths(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"data": {"a": "x"}, "train": {"steps": 0, "patch_size": 30, "amp": "fp8"},
                                   "model": {"ngf": "many"}, "extra": 1}))
    with pytest.raises(ConfigError) as exc:
        load_train_config(bad)
    text = str(exc.value)
    for where in ("data.b", "train.steps", "train.patch_size", "train.amp", "model.ngf", "extra"):
        assert where in text
    for model, problem in (({"brightness_bins": 0}, "model.brightness_bins: must be >= 1"),
                           ({"brightness_bins": 65}, "model.brightness_bins: 65 is more than 64"),
                           ({"local_tone_bins": 65}, "model.local_tone_bins: 65 is more than 64"),
                           ({"local_tone_bins": 8, "tone_filter": False}, "model.local_tone_bins: needs model.tone_filter")):
        bad.write_text(yaml.safe_dump({"data": {"a": str(tmp_path), "b": str(tmp_path)}, "model": model}))
        with pytest.raises(ConfigError, match=problem):
            load_train_config(bad)


def test_tiny_run_on_dicom_and_png_exports_two_usable_models(tmp_path, data, capsys, caplog):
    caplog.set_level(logging.INFO, logger="dicom_node.train")
    cfg = write_config(tmp_path, data)
    assert main(["train", "--config", str(cfg), "--no-progress"]) == 0
    run = tmp_path / "run"
    printed = capsys.readouterr().out
    models = sorted((run / "models").glob("*.safetensors"))
    assert [m.name for m in models] == ["run_A2B.safetensors", "run_B2A.safetensors"]
    assert all(str(m) in printed for m in models)
    # `model info` shows the fitted tone filter and the style distance the run measured.
    assert main(["model", "info", str(models[0]), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    tone = info["tone_filter"]  # band curves by default: a gain for small and one for large coefficients
    assert len(tone["band_gains_small"]) == len(tone["band_gains_large"]) == len(tone["band_sigmas_px"]) > 0
    assert info["style_distance"]["input_vs_target"] > 0
    # The fidelity guard is calibrated at export on the validation images, per direction, and
    # each model names the other as its inverse by weight digest.
    fid = info["fidelity"]
    assert fid["calibrated"] is True and fid["domain_images"] == 3
    assert fid["calibration"]["held_out_images"] == 2 and fid["calibration"]["training_images"] == 3
    assert set(fid["thresholds"]) == {"structure", "band_structure", "unexplained", "network", "cycle", "ood",
                                      "noise", "saturated", "window"}
    assert fid["thresholds"]["network"] == 1.5  # a ratio to the most the network added in calibration
    for k, top in fid["calibration"]["max"].items():
        assert fid["thresholds"][k] > top  # the highest held-out score plus a margin
    pair = [load_style_model(m) for m in models]
    assert pair[0].metadata["inverse"] == {"name": "run_B2A", "weights_sha256": pair[1].weights_sha256}
    assert pair[1].metadata["inverse"]["weights_sha256"] == pair[0].weights_sha256
    assert fid["inverse"]["weights_sha256"] == pair[1].weights_sha256

    # Usable: load like the node does and translate a real image of the other domain.
    image = normalize(read_image_file(data / "val" / "A" / "v0.dcm"))
    for m, direction in zip(models, ("A->B", "B->A")):
        model = load_style_model(m)
        assert model.metadata["direction"] == direction
        out = translate(model, image)
        assert out.shape == image.shape and np.isfinite(out).all() and out.std() > 0
        prov = model.metadata["provenance"]
        assert prov["steps"] == 20 and prov["trained"] is True
        assert prov["data"]["A"]["images"] == 3 and prov["data"]["B"]["images"] == 3
        assert prov["data"]["B"]["skipped_unreadable"] == 1  # broken.dcm skipped and counted
        assert prov["config"]["model"] == {"ngf": 8, "n_blocks": 2, "ndf": 8, "residual": False, "tone_filter": True,
                                             "band_curves": True, "brightness_bins": 4, "local_tone_bins": "auto"}
        assert model.generator.tone_filter is not None  # the default: fitted from the two domains
        assert model.metadata["architecture"]["tone_filter"]["knots"] > 1
        assert model.metadata["architecture"]["tone_filter"]["band_knots"] > 1
        assert prov["paired"] is False  # different file names: unpaired
        assert prov["validation"]["style_distance"] >= 0 and prov["validation"]["style_distance_identity"] > 0
    # Checkpoints load without unpickling code.
    ckpt = latest_checkpoint(run)
    assert ckpt.name == "step_00000020.pt"
    raw = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert raw["step"] == 20 and set(raw["state"]) >= {"g_ab", "g_ba", "d_a", "d_b", "opt_g", "opt_d"}
    # Metrics: a row every 5 steps plus validation at the checkpoints (10, 20), with identity baseline.
    rows = read_metrics(run)
    assert [int(r["step"]) for r in rows if r["g_total"]] == [5, 10, 15, 20]
    val = [r for r in rows if r["val_psnr_a2b"]]
    assert [int(r["step"]) for r in val] == [10, 20]
    assert all(float(r["val_ssim_identity"]) < 1 and float(r["val_psnr_a2b"]) > 0 for r in val)
    assert float([r for r in rows if r["g_total"]][2]["patches_per_s"]) > 0
    # Validation without pairs: the style distance of G(A) from B, with A's own, at every checkpoint.
    style = [r for r in rows if r["style_distance"]]
    assert [int(r["step"]) for r in style] == [10, 20]
    assert all(float(r["style_distance"]) >= 0 and float(r["style_distance_identity"]) > 0 for r in style)
    # Sample panels: 2 rows (A, B) per sample image x 3 columns of 64 px patches.
    panels = sorted((run / "samples").glob("*.png"))
    assert [p.name for p in panels] == ["step_00000010.png", "step_00000020.png"]
    assert np.asarray(Image.open(panels[-1])).shape == (2 * 64, 3 * 64)
    assert (run / "config.yaml").exists() and (run / "cache" / "A" / "index.json").exists()
    assert PATIENT_NAME not in caplog.text and PATIENT_ID not in caplog.text
    # The validation pairs chose, per direction, how many quantiles the first stage's tone curves
    # match, and how much of its shape to keep.
    assert len(re.findall(r"quantiles, chosen on the 2 validation pairs|left out \(the identity\): every fit",
                          caplog.text)) == 2
    assert len(re.findall(r"first stage's shape kept [^\n]*on the 2 validation pairs", caplog.text)) == 2
    # With validation pairs, local tone curves by default (model.local_tone_bins: auto), each
    # direction's kept or left out by the pairs; the exported model carries them either way.
    assert len(re.findall(r"local tone curves (kept|left out)[^\n]*on the 2 validation pairs", caplog.text)) == 2
    assert all(m.metadata["architecture"]["tone_filter"]["local_bins"] == 8 for m in pair)


def test_local_tone_curves_are_on_by_default_only_with_validation_pairs(tmp_path):
    """``model.local_tone_bins: auto`` (the default) acts as 8 with data.val and as off without:
    only pairs can show whether curves fitted per neighbourhood are the look or the content."""
    base = {"data": {"a": "A", "b": "B"}}
    assert parse_train_config(base, base_dir=tmp_path).local_tone_bins == 1
    assert parse_train_config({"data": {**base["data"], "val": "V"}}, base_dir=tmp_path).local_tone_bins == 8
    assert parse_train_config({"data": {**base["data"], "val": "V"}, "model": {"local_tone_bins": 1}},
                              base_dir=tmp_path).local_tone_bins == 1
    assert parse_train_config({"data": {**base["data"], "val": "V"}, "model": {"tone_filter": False}},
                              base_dir=tmp_path).local_tone_bins == 1
    assert parse_train_config({**base, "model": {"local_tone_bins": 4}}, base_dir=tmp_path).local_tone_bins == 4
    with pytest.raises(ConfigError, match="model.local_tone_bins: must be an integer or auto"):
        parse_train_config({**base, "model": {"local_tone_bins": "many"}}, base_dir=tmp_path)


def test_resume_continues_step_count_optimizer_and_loss(tmp_path, data):
    """8 steps at once == 4 steps, then --resume to 8 (bit for bit), and export from the checkpoint;
    with local tone curves, which the checkpoint keeps and the exported model carries."""
    local = {"local_tone_bins": 4}
    straight = tmp_path / "straight"
    straight.mkdir()
    cfg = write_config(straight, data, a="paired/A", b="paired/B", val=None, residual=True, steps=8, decay_from=8,
                       model=local)
    assert main(["train", "--config", str(cfg), "--no-progress"]) == 0
    split = tmp_path / "split"
    split.mkdir()
    cfg = write_config(split, data, a="paired/A", b="paired/B", val=None, residual=True, steps=4, decay_from=8,
                       model=local)
    assert main(["train", "--config", str(cfg), "--no-progress"]) == 0
    # Without --resume an existing run is refused rather than overwritten.
    assert main(["train", "--config", str(cfg), "--steps", "8", "--no-progress"]) == 1
    assert main(["train", "--config", str(cfg), "--steps", "8", "--resume", "--no-progress"]) == 0

    a = load_checkpoint(latest_checkpoint(straight / "run"))
    b = load_checkpoint(latest_checkpoint(split / "run"))
    assert a["step"] == b["step"] == 8
    for net in ("g_ab", "g_ba", "d_a", "d_b"):
        for key, value in a["state"][net].items():
            assert torch.equal(value, b["state"][net][key]), f"{net}.{key} differs after resume"
    assert a["meta"]["losses"] == b["meta"]["losses"]
    assert a["meta"]["paired"] is True and a["meta"]["losses"]["paired"] > 0  # same names: supervised L1 on
    rows = read_metrics(split / "run")
    assert [int(r["step"]) for r in rows if r["g_total"]] == [4, 5, 8]  # log_every 5 (+ the last step of each part)
    assert [int(r["step"]) for r in rows if r["style_distance"]] == [4, 8]  # validation rows at checkpoints
    # the losses of steps 6..8 are the same as in the uninterrupted run: the loss continued
    last_split = [r for r in rows if r["g_total"]][-1]
    last_straight = [r for r in read_metrics(straight / "run") if r["g_total"]][-1]
    assert int(last_straight["step"]) == 8 and last_split["g_total"] != ""
    assert all(last_split[k] == last_straight[k] for k in ("g_total", "cycle_a", "d_a", "d_b", "paired"))

    # export from a checkpoint on demand, into another folder (without --checkpoint the run's
    # best one: tests/test_selection.py)
    out = tmp_path / "exported"
    newest = latest_checkpoint(split / "run")
    assert main(["train", "export", str(split / "run"), "--checkpoint", str(newest), "-o", str(out)]) == 0
    model = load_style_model(out / "run_A2B.safetensors")
    assert model.metadata["version"] == "8" and model.metadata["provenance"]["steps"] == 8
    assert model.metadata["architecture"]["residual"] is True
    assert model.metadata["architecture"]["tone_filter"]["local_bins"] == 4
    assert not torch.equal(model.generator.tone_filter.local_curves, torch.linspace(-1, 1, 257).repeat(4, 1))  # fitted
    # the weights of step 8, but a network that lost to its first stage is exported without it
    zeroed = model.metadata["provenance"]["exported"]["stage"] != "network"
    last = [k for k in model.generator.state_dict() if k.startswith("model.")][-2:]  # the last conv
    for key, value in model.generator.state_dict().items():
        assert torch.equal(value, torch.zeros_like(value) if zeroed and key in last else a["state"]["g_ab"][key])


@pytest.mark.parametrize("case, expected", [
    ("missing", "folder not found"),
    ("empty", "holds no image files"),
    ("unreadable", "0 usable image(s)"),
    ("patch", "patch_size 128 is larger than 3 of the 3 images in domain A"),
])
def test_bad_data_gives_one_line_errors(tmp_path, data, capsys, case, expected):
    bad = tmp_path / "bad"
    bad.mkdir()
    a, patch = "A", 64
    if case == "missing":
        a = str(tmp_path / "nowhere")
    elif case == "empty":
        (bad / "sub").mkdir()
        a = str(bad)
    elif case == "unreadable":
        (bad / "x.dcm").write_bytes(b"garbage")
        (bad / "y.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
        a = str(bad)
    elif case == "patch":
        patch = 128
    cfg = write_config(tmp_path, data, a=a, val=None, patch_size=patch)
    assert main(["train", "--config", str(cfg), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dicom-node train: error:"), err
    assert expected in err[0]
    assert "Traceback" not in "".join(err)


def test_overrides_and_missing_config(tmp_path, data, capsys):
    assert main(["train", "--no-progress"]) == 1
    assert "--config" in capsys.readouterr().err
    cfg = write_config(tmp_path, data, val=None)
    assert main(["train", "--config", str(cfg), "--set", "train.lr", "--no-progress"]) == 1
    assert "SECTION.KEY=VALUE" in capsys.readouterr().err
    from dicom_node.cli import build_parser
    from dicom_node.commands.train import overrides_from_args

    args = build_parser().parse_args(["train", "--config", str(cfg), "--steps", "3", "--set", "train.lr=0.001",
                                      "--out", "somewhere"])
    loaded = load_train_config(cfg, overrides_from_args(args))
    assert loaded.train.steps == 3 and loaded.train.lr == 0.001
    assert loaded.output.dir == Path("somewhere").resolve()


def test_patches_avoid_flat_background_and_flip(tmp_path):
    """An image whose left half is empty background: nearly all patches come from the right half."""
    from dicom_node.train.data import DomainData, PatchSampler, _content_map

    rng = np.random.default_rng(0)
    img = np.full((128, 256), -1.0, np.float32)
    img[:, 128:] = np.clip(rng.normal(0, 0.3, (128, 128)), -1, 1)
    dom = DomainData(label="A", folder=tmp_path, names=["x"], arrays=[img.astype(np.float16)],
                     content=[_content_map(img, None)])
    sampler = PatchSampler(dom, dom, 64, 1, seed=3)
    flat = 0
    for _ in range(200):
        a, _b = sampler.sample()
        flat += (a == -1.0).mean() > 0.5
    assert flat <= 10  # uniform positions would give ~ 40 % mostly-flat patches
    # the sampler state round-trips: the same stream continues
    state = sampler.state()
    first = sampler.sample()[0]
    sampler.set_state(state)
    assert np.array_equal(sampler.sample()[0], first)


def test_lr_schedule_constant_then_linear_to_zero():
    from dicom_node.train.loop import lr_factor

    assert [lr_factor(s, 10, 6) for s in (0, 5, 6, 8)] == [1.0, 1.0, 1.0, 0.5]
    assert lr_factor(9, 10, 6) == pytest.approx(0.25) and lr_factor(10, 10, 6) == 0.0
    assert lr_factor(50, 10, 20) == 1.0  # decay_from >= steps: constant


def test_image_pool_survives_a_patch_size_change():
    """A run resumed with another patch size must not crash on the stored history."""
    import torch

    from dicom_node.train.losses import ImagePool

    pool = ImagePool(4, seed=0)
    for _ in range(3):
        pool.query(torch.zeros(2, 1, 64, 64))
    out = pool.query(torch.ones(2, 1, 96, 96))
    assert out.shape == (2, 1, 96, 96)
    assert all(img.shape[-1] == 96 for img in pool.images)
