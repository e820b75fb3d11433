"""Calibration of the fidelity guard at export: thresholds from the model's own scores.

Why: how far a good translation of a good input may stray from its source depends on the
style (a strong dynamic-range compression moves more than a tone curve) and on the images,
so fixed thresholds either miss faults or flag good images.  At export the trainer scores
each direction on held-out images of its own input domain (the validation pairs when the run
has them, else the training images themselves: the input-similarity score then leaves the
image out of its own domain) and stores, in each model's ``fidelity`` metadata:

* ``thresholds``: the highest held-out score plus a margin (``engine.fidelity``);
* ``domain``: the style statistics and the noise level of each training image, for the
  input-similarity and ``noise`` scores;
* ``saturated_surround``: the domain's darkest surrounds of saturated white, for ``saturated``;
* ``network_scale``: the most the network added beyond its global stage, per component of the
  ``network`` score (``engine.fidelity.network_levels``) over the calibration images;
* ``weights_sha256``: the digest of the network calibrated: weights changed since (a fine-tune,
  a conversion, corruption written back with a new file digest) make every output flagged;
* ``calibration``: how many images, from where, and the highest and median score seen.

The training images are scored too, for more samples of the normal variation: they can only
raise a threshold.
"""
from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any, Sequence

import numpy as np
import torch

from dicom_node.engine import fidelity as fd
from dicom_node.engine.model_file import StyleModel, weights_digest

from .data import pick_images

__all__ = ["fidelity_metadata", "DOMAIN_IMAGES", "CALIBRATION_IMAGES", "FIDELITY_VERSION"]

log = logging.getLogger("dicom_node.train")

DOMAIN_IMAGES = 64
# metadata.fidelity layout; 4: network_scale with the erased-structure components; 5: saturated_surround
FIDELITY_VERSION = 5
CALIBRATION_IMAGES = 32


def _stats_dict(stats) -> dict[str, Any]:
    d = asdict(stats)
    for k in ("quantiles", "band_energy", "spectrum"):
        d[k] = [float(f"{v:.6g}") for v in d[k]]
    return d


def fidelity_metadata(forward: torch.nn.Module, reverse: torch.nn.Module | None, domain_images: Sequence[np.ndarray],
                      held_out: Sequence[np.ndarray] | None = None, *, device: Any = None) -> dict[str, Any]:
    """The ``fidelity`` metadata of the model ``forward`` (its inverse ``reverse`` may be None).

    ``domain_images``: the training images of ``forward``'s input domain (model space);
    ``held_out``: images of that domain not trained on, or None to use the training images.
    """
    from dicom_node.engine.tiling import translate_with_base

    domain_imgs = pick_images(list(domain_images), DOMAIN_IMAGES)
    domain = fd.domain_statistics(domain_imgs)
    domain_small = [fd.analysis_view(img) for img in domain_imgs]
    noise_levels = [fd.noise_level(xs) for xs in domain_small]
    sat_level = fd.saturated_level(domain_small)
    from_training = not held_out
    # Held-out images first; training images too, for more samples of the normal variation
    # (they can only raise a threshold: a false alarm costs a radiologist's time every day).
    held = [] if from_training else pick_images(list(held_out), CALIBRATION_IMAGES)
    calib = held + pick_images(domain_imgs, CALIBRATION_IMAGES)
    g = StyleModel(generator=forward.eval(), metadata={"name": "calibration"})
    inv = StyleModel(generator=reverse.eval(), metadata={"name": "calibration-inverse"}) if reverse is not None else None
    samples: dict[str, list[float]] = {k: [] for k in fd.SCORES}
    network: list[list[float]] = []
    with torch.no_grad():
        for n, x in enumerate(calib):
            y, base = translate_with_base(g, x, tile=0, device=device)
            y = np.clip(y, -1.0, 1.0)
            xs = fd.analysis_view(x)
            network.append(fd.network_levels(fd.analysis_view(fd.network_addition(y, base)),
                                             fd.analysis_view(np.clip(base, -1.0, 1.0)), xs))
            s = fd.structure_scores(xs, fd.analysis_view(y))
            for k in fd.STRUCTURE_SCORES:
                samples[k].append(s[k])
            if inv is not None:
                samples["cycle"].append(fd.cycle_score(inv, x, y, device=device))
            samples["saturated"].append(fd.saturated_score(xs, sat_level))
            samples["window"].append(fd.window_share(x))
            if n < len(held):
                samples["ood"].append(fd.ood_score(xs, domain))
                samples["noise"].append(fd.noise_score(fd.noise_level(xs), noise_levels))
    # Input similarity of every training image to the others (leave one out): many more
    # samples of the domain's spread than the held-out images alone give.
    for i, stats in enumerate(domain):
        others = [d for j, d in enumerate(domain) if j != i]
        if others:
            samples["ood"].append(min(fd.style_distance(stats, d)["total"] for d in others))
            samples["noise"].append(fd.noise_score(noise_levels[i], noise_levels[:i] + noise_levels[i + 1:]))
    # What the network adds: its highest value per component over the calibration images is
    # the scale; the score is the largest ratio to it (1.0 at most on these images).
    network_scale = [max(v) for v in zip(*network)] if network else []
    samples["network"] = [fd.network_score(levels, network_scale) for levels in network]
    thresholds = fd.calibrate_thresholds(samples)
    seen = {k: v for k, v in samples.items() if v}
    log.info("fidelity calibration on %d held-out and %d training images: thresholds %s", len(held),
             len(calib) - len(held), "  ".join(f"{k} {v:.3f}" for k, v in thresholds.items()))
    return {
        "version": FIDELITY_VERSION,
        "weights_sha256": weights_digest(forward.state_dict()),  # what was calibrated (engine.fidelity.assess)
        "thresholds": thresholds,
        "domain": [{**_stats_dict(d), "noise": float(f"{v:.6g}")} for d, v in zip(domain, noise_levels)],
        "saturated_surround": round(sat_level, 6),
        "network_scale": [float(f"{v:.6g}") for v in network_scale],
        "calibration": {
            "images": len(calib),
            "held_out_images": len(held),
            "training_images": len(calib) - len(held),
            "source": "training images (input similarity leave-one-out)" if from_training else
            "validation and training images (input similarity: validation, and training leave-one-out)",
            "max": {k: round(max(v), 4) for k, v in seen.items()},
            "median": {k: round(float(np.median(v)), 4) for k, v in seen.items()},
        },
    }
