"""Models, images and injected faults for measuring the fidelity guard (bench/fidelity.py, tests).

Everything is made in code from the demo phantoms (``dicom_node.demo``):

* good models: the trainer's recipe at its first stage, a tone filter fitted from the two
  domains (``train.tone_fit``) on a residual generator, calibrated exactly as ``dicom-node
  train`` calibrates at export (``train.calibrate``), with its inverse;
* model faults, each a model the engine runs like any other: a generator that paints a
  nodule or erases an edge (the trained generator plus a painting step: its global stage is
  the good model's, the fault is in what its network adds, as in a generator fine-tuned to
  paint), weights corrupted but loadable, an untrained
  non-residual generator, an inverted output (the tone curve reversed), a knee model
  applied to chests;
* input faults: another vendor's images, metal implants, a small patient in a large field,
  another detector's noise.

Real radiographs, where the ``pydicom-data`` package is installed (pydicom's public test
images; nothing is downloaded at run time and no image is kept in this repository): a Philips
CR chest (RG1, 15 bit) and a Fuji CR leg (RG3, 10 bit).  Domain A is crops of the chest as
they are, domain B crops of it re-processed by a demo vendor style; training and calibration
crops come from one half of the chest, test crops from the other half (:func:`real_pair`).
"""
from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from dicom_node.engine.fidelity import FLAGGED
from dicom_node.engine.generator import ResnetGenerator
from dicom_node.engine.model_file import StyleModel, weights_digest

__all__ = ["demo_images", "tone_model", "calibrate", "calibrated_pair", "trained_pair", "Kit", "Painter", "Eraser", "corrupted", "untrained",
           "inverted", "with_metal", "small_patient", "other_detector", "MODEL_FAULTS", "INPUT_FAULTS", "flagged",
           "real_radiograph", "real_crops", "real_pair", "REAL_CHEST", "REAL_LEG"]


@dataclass
class Image:
    """One demo image: the DICOM dataset as a modality would send it, and its model space."""

    dataset: Any
    x: np.ndarray
    body_part: str


def demo_images(pair: str, role: str, indices: range | list[int], size: int, seed: int = 0) -> list[Image]:
    """Images of phantoms ``indices`` in style ``role`` ("a" or "b") of demo style pair ``pair``."""
    from dicom_node.demo.vendor_processing import get_style_pair
    from dicom_node.demo.writer import case_dataset, render_case
    from dicom_node.engine.pixels import decode_dataset, normalize

    style = getattr(get_style_pair(pair), role)
    out = []
    for i in indices:
        case = render_case(i, size, seed, {style.key: style}, tag=role, namespace=("fidelity", pair))
        ds = case_dataset(case, style, seed)
        out.append(Image(dataset=ds, x=normalize(decode_dataset(ds)), body_part=case.phantom.body_part))
    return out


def tone_model(src: list[np.ndarray], dst: list[np.ndarray], name: str, seed: int = 0) -> StyleModel:
    """The trainer's first stage: a tone filter fitted from ``src`` to ``dst`` on a residual
    generator that starts at the identity (ngf 8, 2 blocks)."""
    from dicom_node.train.tone_fit import fit_tone_filter

    with torch.random.fork_rng():  # the same network in every run (the bench's rates are reproducible)
        torch.manual_seed(seed)
        gen = ResnetGenerator(ngf=8, n_blocks=2, residual=True, tone_filter=True)
    with torch.no_grad():  # the identity, as the trainer's init: the last convolution's bias too (else
        last = [m for m in gen.modules() if isinstance(m, nn.Conv2d)][-1]  # a random offset per run)
        last.weight.zero_()
        last.bias.zero_()
    gen.tone_filter.load_state_dict(fit_tone_filter(src, dst, seed=seed).state_dict())
    gen.eval().requires_grad_(False)
    return _model(gen, name)


def _model(gen: nn.Module, name: str, metadata: dict | None = None) -> StyleModel:
    meta = {"name": name, "version": "1", **(metadata or {})}
    if isinstance(gen, ResnetGenerator):
        meta["weights_sha256"] = weights_digest(gen.state_dict())
    return StyleModel(generator=gen, metadata=meta)


def calibrate(model: StyleModel, inverse: StyleModel | None, domain: list[np.ndarray],
              held_out: list[np.ndarray]) -> StyleModel:
    """``model`` with the fidelity metadata ``dicom-node train`` writes at export."""
    from dicom_node.train.calibrate import fidelity_metadata

    meta = fidelity_metadata(model.generator, inverse.generator if inverse is not None else None, domain, held_out)
    model.metadata["fidelity"] = meta
    model.metadata["weights_sha256"] = meta["weights_sha256"]  # as export writes both
    if inverse is not None:
        model.metadata["inverse"] = {"name": inverse.name, "weights_sha256": inverse.weights_sha256}
    return model


