"""The fidelity scores are one table (engine.fidelity_scores.TABLE): a score added as one entry is
computed by the guard (engine.fidelity.assess) and by calibration at export (train.calibrate),
which share one scoring sequence (engine.fidelity.measure)."""
from __future__ import annotations

import numpy as np
import torch

from bench import fidelity_faults as ff
from dicom_node.engine import fidelity
from dicom_node.engine.fidelity_scores import Score
from dicom_node.engine.tiling import translate

SIZE = 96


def test_a_score_added_as_one_table_entry_is_computed_by_the_guard_and_by_calibration(monkeypatch):
    brightness = Score("brightness", "output brighter than in calibration", 0.0, 0.0, None,
                       lambda s, _r: float(s.ys.mean()))
    monkeypatch.setattr(fidelity, "TABLE", fidelity.TABLE + (brightness,))
    a = [i.x for i in ff.demo_images("classic", "a", range(3), SIZE)]
    b = [i.x for i in ff.demo_images("classic", "b", range(1000, 1003), SIZE)]
    held = [i.x for i in ff.demo_images("classic", "a", range(2000, 2002), SIZE)]
    model = ff.calibrate(ff.tone_model(a, b, "table"), None, a, held)

    meta = model.metadata["fidelity"]  # calibration measured it and gave it a threshold (margin 0: its maximum)
    assert meta["thresholds"]["brightness"] == meta["calibration"]["max"]["brightness"]
    with torch.no_grad():
        y = translate(model, held[0], tile=0)
    good = fidelity.assess(model, held[0], y)
    assert good.scores["brightness"] is not None and good.thresholds["brightness"] == meta["thresholds"]["brightness"]
    assert not any("brighter" in r for r in good.reasons), good.reasons
    bright = fidelity.assess(model, held[0], np.clip(y + 0.5, -1.0, 1.0))
    assert bright.flagged and any(r.startswith("output brighter than in calibration (brightness ")
                                  for r in bright.reasons), bright.reasons
