"""The criteria that score a checkpoint's network against its first stage, by name, and the
margin each needs before the export keeps the network (``train/selection.py`` scores,
``train/export.py`` decides; a checkpoint's meta records its criterion as ``gain_by``)."""
from __future__ import annotations

__all__ = ["TRUE_PAIRS", "PSEUDO_PAIRS", "BAND_DISTRIBUTION", "MARGIN_DB"]

TRUE_PAIRS, PSEUDO_PAIRS, BAND_DISTRIBUTION = "true pairs", "pseudo-pairs", "band distribution"

# What a network must beat its first stage by, per criterion (train/selection.py), to be
# exported.  Pseudo-pairs are made by the reverse first stage, so their gain is biased either
# way: bench/quality.py measured +0.65 dB on pseudo-pairs for a network 1.9 dB *below* its tone
# filter on true pairs (multiscale@real), and -5..-9 dB for paired-trained networks 2.6..3.3 dB
# above it.  The band distribution's gain is in dB of a distance: no unpaired network scored
# more than +0.29 there (bench/selection.py, 7 style pairs), so 0.5 dB (a tenth closer to B)
# leaves room for its sampling noise.  True pairs (data.val, a paired run's own pairs) need
# only beat it (> 0 dB).
PSEUDO_PAIR_MARGIN_DB = 1.0
DISTRIBUTION_MARGIN_DB = 0.5
MARGIN_DB = {PSEUDO_PAIRS: PSEUDO_PAIR_MARGIN_DB, BAND_DISTRIBUTION: DISTRIBUTION_MARGIN_DB}  # TRUE_PAIRS: 0