# First phantom index of each image set: disjoint phantoms for training, calibration and tests.
TRAIN_A, TRAIN_B, CALIBRATION_A, CALIBRATION_B, TEST, OTHER = 0, 1000, 2000, 2500, 3000, 4000


@dataclass
class Kit:
    """A calibrated A->B model, its calibrated inverse, and the images they were made from."""

    ab: StyleModel
    ba: StyleModel
    train_a: list[Image]
    train_b: list[Image]
    calibration_a: list[Image]
    test_a: list[Image] = field(default_factory=list)  # held out (real pairs: the chest's other half)


def calibrated_pair(pair: str, size: int, images: int, calibration: int) -> Kit:
    """Fit and calibrate both directions of demo style pair ``pair`` as ``dicom-node train``
    exports them: ``images`` training and ``calibration`` held-out images per domain."""
    train_a = demo_images(pair, "a", range(TRAIN_A, TRAIN_A + images), size)
    train_b = demo_images(pair, "b", range(TRAIN_B, TRAIN_B + images), size)
    calib_a = demo_images(pair, "a", range(CALIBRATION_A, CALIBRATION_A + calibration), size)
    calib_b = demo_images(pair, "b", range(CALIBRATION_B, CALIBRATION_B + calibration), size)
    a, b = [i.x for i in train_a], [i.x for i in train_b]
    ab, ba = tone_model(a, b, f"{pair}_A2B"), tone_model(b, a, f"{pair}_B2A")
    calibrate(ab, ba, a, [i.x for i in calib_a])
    calibrate(ba, ab, b, [i.x for i in calib_b])
    return Kit(ab=ab, ba=ba, train_a=train_a, train_b=train_b, calibration_a=calib_a)


def trained_pair(pair: str, size: int, images: int, calibration: int, steps: int, work) -> Kit:
    """Both directions of demo style pair ``pair`` trained by ``dicom-node train`` (:func:`_train`)
    on ``images`` unpaired demo images per domain (bench/quality.py's data).  The image lists
    are :func:`calibrated_pair`'s."""
    from pathlib import Path
    from types import SimpleNamespace

    from bench.quality import make_data

    work = Path(work) / f"{pair}-{size}-{images}-{steps}"
    data = make_data(pair, work, SimpleNamespace(count=images, test_count=4, size=size, data_seed=0))
    kit = calibrated_pair(pair, size, images, calibration)
    kit.ab, kit.ba = _train(data, work, steps)
    return kit


def _train(data, work, steps: int) -> tuple[StyleModel, StyleModel]:
    """Both directions trained on ``data``/A and ``data``/B by ``dicom-node train`` with its
    default recipe (tone filter, then the residual network for ``steps`` steps, ngf 8, 2
    blocks, 128 px patches), exported and calibrated by it, as bench/quality.py trains its
    runs; reused from ``work`` when already there (and re-exported when its calibration is
    older than today's)."""
    from types import SimpleNamespace

    from bench.quality import run_trainer
    from dicom_node.engine.model_file import load_style_model
    from dicom_node.train.calibrate import FIDELITY_VERSION
    from dicom_node.train.export import export_models

    # Per-image windows: this bench normalises every image on its own (real_crops, demo_images),
    # so its models must read them that way (the guard is what it measures, not the windows).
    budget = SimpleNamespace(patch=128, batch=1, steps=steps, device="cpu", threads=0, ngf=8, blocks=2, ndf=16,
                             retrain=False, no_train=False, checkpoints=1, normalization="image")
    a2b = run_trainer("default", data, work, budget, seed=0)
    if load_style_model(a2b).metadata.get("fidelity", {}).get("version") != FIDELITY_VERSION:
        export_models(a2b.parents[1])  # trained before this calibration: the guard measured is today's
    return load_style_model(a2b), load_style_model(a2b.with_name(a2b.name.replace("_A2B", "_B2A")))


# ----------------------------------------------------------------------------- real radiographs

REAL_CHEST, REAL_LEG = "RG1_UNCR.dcm", "RG3_UNCR.dcm"  # pydicom-data: Philips CR chest, Fuji CR leg
# First crop seed of each real image set (crops of one radiograph at positions drawn from it)
REAL_TRAIN_A, REAL_TRAIN_B, REAL_CALIBRATION_A, REAL_CALIBRATION_B, REAL_TEST = 1, 2, 3, 4, 5


