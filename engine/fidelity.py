"""The fidelity guard: does a restyled radiograph still show its source's anatomy?

Why: a GAN translation can invent or erase structure (a "hallucination"), most often on
inputs unlike its training data, and a broken model file may load and run.  A style changes
tone, sharpness and noise, never the anatomy, so the guard compares every output with its
own source, per image, and names what it finds:

* ``structure``, ``band_structure`` and ``unexplained``: the output is predicted from the
  source by what a style does to a whole image: a monotone tone fit (histogram matching,
  which cannot turn an inverted image upright), a least-squares gain per Laplacian band
  (sharpening, smoothing) and a second monotone fit (the output curve, which clips
  sharpening's overshoots).  What the prediction misses is what the model did locally.
  ``structure`` is the worst 9x9 region of ``E(residual) / (E(prediction) + E(output) + c)``
  on all the detail, box-smoothed so noise texture averages out: ~0 where the output follows
  the source, ~1 where one of them has structure the other lacks (a painted nodule, an
  erased region), so one region counts, not the mean.  ``band_structure`` is the same per
  band (an edge erased at one scale).  ``unexplained`` is the residual's share of the
  output's detail over the whole image (~0.03 for a style, ~1 for noise or an inverted
  image).  Regions the source shows clipped to black or white are not judged.
* ``cycle``: the share of the source's detail that the inverse model's translation of the
  output, ``F(G(x))``, does not restore (only when the inverse model is known).  It runs on
  a reduced image (longest side :data:`CYCLE_SIDE`) to keep its cost small; calibration
  absorbs the scale change.
* ``network``: what the model's network added beyond its global stage (``engine.tone_filter``:
  tone curves and band gains, which act on the whole image alike and cannot draw a nodule),
  or beyond the source for a model without one.  A GAN invents or erases structure only
  there.  Per pyramid band, the worst 9x9 region's RMS of that addition and the worst share
  of the global stage's structure it took away (its sign: an erased edge, which may be no
  stronger than a network's normal edge enhancement), and the worst region of its
  box-smoothed local mean (a blob); each divided by the highest value seen on the model's
  calibration images (``metadata.fidelity.network_scale``, written at export), the score is
  the largest of these ratios: ~1 for what the network normally does, several for a painted
  nodule or an erased edge.  Only for models calibrated with it.
* ``ood``: the input's style distance (``engine.style_stats``, the trainer's statistics) to
  the nearest image of the model's training domain, recorded in the model at export: inputs
  unlike the training data (another body part, another detector) are where models fail.
* ``noise``: the input's noise level (a robust estimate from second differences) against the
  nearest training image's, as ``|log2|`` of their ratio: another detector or dose that the
  global style distance overlooks where the style has strong fine detail of its own.
* ``saturated``: the share of the image (per cent) that is saturated white with a surround
  (the mean of its unsaturated neighbours) darker than the training domain's (the domain's
  0.1 % quantile, recorded at export): metal implants, a plateau with a step all round even
  over bright bone, which the ``structure`` scores cannot judge (clipped regions are
  skipped) and which change the global statistics little.
* ``window``: the share of the input (per cent of its valid pixels) outside the model's fixed
  input window, clipped on the way in (``engine.radiograph``): an input whose values are not
  the ones the model was trained on (another detector, bit depth, exposure or processing) is
  translated from a flattened copy.  Only for fixed-window models.
  ``noise``, ``saturated`` and ``network`` are only judged for models calibrated with them
  (older model files skip them, and ``saturated`` for calibrations before fidelity version 5,
  which measured the darkest single neighbour; there are no defaults).

A calibration names the weights it measured (``metadata.fidelity.weights_sha256``): when the
model's weights are others (fine-tuned, converted, or damaged and saved again with a new file
digest), every output is flagged, since no threshold was ever measured for them.

All are "higher is worse" and compared with thresholds: the model's calibrated ones
(``metadata.fidelity.thresholds``, written by the trainer at export) or the
conservative :data:`DEFAULT_THRESHOLDS`.  Scores are computed on an area-downsampled copy
(longest side :data:`ANALYSIS_SIDE`): anatomy lives at that scale, and the cost stays a
few per cent of a translation (``bench/fidelity.py`` measures it).

Each score is one entry of ``fidelity_scores.TABLE`` (name, reason, margin, default threshold,
compute); the measurements are in :mod:`.fidelity_measures`.  :func:`measure` runs the table
for the guard (:func:`assess`) and for calibration (``train.calibrate``) alike, and the
calibration metadata is written (:func:`calibration_metadata`) and read (:func:`reference_of`,
:func:`thresholds_of`) here.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Collection, Mapping

import numpy as np

from .body_part import UNKNOWN, unseen_body_part
from .fidelity_measures import (
    ANALYSIS_SIDE,
    CLIPPED,
    CYCLE_SIDE,
    LEVELS,
    NETWORK_FLOOR,
    WINDOW,
    analysis_view,
    base_of,
    cycle_score,
    disagreement,
    domain_statistics,
    network_addition,
    network_levels,
    network_score,
    noise_level,
    noise_score,
    ood_score,
    saturated_level,
    saturated_score,
    structure_scores,
    window_share,
)
from .fidelity_scores import TABLE, Reference, Score, Subject
from .pixel_spacing import unlike_pixel_spacing
from .style_stats import StyleStats

if TYPE_CHECKING:
    from .model_file import StyleModel

__all__ = ["FidelityReport", "assess", "measure", "judge", "thresholds_of", "calibrate_thresholds", "reference_of",
           "calibration_metadata", "fixed_window", "Reference", "Score", "Subject", "TABLE", "DEFAULT_THRESHOLDS",
           "SCORES", "FIDELITY_VERSION", "OK", "FLAGGED", "STALE_CALIBRATION",
           # the measurements (fidelity_measures), re-exported for their callers
           "structure_scores", "ood_score", "cycle_score", "domain_statistics", "analysis_view", "disagreement",
           "noise_level", "noise_score", "saturated_level", "saturated_score", "window_share", "network_levels",
           "network_score", "network_addition", "base_of", "ANALYSIS_SIDE", "CYCLE_SIDE", "LEVELS", "CLIPPED",
           "NETWORK_FLOOR"]

OK, FLAGGED = "ok", "flagged"
STALE_CALIBRATION = "the model's weights changed since its calibration (re-export it: dicom-node train export)"
SCORES = tuple(score.name for score in TABLE)  # higher: worse
# Uncalibrated models (older files, ``model init``): each score's default; those without one are not judged.
DEFAULT_THRESHOLDS: dict[str, float] = {s.name: s.default for s in TABLE if s.default is not None}
# metadata.fidelity layout; 4: network_scale with the erased-structure components; 5: saturated_surround
FIDELITY_VERSION = 5


@dataclass
class FidelityReport:
    """The guard's finding for one output: ``verdict`` ok/flagged, with the reasons."""

    verdict: str
    reasons: list[str] = field(default_factory=list)
    scores: dict[str, float | None] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)
    calibrated: bool = False
    worst_region: tuple[int, int] | None = None  # (row, column) in source pixels, for previews

    @property
    def flagged(self) -> bool:
        return self.verdict == FLAGGED

    def summary(self) -> str:
        """One line for ImageComments, previews and status: the verdict and its reasons."""
        return self.verdict if not self.reasons else f"{self.verdict}: {'; '.join(self.reasons)}"

    def to_dict(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "reasons": list(self.reasons), "scores": dict(self.scores),
                "thresholds": dict(self.thresholds), "calibrated": self.calibrated}


