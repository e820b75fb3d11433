"""Each body part weighs alike in both domains when the first stage is fitted (train/exam_mix.py).

The rule on its own (pure functions), the body part read from BodyPartExamined by the trainer's
loader (and none for PNG), and the fit: on domains of other mixes of two "body parts" of
different intensity distributions, styled by one known function, the weighted fit scores well
above the fit on the domains as they are, and two domains of one mix fit exactly as before.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydicom.dataset import Dataset

from dicom_node.engine import load_style_model
from dicom_node.engine.body_part import body_part, examined_body_part
from dicom_node.engine.pixels import DEFAULT_NORMALIZATION
from dicom_node.train.data import load_domain
from dicom_node.train.exam_mix import (
    MAX_REPEAT,
    describe_mix,
    mix_repeats,
    repeated,
    share_no_body_part,
)
from dicom_node.train.tone_fit import fit_tone_filter
from tests.factory import PATIENT_ID, PATIENT_NAME, make_dataset, phantom, write
from tests.test_tone_filter import smooth_field, vendor_b

CHEST, KNEE = "CHEST", "KNEE"


def test_one_mix_in_both_domains_changes_nothing_whatever_the_counts():
    assert mix_repeats([CHEST] * 8 + [KNEE] * 4, [CHEST] * 6 + [KNEE] * 3) == ([1] * 12, [1] * 9)
    assert mix_repeats([CHEST] * 5, [CHEST] * 7) == ([1] * 5, [1] * 7)
    assert mix_repeats(["", CHEST], [CHEST, ""]) == ([1, 1], [1, 1])


def test_other_mixes_are_weighted_to_the_same_mix_in_both():
    a = [CHEST] * 12 + [KNEE] * 2
    b = [CHEST] * 4 + [KNEE] * 8
    rep_a, rep_b = mix_repeats(a, b)
    assert set(zip(a, rep_a)) == {(CHEST, 1), (KNEE, 3)}
    assert set(zip(b, rep_b)) == {(CHEST, 4), (KNEE, 1)}
    share = [repeated(parts, reps).count(CHEST) / sum(reps) for parts, reps in ((a, rep_a), (b, rep_b))]
    assert share[0] == pytest.approx(share[1], abs=0.01)  # 12 of 18 and 16 of 24


def test_a_body_part_in_one_domain_only_is_left_out_and_unknown_is_a_part_of_its_own():
    rep_a, rep_b = mix_repeats([CHEST, CHEST, "HAND", ""], [CHEST, CHEST, ""])
    assert rep_a == [1, 1, 0, 1] and rep_b == [1, 1, 1]
    # no shared part at all: nothing to weigh against, the domains stay as they are
    assert mix_repeats([CHEST] * 3, [KNEE] * 2) == ([1] * 3, [1] * 2)
    assert share_no_body_part([CHEST] * 3, [KNEE] * 2)


def test_a_domain_that_names_no_body_part_leaves_the_mixes_alone():
    # PNG exports against DICOM: B's unknown could be anything, so nothing is weighted or left out
    assert mix_repeats([CHEST] * 10 + ["", ""], [""] * 12) == ([1] * 12, [1] * 12)
    assert not share_no_body_part([CHEST] * 3, [""] * 3)


def test_repeats_stop_at_the_cap():
    rep_a, rep_b = mix_repeats([CHEST] * 40 + [KNEE], [CHEST] + [KNEE] * 40)
    assert max(rep_a + rep_b) == MAX_REPEAT
    assert rep_a[-1] == MAX_REPEAT and rep_b[0] == MAX_REPEAT


def test_body_part_names_are_compared_in_upper_case_and_logged_safely():
    assert body_part(" chest ") == CHEST
    assert body_part(None) == "" and body_part("") == ""
    assert body_part("HAND WRIST") == "HAND WRIST"  # two parts: kept as it is
    assert body_part("KNIE\x1b[31m\n") == "KNIE??31M"  # no control character reaches the log
    assert len(body_part("X" * 64)) == 16
    assert describe_mix([KNEE, CHEST, CHEST, ""]) == "CHEST 2, KNEE 1, unknown 1"


def test_one_part_named_in_several_ways_is_one_part():
    # Synonyms by the SNOMED CT concept pydicom's code dictionary gives them (PS3.16 Annex L)
    for name in ("THORAX", "Thorax", "PA CHEST", "chest pa", "816094009"):
        assert body_part(name) == CHEST, name
    for name in ("KNEE JOINT", "Knee joint", "49076000", "72696002"):
        assert body_part(name) == KNEE, name
    assert body_part("L-SPINE") == body_part("LUMBAR SPINE") == body_part("L SPINE") == "LSPINE"
    assert body_part("C SPINE LAT") == "CSPINE" and body_part("ANKLE JOINT") == "ANKLE"
    assert body_part("ABDOMEN_PELVIS") == "ABDOMENPELVIS"
    assert body_part("KNIE") == "KNIE" and body_part("43") == "43"  # unknown names stay as they are


def test_an_empty_body_part_examined_falls_back_to_the_coded_anatomic_region():

    def region(**code):
        item = Dataset()
        for key, value in code.items():
            setattr(item, key, value)
        ds = Dataset()
        ds.BodyPartExamined = ""
        ds.AnatomicRegionSequence = [item]
        return ds

    # SRT code of older DX modalities, and the SNOMED CT code with no meaning
    assert examined_body_part(region(CodeValue="T-D3000", CodingSchemeDesignator="SRT", CodeMeaning="Chest")) == CHEST
    assert examined_body_part(region(CodeValue="72696002", CodingSchemeDesignator="SCT")) == KNEE
    named = region(CodeValue="72696002", CodingSchemeDesignator="SCT", CodeMeaning="Knee")
    named.BodyPartExamined = "THORAX"  # BodyPartExamined, when present, is what counts
    assert examined_body_part(named) == CHEST
    assert examined_body_part(Dataset()) == ""
    empty = Dataset()
    empty.AnatomicRegionSequence = []
    assert examined_body_part(empty) == ""


@pytest.mark.filterwarnings("ignore:Invalid value for VR CS")  # lower case, as some headers have it
def test_the_trainer_reads_each_image_s_body_part(tmp_path):
    folder = tmp_path / "A"
    folder.mkdir()
    for name, part in (("a", "chest "), ("b", None), ("c", "Knee")):
        ds = make_dataset(phantom(64, 64))
        if part is None:
            del ds.BodyPartExamined
        else:
            ds.BodyPartExamined = part
        write(ds, folder / f"{name}.dcm")
    Image.fromarray(phantom(64, 64, bits=8).astype(np.uint8)).save(folder / "d.png")
    thorax = make_dataset(phantom(64, 64))
    thorax.BodyPartExamined = "THORAX"
    write(thorax, folder / "e.dcm")
    coded = make_dataset(phantom(64, 64))
    coded.BodyPartExamined = ""
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "72696002", "SCT", "Knee"
    coded.AnatomicRegionSequence = [code]
    write(coded, folder / "f.dcm")
    for _ in range(2):  # decoded, then from the cache
        domain = load_domain(folder, "A", tmp_path / "cache", dict(DEFAULT_NORMALIZATION))
        assert domain.names == ["a", "b", "c", "d", "e", "f"]
        assert domain.body_parts == [CHEST, "", KNEE, "", CHEST, KNEE]


def _part(kind: str, seed: int) -> np.ndarray:
    """A "chest" (darker, the smooth field as it is) or a "knee" (brighter, flatter): two
    intensity distributions that no style maps onto each other."""
    x = smooth_field(seed)
    return x if kind == CHEST else np.clip(0.35 * x + 0.45, -1, 1).astype(np.float32)


def _domains(chests: int, knees: int, first: int, style=lambda x: x):
    images = [style(_part(CHEST, first + i)) for i in range(chests)]
    images += [style(_part(KNEE, first + 100 + i)) for i in range(knees)]
    return images, [CHEST] * chests + [KNEE] * knees


def _error_db(tf, pairs) -> float:
    with torch.no_grad():
        errors = [np.mean((tf(torch.from_numpy(x)[None, None])[0, 0].numpy() - y) ** 2) for x, y in pairs]
    return float(10 * np.log10(4.0 / np.mean(errors)))


def test_the_fit_on_other_mixes_weighted_by_body_part_wins_back_what_the_mix_cost(caplog):
    a, parts_a = _domains(6, 1, first=10)
    b, parts_b = _domains(2, 6, first=40, style=vendor_b)  # other images, other mix: unpaired
    held = [(_part(kind, s), vendor_b(_part(kind, s))) for kind in (CHEST, KNEE) for s in (70, 71)]
    with caplog.at_level(logging.INFO, logger="dicom_node.train"):
        weighted = fit_tone_filter(a, b, src_parts=parts_a, dst_parts=parts_b)
    as_they_are = fit_tone_filter(a, b)
    gain = _error_db(weighted, held) - _error_db(as_they_are, held)
    print(f"weighted fit {gain:+.2f} dB over the fit on the domains as they are")
    assert gain > 3.0, gain
    said = [r.getMessage() for r in caplog.records if "mixes of body parts" in r.getMessage()]
    assert said == ["tone filter fit: the domains hold other mixes of body parts (source: CHEST 6, KNEE 1; target: "
                    "KNEE 6, CHEST 2), so each part weighs alike in both (source KNEE x3; target CHEST x4)"]


def test_one_mix_fits_exactly_as_without_body_parts():
    a, parts_a = _domains(4, 2, first=10)
    b, parts_b = _domains(4, 2, first=40, style=vendor_b)
    with_parts, without = (fit_tone_filter(a, b, **kw).state_dict()
                           for kw in ({"src_parts": parts_a, "dst_parts": parts_b}, {}))
    assert all(torch.equal(with_parts[k], without[k]) for k in without)


def test_domains_that_share_no_body_part_are_said_to_read_anatomy_as_style(caplog):
    a, _ = _domains(3, 0, first=10)
    b, _ = _domains(0, 3, first=40, style=vendor_b)
    with caplog.at_level(logging.WARNING, logger="dicom_node.train"):
        fit_tone_filter(a, b, src_parts=[CHEST] * 3, dst_parts=[KNEE] * 3)
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "share no body part (source: CHEST 3; target: KNEE 3)" in said
    assert PATIENT_NAME not in said and PATIENT_ID not in said


def test_unpaired_patches_are_drawn_by_the_weights_and_alike_without_them():
    from dicom_node.train.data import DomainData, PatchSampler

    def domain(values: list[float]) -> DomainData:
        arrays = [np.full((32, 32), v, np.float32) for v in values]
        return DomainData(label="X", folder=Path("X"), names=[str(v) for v in values], arrays=arrays,
                          content=[np.ones((4, 4), np.uint8) for _ in values])

    a, b = domain([0.0, 0.1, 0.2]), domain([0.5, 0.6])
    drawn = PatchSampler(a, b, 16, 1, weights=([1, 0, 3], [1, 1]))
    seen = np.array([float(drawn.sample()[0][0, 0, 0, 0]) for _ in range(2000)])
    counts = [int(np.sum(np.isclose(seen, v))) for v in (0.0, 0.1, 0.2)]
    assert counts[1] == 0 and 2.5 < counts[2] / counts[0] < 3.5
    # without weights the stream is the one the trainer drew before weights existed
    plain = PatchSampler(a, b, 16, 1, seed=3)
    rng = np.random.default_rng([3, 0])
    first = float(plain.sample()[0][0, 0, 0, 0])
    assert first == pytest.approx([0.0, 0.1, 0.2][int(rng.integers(3))])


def train_tiny(tmp_path: Path, caplog, *extra: str) -> list[str]:
    """``dicom-node train`` on ``tmp_path``'s A and B for 2 steps of a tiny model into ``run/``;
    the trainer's log lines."""
    import yaml

    from dicom_node.cli import main

    cfg = {"data": {"a": str(tmp_path / "A"), "b": str(tmp_path / "B")},
           "model": {"ngf": 4, "n_blocks": 1, "ndf": 4},
           "train": {"patch_size": 32, "batch_size": 1, "steps": 2, "pool_size": 2, "threads": 1},
           "output": {"dir": str(tmp_path / "run"), "sample_every": 2, "checkpoint_every": 2, "log_every": 1}}
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(cfg))
    caplog.set_level(logging.INFO, logger="dicom_node.train")
    caplog.clear()
    assert main(["train", "--config", str(tmp_path / "train.yaml"), "--no-progress", *extra]) == 0
    return [r.getMessage() for r in caplog.records]