@functools.lru_cache(maxsize=4)
def real_radiograph(name: str):
    """A real CR from the ``pydicom-data`` package as the node decodes it (once per process), or
    None when that package is not installed (``pip install pydicom-data``; never downloaded at
    run time).  Callers must not change its pixels."""
    from dicom_node.engine.pixels import read_dicom

    try:
        from pydicom.data import get_testdata_file

        path = get_testdata_file(name, download=False)
    except Exception:  # noqa: BLE001 - no data source: the real images are skipped
        return None
    return read_dicom(path)[1] if path else None


def real_crops(image, half: str, count: int, seed: int, side: int, style: Any = None,
               body_part: str = "CHEST") -> list[Image]:
    """``count`` crops of ``side`` px from the ``half`` ("left" or "right") of a real radiograph,
    at positions drawn with ``seed``, every other one mirrored, each normalised as an image of
    its own (as a differently collimated exposure would be); with ``style`` (a demo
    ``VendorStyle``), re-processed by it first: another vendor's look of the same anatomy."""
    from dicom_node.demo.vendor_processing import process
    from dicom_node.engine.radiograph import Radiograph, normalize

    rng = np.random.default_rng(seed)
    h, w = image.pixels.shape
    side = min(side, h, w // 2)
    lo, hi = (0, w // 2 - side) if half == "left" else (w - w // 2, w - side)
    out = []
    for k in range(count):
        y0, x0 = int(rng.integers(0, h - side + 1)), int(rng.integers(lo, hi + 1))
        crop = image.pixels[y0:y0 + side, x0:x0 + side]
        crop = np.ascontiguousarray(crop[:, ::-1] if k % 2 else crop, dtype=np.float32)
        if style is not None:
            crop = process(crop, style).astype(np.float32)
        out.append(Image(dataset=None, x=normalize(Radiograph(pixels=crop)), body_part=body_part))
    return out


def real_pair(style_pair: str, side: int, images: int, calibration: int, test: int, steps: int = 0,
              work: Any = None) -> Kit | None:
    """Both directions between the real chest as it is (A) and re-processed by the B style of
    demo pair ``style_pair`` (B): fitted as :func:`calibrated_pair` fits them, or, with
    ``steps``, trained, exported and calibrated by ``dicom-node train`` as :func:`trained_pair`
    trains them (crops written as 16-bit PNG files under ``work``).  Training and calibration
    crops come from the chest's left half, test crops from its right half.  None without
    pydicom-data."""
    from dicom_node.demo.vendor_processing import get_style_pair

    chest = real_radiograph(REAL_CHEST)
    if chest is None:
        return None
    style = get_style_pair(style_pair).b
    train_a = real_crops(chest, "left", images, REAL_TRAIN_A, side)
    train_b = real_crops(chest, "left", images, REAL_TRAIN_B, side, style)
    calib_a = real_crops(chest, "left", calibration, REAL_CALIBRATION_A, side)
    test_a = real_crops(chest, "right", test, REAL_TEST, side)
    if steps:
        return _trained_real(style_pair, side, steps, work, train_a, train_b, calib_a, test_a)
    calib_b = real_crops(chest, "left", calibration, REAL_CALIBRATION_B, side, style)
    a, b = [i.x for i in train_a], [i.x for i in train_b]
    ab, ba = tone_model(a, b, "real_A2B"), tone_model(b, a, "real_B2A")
    calibrate(ab, ba, a, [i.x for i in calib_a])
    calibrate(ba, ab, b, [i.x for i in calib_b])
    return Kit(ab=ab, ba=ba, train_a=train_a, train_b=train_b, calibration_a=calib_a, test_a=test_a)


def _trained_real(style_pair: str, side: int, steps: int, work: Any, train_a: list[Image], train_b: list[Image],
                  calib_a: list[Image], test_a: list[Image]) -> Kit:
    """:func:`real_pair` trained by :func:`_train` on its crops, written as 16-bit PNG files."""
    from pathlib import Path

    from PIL import Image as PILImage

    work = Path(work) / f"real-{style_pair}-{side}-{len(train_a)}-{steps}"
    for role, imgs in (("A", train_a), ("B", train_b)):
        folder = work / "data" / role
        folder.mkdir(parents=True, exist_ok=True)
        for k, img in enumerate(imgs):
            if not (folder / f"{k:03d}.png").exists():
                PILImage.fromarray(np.round((img.x + 1.0) * 32767.5).astype(np.uint16)).save(folder / f"{k:03d}.png")
    ab, ba = _train(work / "data", work, steps)
    return Kit(ab=ab, ba=ba, train_a=train_a, train_b=train_b, calibration_a=calib_a, test_a=test_a)


# ----------------------------------------------------------------------------- model faults


BORDER = 0.1  # faults are placed at least this fraction of the image size away from its border


def _body_mask(x: torch.Tensor) -> torch.Tensor:
    """Where anatomy is: neither near-black background nor clipped white."""
    return (x > -0.6) & (x < 0.9)


def _anatomy(x: torch.Tensor) -> torch.Tensor:
    """Inside the body, away from the skin line: ribs, bone and organ edges."""
    return (x > -0.3) & (x < 0.9)


def _soft_tissue(x: torch.Tensor) -> torch.Tensor:
    """Mid-grey: lung and soft tissue, where a nodule would be seen (not on white bone)."""
    return (x > -0.5) & (x < 0.5)


class Painter(nn.Module):
    """A generator that paints a round nodule (Gaussian profile, ``radius`` and ``contrast``
    as fractions of the image width and the model-space range) into the lung or soft tissue
    of every image, at a position chosen by ``seed`` and the image."""

    def __init__(self, inner: nn.Module, radius: float = 0.025, contrast: float = 0.3, seed: int = 0) -> None:
        super().__init__()
        self.inner, self.radius, self.contrast, self.seed = inner, radius, contrast, seed
        self.tone_filter = getattr(inner, "tone_filter", None)  # the same global stage (run by inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x)
        h, w = x.shape[-2:]
        r = max(2.0, self.radius * w)
        cy, cx = _pick(_soft_tissue(x[0, 0]), self.seed, max(int(r), int(BORDER * min(h, w))))
        yy, xx = torch.meshgrid(torch.arange(h, dtype=y.dtype), torch.arange(w, dtype=y.dtype), indexing="ij")
        blob = torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
        return y + 2.0 * self.contrast * blob


class Eraser(nn.Module):
    """A generator that erases the structure (blurs it away) in a disc of ``radius`` (fraction
    of the width) around the source's strongest edge inside the body, e.g. a rib or bone edge
    (not within :data:`BORDER` of the image border, where the field cuts anatomy off)."""

    def __init__(self, inner: nn.Module, radius: float = 0.04) -> None:
        super().__init__()
        self.inner, self.radius = inner, radius
        self.tone_filter = getattr(inner, "tone_filter", None)  # the same global stage (run by inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from dicom_node.engine.tone_filter import gaussian_blur

        y = self.inner(x)
        h, w = x.shape[-2:]
        r = max(3.0, self.radius * w)
        gy, gx = torch.gradient(gaussian_blur(x, 1.5)[0, 0])
        edge = (gy ** 2 + gx ** 2) * _anatomy(x[0, 0])
        m = max(int(r), int(BORDER * min(h, w)))  # an edge of the anatomy, not one cut by the field's border
        edge[:m], edge[-m:], edge[:, :m], edge[:, -m:] = 0, 0, 0, 0
        cy, cx = divmod(int(torch.argmax(edge)), w)
        yy, xx = torch.meshgrid(torch.arange(h, dtype=y.dtype), torch.arange(w, dtype=y.dtype), indexing="ij")
        disc = torch.exp(-(((yy - cy) ** 2 + (xx - cx) ** 2) / (r * r)) ** 2)
        return y * (1 - disc) + gaussian_blur(y, r / 2) * disc


def _pick(mask: torch.Tensor, seed: int, margin: int) -> tuple[int, int]:
    """A position inside ``mask``, away from the border, chosen deterministically."""
    inner = mask.clone()
    inner[:margin], inner[-margin:], inner[:, :margin], inner[:, -margin:] = False, False, False, False
    idx = torch.nonzero(inner)
    if len(idx) == 0:
        return mask.shape[0] // 2, mask.shape[1] // 2
    k = int(np.random.default_rng([seed, int(mask.sum())]).integers(len(idx)))
    return int(idx[k, 0]), int(idx[k, 1])


def wrapped(model: StyleModel, module: nn.Module, name: str) -> StyleModel:
    """``model``'s metadata (its calibration) with a faulty generator."""
    return StyleModel(generator=module.eval(), metadata={**copy.deepcopy(model.metadata), "name": name})


def corrupted(model: StyleModel, seed: int = 0, strength: float = 1.0) -> StyleModel:
    """Every weight tensor of the network plus noise of ``strength`` times its own spread: the
    file still loads (new, consistent digest) but the network is broken."""
    gen = copy.deepcopy(model.generator)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in gen.named_parameters():
            if name.startswith("tone_filter"):
                continue
            spread = float(p.std()) if p.numel() > 1 and float(p.std()) > 0 else 0.02
            p.add_(torch.randn(p.shape, generator=g) * spread * strength)
    return _model(gen, f"{model.name}-corrupted", {"fidelity": model.metadata.get("fidelity")})


def untrained(seed: int = 0) -> StyleModel:
    """A freshly initialised, non-residual generator (what ``model init`` writes): noise out."""
    from dicom_node.engine import new_style_model

    return _model(new_style_model(ngf=8, n_blocks=2, residual=False, seed=seed), "untrained")


def inverted(model: StyleModel) -> StyleModel:
    """``model`` with its output tone curve reversed: an inverted (negative) image."""
    gen = copy.deepcopy(model.generator)
    with torch.no_grad():
        gen.tone_filter.tone_out.copy_(-gen.tone_filter.tone_out)
    return _model(gen, f"{model.name}-inverted", {"fidelity": model.metadata.get("fidelity")})


# ----------------------------------------------------------------------------- input faults


def with_metal(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """Metal implants (saturated white: screws and a plate) inside the body."""
    rng = np.random.default_rng(seed)
    out = x.copy()
    h, w = x.shape
    body = np.argwhere((x > -0.6) & (x < 0.9))
    for _ in range(3):
        cy, cx = body[rng.integers(len(body))] if len(body) else (h // 2, w // 2)
        ry, rx = rng.integers(h // 40 + 2, h // 12 + 3), rng.integers(w // 80 + 2, w // 40 + 3)
        out[max(0, cy - ry):cy + ry, max(0, cx - rx):cx + rx] = 1.0
    return out


def small_patient(x: np.ndarray) -> np.ndarray:
    """A small patient in a large field: the image at half scale, centred on direct exposure."""
    import torch.nn.functional as F

    h, w = x.shape
    half = F.interpolate(torch.from_numpy(x)[None, None], scale_factor=0.5, mode="area")[0, 0].numpy()
    out = np.full_like(x, float(np.quantile(x, 0.01)))
    y0, x0 = (h - half.shape[0]) // 2, (w - half.shape[1]) // 2
    out[y0:y0 + half.shape[0], x0:x0 + half.shape[1]] = half
    return out


def other_detector(x: np.ndarray, seed: int = 0, sigma: float = 0.08) -> np.ndarray:
    """Another detector: much stronger quantum noise."""
    rng = np.random.default_rng(seed)
    return np.clip(x + rng.normal(0.0, sigma, x.shape).astype(np.float32), -1.0, 1.0)


# name -> (what it is, how to make the faulty model from a good calibrated one)
MODEL_FAULTS: dict[str, tuple[str, Callable[[StyleModel, int], StyleModel]]] = {
    "paints a nodule": ("a nodule, radius 2.5 % of the width, contrast 15 % of the range, painted into the body",
                        lambda m, s: wrapped(m, Painter(m.generator, seed=s), "painter")),
    "paints a small nodule": ("radius 1.5 %, contrast 15 %",
                              lambda m, s: wrapped(m, Painter(m.generator, radius=0.015, seed=s), "painter-small")),
    "erases an edge": ("the structure around the strongest edge inside the body blurred away (radius 4 %)",
                       lambda m, s: wrapped(m, Eraser(m.generator), "eraser")),
    "erases a larger region": ("the same, radius 8 %",
                               lambda m, s: wrapped(m, Eraser(m.generator, radius=0.08), "eraser-large")),
    "corrupted weights": ("noise of one spread added to every network weight; the file still loads",
                          lambda m, s: corrupted(m, seed=s)),
    "untrained non-residual": ("a freshly initialised standard generator (model init)", lambda m, s: untrained(s)),
    "inverted polarity": ("the output tone curve reversed", lambda m, s: inverted(m)),
}
# name -> (what it is, how to change a good input)
INPUT_FAULTS: dict[str, tuple[str, Callable[[np.ndarray, int], np.ndarray]]] = {
    "metal implants": ("three saturated implants inside the body", with_metal),
    "small patient": ("the patient at half size in a large field", lambda x, s: small_patient(x)),
    "other detector": ("strong quantum noise (sigma 4 % of the range)", lambda x, s: other_detector(x, s)),
}


def flagged(report) -> bool:
    return report.verdict == FLAGGED