def measure(subject: Subject, reference: Reference, names: Collection[str] | None = None) -> dict[str, float | None]:
    """Every score of :data:`TABLE` (or those in ``names``) for ``subject``, in table order:
    the one scoring sequence of the guard and of its calibration."""
    return {s.name: s.compute(subject, reference) for s in TABLE if names is None or s.name in names}


def fixed_window(model: StyleModel) -> bool:
    """Whether ``model`` reads absolute values through one fixed window (``engine.radiograph``)."""
    return model.normalization.get("method") == "fixed"


def judge(scores: Mapping[str, float | None], thresholds: Mapping[str, float]) -> tuple[str, list[str]]:
    """ok, or flagged with one reason per score above its threshold (absent scores are skipped)."""
    reasons = []
    for s in TABLE:
        value = scores.get(s.name)
        if value is not None and s.name in thresholds and not float(value) <= thresholds[s.name]:
            reasons.append(f"{s.reason} ({s.name} {float(value):.2f} > {thresholds[s.name]:.2f})")
    return (FLAGGED if reasons else OK), reasons


def assess(model: StyleModel, x: np.ndarray, y: np.ndarray, *, valid: np.ndarray | None = None,
           inverse: StyleModel | None = None, device: Any = None, base: np.ndarray | None = None,
           body_part: str = UNKNOWN, pixel_spacing: float | None = None) -> FidelityReport:
    """The guard's report for source ``x`` and output ``y`` (model space, full resolution).

    ``base``: the model's global stage's output for ``x`` (``tiling.translate_with_base``);
    computed here when a model calibrated for the ``network`` score comes without it.
    ``body_part``: the source's (``engine.body_part``); one that the model's input domain never
    held in training is flagged, whatever the scores: the model has learnt nothing of it.
    ``pixel_spacing``: the source's pixel size in mm (``engine.pixel_spacing``); one far outside
    the sizes the model was trained on is flagged too: it processes detail at another scale.
    """
    thresholds, calibrated = thresholds_of(model)
    subject = Subject(x, y, valid=valid, base=base, model=model, device=device)
    if min(subject.xs.shape) < 2 * WINDOW:
        return FidelityReport(verdict=FLAGGED, reasons=[f"image too small to check (< {2 * WINDOW} pixels)"],
                              scores={k: None for k in SCORES}, thresholds=thresholds, calibrated=calibrated)
    scores = measure(subject, reference_of(model, inverse))
    structure, (row, col) = subject.structure
    scores["structure_mean"] = structure["structure_mean"]  # reported, not judged
    if not all(np.isfinite(v) for v in scores.values() if v is not None):
        scores = {k: (v if v is None or np.isfinite(v) else 99.0) for k, v in scores.items()}
    verdict, reasons = judge(scores, thresholds)
    calibrated_for = _fidelity_meta(model).get("weights_sha256")
    if calibrated and calibrated_for and model.weights_sha256 and calibrated_for != model.weights_sha256:
        # The thresholds say what *these* weights normally do: others were never measured.
        verdict, reasons = FLAGGED, reasons + [STALE_CALIBRATION]
    for unlike in (unseen_body_part(model.metadata, body_part), unlike_pixel_spacing(model.metadata, pixel_spacing)):
        if unlike:
            verdict, reasons = FLAGGED, reasons + [unlike]
    scale = x.shape[0] / subject.xs.shape[0]
    return FidelityReport(verdict=verdict, reasons=reasons, scores={k: _round(v) for k, v in scores.items()},
                          thresholds=thresholds, calibrated=calibrated,
                          worst_region=(int((row + 0.5) * scale), int((col + 0.5) * scale)))


