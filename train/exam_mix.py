"""Each body part weighs alike in both domains when the first stage is fitted.

Why: the first stage (:mod:`.tone_fit`) matches the two domains' *distributions*, and a chest
and a knee have different ones whatever the vendor.  Two archives with another mix of
examinations (mostly chests from one room, mostly extremities from the other) make the fit
read the mix as style.  On the demo phantoms (``bench/exam_mix.py``: 12 chests and 2 knees
against 4 chests and 8 knees, 6 style pairs, 2 data seeds) the fit on the domains as they were
scored 6.8 to 20.5 dB below the same fit on domains of one mix, below the input on 8 of 12;
weighted by this rule it won back 6.1 to 18.8 dB (+1.6 to +3.2 on crops of real radiographs),
and on domains of one mix it is the same fit to the last digit (bench/README.md, "Domains with
other mixes of body parts").

The rule (pure functions; each image's body part from its DICOM header by the engine's rule,
:func:`dicom_node.engine.body_part.examined_body_part`, which reads one part named in other
words as one):

* an image without one (BodyPartExamined and Anatomic Region Sequence absent or empty, or not
  DICOM) is of the unknown body part, ``""``;
* when a domain names no body part at all (PNG or TIFF exports, or headers without it), the
  mixes cannot be compared and nothing is weighted; otherwise the unknown part is a part of
  its own;
* a body part found in one domain only is left out of the fit: its images have nothing in the
  other domain to be matched against (unless the domains share no part at all: then nothing is
  weighted, and :func:`share_no_body_part` lets the log say so);
* each shared body part ``s`` weighs ``n_A(s) n_B(s) / (n_A(s) + n_B(s))`` in both domains
  (as a share of the sum over the shared parts), where ``n`` counts its images: the weights
  that give both domains the same mix with the least noise (a stratified estimate's variance,
  the sum of ``w(s)**2 (1 / n_A(s) + 1 / n_B(s))``, is least there).  Two domains of one mix
  keep their own weights, so their fit does not change;
* the weights are carried out by repeating images (each image of a part as often as its
  weight per image is over the domain's smallest, rounded, at most :data:`MAX_REPEAT` times),
  so that every step of the fit, tone curves and band curves alike, sees the same mix.

The trainer draws its unpaired training patches by the same weights (``train/loop.py``): a
discriminator shown mostly knees as B would teach the generator to make A's chests look like
knees.
"""
from __future__ import annotations

from collections import Counter
from typing import Sequence, TypeVar

from dicom_node.engine.body_part import UNKNOWN

__all__ = ["MAX_REPEAT", "mix_repeats", "share_no_body_part", "repeated", "weighs_anything", "mix_counts",
           "describe_mix"]

MAX_REPEAT = 4  # an image is repeated at most this often: more would let a few images stand for a part

_T = TypeVar("_T")


def mix_repeats(parts_a: Sequence[str], parts_b: Sequence[str]) -> tuple[list[int], list[int]]:
    """How often each image of domain A and of domain B enters the fit (0: left out), by the
    rule in the module docstring.  All ones when the two domains hold one mix."""
    count_a, count_b = Counter(parts_a), Counter(parts_b)
    shared = set(count_a) & set(count_b)
    if not shared or not _names_any(parts_a) or not _names_any(parts_b):
        return [1] * len(parts_a), [1] * len(parts_b)
    weight = {s: count_a[s] * count_b[s] / (count_a[s] + count_b[s]) for s in shared}
    return _repeats(parts_a, count_a, weight), _repeats(parts_b, count_b, weight)


def weighs_anything(repeats: tuple[Sequence[int], Sequence[int]]) -> bool:
    """Whether :func:`mix_repeats`' answer changes anything: an image repeated or left out."""
    return any(times != 1 for domain in repeats for times in domain)


def share_no_body_part(parts_a: Sequence[str], parts_b: Sequence[str]) -> bool:
    """Both domains name body parts, and none is in both: the fit reads the anatomy as style."""
    return _names_any(parts_a) and _names_any(parts_b) and not set(parts_a) & set(parts_b)


def _names_any(parts: Sequence[str]) -> bool:
    return any(p != UNKNOWN for p in parts)


def _repeats(parts: Sequence[str], count: Counter[str], weight: dict[str, float]) -> list[int]:
    """One domain's repeats: each shared part's weight per image over the smallest such."""
    per_image = {s: weight[s] / count[s] for s in weight}
    least = min(per_image.values())
    times = {s: min(MAX_REPEAT, int(v / least + 0.5)) for s, v in per_image.items()}
    return [times.get(p, 0) for p in parts]


def repeated(items: Sequence[_T], repeats: Sequence[int]) -> list[_T]:
    """``items``, each as often as its repeat, in their order."""
    return [item for item, times in zip(items, repeats) for _ in range(times)]


def mix_counts(parts: Sequence[str]) -> dict[str, int]:
    """A domain's mix, most frequent first, unknown last and so named: ``{"CHEST": 12, "unknown": 1}``."""
    counts = sorted(Counter(parts).items(), key=lambda kv: (kv[0] == UNKNOWN, -kv[1], kv[0]))
    return {part or "unknown": n for part, n in counts}


def describe_mix(parts: Sequence[str]) -> str:
    """A domain's mix for the log: ``CHEST 12, KNEE 2, unknown 1``."""
    return ", ".join(f"{part} {n}" for part, n in mix_counts(parts).items())
