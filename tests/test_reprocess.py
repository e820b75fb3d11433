"""Whose style is this series, and redoing a study after a model change (issue 25, items 3 and 4).

Real parts: studies arrive over real associations, outputs go to a folder destination, a
dcmtk ``storescp`` PACS or a pynetdicom receiver; the reprocess end to end runs the node as a
``dicom-node serve`` subprocess, with ``dicom-node reload``/``reprocess``/``audit`` as commands.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from dicom_node.cli import main
from dicom_node.config import ConfigError, parse_config
from dicom_node.errors import UserError
from dicom_node.node import Node
from dicom_node.routing import SERIES_BLOCKS, series_description, series_number_block, series_numbers
from dicom_node.state import NewDelivery, StateDB
from tests.nodeproc import free_port, node_config, send, wait_for, write_config
from tests.peers import NodeProcess, StoreSCP, dciodvfy_errors, tiny_node_config, wait_until
from tests.postgres import postgres_server  # noqa: F401 - fixture
from tests.test_node import instance_states, study
from tests.test_state import database, fixed, receive, states  # noqa: F401 - fixture


def _second_model(tmp_path: Path, name: str = "retrained", seed: int = 2) -> Path:
    """Another tiny residual model (other weights, so another digest and DeviceUID)."""
    from dicom_node.engine import new_style_model, save_style_model

    path = tmp_path / f"{name}.safetensors"
    save_style_model(new_style_model(ngf=4, n_blocks=1, residual=True, seed=seed), path, name=name, version="2")
    return path


def _named_study(n: int, description: str = "CHEST PA", number: int = 3) -> list:
    sources = study(n)
    for ds in sources:
        ds.SeriesDescription, ds.SeriesNumber = description, number
    return sources


# ------------------------------------------------------------------ item 3: series per route

def test_series_numbers_come_from_the_route_name_not_its_position():
    assert series_numbers("kim_chest", 3) == (series_number_block("kim_chest") * 1000 + 3,
                                              series_number_block("kim_chest") * 1000 + 3 + 1_000_000)
    assert 1 <= series_number_block("kim_chest") <= SERIES_BLOCKS
    assert series_numbers("kim_chest", "1004") == series_numbers("kim_chest", 4)  # source number modulo 1000
    assert series_numbers("kim_chest", None) == series_numbers("kim_chest", "x")  # missing or odd: 0
    assert series_description("{route} style: {source}", route="kim", model="soft", source="") == "kim style"
    assert series_description("{route} ({model}) {source}", route="kim", model="soft", source=" CHEST  PA ") == \
        "kim (soft) CHEST PA"


def test_check_config_reports_routes_that_would_number_their_series_alike(tmp_path):
    names = {}
    for i in range(SERIES_BLOCKS + 1):  # pigeonhole: two names in one block
        names.setdefault(series_number_block(f"r{i}"), []).append(f"r{i}")
    a, b = next(v for v in names.values() if len(v) > 1)[:2]
    raw = node_config(tmp_path, port=free_port(), model_path=tmp_path / "m.safetensors",
                      destinations={"outbox": {"type": "folder", "path": str(tmp_path / "o")}},
                      routes=[{"name": a, "called_ae": "A", "model": "tiny", "destinations": ["outbox"]},
                              {"name": b, "called_ae": "B", "model": "tiny", "destinations": ["outbox"],
                               "series_description": "{patient} style"}])
    with pytest.raises(ConfigError) as err:
        parse_config(raw, base_dir=tmp_path)
    text = str(err.value)
    assert f"routes[1].name: route {b!r} would number its series like routes[0] ({a!r})" in text
    assert "routes[1].series_description: unknown field(s) {patient}" in text


def test_two_radiologists_series_in_one_study_are_named_and_numbered_by_route(tmp_path, tiny_model_path):
    """One study sent to two called AEs routed to two models: two series at the folder
    destination, with different SeriesNumbers and descriptions naming their routes (was: both
    1003, titled by the model's internal name); the SCs pass dciodvfy."""
    outbox = tmp_path / "outbox"
    long_source = "CHEST PA ERECT INSPIRATION WITH A VERY LONG SERIES DESCRIPTION"  # 62 characters
    raw = node_config(tmp_path, port=free_port(), model_path=tiny_model_path,
                      destinations={"outbox": {"type": "folder", "path": str(outbox)}},
                      routes=[{"name": "kim_chest", "called_ae": "DR_KIM_STYLE", "model": "tiny",
                               "destinations": ["outbox"], "fidelity": {"action": "record"}},
                              {"name": "lee_soft", "called_ae": "DR_LEE_STYLE", "model": "lee",
                               "destinations": ["outbox"], "fidelity": {"action": "record"},
                               "series_description": "Dr Lee style ({model}): {source}"}], stable=0.2)
    raw["models"]["lee"] = {"path": str(_second_model(tmp_path, "lee-internal-name")), "device": "cpu"}
    sources = _named_study(2, long_source, 3)
    with Node(parse_config(raw, base_dir=tmp_path)) as node:
        assert send(node.port, sources, called="DR_KIM_STYLE") == [0, 0]
        assert send(node.port, sources, called="DR_LEE_STYLE") == [0, 0]
        assert wait_for(lambda: len(list(outbox.rglob("*.dcm"))) == 4, 60), node.db.counts()
    series = {}
    for path in outbox.rglob("*.dcm"):
        sc = pydicom.dcmread(path)
        series.setdefault(str(sc.SeriesInstanceUID), []).append((sc, path))
    assert len(series) == 2
    found = {}
    for items in series.values():
        assert len({(int(sc.SeriesNumber), str(sc.SeriesDescription)) for sc, _ in items}) == 1
        sc, path = items[0]
        found[int(sc.SeriesNumber)] = str(sc.SeriesDescription)
        assert dciodvfy_errors(path) == []
    kim, lee = series_numbers("kim_chest", 3)[0], series_numbers("lee_soft", 3)[0]
    assert kim != lee and set(found) == {kim, lee}
    assert found[kim] == f"kim_chest style: {long_source}"[:64].rstrip()
    assert found[lee] == f"Dr Lee style (lee): {long_source}"[:64].rstrip()
    assert all("internal" not in d and "tiny" not in d for d in found.values())


# ------------------------------------------------------------------ item 4: reprocess

def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dicom_node", *args], capture_output=True, text=True, timeout=120)


def _equipment(sc) -> pydicom.Dataset:
    return next(i for i in sc.ContributingEquipmentSequence if i.get("Manufacturer") == "dicom-node")


def test_reprocess_after_a_reload_delivers_a_new_version_in_the_same_series_to_a_dcmtk_pacs(tmp_path,
                                                                                          tiny_model_path):
    from dicom_node.engine import load_style_model
    from dicom_node.engine.secondary_capture import device_uid

    pacs = StoreSCP(out_dir=tmp_path / "pacs").start()
    try:
        cfg = tiny_node_config(tiny_model_path, {"pacs": {"type": "dicom", "ae_title": pacs.ae_title,
                                                          "host": "127.0.0.1", "port": pacs.port}}, stable=0.3)
        cfg["routes"][0].update(name="kim_chest", fidelity={"action": "record"})
        node = NodeProcess(tmp_path / "node", cfg).start()
        try:
            sources = _named_study(2)
            study_uid = str(sources[0].StudyInstanceUID)
            assert send(node.port, sources, called="DR_KIM_STYLE") == [0, 0]
            wait_until(lambda: len(pacs.files()) == 2, 60, message="the first outputs at the PACS")
            first = {str(sc.SOPInstanceUID): sc for sc in map(pydicom.dcmread, pacs.files())}

            # a retrained model swapped in with reload; a resend would be a duplicate
            retrained = _second_model(tmp_path)
            node.config["models"]["tiny"]["path"] = str(retrained)
            write_config(node.config_path, node.config)
            done = _cli("reload", "--config", str(node.config_path))
            assert done.returncode == 0, done.stdout + done.stderr

            done = _cli("reprocess", "--study", study_uid, "--config", str(node.config_path))
            assert done.returncode == 0, done.stdout + done.stderr
            assert "queued 2 instances of route kim_chest for translation again" in done.stdout
            wait_until(lambda: len(pacs.files()) == 4, 60, message="the re-translated outputs at the PACS")
            second = {str(sc.SOPInstanceUID): sc for sc in map(pydicom.dcmread, pacs.files())
                      if str(sc.SOPInstanceUID) not in first}
            new_model, old_model = load_style_model(retrained), load_style_model(tiny_model_path)
            assert len(second) == 2
            for sc in second.values():
                # new output version, same series (and number, description)
                assert {str(sc.SeriesInstanceUID)} == {str(s.SeriesInstanceUID) for s in first.values()}
                assert int(sc.SeriesNumber) == series_numbers("kim_chest", 3)[0]
                assert str(sc.SeriesDescription) == "kim_chest style: CHEST PA"
                assert f"sha256 {new_model.metadata['sha256'][:16]}" in str(sc.DerivationDescription)
                assert _equipment(sc).DeviceUID == device_uid(new_model) != device_uid(old_model)
                assert "retrained 2" in str(_equipment(sc).SoftwareVersions)
            assert {str(sc.SourceImageSequence[0].ReferencedSOPInstanceUID) for sc in second.values()} == \
                {str(ds.SOPInstanceUID) for ds in sources}

            done = _cli("audit", "--study", study_uid, "--json", "--config", str(node.config_path))
            rows = [json.loads(line) for line in done.stdout.splitlines()]
            redone = [r for r in rows if r["output_sop_uid"] in second]
            assert len(rows) == 4 and len(redone) == 2
            for r in redone:
                assert r["output_version"] == 2 and r["requested_by"].startswith("cli:")
                assert r["model_digest"] == new_model.weights_sha256 and r["model"] == "retrained"
            assert all(r["output_version"] == 1 and r["requested_by"] is None
                       for r in rows if r["output_sop_uid"] in first)
            text = _cli("audit", "--study", study_uid, "--config", str(node.config_path)).stdout
            assert text.count("version 2 (reprocess by cli:") == 2 and "4 outputs" in text
            db = StateDB(Path(cfg["storage"]["spool_dir"]) / "state.db")
            try:
                action = db.operations.actions()[0]
            finally:
                db.close()
            assert action["action"] == "reprocess" and action["user"].startswith("cli:")
            assert study_uid in action["target"] and "2 instance(s) on kim_chest" in action["result"]
            assert "reprocessed: output version 2" in node.log_text()
            assert pacs.store_requests() == 4  # each output once, the originals never
        finally:
            node.stop()
    finally:
        pacs.stop()


def test_the_console_reprocess_button(tmp_path, tiny_model_path):
    from tests.test_web import Browserless, _token

    outbox = tmp_path / "outbox"
    raw = node_config(tmp_path, port=free_port(), model_path=tiny_model_path,
                      destinations={"outbox": {"type": "folder", "path": str(outbox)}},
                      routes=[{"name": "kim_chest", "called_ae": "DR_KIM_STYLE", "model": "tiny",
                               "destinations": ["outbox"], "fidelity": {"action": "record"}}],
                      stable=0.2, web={"port": 0})
    sources = _named_study(1)
    study_uid = str(sources[0].StudyInstanceUID)
    with Node(parse_config(raw, base_dir=tmp_path)) as node:
        assert send(node.port, sources, called="DR_KIM_STYLE") == [0]
        assert wait_for(lambda: set(instance_states(node).values()) == {"delivered"}, 60)
        web = Browserless(node.web.url)
        web.login_with_token(_token(node))
        page = f"/studies/{study_uid}"
        html = web.get(page)[2]
        assert "Reprocess (kim_chest)" in html
        status, headers, _ = web.post("/reprocess", {"csrf_token": web.csrf(page), "study_uid": study_uid,
                                                     "route": "kim_chest", "back": page})
        assert status == 303 and headers["location"] == page
        assert "queued for translation again: 1 instance(s) of route kim_chest" in web.get(page)[2]
        assert wait_for(lambda: len(list(outbox.rglob("*.dcm"))) == 2, 60)
        assert wait_for(lambda: set(instance_states(node).values()) == {"delivered"}, 20)
        assert [(r["output_version"], r["requested_by"]) for r in node.db.audit.rows(study_uid=study_uid)] == \
            [(1, None), (2, "token")]
        assert [(a["action"], a["user"]) for a in node.db.operations.actions()][:1] == [("reprocess", "token")]


def test_delivered_work_is_removed_after_keep_sources_days_and_then_cannot_be_reprocessed(tmp_path,
                                                                                         tiny_model_path, capsys):
    """storage.keep_sources_days small (3 s): the node's deliverers remove the delivered study's
    source and output from the spool; reprocess then says why not in one line, exit 1."""
    outbox = tmp_path / "outbox"
    raw = node_config(tmp_path, port=free_port(), model_path=tiny_model_path,
                      destinations={"outbox": {"type": "folder", "path": str(outbox)}},
                      routes=[{"name": "kim_chest", "called_ae": "DR_KIM_STYLE", "model": "tiny",
                               "destinations": ["outbox"]}],
                      stable=0.2, storage={"keep_sources_days": 3 / 86400})
    cfg_path = write_config(tmp_path / "node.yaml", raw)
    sources = _named_study(1)
    spool = tmp_path / "spool"
    with Node(parse_config(raw, base_dir=tmp_path)) as node:
        assert send(node.port, sources, called="DR_KIM_STYLE") == [0]
        assert wait_for(lambda: set(instance_states(node).values()) == {"delivered"}, 60)
        assert wait_for(lambda: not list((spool / "in").rglob("*.dcm")) and not list((spool / "out").rglob("*.dcm")),
                        30)
    assert len(list(outbox.rglob("*.dcm"))) == 1  # delivered, then removed from the spool only
    assert main(["reprocess", "--study", str(sources[0].StudyInstanceUID), "--config", str(cfg_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "its sources are no longer kept" in err and "keep_sources_days" in err


def _deliver(db: StateDB, iid: int, out_uid: str, now: float) -> None:
    db.mark_translated(iid, [NewDelivery("pacs", "output", out_uid, f"/out/{out_uid}.dcm")], now=now)
    for d in db.deliveries.due(now=now):
        db.deliveries.record_results([(d, True, None)], 3, lambda n: 1.0, now=now)


def test_sources_are_kept_until_the_whole_study_is_delivered_and_old_enough(database):
    """finished_unpurged with a keep window: a delivered instance waits while a sibling of its
    study is unfinished, and until keep_seconds after the study's last change; reprocess_study
    takes only a delivered study whose sources are still there."""
    db = StateDB(database)
    a, _ = receive(db, "1.1", now=0.0)
    b, _ = receive(db, "1.2", now=0.0)
    db.studies.release_due(fixed(1.0), now=5.0)
    _deliver(db, a, "9.1", 6.0)
    assert [i for i, _ in db.sources.finished_unpurged()] == [a]  # keep 0: at once, as before the setting
    assert db.sources.finished_unpurged(keep_seconds=100.0, now=1000.0) == []  # its sibling is not delivered
    with pytest.raises(UserError, match="is not finished .ready.: reprocess it once it is delivered"):
        db.sources.reprocess("1.2.3", user="alice")
    _deliver(db, b, "9.2", 10.0)
    assert db.sources.finished_unpurged(keep_seconds=100.0, now=109.0) == []  # the study changed at 10
    assert sorted(i for i, _ in db.sources.finished_unpurged(keep_seconds=100.0, now=111.0)) == [a, b]

    with pytest.raises(UserError, match="route kim is no longer configured"):
        db.sources.reprocess("1.2.3", user="alice", configured=["kim_chest"])
    assert db.sources.reprocess("1.2.3", "kim", user="alice", configured=["kim"], now=120.0) == {"kim": 2}
    assert states(db) == {"1.1": "ready", "1.2": "ready"}
    assert db.sources.output_version(a) == (2, "alice")
    assert db.operations.actions()[0]["action"] == "reprocess" and db.operations.actions()[0]["user"] == "alice"
    with pytest.raises(UserError, match="nothing translated on this node to reprocess .unknown study"):
        db.sources.reprocess("1.2.999", user="alice")
    c, _ = receive(db, "2.1", "1.2.4", now=200.0)
    db.studies.release_due(fixed(1.0), now=205.0)
    _deliver(db, c, "9.3", 206.0)
    db.sources.mark_purged([c])
    with pytest.raises(UserError, match="its sources are no longer kept"):
        db.sources.reprocess("1.2.4", user="alice")
    assert db.sources.output_version(c) == (1, None)
    db.close()