def calibrate_thresholds(samples: Mapping[str, list[float]]) -> dict[str, float]:
    """Thresholds from held-out scores: the highest seen plus the score's margin (``fidelity_scores``)."""
    out = {}
    for s in TABLE:
        values = [float(v) for v in samples.get(s.name) or [] if v is not None and np.isfinite(v)]
        if values:
            top = max(values)
            out[s.name] = round(top + max(s.margin_abs, s.margin_rel * top), 4)
    return out


# --------------------------------------------------------------------------------------------
# The calibration metadata (``metadata.fidelity``): written at export, read by the guard


def calibration_metadata(reference: Reference, samples: Mapping[str, list[float]], *, weights_sha256: str,
                         held_out_images: int, training_images: int, source: str) -> dict[str, Any]:
    """A model's ``fidelity`` metadata: thresholds from the calibration ``samples`` (score name:
    values), the ``reference`` its scores are judged against, the digest of the weights
    calibrated, and what the calibration saw (images, ``source``, highest and median scores)."""
    seen = {k: v for k, v in samples.items() if v}
    return {
        "version": FIDELITY_VERSION,
        "weights_sha256": weights_sha256,  # what was calibrated (see assess)
        "thresholds": calibrate_thresholds(samples),
        "domain": [{**_stats_dict(d), "noise": float(f"{v:.6g}")}
                   for d, v in zip(reference.domain or [], reference.noise_levels or [])],
        "saturated_surround": (None if reference.saturated_surround is None
                               else round(reference.saturated_surround, 6)),
        "network_scale": [float(f"{v:.6g}") for v in reference.network_scale or []],
        "calibration": {
            "images": held_out_images + training_images,
            "held_out_images": held_out_images,
            "training_images": training_images,
            "source": source,
            "max": {k: round(max(v), 4) for k, v in seen.items()},
            "median": {k: round(float(np.median(v)), 4) for k, v in seen.items()},
        },
    }


