"""Which checkpoint to export, and whether its network earns its place over the first stage.

Why: a CycleGAN's network can end *worse* than the global stage in front of it (the tone
filter: tone curves and band gains fitted from the domains' distributions), and the style
distance cannot see it (it rated a model 3 dB worse than its input as far closer to B).  So at
every checkpoint the trainer scores each direction's whole generator against its first stage
alone on the same images, in dB (of the squared error pooled over the pairs, or of a distance):

* with validation pairs (``data.val``): the true pairs, ``10 log10(E|T(a) - b|² / E|G(a) - b|²)``
  (each squared error's mean over the pairs, so that a ruined pair is not hidden by the others),
  as written and after each output's best gain and offset, whichever gains less
  (:mod:`.pair_scores`: a better level must not hide a worse look);
* paired training without ``data.val``: up to :data:`PSEUDO_IMAGES` of its own training pairs;
* without any pairs, by distribution (``select_by: distribution``, the unpaired default since
  it was measured against the pseudo-pairs, ``bench/selection.py``): how much closer to the
  target domain's joint band distribution (``train/band_distance.py``) the whole generator's
  outputs on :data:`DISTRIBUTION_IMAGES` source images are than its first stage's, ``10
  log10(d(T(A), B) / d(G(A), B))`` in dB of that distance.  It made the right call where the
  pseudo-pairs did not (networks trained on true pairs, which beat their first stage), and the
  same call on every unpaired network measured; like the first stage, it cannot see a content
  difference between the domains.
* without any pairs, on *pseudo-pairs* (``select_by: pseudo``) made from the target domain's
  own images by the reverse direction's first stage, ``a~ = T_ba(b)``: a content-preserving
  global map, so ``b`` is the right answer for ``a~`` up to what a global stage cannot
  express; the same ratio with ``G(a~)`` and ``T_ab(a~)``.  This criterion leans toward the
  first stage: ``a~`` lacks the A style's local character that the network learned to change, and
  ``T_ab(T_ba(b))`` is nearly ``b`` already.  Measured (``bench/quality.py``, multiscale style
  on real crops): it ranked an unpaired run's checkpoints like their true-pair PSNR, and
  agreed with the truth that those networks lost to their first stage (-2.7 / -0.1 dB against
  -2.9 / -0.5 dB on true pairs), but it rated networks trained *with* true pairs -5 to -9 dB
  where they gained +2.6 to +3.3 dB.  So a network it scores is kept only when even this
  conservative test says it wins by a margin.

With true pairs the trainer also scores each first stage against the input itself
(``first_stage_over_input_*``: ``10 log10(E|a - b|² / E|T(a) - b|²)``, the input as a model
that changes nothing would write it, in the target's window), once, and warns when it is below 0 dB: a
distribution-matching first stage takes any content difference between the domains for the style
(docs/training.md, "What the two domains must share"), and only pairs can show it.

The gain of the A->B direction picks the best checkpoint (kept as ``checkpoints/best.pt``);
a direction whose network does not beat its first stage there is exported as the first stage
alone (the network's last convolution zeroed: the residual generator is then exactly its tone
filter), and the log and the model's provenance say so.  ``bench/selection.py`` measures how the
criteria rank checkpoints and methods against true-pair PSNR, and what each would export.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from dicom_node.engine.errors import UserError

from .band_distance import BandDistance, distance_gain_db
from .criteria import BAND_DISTRIBUTION, PSEUDO_PAIRS, TRUE_PAIRS
from .networks import has_first_stage, zero_network
from .pair_scores import pooled_gain_db

if TYPE_CHECKING:
    from dicom_node.engine.generator import ResnetGenerator

    from .data import DomainData

log = logging.getLogger("dicom_node.train")

__all__ = ["first_stage", "has_first_stage", "network_gain", "first_stage_over_input", "pseudo_pairs", "zero_network",
           "CheckpointSelector", "PSEUDO_IMAGES", "DISTRIBUTION_IMAGES", "GAIN_KEYS", "OVER_INPUT_KEYS"]

PSEUDO_IMAGES = 4  # target-domain images per direction made into pseudo-pairs
DISTRIBUTION_IMAGES = 6  # source images per direction translated for the band distribution
DISTRIBUTION_TARGET_IMAGES = 24  # target images it is measured against, once
GAIN_KEYS = ("gain_a2b", "gain_b2a")  # dB over the first stage, per direction (metrics.csv, checkpoint meta)
OVER_INPUT_KEYS = ("first_stage_over_input_a2b", "first_stage_over_input_b2a")  # dB, true pairs only (checkpoint meta)


def first_stage(gen: ResnetGenerator) -> Callable[[np.ndarray], np.ndarray]:
    """``gen``'s first stage alone as a function of one model-space image: its tone filter
    (``engine.fidelity.base_of``, clamped as the generator clamps), or the identity for a
    residual generator without one."""
    from dicom_node.engine.fidelity import base_of
    from dicom_node.engine.model_file import StyleModel

    model = StyleModel(generator=gen, metadata={"name": "first-stage"})
    return lambda img: np.clip(base_of(model, img), -1.0, 1.0)


def pseudo_pairs(reverse: ResnetGenerator, targets: Sequence[np.ndarray]) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, input, target) pairs from target-domain images: the input is the reverse
    generator's first stage applied to the target (module doc)."""
    back = first_stage(reverse)
    return [(f"pseudo{i}", back(t), np.asarray(t, dtype=np.float32)) for i, t in enumerate(targets)]


