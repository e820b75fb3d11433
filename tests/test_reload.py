"""Live reconfiguration, stable route names and study completion v2, over real associations.

The node is a real ``dicom-node serve`` process; ``dicom-node reload`` (what systemctl reload
runs) and a plain SIGHUP reconfigure it while a sender is in the middle of an association.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.nodeproc import NodeProcess, Receiver, associate_result, free_port, node_config, send, wait_for, write_config
from tests.test_node import study


def _model(path: Path, name: str, version: str, seed: int) -> Path:
    import torch

    from dicom_node.engine import new_style_model, save_style_model

    gen = new_style_model(ngf=4, n_blocks=1, residual=True, seed=seed)
    last = [m for m in gen.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    with torch.no_grad():
        last.weight.normal_(0.0, 0.002, generator=torch.Generator().manual_seed(seed))
    save_style_model(gen, path, name=name, version=version)
    return path


def _reload(cfg_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dicom_node", "reload", "--config", str(cfg_path)],
                          capture_output=True, text=True, timeout=120)


def _model_versions(ds) -> set[str]:
    item = next(i for i in ds.ContributingEquipmentSequence if i.get("Manufacturer") == "dicom-node")
    return {str(v) for v in item.SoftwareVersions}


def _slow_send(port: int, datasets, called: str, pause: float, out: list) -> None:
    """One association, a pause between C-STOREs (a modality sending while the node reloads)."""
    from pynetdicom import AE

    ae = AE(ae_title="MODALITY")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(str(datasets[0].SOPClassUID), [str(datasets[0].file_meta.TransferSyntaxUID)])
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        out.append("not established")
        return
    for ds in datasets:
        rsp = assoc.send_c_store(ds)
        out.append(int(rsp.Status) if rsp and "Status" in rsp else None)
        time.sleep(pause)
    assoc.release()
    out.append("released")


def test_reload_applies_routes_and_models_without_dropping_an_association(tmp_path):
    v1 = _model(tmp_path / "kim-v1.safetensors", "kim", "1", seed=1)
    v2 = _model(tmp_path / "kim-v2.safetensors", "kim", "2", seed=2)
    with Receiver("PACS") as pacs:
        port = free_port()
        dests = {"pacs": {"type": "dicom", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}}
        cfg = node_config(tmp_path, port=port, model_path=v1, destinations=dests, stable=0.3,
                          routes=[{"name": "old", "called_ae": "DR_OLD", "model": "tiny", "destinations": ["pacs"]}])
        cfg_path = write_config(tmp_path / "node.yaml", cfg)
        with NodeProcess(cfg_path, port, tmp_path / "node.log") as node:
            pid = node.proc.pid
            first = study(1)
            assert send(port, first, called="DR_OLD") == [0]
            assert wait_for(lambda: len(pacs.received) == 1, 30)
            assert "model kim 1" in _model_versions(pacs.received[0])

            statuses: list = []
            sender = threading.Thread(target=_slow_send, args=(port, study(20), "DR_OLD", 0.1, statuses))
            sender.start()
            assert wait_for(lambda: len(statuses) >= 3, 20)
            cfg["routes"] = [{"name": "new", "called_ae": "DR_NEW", "model": "tiny", "destinations": ["pacs"]}]
            cfg["models"]["tiny"]["path"] = str(v2)
            write_config(cfg_path, cfg)
            done = _reload(cfg_path)
            assert done.returncode == 0, done.stderr
            for line in ("route new added", "route old removed", "model tiny changed"):
                assert line in done.stdout, done.stdout
            sender.join(60)
            assert statuses[-1] == "released" and statuses[:-1] == [0] * 20, statuses  # it never noticed
            assert node.proc.pid == pid and node.proc.poll() is None  # same process, no restart
            assert associate_result(port, called="DR_NEW").is_released
            old = associate_result(port, called="DR_OLD")
            assert old.is_rejected and not old.is_established
            before = len(pacs.received)
            latest = study(1)
            assert send(port, latest, called="DR_NEW") == [0]
            assert wait_for(lambda: any(str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID)
                                        == str(latest[0].SOPInstanceUID) for ds in pacs.received[before:]), 30)
            out = next(ds for ds in pacs.received if str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID)
                       == str(latest[0].SOPInstanceUID))
            assert "model kim 2" in _model_versions(out)


def test_invalid_config_and_restart_only_settings_leave_the_old_config_serving(tmp_path, tiny_model_path):
    with Receiver("PACS") as pacs:
        port = free_port()
        dests = {"pacs": {"type": "dicom", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}}
        cfg = node_config(tmp_path, port=port, model_path=tiny_model_path, destinations=dests, stable=0.3,
                          routes=[{"called_ae": "DR_KIM", "model": "tiny", "destinations": ["pacs"]}])
        cfg_path = write_config(tmp_path / "node.yaml", cfg)
        good = cfg_path.read_text()
        with NodeProcess(cfg_path, port, tmp_path / "node.log") as node:
            cfg["routes"][0]["model"] = "missing"
            cfg["retry"]["max_attempts"] = "many"
            write_config(cfg_path, cfg)
            done = _reload(cfg_path)
            assert done.returncode == 1
            assert "routes[0].model: unknown model 'missing'" in done.stderr and "retry.max_attempts" in done.stderr
            assert "reload refused, still running the old config: routes[0].model" in node.log()
            assert send(port, study(1), called="DR_KIM") == [0]  # still the old config
            assert wait_for(lambda: len(pacs.received) == 1, 30)

            cfg_path.write_text(good.replace(f"port: {port}", f"port: {free_port()}"))
            done = _reload(cfg_path)
            assert done.returncode == 0 and "node.port changed: needs a restart" in done.stdout, done.stdout
            assert associate_result(port, called="DR_KIM").is_released  # the old port serves on

            # a plain SIGHUP (kill -HUP) does the same as `dicom-node reload`
            cfg["retry"]["max_attempts"] = 20
            cfg["routes"] = [{"called_ae": "DR_KIM", "model": "tiny", "destinations": ["pacs"]},
                             {"called_ae": "DR_LEE", "model": "tiny", "destinations": ["pacs"]}]
            write_config(cfg_path, cfg)
            os.kill(node.proc.pid, signal.SIGHUP)
            assert wait_for(lambda: "route dr_lee-tiny added" in node.log(), 30), node.log()[-2000:]
            assert associate_result(port, called="DR_LEE").is_released


def test_queued_work_follows_its_route_name_when_routes_are_reordered(tmp_path):
    """Instances waiting for their study's quiet period when the routes are reordered (and the
    node restarted) are translated by the route they arrived on."""
    soft = _model(tmp_path / "soft.safetensors", "soft", "1", seed=1)
    sharp = _model(tmp_path / "sharp.safetensors", "sharp", "1", seed=2)
    with Receiver("PACS") as pacs:
        port = free_port()
        dests = {"pacs": {"type": "dicom", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}}
        cfg = node_config(tmp_path, port=port, model_path=soft, destinations=dests, stable=3.0,
                          routes=[{"called_ae": "DR_KIM", "model": "soft", "destinations": ["pacs"]},
                                  {"called_ae": "DR_LEE", "model": "sharp", "destinations": ["pacs"]}])
        cfg["models"] = {"soft": {"path": str(soft), "device": "cpu"}, "sharp": {"path": str(sharp), "device": "cpu"}}
        cfg_path = write_config(tmp_path / "node.yaml", cfg)
        node = NodeProcess(cfg_path, port, tmp_path / "node.log").start()
        try:
            assert send(port, study(2), called="DR_KIM") == [0, 0]
            node.kill9()  # before the study is quiet: the work waits in the spool
            cfg["routes"].reverse()  # DR_LEE's route is now the first one
            write_config(cfg_path, cfg)
            node.start()
            assert wait_for(lambda: len(pacs.received) == 2, 60)
            assert all("model soft 1" in _model_versions(ds) for ds in pacs.received)
        finally:
            node.kill9()


def _max_wait_config(tmp_path: Path, model: Path, pacs: Receiver, *, stable: float, max_wait: float,
                     action: str) -> tuple[Path, int]:
    """A node whose DR_KIM route waits 3 s of quiet, at most ``max_wait`` s, then ``action``s."""
    port = free_port()
    dests = {"pacs": {"type": "dicom", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}}
    cfg = node_config(tmp_path, port=port, model_path=model, destinations=dests, stable=stable,
                      routes=[{"called_ae": "DR_KIM", "model": "tiny", "destinations": ["pacs"],
                               "study_stable_seconds": 3, "max_wait_seconds": max_wait, "on_max_wait": action}])
    return write_config(tmp_path / "node.yaml", cfg), port


def test_max_wait_translates_a_study_that_never_pauses_and_follow_ups_join_its_series(tmp_path, tiny_model_path):
    with Receiver("PACS") as pacs:
        cfg_path, port = _max_wait_config(tmp_path, tiny_model_path, pacs, stable=10.0, max_wait=2, action="proceed")
        sources = study(14)
        with NodeProcess(cfg_path, port, tmp_path / "node.log") as node:
            statuses: list = []
            sender = threading.Thread(target=_slow_send, args=(port, sources, "DR_KIM", 0.5, statuses))
            sender.start()  # one instance every 0.5 s for 7 s: never quiet for 3 s
            assert wait_for(lambda: len(pacs.received) > 0, 30)
            assert sender.is_alive(), "the first outputs must arrive while the sender is still sending"
            sender.join(60)
            assert statuses[-1] == "released"
            assert wait_for(lambda: len(pacs.received) == len(sources), 60), len(pacs.received)
            assert "max_wait_seconds 2s: translating what has arrived" in node.log()
        refs = [str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID) for ds in pacs.received]
        assert sorted(refs) == sorted(str(ds.SOPInstanceUID) for ds in sources)  # each once: no duplicates
        assert len({str(ds.SeriesInstanceUID) for ds in pacs.received}) == 1  # follow-ups join the series


def test_max_wait_discard_drops_a_study_that_never_pauses(tmp_path, tiny_model_path):
    import sqlite3

    with Receiver("PACS") as pacs:
        cfg_path, port = _max_wait_config(tmp_path, tiny_model_path, pacs, stable=0.5, max_wait=1, action="discard")
        sources = study(6)
        with NodeProcess(cfg_path, port, tmp_path / "node.log") as node:
            statuses: list = []
            _slow_send(port, sources, "DR_KIM", 0.5, statuses)
            assert statuses == [0] * 6 + ["released"]  # acknowledged (kept), then dropped by the rule
            db = sqlite3.connect(tmp_path / "spool" / "state.db")
            assert wait_for(lambda: [s for (s,) in db.execute("SELECT state FROM instances")] == ["discarded"] * 6,
                            30)
            db.close()
            assert "discarded (on_max_wait: discard)" in node.log()
        assert pacs.received == []


def test_a_config_nested_20000_deep_is_refused_in_one_line_and_the_node_serves_on(tmp_path, tiny_model_path):
    """SIGHUP, `dicom-node reload` and check-config on a document that overflows PyYAML's
    recursive composer: one line each, exit 1, and the node keeps its old config."""
    import json

    with Receiver("PACS") as pacs:
        port = free_port()
        dests = {"pacs": {"type": "dicom", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}}
        cfg = node_config(tmp_path, port=port, model_path=tiny_model_path, destinations=dests, stable=0.3,
                          routes=[{"called_ae": "DR_KIM", "model": "tiny", "destinations": ["pacs"]}])
        cfg_path = write_config(tmp_path / "node.yaml", cfg)
        with NodeProcess(cfg_path, port, tmp_path / "node.log") as node:
            cfg_path.write_text("routes: " + "[" * 20_000 + "]" * 20_000 + "\n")
            os.kill(node.proc.pid, signal.SIGHUP)
            assert wait_for(lambda: "reload refused" in node.log(), 30), node.log()[-2000:]
            refused = [line for line in node.log().splitlines() if "reload refused" in line]
            assert len(refused) == 1 and "nested more than 50 levels deep" in refused[0], refused
            assert "Traceback" not in node.log()
            result_file = tmp_path / "spool" / "reload-result.json"  # written after the log line
            assert wait_for(result_file.exists, 30), node.log()[-2000:]
            result = json.loads(result_file.read_text())
            assert result["ok"] is False and len(result["problems"]) == 1

            done = _reload(cfg_path)
            assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1, done.stderr
            assert "nested more than 50 levels deep" in done.stderr
            checked = subprocess.run([sys.executable, "-m", "dicom_node", "check-config", str(cfg_path)],
                                     capture_output=True, text=True, timeout=60)
            assert checked.returncode == 1 and "Traceback" not in checked.stderr + checked.stdout
            assert checked.stdout.strip().splitlines() == ["<yaml> line 1 column 58: nested more than 50 levels deep"]

            assert node.proc.poll() is None
            assert send(port, study(1), called="DR_KIM") == [0]  # the old config still serves
            assert wait_for(lambda: len(pacs.received) == 1, 30)
