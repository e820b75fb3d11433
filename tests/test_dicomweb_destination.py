"""The ``dicomweb`` destination kind: its config (secrets never in the URL or the output),
check-config reaching the archive, and the node delivering restyled series over STOW-RS to
Debian's Orthanc with its DICOMweb plugin and basic auth (shown by the console, counted by
/metrics), also when Orthanc goes down in the middle of a study (retries, then each
instance exactly once).
"""
from __future__ import annotations

import re
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from dicom_node.config import ConfigError, load_config
from dicom_node.web.auth import hash_password
from tests.peers import NodeProcess, Orthanc, acknowledged_sop_uids, free_port, storescu, tiny_node_config, wait_until
from tests.test_interop_faults import assert_exactly_once, make_study, sc_references

PASSWORD = "s3cret-for-orthanc"
CONSOLE_PASSWORD = "console password"
CALLED = "DR_KIM_STYLE"
SC_STORAGE = "1.2.840.10008.5.1.4.1.1.7"


def write_config(folder: Path, destination: dict, model: str = "default") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"storage": {"spool_dir": str(folder / "spool")}, "models": {"m": {"path": model}},
           "destinations": {"archive": destination},
           "routes": [{"called_ae": CALLED, "model": "m", "destinations": ["archive"]}], "web": None}
    path = folder / "node.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def problems_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value.problems


def check_config(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dicom_node", "check-config", str(path)],
                          capture_output=True, text=True, timeout=120)


# ------------------------------------------------------------------------------- config


def test_config_with_basic_auth_and_tls_parses_and_shows_no_secret(tmp_path):
    (tmp_path / "pw").write_text("hunter2\n")
    path = write_config(tmp_path, {"type": "dicomweb", "url": "https://pacs.example.org:8443/dicom-web",
                                   "auth": {"basic": {"user": "node", "password_file": "pw"}},
                                   "tls": {"verify": True}, "max_request_bytes": 1000000, "timeout": 20})
    cfg = load_config(path)
    dest = cfg.destinations["archive"]
    assert (dest.type, dest.url, dest.auth.user, dest.auth.password_file) == (
        "dicomweb", "https://pacs.example.org:8443/dicom-web", "node", tmp_path / "pw")
    assert (dest.max_request_bytes, dest.timeout, dest.tls.verify) == (1000000, 20, True)
    from dicom_node.commands.check_config import summary

    text = "\n".join(summary(cfg))
    assert "archive (dicomweb STOW-RS https://pacs.example.org:8443, basic auth as node)" in text
    assert "hunter2" not in text


def test_config_mistakes_are_named_by_their_yaml_path(tmp_path, monkeypatch):
    monkeypatch.delenv("NO_SUCH_TOKEN_VAR", raising=False)
    cases = [
        ({"url": "https://node:pw@pacs/dicom-web"},
         "destinations.archive.url: credentials in the URL are not allowed (they would end up in logs): use auth"),
        ({"url": "https://pacs/dicom-web", "auth": {"bearer_file": "t", "bearer_env": "X"}},
         "destinations.archive.auth: give exactly one of basic, bearer_file or bearer_env"),
        ({"url": "https://pacs/dicom-web", "auth": {"basic": {"user": "node", "password_file": "missing"}}},
         f"destinations.archive.auth.basic.password_file: cannot read {tmp_path / 'missing'}"),
        ({"url": "https://pacs/dicom-web", "auth": {"bearer_env": "NO_SUCH_TOKEN_VAR"}},
         "destinations.archive.auth.bearer_env: environment variable NO_SUCH_TOKEN_VAR is not set"),
        ({"url": "https://pacs/dicom-web", "tls": {"cert": "c.pem"}},
         "destinations.archive.tls: cert and key go together (our client certificate)"),
        ({"url": "http://pacs/dicom-web", "max_request_bytes": 0},
         "destinations.archive.max_request_bytes"),
    ]
    for i, (spec, expected) in enumerate(cases):
        problems = problems_of(write_config(tmp_path, {"type": "dicomweb", **spec}))
        assert any(p.startswith(expected) for p in problems), (i, problems)
        assert not any("pw@" in p for p in problems)