def network_gain(gen: ResnetGenerator, pairs: Sequence[tuple[str, np.ndarray, np.ndarray]],
                 device: Any = None) -> float:
    """How much closer to the ``pairs``' targets the whole generator comes than its first stage
    alone, in dB of their pooled squared errors (:func:`pair_scores.pooled_gain_db`: as written and
    as a look, whichever gains less; whole images through the engine, as the node runs them)."""
    from dicom_node.engine import translate

    from .validate import frozen_model

    model = frozen_model(gen, "selection")
    stage = first_stage(model.generator)
    return pooled_gain_db([(translate(model, x, device=device), y) for _, x, y in pairs],
                          [(stage(x), y) for _, x, y in pairs])


def first_stage_over_input(gen: ResnetGenerator, pairs: Sequence[tuple[str, np.ndarray, np.ndarray]]) -> float:
    """How much closer to the true ``pairs``' targets ``gen``'s first stage comes than changing
    nothing, in dB of their pooled squared errors (:func:`pair_scores.pooled_gain_db`)."""
    stage = first_stage(gen)
    return pooled_gain_db([(stage(x), y) for _, x, y in pairs], [(np.asarray(x, np.float32), y) for _, x, y in pairs])


class CheckpointSelector:
    """A run's gains over the first stage at each checkpoint, and its best checkpoint so far."""

    def __init__(self, select_by: str, run_dir: Path, device: Any = None) -> None:
        self.select_by, self.run_dir, self.device = select_by, Path(run_dir), device
        self._pairs: tuple[list[tuple[str, np.ndarray, np.ndarray]], list[tuple[str, np.ndarray, np.ndarray]]] | None = None
        self._by_distribution: tuple[tuple[list[np.ndarray], BandDistance, float], ...] | None = None
        self.criterion = ""
        self._best: float | None = None
        self._over_input: dict[str, float] = {}

    def gains(self, g_ab: ResnetGenerator, g_ba: ResnetGenerator, data: tuple[DomainData, DomainData],
              val_pairs: list[tuple[str, np.ndarray, np.ndarray]]) -> dict[str, float]:
        """``{"gain_a2b", "gain_b2a"}`` in dB (empty for generators without a first stage);
        ``val_pairs``: the validation pairs, or a paired run's training pairs (module doc)."""
        if not has_first_stage(g_ab):
            return {}
        if not self.criterion:  # the first stages are fitted once and never trained: scored once
            self._prepare(g_ab, g_ba, data, val_pairs)
        if self._by_distribution is not None:
            out = {key: self._distribution_gain(gen, *prepared)
                   for key, gen, prepared in zip(GAIN_KEYS, (g_ab, g_ba), self._by_distribution)}
        else:
            assert self._pairs is not None
            out = {key: network_gain(gen, pairs, self.device) for key, gen, pairs in zip(GAIN_KEYS, (g_ab, g_ba), self._pairs)}
        log.info("network over its first stage (%s): A->B %+.2f dB, B->A %+.2f dB", self.criterion,
                 out["gain_a2b"], out["gain_b2a"])
        return {**out, **self._over_input}

    def _prepare(self, g_ab: ResnetGenerator, g_ba: ResnetGenerator, data: tuple[DomainData, DomainData],
                 val_pairs: list[tuple[str, np.ndarray, np.ndarray]]) -> None:
        """Pick the criterion (module doc) and make what it needs, once."""
        from .data import pick_images

        by_pairs = self.select_by == "pairs" or (self.select_by == "auto" and bool(val_pairs))
        if by_pairs and not val_pairs:
            raise UserError("train.select_by is pairs but the run has no pairs (data.val, or paired training)")
        a, b = data
        if by_pairs:
            self._pairs = (val_pairs, [(n, y, x) for n, x, y in val_pairs])
            self._over_input = self._first_stages_over_input(g_ab, g_ba, *self._pairs)
            self.criterion = TRUE_PAIRS
        elif self.select_by == "pseudo":
            self._pairs = (pseudo_pairs(g_ba, pick_images(b.arrays, PSEUDO_IMAGES)),
                           pseudo_pairs(g_ab, pick_images(a.arrays, PSEUDO_IMAGES)))
            self.criterion = PSEUDO_PAIRS
        else:
            prepared = []
            for gen, source, target in ((g_ab, a, b), (g_ba, b, a)):
                images = pick_images(source.arrays, DISTRIBUTION_IMAGES)
                distance = BandDistance(pick_images(target.arrays, DISTRIBUTION_TARGET_IMAGES))
                stage = first_stage(gen)
                prepared.append((images, distance, distance([stage(x) for x in images])))
            self._by_distribution = (prepared[0], prepared[1])
            self.criterion = BAND_DISTRIBUTION

    def _distribution_gain(self, gen: ResnetGenerator, images: list[np.ndarray], distance: BandDistance,
                           first: float) -> float:
        """How much closer to the target's band distribution ``gen`` brings ``images`` than its
        first stage (``first``, that stage's distance), in dB of the distance."""
        from dicom_node.engine import translate

        from .validate import frozen_model

        model = frozen_model(gen, "selection")
        return distance_gain_db(first, distance([translate(model, x, device=self.device) for x in images]))

    @staticmethod
    def _first_stages_over_input(g_ab: ResnetGenerator, g_ba: ResnetGenerator, pairs_ab: list[tuple[str, np.ndarray, np.ndarray]],
                                 pairs_ba: list[tuple[str, np.ndarray, np.ndarray]]) -> dict[str, float]:
        """Each first stage against the input on the true pairs (module doc), logged; a warning
        when one is worse than changing nothing."""
        out = {}
        for key, label, gen, pairs in zip(OVER_INPUT_KEYS, ("A->B", "B->A"), (g_ab, g_ba), (pairs_ab, pairs_ba)):
            out[key] = first_stage_over_input(gen, pairs)
            if out[key] < 0:
                log.warning("%s: the first stage is %.2f dB worse than the input on the %d true pairs: the domains "
                            "differ in more than the style (body part, field of view, collimation?)", label,
                            -out[key], len(pairs))
            else:
                log.info("%s: the first stage is %+.2f dB over the input on the %d true pairs", label, out[key], len(pairs))
        return out

    def keep_best(self, checkpoint: Path, step: int, gain: float | None) -> None:
        """Copy ``checkpoint`` to ``checkpoints/best.pt`` when its A->B gain is the best so far
        (a resumed run competes with the best it kept before)."""
        import shutil

        from dicom_node.engine.atomic import atomic_write

        from .export import best_checkpoint_path, load_checkpoint

        if gain is None:
            return
        best = best_checkpoint_path(self.run_dir)
        if self._best is None:
            self._best = (float(load_checkpoint(best)["meta"].get("validation", {}).get("gain_a2b", -np.inf))
                          if best.exists() else -np.inf)
        if gain > self._best:
            atomic_write(best, lambda tmp: shutil.copyfile(checkpoint, tmp), durable=False)
            self._best = gain
            log.info("step %d is the best checkpoint so far (A->B %+.2f dB over the first stage)", step, gain)
