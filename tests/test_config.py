"""Node config validation and ``dicom-node check-config``.

Why: a node that starts with a typo in its config routes studies to the wrong place or
nowhere.  Every problem must be reported at once, each with the YAML path that points at
it, and the shipped example must always validate.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dicom_node.cli import main
from dicom_node.config import (
    STYLE_MODEL_FORMAT,
    ConfigError,
    NodeConfig,
    ae_title_problem,
    load_config,
    parse_config,
)

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "config" / "node.example.yaml"


@pytest.fixture()
def base(tmp_path, tiny_model_path) -> Path:
    """A config folder holding a real (tiny) style model under models/."""
    (tmp_path / "models").mkdir()
    shutil.copy(tiny_model_path, tmp_path / "models" / "soft.safetensors")
    shutil.copy(tiny_model_path, tmp_path / "models" / "sharp.safetensors")
    return tmp_path


def valid_raw() -> dict:
    return {
        "node": {"ae_title": "DICOMNODE", "host": "127.0.0.1", "port": 11112, "max_associations": 4},
        "storage": {"spool_dir": "spool"},
        "study_stable_seconds": 5,
        "models": {
            "soft": {"path": "models/soft.safetensors", "device": "cpu", "tile": 256, "overlap": 0.25},
            "sharp": {"path": "models/sharp.safetensors"},
        },
        "destinations": {
            "pacs": {"type": "dicom", "ae_title": "PACS", "host": "127.0.0.1", "port": 4242},
            "outbox": {"type": "folder", "path": "outbox"},
        },
        "routes": [
            {"called_ae": "DR_KIM_STYLE", "model": "soft", "destinations": ["pacs"],
             "calling_ae": ["CR_ROOM1"], "match": {"Modality": ["CR", "DX"]}, "forward_original": False},
            {"called_ae": "DR_LEE_STYLE", "model": "sharp", "destinations": ["pacs", "outbox"]},
            {"called_ae": "DR_PARK_STYLE", "model": "soft", "destinations": ["outbox"]},
        ],
        "retry": {"max_attempts": 3, "backoff_seconds": [1, 2]},
    }


def problems_of(raw, base_dir: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(raw, base_dir=base_dir, source="test.yaml")
    return info.value.problems


def test_valid_config_loads_with_types_and_resolved_paths(base):
    cfg = parse_config(valid_raw(), base_dir=base, source="test.yaml")
    assert isinstance(cfg, NodeConfig)
    assert cfg.node.port == 11112 and cfg.node.max_associations == 4 and cfg.node.tls is None
    assert cfg.storage.spool_dir == base / "spool"
    assert Path(cfg.models["soft"].path) == base / "models" / "soft.safetensors"
    assert cfg.models["soft"].tile == 256 and cfg.models["sharp"].tile is None
    assert cfg.destinations["outbox"].path == base / "outbox"
    assert cfg.destinations["pacs"].port == 4242
    assert cfg.destinations["pacs"].calling_ae == "DICOMNODE"  # defaults to the node's AE title
    assert [r.called_ae for r in cfg.routes] == ["DR_KIM_STYLE", "DR_LEE_STYLE", "DR_PARK_STYLE"]
    assert cfg.routes[0].calling_ae == ["CR_ROOM1"] and cfg.routes[0].match == {"Modality": ["CR", "DX"]}
    assert cfg.routes[1].calling_ae is None and cfg.routes[1].destinations == ["pacs", "outbox"]
    assert cfg.retry.backoff_seconds == [1.0, 2.0] and cfg.retry.delay(5) == 2.0
    assert cfg.study_stable_seconds == 5.0 and cfg.source == "test.yaml"


def _set(raw: dict, path: list, value) -> None:
    target = raw
    for key in path[:-1]:
        target = target[key]
    if value is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value


_DELETE = object()

CASES = [
    (["node", "prot"], 1, "node.prot: unknown key"),
    (["node", "port"], 70000, "node.port: must be 1..65535"),
    (["node", "port"], 0, "node.port: must be 1..65535"),
    (["node", "port"], "11112", "node.port: must be an integer, not a string"),
    (["node", "port"], True, "node.port: must be an integer, not a boolean"),
    (["node", "ae_title"], "A" * 17, "node.ae_title: AE title 'AAAAAAAAAAAAAAAAA' is longer than 16 characters"),
    (["node", "ae_title"], "   ", "node.ae_title: AE title is empty"),
    (["node", "max_associations"], 0, "node.max_associations: must be >= 1"),
    (["node", "acse_timeout"], 0, "node.acse_timeout: must be > 0"),
    (["node", "tls"], {"cert": "nope.pem"}, "node.tls.key: required key missing"),
    (["node", "tls"], {"cert": "nope.pem", "key": "nope.key"}, "node.tls.cert: file not found: "),
    (["storage", "spool"], "x", "storage.spool: unknown key"),
    (["study_stable_seconds"], -1, "study_stable_seconds: must be >= 0"),
    (["workers"], 0, "workers: must be >= 1"),
    (["extra"], 1, "extra: unknown key"),
    (["models", "soft", "path"], "models/missing.safetensors", "models.soft.path: file not found: "),
    (["models", "soft", "path"], _DELETE, "models.soft.path: required key missing"),
    (["models", "soft", "device"], "gpu", "models.soft.device: must be auto, cpu, cuda, cuda:N or mps"),
    (["models", "soft", "tile"], 16, "models.soft.tile: must be 0 (whole image) or >= 64 pixels"),
    (["models", "soft", "overlap"], 1.0, "models.soft.overlap: must be >= 0 and < 1"),
    (["models", "soft", "colour"], "red", "models.soft.colour: unknown key"),
    (["models"], [], "models: must be a mapping, not a list"),
    (["destinations", "pacs", "type"], "ftp", "destinations.pacs.type: must be dicom, dicomweb or folder, not 'ftp'"),
    (["destinations", "pacs", "type"], _DELETE, "destinations.pacs.type: required key missing"),
    (["destinations", "pacs", "port"], _DELETE, "destinations.pacs.port: required key missing"),
    (["destinations", "pacs", "port"], -5, "destinations.pacs.port: must be 1..65535"),
    (["destinations", "pacs", "ae_title"], "PA\\CS",
     "destinations.pacs.ae_title: AE title 'PA\\\\CS' contains a backslash"),
    (["destinations", "pacs", "path"], "/x", "destinations.pacs.path: unknown key"),
    (["destinations", "pacs", "timeout"], 0, "destinations.pacs.timeout: must be > 0"),
    (["destinations", "pacs", "tls"], {"ca": "missing-ca.pem"}, "destinations.pacs.tls.ca: file not found: "),
    (["destinations", "outbox", "path"], _DELETE, "destinations.outbox.path: required key missing"),
    (["destinations", "outbox", "host"], "x", "destinations.outbox.host: unknown key"),
    (["routes", 1, "model"], "soft2", "routes[1].model: unknown model 'soft2'"),
    (["routes", 1, "destinations"], ["pacs", "nowhere"], "routes[1].destinations[1]: unknown destination 'nowhere'"),
    (["routes", 1, "destinations"], [], "routes[1].destinations: at least one destination is required"),
    (["routes", 2, "called_ae"], "DR_LEE_STYLE", "routes[2].called_ae: duplicate AE title 'DR_LEE_STYLE'"),
    (["routes", 2, "called_ae"], "BAD\x01AE", "routes[2].called_ae: AE title 'BAD\\x01AE' contains control characters"),
    (["routes", 2, "called_ae"], "", "routes[2].called_ae: AE title is empty"),
    (["routes", 2, "called_ae"], 42, "routes[2].called_ae: AE title must be a string, not an integer"),
    (["routes", 2, "called_ae"], _DELETE, "routes[2].called_ae: required key missing"),
    (["routes", 0, "calling_ae"], ["CR_ROOM1", "X" * 20], "routes[0].calling_ae[1]: AE title"),
    (["routes", 0, "match"], {"Modallity": ["CR"]}, "routes[0].match.Modallity: unknown DICOM keyword 'Modallity'"),
    (["routes", 0, "forward_original"], "yes", "routes[0].forward_original: must be true or false, not a string"),
    (["routes", 0, "modle"], "soft", "routes[0].modle: unknown key"),
    (["routes"], {}, "routes: must be a list, not a mapping"),
    (["routes"], [], "routes: at least one route is required"),
    (["destinations", "pacs"], {"type": "dicom", "ae_title": "DR_LEE_STYLE", "host": "localhost", "port": 11112},
     "destinations.pacs: sends back to this node's own route 'DR_LEE_STYLE' (an endless loop)"),
    (["destinations", "outbox", "path"], "spool/outbox", "destinations.outbox.path: overlaps storage.spool_dir"),
    (["destinations", "outbox", "path"], ".", "destinations.outbox.path: overlaps storage.spool_dir"),
    (["retry", "max_attempts"], 0, "retry.max_attempts: must be >= 1"),
    (["retry", "backoff_seconds"], [5, -1], "retry.backoff_seconds[1]: must be >= 0"),
    (["retry", "backoff_seconds"], [], "retry.backoff_seconds: must be a non-empty list of seconds"),
    (["retry", "max_attemps"], 3, "retry.max_attemps: unknown key"),
]


@pytest.mark.parametrize("path,value,expected", CASES,
                         ids=[c[2].split(":")[0] + "-" + str(i) for i, c in enumerate(CASES)])
def test_each_problem_is_reported_with_its_path(base, path, value, expected):
    raw = valid_raw()
    _set(raw, path, value)
    problems = problems_of(raw, base)
    assert any(p.startswith(expected) for p in problems), problems


def test_routes_may_share_a_called_ae_unless_one_is_shadowed(base):
    """Several routes per called AE are fine (first match wins); an unreachable one is not."""
    raw = valid_raw()
    kim = {"called_ae": "DR_KIM_STYLE", "destinations": ["pacs"]}
    raw["routes"] = [
        {**kim, "model": "soft", "match": {"Modality": ["CR"]}},
        {**kim, "model": "sharp", "match": {"Modality": ["DX"]}},                  # other modality
        {**kim, "model": "sharp", "calling_ae": ["ROOM2"]},                         # other sender
        {**kim, "model": "soft"},                                                   # catch-all last
    ]
    cfg = parse_config(raw, base_dir=base)
    assert [r.model for r in cfg.routes] == ["soft", "sharp", "sharp", "soft"]

    shadowed = [
        ({"calling_ae": None, "match": {}}, {"match": {"Modality": ["CR"]}}),        # catch-all first
        ({"match": {"Modality": ["CR", "DX"]}}, {"match": {"Modality": ["cr"]}}),    # values are a subset
        ({"calling_ae": ["A", "B"]}, {"calling_ae": ["A"], "match": {"BodyPartExamined": ["CHEST"]}}),
        ({"match": {"Modality": ["CR"]}}, {"match": {"Modality": ["CR"]}}),          # identical
    ]
    for first, later in shadowed:
        raw["routes"] = [{**kim, "model": "soft", **{k: v for k, v in first.items() if v is not None}},
                         {**kim, "model": "sharp", **later}]
        problems = problems_of(raw, base)
        assert problems and problems[0].startswith("routes[1].called_ae: duplicate AE title 'DR_KIM_STYLE'"), \
            (first, later, problems)


def test_every_problem_is_reported_at_once(base):
    raw = valid_raw()
    raw["node"]["port"] = 0
    raw["node"]["prot"] = 1
    raw["routes"][1]["model"] = "soft2"
    raw["routes"][2]["called_ae"] = "DR_LEE_STYLE"
    raw["models"]["sharp"]["path"] = "missing.safetensors"
    problems = problems_of(raw, base)
    assert len(problems) == 5, problems
    with pytest.raises(ConfigError) as info:
        parse_config(raw, base_dir=base, source="x.yaml")
    assert str(info.value).startswith("x.yaml: 5 problem(s)")


def test_required_top_level_keys_and_empty_document(base):
    assert sorted(problems_of({"node": {}}, base)) == [
        "destinations: required key missing", "models: required key missing", "routes: required key missing"]
    assert problems_of(None, base) == ["<root>: the config is empty"]
    assert problems_of([1, 2], base) == ["<root>: must be a mapping, not a list"]


def test_folders_that_cannot_be_written_are_reported(base):
    (base / "afile").write_text("x")
    raw = valid_raw()
    raw["storage"]["spool_dir"] = "afile/spool"
    raw["destinations"]["outbox"]["path"] = "/proc/dicom-node-outbox"  # cannot be created, even by root
    problems = problems_of(raw, base)
    assert any(p.startswith("storage.spool_dir: not a folder") for p in problems), problems
    assert any(p.startswith("destinations.outbox.path: not writable") for p in problems), problems


def test_model_file_must_be_a_style_model(base):
    (base / "models" / "weights.bin").write_bytes(b"\x00" * 100)
    raw = valid_raw()
    raw["models"]["soft"]["path"] = "models/weights.bin"
    [problem] = problems_of(raw, base)
    assert problem.startswith("models.soft.path: not a style model file"), problem


def test_style_model_format_matches_the_engine():
    from dicom_node.engine.model_file import FORMAT

    assert STYLE_MODEL_FORMAT == FORMAT


def test_bundled_model_names(base):
    from dicom_node.engine.model_file import bundled_model_path

    raw = valid_raw()
    raw["models"]["soft"]["path"] = "no_such_bundled_model"
    [problem] = problems_of(raw, base)
    assert problem.startswith("models.soft.path: bundled model 'no_such_bundled_model' not found"), problem

    raw["models"]["soft"]["path"] = "default"
    if bundled_model_path("default").is_file():
        assert parse_config(raw, base_dir=base).models["soft"].path == "default"
    else:
        assert problems_of(raw, base)[0].startswith("models.soft.path: bundled model 'default' not found")


def test_absolute_paths_ignore_base_dir(base):
    raw = valid_raw()
    for name in ("soft", "sharp"):
        raw["models"][name]["path"] = str(base / "models" / f"{name}.safetensors")
    raw["storage"]["spool_dir"] = str(base / "abs-spool")
    raw["destinations"]["outbox"]["path"] = str(base / "abs-outbox")
    cfg = parse_config(raw, base_dir=Path("/nonexistent"), source="t")
    assert cfg.storage.spool_dir == base / "abs-spool"
    assert cfg.destinations["outbox"].path == base / "abs-outbox"
    assert Path(cfg.models["sharp"].path) == base / "models" / "sharp.safetensors"


def test_validation_does_not_create_folders(base):
    cfg = parse_config(valid_raw(), base_dir=base)
    assert not cfg.storage.spool_dir.exists() and not cfg.destinations["outbox"].path.exists()
    assert sorted(p.name for p in base.iterdir()) == ["models"]


def test_ae_title_rules():
    assert ae_title_problem("DR_KIM_STYLE") is None
    assert ae_title_problem("A" * 16) is None
    for bad in ["", " ", "A" * 17, "A\\B", "A\nB", "ÄRZTIN", None, 7]:
        assert ae_title_problem(bad), bad


def _write(base: Path, raw, name="node.yaml") -> Path:
    path = base / name
    path.write_text(yaml.safe_dump(raw) if not isinstance(raw, str) else raw)
    return path


def test_load_config_reports_duplicate_keys_and_yaml_errors(base):
    text = yaml.safe_dump(valid_raw()).replace("port: 11112", "port: 11112\n  port: 11113")
    with pytest.raises(ConfigError) as info:
        load_config(_write(base, text))
    assert len(info.value.problems) == 1 and "duplicate key 'port'" in info.value.problems[0]

    with pytest.raises(ConfigError) as info:
        load_config(_write(base, "routes: [\n"))
    assert info.value.problems[0].startswith("<yaml> line 2")


def test_check_config_cli_ok(base, capsys):
    path = _write(base, valid_raw())
    assert main(["check-config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "OK" in out.splitlines()[0]
    assert "DR_KIM_STYLE -> model soft" in out and "pacs (dicom PACS@127.0.0.1:4242)" in out


def test_check_config_cli_prints_one_line_per_problem(base, capsys):
    raw = valid_raw()
    raw["node"]["port"] = 0
    raw["routes"][1]["model"] = "soft2"
    raw["routes"][2]["called_ae"] = "DR_LEE_STYLE"
    assert main(["check-config", str(_write(base, raw))]) == 1
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [
        "node.port: must be 1..65535",
        "routes[1].model: unknown model 'soft2'",
        "routes[2].called_ae: duplicate AE title 'DR_LEE_STYLE': routes[1] already takes every instance "
        "this route would (give it a narrower calling_ae/match or remove one)",
    ]
    assert "3 problem(s)" in captured.err


def test_check_config_cli_missing_file_is_a_user_error(base, capsys):
    assert main(["check-config", str(base / "nope.yaml")]) == 1
    assert "cannot read config" in capsys.readouterr().err


def test_check_config_entry_point_exit_codes(base):
    good = _write(base, valid_raw(), "good.yaml")
    bad_raw = valid_raw()
    bad_raw["node"]["prot"] = 1
    bad = _write(base, bad_raw, "bad.yaml")
    cmd = [sys.executable, "-m", "dicom_node", "check-config"]
    ok = subprocess.run(cmd + [str(good)], capture_output=True, text=True, timeout=60)
    fail = subprocess.run(cmd + [str(bad)], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert fail.returncode == 1 and fail.stdout.strip() == "node.prot: unknown key"
    assert "Traceback" not in fail.stderr


def test_example_config_validates(tmp_path, tiny_model_path, capsys):
    """The shipped example, verbatim except for its server folders, passes check-config.

    /var/lib/dicom-node exists on an installed server only, so the test points it into a
    temporary folder; the model files the example names are created as real tiny models.
    """
    text = EXAMPLE.read_text()
    assert "/var/lib/dicom-node" in text
    config = tmp_path / "etc" / "node.yaml"
    config.parent.mkdir()
    config.write_text(text.replace("/var/lib/dicom-node", str(tmp_path / "var")))
    raw = yaml.safe_load(text)
    for spec in raw["models"].values():
        if spec["path"] != "default":
            target = config.parent / spec["path"]
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(tiny_model_path, target)
    assert main(["check-config", str(config)]) == 0, capsys.readouterr().out
    cfg = load_config(config)
    assert len(cfg.routes) >= 3 and {d.type for d in cfg.destinations.values()} == {"dicom", "folder"}
    assert all(r.called_ae.endswith("_STYLE") for r in cfg.routes)
    assert cfg.node.tls is None  # TLS is shown commented out



UNIT = REPO / "systemd" / "dicom-node.service"


def _unit_settings(text: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "[")) and "=" in line:
            key, value = line.split("=", 1)
            settings.setdefault(key, []).append(value)
    return settings


def test_systemd_unit_is_hardened_and_runs_the_node():
    s = _unit_settings(UNIT.read_text())
    assert s["ExecStart"] == ["/opt/dicom-node/.venv/bin/dicom-node serve --config /etc/dicom-node/config.yaml"]
    # systemctl reload: validate and apply without a restart (an invalid config fails the reload)
    assert s["ExecReload"] == ["/opt/dicom-node/.venv/bin/dicom-node reload --config /etc/dicom-node/config.yaml"]
    assert s["User"] == ["dicom-node"] and s["Restart"] == ["on-failure"]
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
                       "PrivateTmp": "yes", "CapabilityBoundingSet": "", "AmbientCapabilities": "",
                       "StateDirectory": "dicom-node", "UMask": "0077", "TimeoutStopSec": "30",
                       "KillSignal": "SIGTERM"}.items():
        assert s.get(key) == [value], key
    assert "/var/lib/dicom-node" in s["ReadWritePaths"][0]
    # the GPU must stay reachable: no PrivateDevices=yes without a DeviceAllow for nvidia
    assert s.get("PrivateDevices", ["no"]) == ["no"] and any("nvidia" in v for v in s["DeviceAllow"])


def test_systemd_unit_passes_systemd_analyze_verify(tmp_path):
    """``systemd-analyze verify`` on the unit, pointed at this checkout's executable.

    Unknown or misspelt directives are only warnings for systemd, so the output must be clean too.
    """
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed")
    exe = Path(sys.executable).with_name("dicom-node")
    if not exe.exists():
        pytest.skip("dicom-node entry point not installed next to this Python")
    unit = tmp_path / "dicom-node.service"
    unit.write_text(UNIT.read_text().replace("/opt/dicom-node/.venv/bin/dicom-node", str(exe)))
    proc = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    output = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0 and ("Failed to connect" in output or "System has not been booted" in output):
        pytest.skip(f"systemd-analyze cannot run here: {output.splitlines()[0]}")
    assert proc.returncode == 0, output
    assert not [line for line in output.splitlines() if "dicom-node.service" in line], output


def test_tls_files_are_loaded_by_check_config(base):
    """Valid certificates load; a key that belongs to another certificate is found before serving."""
    from tests.certs import make_pki

    pki = make_pki(base / "pki")
    raw = valid_raw()
    raw["node"]["tls"] = {"cert": str(pki.server_cert), "key": str(pki.server_key), "ca": str(pki.ca),
                          "require_client_cert": True}
    raw["destinations"]["pacs"]["tls"] = {"ca": str(pki.ca), "cert": str(pki.client_cert),
                                          "key": str(pki.client_key)}
    cfg = parse_config(raw, base_dir=base)
    assert cfg.node.tls.require_client_cert and cfg.node.tls.ca == pki.ca
    assert cfg.destinations["pacs"].tls.cert == pki.client_cert

    raw["node"]["tls"]["key"] = str(pki.client_key)  # not the server certificate's key
    raw["destinations"]["pacs"]["tls"]["ca"] = str(pki.client_key)  # not a certificate
    problems = problems_of(raw, base)
    assert any(p.startswith("node.tls: cannot load certificate") for p in problems), problems
    assert any(p.startswith("destinations.pacs.tls: cannot load CA") for p in problems), problems
    assert len(problems) == 2


def test_webhook_url_with_credentials_is_refused_without_echoing_it(base, capsys):
    """check-config: one line naming the YAML path, pointing at secret/headers, and never the
    password itself (the terminal, CI logs); headers are checked and their values not echoed."""
    raw = valid_raw()
    raw["notifications"] = [
        {"url": "https://hook.example/ok", "headers": {"Authorization": "Bearer tok-OK"}},
        {"url": "http://ops:hunter2-pw@hook.example/in"},
        {"url": "ftp://hook.example/x?token=hunter3-pw"},
        {"url": "https://hook.example/y", "headers": {"X-Token": "hunter4-pw\r\nX-Evil: 1", "bad name": "v"}},
    ]
    assert main(["check-config", str(_write(base, raw))]) == 1
    out = capsys.readouterr().out
    assert out.splitlines() == [
        "notifications[1].url: credentials in the URL are not allowed (they would end up in logs): "
        "use the webhook's secret or headers (e.g. Authorization)",
        "notifications[2].url: must be an http:// or https:// URL with a host",
        "notifications[3].headers.X-Token: must be text on one line",
        "notifications[3].headers.bad name: not a valid HTTP header name",
    ], out
    assert "hunter" not in out
    del raw["notifications"][1:]
    hook = parse_config(raw, base_dir=base).notifications[0]
    assert hook.headers == {"Authorization": "Bearer tok-OK"} and "tok-OK" not in repr(hook)


def test_check_config_names_a_webhook_by_its_host_only(base, capsys):
    """A token in a webhook's path or query never reaches the terminal or CI logs."""
    raw = valid_raw()
    raw["notifications"] = [{"url": "https://hook.example:8443/in/tok-SECRET-1?key=tok-SECRET-2"}]
    assert main(["check-config", str(_write(base, raw))]) == 0
    out = capsys.readouterr().out
    assert "webhook" in out and "https://hook.example:8443 on" in out and "tok-SECRET" not in out, out
