"""The fidelity guard's scores as one table: each score is one :class:`Score` entry.

Why a table: the guard (``engine.fidelity.assess``) and its calibration at export
(``train.calibrate``) compute the same scores through one :func:`engine.fidelity.measure`, so
they cannot drift, and a new score is one entry here (its measurement, if new, goes to
:mod:`.fidelity_measures`): the guard reports and judges it, calibration gives it a threshold.

An entry's ``compute`` gets a :class:`Subject` (one source and its output, each view of them
computed once, on first use) and a :class:`Reference` (what the model's calibration recorded
of its training domain and network, its inverse, its input window) and returns the score, or
None where the model has nothing to judge it against.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from .fidelity_measures import (
    analysis_view,
    base_of,
    cycle_score,
    network_addition,
    network_levels,
    network_score,
    noise_level,
    noise_score,
    ood_score,
    saturated_score,
    structure_with_worst,
    window_share,
)
from .style_stats import StyleStats, style_statistics

if TYPE_CHECKING:
    from .model_file import StyleModel

__all__ = ["Score", "Subject", "Reference", "TABLE"]


class Subject:
    """A source ``x`` and its output ``y`` (model space, full resolution), as the scores see them.

    ``y`` may be None for a source judged alone (calibration's training images: only scores
    of the input need no output).  ``base``: the model's global stage's output for ``x``
    (``tiling.translate_with_base``), else computed from ``model`` when the ``network``
    score asks for it.  Every view is computed once, on first use.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray | None = None, *, valid: np.ndarray | None = None,
                 base: np.ndarray | None = None, model: StyleModel | None = None, device: Any = None) -> None:
        self.x = x
        self.y: np.ndarray | None = None if y is None else np.clip(y, -1.0, 1.0)  # what the output shows (to_output_pixels clips)
        self.valid = valid
        self.model = model
        self.device = device
        self._base = base

    @property
    def output(self) -> np.ndarray:
        if self.y is None:
            raise ValueError("this score needs the output")
        return self.y

    @cached_property
    def xs(self) -> np.ndarray:
        return analysis_view(self.x, self.valid)

    @cached_property
    def ys(self) -> np.ndarray:
        return analysis_view(self.output, self.valid)

    @cached_property
    def vs(self) -> np.ndarray | None:
        """``valid`` at analysis scale (None: all valid)."""
        if self.valid is None or self.valid.all():
            return None
        result: np.ndarray = analysis_view(self.valid.astype(np.float32)) >= 1.0
        return result

    @cached_property
    def structure(self) -> tuple[dict[str, float], tuple[int, int]]:
        """The structure scores and the worst region (row, column in analysis pixels)."""
        return structure_with_worst(self.xs, self.ys)

    @cached_property
    def style(self) -> StyleStats:
        return style_statistics([self.xs])

    @cached_property
    def noise(self) -> float:
        return noise_level(self.xs, self.vs)

    @cached_property
    def base(self) -> np.ndarray:
        if self._base is None:
            if self.model is None:
                raise ValueError("the network score needs the model's global stage output or the model")
            self._base = base_of(self.model, self.x, device=self.device)
        return self._base

    @cached_property
    def network_levels(self) -> list[float]:
        """What the network added beyond its global stage (``fidelity_measures.network_levels``)."""
        return network_levels(analysis_view(network_addition(self.output, self.base), self.valid),
                              analysis_view(np.clip(self.base, -1.0, 1.0), self.valid), self.xs)