def _stats_dict(stats: StyleStats) -> dict[str, Any]:
    d = asdict(stats)
    for k in ("quantiles", "band_energy", "spectrum"):
        d[k] = [float(f"{v:.6g}") for v in d[k]]
    return d


def reference_of(model: StyleModel, inverse: StyleModel | None = None) -> Reference:
    """What ``model``'s calibration recorded (each part None where it lacks it: older files
    skip those scores; ``saturated`` needs fidelity version 5's ``saturated_surround``), with
    its ``inverse``."""
    meta = _fidelity_meta(model)
    items = meta.get("domain")
    domain = noise = None
    if isinstance(items, list) and items:
        try:
            domain = [StyleStats(quantiles=list(d["quantiles"]), band_energy=list(d["band_energy"]),
                                 spectrum=list(d["spectrum"]), images=int(d.get("images", 1))) for d in items]
        except (KeyError, TypeError, ValueError):
            domain = None
        if all(isinstance(d, dict) and isinstance(d.get("noise"), (int, float)) for d in items):
            noise = [float(d["noise"]) for d in items]
    sat = meta.get("saturated_surround")  # (an older "saturated_level" measured another step: skipped)
    scale = meta.get("network_scale")
    network = ([float(v) for v in scale] if isinstance(scale, list) and scale
               and all(isinstance(v, (int, float)) for v in scale) else None)
    return Reference(domain=domain, noise_levels=noise, saturated_surround=float(sat) if isinstance(sat, (int, float))
                     else None, network_scale=network, inverse=inverse, fixed_window=fixed_window(model))


def thresholds_of(model: StyleModel) -> tuple[dict[str, float], bool]:
    """The model's thresholds (calibrated, or the defaults for what it lacks) and whether calibrated."""
    stored = _fidelity_meta(model).get("thresholds") or {}
    out = dict(DEFAULT_THRESHOLDS)
    for s in TABLE:
        if isinstance(stored.get(s.name), (int, float)):
            out[s.name] = float(stored[s.name])
    return out, bool(stored)


def _fidelity_meta(model: StyleModel) -> dict[str, Any]:
    meta = model.metadata.get("fidelity")
    return meta if isinstance(meta, dict) else {}


def _round(v: float | None) -> float | None:
    return None if v is None else round(float(v), 4)
