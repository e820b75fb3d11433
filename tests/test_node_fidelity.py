"""The fidelity guard in the node, end to end over real associations on 127.0.0.1.

Routes with each ``fidelity.action`` get a good model (the residual tiny model: the guard
passes it) and a faulty one (an untrained, non-residual generator: noise out, the guard
flags it); what arrives at a pynetdicom storage SCP (the PACS), what ``status``, ``release``,
``discard`` and ``audit`` say, and what the audit trail keeps are checked.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from dicom_node.cli import main
from dicom_node.config import parse_config
from dicom_node.engine.defaults import CAUTION_LABEL, FLAGGED_PREFIX
from dicom_node.node import Node
from tests.factory import PATIENT_ID, PATIENT_NAME
from tests.nodeproc import Receiver, free_port, node_config, send, wait_for
from tests.test_node import instance_states, study


@pytest.fixture(scope="module")
def untrained_path(tmp_path_factory) -> Path:
    from dicom_node.engine import new_style_model, save_style_model

    path = tmp_path_factory.mktemp("models") / "untrained.safetensors"
    save_style_model(new_style_model(ngf=4, n_blocks=1, residual=False, seed=4), path, name="untrained")
    return path


def _node(tmp_path: Path, pacs_port: int, models: dict[str, Path], routes: list[dict]) -> tuple[Node, Path]:
    raw = node_config(tmp_path, port=free_port(), model_path=models["tiny"],
                      destinations={"pacs": {"type": "dicom", "ae_title": "PACS", "host": "127.0.0.1",
                                             "port": pacs_port}},
                      routes=routes, stable=0.2)
    raw["models"] = {name: {"path": str(p), "device": "cpu"} for name, p in models.items()}
    cfg_path = tmp_path / "node.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    config = parse_config(raw, base_dir=tmp_path)
    config.node.port = 0
    return Node(config), cfg_path


def _outputs(pacs: Receiver) -> list:
    return [ds for ds in pacs.received if str(ds.SOPClassUID) == "1.2.840.10008.5.1.4.1.1.7"]


def test_flag_record_and_ok_outputs_reach_the_pacs_marked_as_the_route_says(tmp_path, tiny_model_path,
                                                                           untrained_path, caplog, capsys):
    routes = [{"called_ae": "GOOD", "model": "tiny", "destinations": ["pacs"]},
              {"called_ae": "FLAG", "model": "bad", "destinations": ["pacs"], "fidelity": {"action": "flag"}},
              {"called_ae": "RECORD", "model": "bad", "destinations": ["pacs"], "fidelity": {"action": "record"},
               "label": None}]
    with Receiver("PACS") as pacs:
        node, cfg = _node(tmp_path, pacs.port, {"tiny": tiny_model_path, "bad": untrained_path}, routes)
        with node:
            good, flag, record = study(1), study(1), study(1)
            assert send(node.port, good, called="GOOD") == [0]
            assert send(node.port, flag, called="FLAG") == [0]
            assert send(node.port, record, called="RECORD") == [0]
            assert wait_for(lambda: len(_outputs(pacs)) == 3, 30)
            assert wait_for(lambda: set(instance_states(node).values()) == {"delivered"}, 10)
            by_source = {str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID): ds for ds in _outputs(pacs)}
            ok_sc = by_source[str(good[0].SOPInstanceUID)]
            flagged_sc = by_source[str(flag[0].SOPInstanceUID)]
            recorded_sc = by_source[str(record[0].SOPInstanceUID)]
            # good: the caution label only; the model's DeviceUID in ContributingEquipmentSequence
            assert str(ok_sc.ImageComments) == CAUTION_LABEL
            assert not str(ok_sc.SeriesDescription).startswith(FLAGGED_PREFIX)
            (equipment,) = [i for i in ok_sc.ContributingEquipmentSequence if i.Manufacturer == "dicom-node"]
            assert equipment.DeviceUID.startswith("2.25.")
            # flag: its own series, the caution prefix, the reasons with scores
            assert str(flagged_sc.SeriesDescription).startswith(FLAGGED_PREFIX)
            assert "Fidelity guard: flagged: " in str(flagged_sc.ImageComments)
            assert "output not explained by the source" in str(flagged_sc.ImageComments)
            assert int(flagged_sc.SeriesNumber) >= 2000
            # record: forwarded unmarked, and this route switched the label off
            assert not str(recorded_sc.SeriesDescription).startswith(FLAGGED_PREFIX)
            assert "ImageComments" not in recorded_sc
            # each verdict is in the audit trail, and status counts them
            audit = {r["source_sop_uid"]: r for r in node.db.audit.rows()}
            assert audit[str(good[0].SOPInstanceUID)]["verdict"] == "ok"
            assert audit[str(flag[0].SOPInstanceUID)]["verdict"] == "flagged"
            assert audit[str(record[0].SOPInstanceUID)]["verdict"] == "flagged"
            assert audit[str(record[0].SOPInstanceUID)]["action"] == "record"
            assert {r["disposition"] for r in audit.values()} == {"forwarded"}
            assert audit[str(good[0].SOPInstanceUID)]["device_uid"] == str(equipment.DeviceUID)
    assert main(["status", "--json", "--config", str(cfg)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["fidelity"]["outputs"]["ok"] == 1 and report["fidelity"]["outputs"]["flagged"] == 2
    assert report["fidelity"]["withheld"] == []
    assert {f["source_sop_uid"] for f in report["fidelity"]["flagged"]} == {
        str(flag[0].SOPInstanceUID), str(record[0].SOPInstanceUID)}
    # logs name the verdict and its reasons, never the patient
    assert "fidelity guard flagged the output" in caplog.text
    assert PATIENT_NAME not in caplog.text and PATIENT_ID not in caplog.text


def test_withheld_output_waits_for_an_operator_then_release_and_discard(tmp_path, untrained_path,
                                                                        tiny_model_path, capsys):
    routes = [{"called_ae": "HOLD", "model": "bad", "destinations": ["pacs"], "forward_original": True,
               "fidelity": {"action": "withhold"}}]
    with Receiver("PACS") as pacs:
        node, cfg = _node(tmp_path, pacs.port, {"tiny": tiny_model_path, "bad": untrained_path}, routes)
        with node:
            first, second = study(1), study(1)
            assert send(node.port, first + second, called="HOLD") == [0, 0]
            sources = {str(first[0].SOPInstanceUID), str(second[0].SOPInstanceUID)}
            # the originals go out; the restyled images do not
            assert wait_for(lambda: set(pacs.uids()) == sources, 30)
            assert wait_for(lambda: set(instance_states(node).values()) == {"withheld"}, 10)
            assert _outputs(pacs) == []
            held = node.db.database.query("SELECT path FROM deliveries WHERE state='held'")
            assert len(held) == 2 and all(Path(p).is_file() for (p,) in held)  # kept in the spool

            assert main(["status", "--config", str(cfg)]) == 0
            text = capsys.readouterr().out
            assert "withheld 2" in text and "dicom-node release" in text
            assert main(["status", "--json", "--config", str(cfg)]) == 0
            report = json.loads(capsys.readouterr().out)
            withheld = {w["source_sop_uid"]: w for w in report["fidelity"]["withheld"]}
            assert set(withheld) == sources
            assert report["fidelity"]["outputs"]["flagged"] == 2 and len(report["fidelity"]["flagged"]) == 2
            assert all(w["reasons"] for w in withheld.values())

            # release the first by its output SOP UID: it reaches the PACS, marked as flagged
            out_uid = withheld[str(first[0].SOPInstanceUID)]["output_sop_uid"]
            assert main(["release", out_uid, "--config", str(cfg)]) == 0
            assert f"released {out_uid}" in capsys.readouterr().out
            assert wait_for(lambda: len(_outputs(pacs)) == 1, 20)
            sc = _outputs(pacs)[0]
            assert str(sc.SOPInstanceUID) == out_uid and str(sc.SeriesDescription).startswith(FLAGGED_PREFIX)
            assert wait_for(lambda: instance_states(node)[str(first[0].SOPInstanceUID)] == "delivered", 10)

            # discard the second by its source SOP UID: never sent, files purged
            assert main(["discard", str(second[0].SOPInstanceUID), "--config", str(cfg)]) == 0
            assert "discarded 1 withheld output" in capsys.readouterr().out
            assert wait_for(lambda: instance_states(node)[str(second[0].SOPInstanceUID)] == "discarded", 10)
            assert wait_for(lambda: not any(Path(p).exists() for (p,) in held if out_uid not in p), 15)
            # the released one was delivered: kept storage.keep_sources_days for a reprocess
            assert [Path(p).is_file() for (p,) in held if out_uid in p] == [True]
            assert len(_outputs(pacs)) == 1

            # nothing left to release: a one-line error, exit 1
            assert main(["release", "--all", "--config", str(cfg)]) == 1
            assert "no withheld output matches" in capsys.readouterr().err

    # the audit trail: source -> model digest -> output -> verdict -> what happened
    assert main(["audit", "--config", str(cfg), "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {r["source_sop_uid"]: r["disposition"] for r in rows} == {
        str(first[0].SOPInstanceUID): "released", str(second[0].SOPInstanceUID): "discarded"}
    assert all(r["verdict"] == "flagged" and len(r["model_digest"]) == 64 and r["reasons"] for r in rows)
    assert main(["audit", "--config", str(cfg), "--study", str(first[0].StudyInstanceUID)]) == 0
    text = capsys.readouterr().out
    assert str(first[0].SOPInstanceUID) in text and str(second[0].SOPInstanceUID) not in text
    assert text.strip().endswith("1 output")
    assert main(["audit", "--config", str(cfg), "--since", "1h"]) == 0
    assert capsys.readouterr().out.strip().endswith("2 outputs")
    assert main(["audit", "--config", str(cfg), "--since", "2999-01-01"]) == 0
    assert capsys.readouterr().out.strip().endswith("0 outputs")
    assert main(["audit", "--config", str(cfg), "--since", "yesterday"]) == 1
    assert "--since 'yesterday'" in capsys.readouterr().err


def test_route_fidelity_and_label_are_validated(tmp_path, tiny_model_path, capsys):
    raw = node_config(tmp_path, port=11112, model_path=tiny_model_path,
                      destinations={"out": {"type": "folder", "path": str(tmp_path / "out")}},
                      routes=[{"called_ae": "A", "model": "tiny", "destinations": ["out"],
                               "fidelity": {"action": "hide"}, "label": 7},
                              {"called_ae": "B", "model": "tiny", "destinations": ["out"], "fidelity": "flag"}])
    raw["models"]["tiny"]["inverse"] = "missing.safetensors"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["check-config", str(path)]) == 1
    err = capsys.readouterr()
    text = err.out + err.err
    assert "routes[0].fidelity.action: must be one of record, flag, withhold, not 'hide'" in text
    assert "routes[0].label: must be a text, or null for no label" in text
    assert "routes[1].fidelity" in text
    assert "models.tiny.inverse: model file not found" in text


def test_inverse_next_to_the_model_is_loaded_for_the_cycle_check(tmp_path, tiny_model_path):
    """A trained pair names each other by weight digest: the node finds the inverse beside the
    model (``inverse: auto``) and records a cycle score for every output."""
    import torch

    from dicom_node.engine import load_style_model, new_style_model, save_style_model
    from dicom_node.engine.model_file import weights_digest

    folder = tmp_path / "models"
    gens = {}
    for name, seed in (("pair_A2B", 1), ("pair_B2A", 2)):
        gen = new_style_model(ngf=4, n_blocks=1, residual=True, seed=seed)
        last = [m for m in gen.modules() if isinstance(m, torch.nn.Conv2d)][-1]
        with torch.no_grad():
            last.weight.normal_(0.0, 0.002, generator=torch.Generator().manual_seed(seed))
        gens[name] = gen
    digests = {k: weights_digest(g.state_dict()) for k, g in gens.items()}
    for name, other in (("pair_A2B", "pair_B2A"), ("pair_B2A", "pair_A2B")):
        save_style_model(gens[name], folder / f"{name}.safetensors", name=name,
                         inverse={"name": other, "weights_sha256": digests[other]})
    save_style_model(new_style_model(ngf=4, n_blocks=1, seed=9), folder / "unrelated.safetensors", name="x")
    model = load_style_model(folder / "pair_A2B.safetensors")
    from dicom_node.engine.model_file import find_inverse

    assert find_inverse(model) == folder / "pair_B2A.safetensors"

    dest = tmp_path / "outbox"
    raw = node_config(tmp_path, port=free_port(), model_path=folder / "pair_A2B.safetensors",
                      destinations={"out": {"type": "folder", "path": str(dest)}},
                      routes=[{"called_ae": "KIM", "model": "tiny", "destinations": ["out"]}], stable=0.2)
    assert raw["models"]["tiny"]["path"].endswith("pair_A2B.safetensors")  # inverse: auto (the default)
    config = parse_config(raw, base_dir=tmp_path)
    config.node.port = 0
    with Node(config) as node:
        ds = study(1)
        assert send(node.port, ds, called="KIM") == [0]
        assert wait_for(lambda: set(instance_states(node).values()) == {"delivered"}, 30)
        (row,) = node.db.audit.rows()
    assert row["verdict"] == "ok" and row["scores"]["cycle"] is not None
    assert row["model_digest"] == digests["pair_A2B"]