@dataclass(frozen=True)
class Reference:
    """What a model's scores are judged against (``engine.fidelity.reference_of`` reads it from a
    model's calibration metadata; calibration builds it from the training domain).

    ``domain`` and ``noise_levels``: per training image; ``saturated_surround``: the domain's
    darkest surrounds of saturation; ``network_scale``: the most the network added in
    calibration; ``inverse``: the reverse model; ``fixed_window``: the model reads one fixed
    input window.  None (or False): that score is not judged.
    """

    domain: list[StyleStats] | None = None
    noise_levels: list[float] | None = None
    saturated_surround: float | None = None
    network_scale: list[float] | None = None
    inverse: StyleModel | None = None
    fixed_window: bool = False

    def without(self, i: int) -> Reference:
        """The same without training image ``i`` (calibration scores each training image against the others)."""
        def drop(items: list[Any] | None) -> list[Any] | None:
            return None if items is None else items[:i] + items[i + 1:]
        return replace(self, domain=drop(self.domain), noise_levels=drop(self.noise_levels))


@dataclass(frozen=True)
class Score:
    """One score: ``name``; ``reason``, the words of a flag; the calibration margin over the
    highest calibration score, the larger of ``margin_abs`` and ``margin_rel`` times it;
    ``default``, the threshold for uncalibrated models (None: judged only when calibrated);
    ``compute``; ``domain_input``: it compares the input with the nearest training image, so
    calibration measures it on held-out images and on each training image against the others
    (against its own domain, a training image is its own nearest)."""

    name: str
    reason: str
    margin_abs: float
    margin_rel: float
    default: float | None
    compute: Callable[[Subject, Reference], float | None]
    domain_input: bool = False


def _structure(key: str) -> Callable[[Subject, Reference], float | None]:
    return lambda s, _r: s.structure[0][key]


def _network(s: Subject, r: Reference) -> float | None:
    return network_score(s.network_levels, r.network_scale) if r.network_scale is not None else None


def _cycle(s: Subject, r: Reference) -> float | None:
    return cycle_score(r.inverse, s.x, s.output, device=s.device) if r.inverse is not None else None


def _ood(s: Subject, r: Reference) -> float | None:
    return ood_score(s.style, r.domain) if r.domain else None


def _noise(s: Subject, r: Reference) -> float | None:
    return noise_score(s.noise, r.noise_levels) if r.noise_levels else None


def _saturated(s: Subject, r: Reference) -> float | None:
    return saturated_score(s.xs, r.saturated_surround) if r.saturated_surround is not None else None


def _window(s: Subject, r: Reference) -> float | None:
    return window_share(s.x, s.valid) if r.fixed_window else None


# All "higher is worse".  Defaults: loose enough that a plausible style never trips them, tight
# enough for the gross faults (inverted, random, blank, broken model); ``network``, ``noise`` and
# ``saturated`` have none: they need the calibration's records.  Margins: whole-image scores
# (unexplained, cycle, ood) get a wide relative one: a few dozen calibration images do not show
# their tail (measured, bench/fidelity.py); ``noise``: at least half an octave beyond the
# domain's spread; ``saturated``: at least 0.05 % of the image; ``window``: twice the highest
# share seen, at least 5 % of the image more; ``network`` is a ratio to its own calibration
# (1.0 at most there): half as much again.  The order is the order of reasons and reports.
TABLE: tuple[Score, ...] = (
    Score("structure", "a region differs from the source", 0.1, 0.35, 0.75, _structure("structure")),
    Score("band_structure", "an edge differs from the source", 0.1, 0.35, 0.75, _structure("band_structure")),
    Score("unexplained", "output not explained by the source", 0.1, 1.0, 0.5, _structure("unexplained")),
    Score("network", "the network changed a region more than it ever did in calibration", 0.5, 0.0, None, _network),
    Score("cycle", "inverse model does not restore the source", 0.1, 1.0, 0.5, _cycle),
    Score("ood", "input unlike the training data", 1.0, 1.0, 3.0, _ood, domain_input=True),
    Score("noise", "input noise unlike the training data", 0.5, 1.0, None, _noise, domain_input=True),
    Score("saturated", "saturated regions unlike the training data (metal?)", 0.05, 1.0, None, _saturated),
    Score("window", "input values outside the model's intensity window", 5.0, 1.0, 20.0, _window),
)