@pytest.mark.filterwarnings("ignore:Invalid value for VR CS")
def test_dicom_node_train_weighs_other_mixes_in_the_first_stage_and_the_patches(tmp_path, caplog, capsys):
    from dicom_node.cli import main

    for domain, parts in (("A", [CHEST] * 3 + [KNEE]), ("B", [CHEST] + [KNEE] * 3)):
        (tmp_path / domain).mkdir()
        for i, part in enumerate(parts):
            ds = make_dataset(phantom(64, 64, seed=i + (10 if domain == "B" else 0)), seed=i)
            ds.BodyPartExamined = part
            write(ds, tmp_path / domain / f"{domain.lower()}{i}.dcm")
    said = train_tiny(tmp_path, caplog)
    assert sum("other mixes of body parts" in m for m in said) == 2  # both directions' first stage
    assert "training patches weighted by body part, each alike in both domains (A: CHEST 3, KNEE 1; B: KNEE 3, " \
           "CHEST 1)" in said
    assert not any(PATIENT_NAME in m or PATIENT_ID in m for m in said)
    # the model says what anatomy it was trained on
    model = load_style_model(tmp_path / "run" / "models" / "run_A2B.safetensors")
    data = model.metadata["provenance"]["data"]
    assert data["A"]["body_parts"] == {CHEST: 3, KNEE: 1} and data["B"]["body_parts"] == {KNEE: 3, CHEST: 1}
    capsys.readouterr()
    assert main(["model", "info", "--json", str(tmp_path / "run" / "models" / "run_A2B.safetensors")]) == 0
    assert json.loads(capsys.readouterr().out)["trained_body_parts"] == [CHEST, KNEE]
    # data.body_parts: ignore (headers whose body parts are wrong): every image alike again
    caplog.clear()
    assert main(["train", "--config", str(tmp_path / "train.yaml"), "--no-progress", "-o", str(tmp_path / "run2"),
                 "--set", "data.body_parts=ignore"]) == 0
    assert not any("body part" in r.getMessage() for r in caplog.records)


def test_the_guard_reads_a_model_s_body_parts_whatever_shape_its_metadata_has():
    from dicom_node.engine.body_part import trained_body_parts, unseen_body_part

    known = {"direction": "A->B", "provenance": {"data": {"A": {"body_parts": {CHEST: 2, "unknown": 1}},
                                                          "B": {"body_parts": {KNEE: 3}}}}}
    assert trained_body_parts(known) == {CHEST}
    assert trained_body_parts({**known, "direction": "B->A"}) == {KNEE}
    assert unseen_body_part(known, KNEE) == "body part KNEE was not in the model's training data (CHEST)"
    assert unseen_body_part(known, CHEST) is None and unseen_body_part(known, "") is None
    # a model written with the header's own names is read by today's rule: THORAX is CHEST
    older = {"direction": "A->B", "provenance": {"data": {"A": {"body_parts": {"THORAX": 2}}}}}
    assert trained_body_parts(older) == {CHEST} and unseen_body_part(older, CHEST) is None
    for odd in ({}, {"provenance": "text"}, {"provenance": {"data": {"A": {"body_parts": [CHEST]}}}}):
        assert trained_body_parts(odd) == set() and unseen_body_part(odd, KNEE) is None
