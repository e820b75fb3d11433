"""Calibration of the fidelity guard at export: thresholds from the model's own scores.

Why: how far a good translation of a good input may stray from its source depends on the
style (a strong dynamic-range compression moves more than a tone curve) and on the images,
so fixed thresholds either miss faults or flag good images.  At export the trainer scores
each direction on held-out images of its own input domain (the validation pairs when the run
has them, else the training images themselves: the input-similarity score then leaves the
image out of its own domain) and stores, in each model's ``fidelity`` metadata:

* ``thresholds``: the highest held-out score plus its margin (``engine.fidelity_scores``);
* ``domain``: the style statistics and the noise level of each training image, for the
  input-similarity and ``noise`` scores;
* ``saturated_surround``: the domain's darkest surrounds of saturated white, for ``saturated``;
* ``network_scale``: the most the network added beyond its global stage, per component of the
  ``network`` score (``engine.fidelity.network_levels``) over the calibration images;
* ``weights_sha256``: the digest of the network calibrated: weights changed since (a fine-tune,
  a conversion, corruption written back with a new file digest) make every output flagged;
* ``calibration``: how many images, from where, and the highest and median score seen.

The training images are scored too, for more samples of the normal variation: they can only
raise a threshold.  The scores are the guard's own (``engine.fidelity.measure``, one table for
both), and the metadata's layout is the engine's (``engine.fidelity.calibration_metadata``).
"""
from __future__ import annotations

import logging
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from dicom_node.engine import fidelity
from dicom_node.engine.fidelity import FIDELITY_VERSION, Reference, Subject, measure
from dicom_node.engine.model_file import StyleModel, weights_digest

from .data import pick_images

if TYPE_CHECKING:
    from dicom_node.engine.generator import ResnetGenerator

__all__ = ["fidelity_metadata", "DOMAIN_IMAGES", "CALIBRATION_IMAGES", "FIDELITY_VERSION"]

log = logging.getLogger("dicom_node.train")

DOMAIN_IMAGES = 64
CALIBRATION_IMAGES = 32


def fidelity_metadata(forward: ResnetGenerator, reverse: ResnetGenerator | None, domain_images: Sequence[np.ndarray],
                      held_out: Sequence[np.ndarray] | None = None, *, device: Any = None) -> dict[str, Any]:
    """The ``fidelity`` metadata of the model ``forward`` (its inverse ``reverse`` may be None).

    ``domain_images``: the training images of ``forward``'s input domain (model space);
    ``held_out``: images of that domain not trained on, or None to use the training images.
    """
    from dicom_node.engine.tiling import translate_with_base

    domain_imgs = pick_images(list(domain_images), DOMAIN_IMAGES)
    domain = [Subject(img) for img in domain_imgs]  # sources alone: their style, noise, saturation
    inv = StyleModel(generator=reverse.eval(), metadata={"name": "calibration-inverse"}) if reverse is not None else None
    # The window share is measured for every model: the guard judges it for fixed-window ones only.
    reference = Reference(domain=[s.style for s in domain], noise_levels=[s.noise for s in domain],
                          saturated_surround=fidelity.saturated_level([s.xs for s in domain]), inverse=inv,
                          fixed_window=True)
    from_training = not held_out
    # Held-out images first; training images too, for more samples of the normal variation
    # (they can only raise a threshold: a false alarm costs a radiologist's time every day).
    held = [] if from_training or held_out is None else pick_images(list(held_out), CALIBRATION_IMAGES)
    calib = held + pick_images(domain_imgs, CALIBRATION_IMAGES)
    g = StyleModel(generator=forward.eval(), metadata={"name": "calibration"})
    samples: dict[str, list[float]] = {s.name: [] for s in fidelity.TABLE}
    not_domain = [s.name for s in fidelity.TABLE if not s.domain_input]  # a training image is in its domain
    network: list[list[float]] = []
    with torch.no_grad():
        for n, x in enumerate(calib):
            y, base = translate_with_base(g, x, tile=0, device=device)
            subject = Subject(x, y, base=base, device=device)
            _add(samples, measure(subject, reference, None if n < len(held) else not_domain))
            network.append(subject.network_levels)
    # Input similarity of every training image to the others (leave one out): many more
    # samples of the domain's spread than the held-out images alone give.
    domain_input = [s.name for s in fidelity.TABLE if s.domain_input]
    for i, subject in enumerate(domain):
        _add(samples, measure(subject, reference.without(i), domain_input))
    # What the network adds: its highest value per component over the calibration images is
    # the scale (the reference of the ``network`` score); the score is the largest ratio to it
    # (1.0 at most on these images).
    network_scale = [max(v) for v in zip(*network)] if network else []
    samples["network"] = [fidelity.network_score(levels, network_scale) for levels in network]
    meta = fidelity.calibration_metadata(
        replace(reference, network_scale=network_scale), samples, weights_sha256=weights_digest(forward.state_dict()), held_out_images=len(held),
        training_images=len(calib) - len(held),
        source="training images (input similarity leave-one-out)" if from_training else
        "validation and training images (input similarity: validation, and training leave-one-out)")
    log.info("fidelity calibration on %d held-out and %d training images: thresholds %s", len(held),
             len(calib) - len(held), "  ".join(f"{k} {v:.3f}" for k, v in meta["thresholds"].items()))
    return meta


def _add(samples: dict[str, list[float]], scores: dict[str, float | None]) -> None:
    for k, v in scores.items():
        if v is not None:
            samples[k].append(v)