def test_check_config_reports_an_unreachable_base_url_and_serve_config_still_loads(tmp_path):
    port = free_port()
    path = write_config(tmp_path, {"type": "dicomweb", "url": f"http://127.0.0.1:{port}/dicom-web", "timeout": 5})
    load_config(path)  # the node starts (and queues) while the archive is down
    proc = check_config(path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert (f"destinations.archive.url: cannot reach the archive: cannot connect to http://127.0.0.1:{port} "
            "(refused)") in proc.stdout


# ------------------------------------------------------------------- the node and Orthanc


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    pacs = Orthanc(tmp_path_factory.mktemp("orthanc-stow"), dicomweb=True, users={"node": PASSWORD})
    pacs.start()
    yield pacs
    pacs.stop()


def dicomweb_destination(orthanc: Orthanc, folder: Path) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    secret = folder / "orthanc-password"
    secret.write_text(PASSWORD + "\n")
    return {"archive": {"type": "dicomweb", "url": orthanc.dicomweb_url, "timeout": 10,
                        "auth": {"basic": {"user": "node", "password_file": str(secret)}}}}


def console_overview(url: str) -> str:
    """The console's overview page after logging in as alice."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPCookieProcessor())
    html = opener.open(url + "/login", timeout=15).read().decode()
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)
    form = urllib.parse.urlencode({"csrf_token": csrf, "user": "alice", "password": CONSOLE_PASSWORD, "next": "/"})
    return opener.open(url + "/login", data=form.encode(), timeout=15).read().decode()


def metric(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        m = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
        if m and ",".join(sorted(m.group(1).split(","))) == want:
            return float(m.group(2))
    return 0.0


@pytest.mark.interop
def test_restyled_series_arrives_in_orthanc_over_stow_rs_with_basic_auth(orthanc, tmp_path, tiny_model_path):
    study, files = make_study(tmp_path / "study", 3)
    cfg = tiny_node_config(tiny_model_path, dicomweb_destination(orthanc, tmp_path), stable=0.5)
    web_port = free_port()
    cfg["web"] = {"host": "127.0.0.1", "port": web_port, "users": {"alice": hash_password(CONSOLE_PASSWORD)}}
    node = NodeProcess(tmp_path / "node", cfg).start()
    try:
        sent = storescu(files, node.port, CALLED)
        assert sent.returncode == 0, sent.stderr[-2000:]
        wait_until(lambda: len(sc_references(orthanc, study)) >= 3, timeout=60,
                   message=f"3 SC in Orthanc over STOW-RS\n{node.log_tail()}")
        acked = acknowledged_sop_uids(sent.stdout + sent.stderr, files)
        assert_exactly_once(orthanc, study, acked, acked)
        sid = orthanc.find_study(study)
        classes = {orthanc.instance_tags(i["ID"])["SOPClassUID"] for i in orthanc.get(f"/studies/{sid}/instances")}
        assert classes == {SC_STORAGE}  # only the restyled series: originals are not forwarded
        # metrics count the deliveries to a DICOMweb destination like any other
        def delivered() -> float:
            with urllib.request.urlopen(f"http://127.0.0.1:{web_port}/metrics", timeout=10) as resp:
                return metric(resp.read().decode(), "dicom_node_deliveries_total", destination="archive",
                              outcome="delivered")
        wait_until(lambda: delivered() == 3, timeout=20, message="3 deliveries counted")
        assert PASSWORD not in node.log_text()
        # the console's overview describes the destination in its kind's words
        table = console_overview(f"http://127.0.0.1:{web_port}")
        table = table[table.index('id="destinations"'):]
        assert re.search(rf"<td>archive</td><td>STOW-RS http://127.0.0.1:{orthanc.http_port}, basic auth as node</td>",
                         table), table[:600]
    finally:
        node.stop()


@pytest.mark.interop
def test_orthanc_down_mid_study_then_back_delivers_each_instance_once(orthanc, tmp_path, tiny_model_path):
    study, files = make_study(tmp_path / "study", 6)
    node = NodeProcess(tmp_path / "node", tiny_node_config(
        tiny_model_path, dicomweb_destination(orthanc, tmp_path), stable=0.5, backoff=[0.5, 1.0])).start()
    try:
        first = storescu(files[:3], node.port, CALLED)
        assert first.returncode == 0, first.stderr[-2000:]
        orthanc.stop()  # the archive goes away in the middle of the study
        second = storescu(files[3:], node.port, CALLED)
        assert second.returncode == 0, second.stderr[-2000:]
        acked = acknowledged_sop_uids(first.stdout + first.stderr, files) | acknowledged_sop_uids(
            second.stdout + second.stderr, files)
        assert len(acked) == 6
        wait_until(lambda: node.count_log("to retry") >= 2, timeout=60,
                   message=f"failed STOW-RS attempts\n{node.log_tail()}")
        assert "(refused)" in node.log_text()
        orthanc.start()
        wait_until(lambda: len(sc_references(orthanc, study)) >= 6, timeout=60,
                   message=f"delivery after Orthanc came back\n{node.log_tail()}")
        assert_exactly_once(orthanc, study, acked, acked)
    finally:
        node.stop()
        if orthanc.proc is None:
            orthanc.start()
