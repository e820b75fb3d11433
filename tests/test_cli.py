"""The ``dicom-node`` command line as an operator meets it: ports in use, one spelling per
option, help for everything, a closed pipe, a quick start without torch.

Subprocesses where the behaviour is the process's own (exit code, what reaches the
terminal, which modules a fresh interpreter imported); ports held by real sockets.
"""
from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from dicom_node.cli import build_parser, main
from tests.nodeproc import free_port, node_config, write_config

TIMEOUT = 120


def _dicom_node(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dicom_node", *args], capture_output=True, text=True,
                          timeout=TIMEOUT, **kwargs)


def _config(tmp_path: Path, model: Path, **extra) -> Path:
    cfg = node_config(tmp_path, port=extra.pop("port", free_port()), model_path=model,
                      destinations={"outbox": {"type": "folder", "path": str(tmp_path / "outbox")}},
                      routes=[{"called_ae": "KIM", "model": "tiny", "destinations": ["outbox"]}], **extra)
    return write_config(tmp_path / "node.yaml", cfg)


def _state_db(config: Path) -> Path:
    from dicom_node.config import load_config
    from dicom_node.spool import node_spool

    return node_spool(load_config(str(config))).db_path


@pytest.fixture()
def held_port():
    """A port held by a listening socket, as another program holds it."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    yield sock.getsockname()[1]
    sock.close()


# -- 1. ports in use --------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["dicom", "console", "both"])
def test_serve_with_a_port_in_use_is_one_line_exit_1_and_leaves_no_node(which, held_port, tmp_path,
                                                                          tiny_model_path):
    dicom = held_port if which in ("dicom", "both") else free_port()
    web = held_port if which == "console" else free_port()
    if which == "both":
        other = socket.socket()
        other.bind(("127.0.0.1", 0))
        other.listen(1)
        web = other.getsockname()[1]
    config = _config(tmp_path, tiny_model_path, port=dicom, web={"host": "127.0.0.1", "port": web})
    try:
        result = _dicom_node("serve", "--config", str(config))
    finally:
        if which == "both":
            other.close()
    assert result.returncode == 1, result.stderr
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr  # no traceback, no login link, no "model loaded" before it
    if which in ("dicom", "both"):
        assert f"cannot listen on 127.0.0.1:{dicom}: Address already in use" in lines[0]
    if which in ("console", "both"):
        assert f"cannot serve the console on 127.0.0.1:{web}: Address already in use" in lines[0]
    # never started: nothing recorded (no spool, so no ghost node for status or the console)
    assert not _state_db(config).exists()


def test_a_start_that_fails_after_registering_leaves_no_node_row(held_port, tmp_path, tiny_model_path,
                                                                  monkeypatch):
    """The port taken between the probe and the listener's bind (a race): the start fails
    after the node registered; its row goes, and the node on the next start is the only one."""
    import dicom_node.node as node_module
    from dicom_node.config import load_config
    from dicom_node.errors import UserError
    from dicom_node.node import Node
    from dicom_node.state import StateDB

    config = load_config(str(_config(tmp_path, tiny_model_path, port=held_port)))
    monkeypatch.setattr(node_module, "check_ports", lambda *a: None)  # the probe ran before the port was taken
    node = Node(config)
    with pytest.raises(UserError, match="cannot listen on"):
        node.start()
    node.stop()
    db = StateDB(node.spool.db_path)
    try:
        assert db.cluster.nodes() == []
    finally:
        db.close()


def test_nodes_stopped_over_an_hour_ago_leave_the_overview(tmp_path):
    from dicom_node.cluster import STOPPED_NODES_KEPT_SECONDS
    from dicom_node.state import StateDB

    t = 1_800_000_000.0
    dbs = [StateDB(tmp_path / "state.db") for _ in range(3)]
    try:
        for db, name in zip(dbs, ("stopped", "died", "up")):
            db.cluster.register_node(node_id=f"{name}.1", name=name, role="all", exclusive=False, now=t)
        dbs[0].cluster.node_stopped(now=t + 10)
        dbs[2].cluster.heartbeat(now=t + STOPPED_NODES_KEPT_SECONDS + 60)
        states = lambda now: {n["name"]: n["state"] for n in dbs[2].cluster.nodes(now=now)}  # noqa: E731
        assert states(t + 20) == {"died": "up", "stopped": "stopped", "up": "up"}
        later = states(t + STOPPED_NODES_KEPT_SECONDS + 70)
        assert later == {"died": "late", "up": "up"}  # a crash stays listed (a day), a clean stop does not
    finally:
        for db in dbs:
            db.close()


# -- 5. one spelling, described --------------------------------------------------------------
def _parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, (*path, name))


def test_every_command_has_a_description_and_every_option_a_help():
    missing = []
    for path, parser in _parsers(build_parser()):
        if not (parser.description or "").strip():
            missing.append(f"{' '.join(path) or 'dicom-node'}: no description")
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction) or action.help == argparse.SUPPRESS:
                continue
            if not (action.help or "").strip():
                missing.append(f"{' '.join(path)} {'/'.join(action.option_strings) or action.dest}: no help")
    assert missing == []
    assert len(list(_parsers(build_parser()))) >= 16  # the walk really reached the subcommands


def test_every_output_option_is_dash_o_output_and_old_spellings_still_parse():
    parser = build_parser()
    cases = [  # (command line before the output option, dest, positional arguments after it)
        (["translate", "--model", "m"], "output", ["x.dcm"]),
        (["evaluate", "--model", "m"], "output", ["pairs"]),
        (["train", "--config", "t.yaml"], "out", []),
        (["train", "export", "run"], "export_out", []),
        (["model", "init"], "out", []),
        (["demo-data"], "outdir", []),
    ]
    for head, dest, tail in cases:
        for flag in ("-o", "--output"):
            assert getattr(parser.parse_args([*head, flag, "X", *tail]), dest) == "X", (head, flag)
        helptext = _parsers_by_path(parser)[tuple(c for c in head if c in _COMMANDS)].format_help()
        assert "-o OUTDIR, --output OUTDIR" in helptext or "-o FILE, --output FILE" in helptext \
            or "-o RUN_DIR, --output RUN_DIR" in helptext, head
        assert "--out " not in helptext and "--out\n" not in helptext, head  # old spellings hidden
    # the old spellings of evaluate, train and train export keep working
    assert parser.parse_args(["evaluate", "--model", "m", "pairs", "--out", "E"]).output == "E"
    assert parser.parse_args(["train", "--config", "t.yaml", "--out", "R"]).out == "R"
    assert parser.parse_args(["train", "export", "run", "--out", "M"]).export_out == "M"


_COMMANDS = {"translate", "evaluate", "train", "export", "model", "init", "demo-data"}


def _parsers_by_path(parser):
    return dict(_parsers(parser))


def test_positional_and_option_forms_of_config_and_output(tmp_path, tiny_model_path, capsys):
    config = _config(tmp_path, tiny_model_path)
    assert main(["check-config", str(config)]) == 0
    positional = capsys.readouterr().out
    assert main(["check-config", "--config", str(config)]) == 0
    assert capsys.readouterr().out == positional and ": OK" in positional
    assert main(["check-config"]) == 1
    assert main(["check-config", str(config), "--config", str(tmp_path / "other.yaml")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "FILE is required" in err[0] and "name it once" in err[1]
    assert main(["model", "init", "--ngf", "2", "--blocks", "0", "-o", str(tmp_path / "a.safetensors")]) == 0
    assert main(["model", "init", "--ngf", "2", "--blocks", "0", str(tmp_path / "b.safetensors")]) == 0
    from safetensors.numpy import load_file

    a, b = load_file(tmp_path / "a.safetensors"), load_file(tmp_path / "b.safetensors")  # same seed, same weights
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_evaluate_preview_is_a_flag_into_the_output_folder_and_a_path_still_works(tmp_path, capsys):
    from dicom_node.demo.writer import write_demo_data

    pairs = tmp_path / "pairs"
    write_demo_data(pairs, count=0, test_count=1, size=128, seed=0, progress=False)
    assert main(["model", "init", "--ngf", "2", "--blocks", "0", "--residual", "-o", str(tmp_path / "id.safetensors")]) == 0
    base = ["evaluate", "--model", str(tmp_path / "id.safetensors"), "--no-panels", "--no-seam-check"]
    assert main([*base, "--preview", str(pairs), "-o", str(tmp_path / "e1")]) == 0  # the flag before PAIRS_DIR
    assert (tmp_path / "e1" / "preview.png").is_file()
    assert main([*base, str(pairs), "-o", str(tmp_path / "e2"), "--preview"]) == 0
    assert (tmp_path / "e2" / "preview.png").is_file()
    assert main([*base, str(pairs), "--out", str(tmp_path / "e3"), "--preview", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").is_file() and not (tmp_path / "e3" / "preview.png").exists()
    assert main([*base, "-o", str(tmp_path / "e4")]) == 1
    assert "PAIRS_DIR is required" in capsys.readouterr().err


def test_closed_pipe_ends_quietly(tmp_path, tiny_model_path):
    """``dicom-node audit | head -1`` and ``dicom-node --help | head -1``: the reader is gone."""
    from dicom_node.state import StateDB

    config = _config(tmp_path, tiny_model_path)
    db_path = _state_db(config)
    db_path.parent.mkdir(parents=True)
    StateDB(db_path).close()
    for args in (["audit", "--config", str(config)], ["--help"]):
        proc = subprocess.Popen([sys.executable, "-m", "dicom_node", *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        proc.stdout.close()  # before the command writes a byte
        err = proc.stderr.read()
        assert proc.wait(TIMEOUT) == 0, err
        assert err == "", err


# -- 6. quick start without torch ----------------------------------------------------------
NO_MODEL_COMMANDS = [
    ["--help"], ["serve", "--help"], ["status"], ["status", "--json"], ["check-config", "{config}"],
    ["check-config", "{bundled}"], ["audit"], ["retry"], ["release", "--all"], ["reload", "{config}"],
    ["hash-password"], ["translate", "--help"], ["evaluate", "--help"], ["train", "--help"], ["model", "--help"],
]


def test_commands_that_need_no_model_do_not_import_torch(tmp_path, tiny_model_path):
    """Each command's main in a fresh interpreter (one per command: an import stays imported)."""
    from dicom_node.state import StateDB

    config = _config(tmp_path, tiny_model_path)
    bundled = tmp_path / "bundled.yaml"
    bundled.write_text(config.read_text().replace(str(tiny_model_path), "default"))
    db_path = _state_db(config)
    db_path.parent.mkdir(parents=True)
    StateDB(db_path).close()
    script = ("import json, sys\nfrom dicom_node.cli import main\n"
              "try:\n    rc = main(json.loads(sys.argv[1]))\nexcept SystemExit as e:\n    rc = e.code\n"
              "print(json.dumps([rc, 'torch' in sys.modules]), file=sys.stderr)\n")
    imported = {}
    for command in NO_MODEL_COMMANDS:
        argv = [a.format(config=config, bundled=bundled) for a in command]
        if argv[0] in ("status", "audit", "retry", "release"):
            argv += ["--config", str(bundled)]  # model: default (the bundled name, as the embedded config)
        result = subprocess.run([sys.executable, "-c", script, json.dumps(argv)], input="a long enough password\n",
                                capture_output=True, text=True, timeout=TIMEOUT)
        rc, torch_imported = json.loads(result.stderr.strip().splitlines()[-1])
        assert rc in (0, 1), (command, result.stderr)
        imported[" ".join(command)] = torch_imported
    assert not any(imported.values()), imported
    # the check can fail: a command that loads a model imports torch
    result = subprocess.run([sys.executable, "-c", script, json.dumps(["model", "info", str(tiny_model_path)])],
                            capture_output=True, text=True, timeout=TIMEOUT)
    assert json.loads(result.stderr.strip().splitlines()[-1]) == [0, True]


# -- 2. make run on other ports ------------------------------------------------------------
def test_make_run_passes_other_ports_to_serve():
    root = Path(__file__).resolve().parents[1]
    dry = subprocess.run(["make", "-n", "-C", str(root), "run", "PORT=11113", "WEB_PORT=8081"], capture_output=True,
                         text=True, timeout=60)
    assert dry.returncode == 0, dry.stderr
    assert "dicom-node serve --port 11113 --web-port 8081" in dry.stdout


def test_serve_on_other_ports_runs_the_embedded_config_there(tmp_path):
    import signal
    import time
    import urllib.request

    port, web_port = free_port(), free_port()
    proc = subprocess.Popen([sys.executable, "-m", "dicom_node", "serve", "--port", str(port), "--web-port",
                             str(web_port)], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline, live = time.monotonic() + TIMEOUT, None
        while live is None and proc.poll() is None and time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    pass
                with urllib.request.urlopen(f"http://127.0.0.1:{web_port}/health/live", timeout=5) as r:
                    live = r.status
            except OSError:
                time.sleep(0.2)
        assert live == 200, proc.stderr.read() if proc.poll() is not None else "not listening"
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert f"127.0.0.1:{port}" in err and f"127.0.0.1:{web_port}" in err


def test_other_ports_are_for_the_embedded_config_only(tmp_path, tiny_model_path):
    config = _config(tmp_path, tiny_model_path)
    result = _dicom_node("serve", "--config", str(config), "--port", "11113")
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1
    assert "set node.port and web.port in the file" in result.stderr
    result = _dicom_node("serve", "--port", "8080", "--web-port", "8080")
    assert result.returncode == 1 and "cannot share port 8080" in result.stderr


def test_help_imports_no_demo_generators_and_demo_data_help_still_lists_the_style_pairs():
    """Every command builds the whole parser: demo-data's style pair list (numpy, the demo
    generators) is imported only for its own help."""
    probe = ("import sys\nfrom dicom_node.cli import build_parser\nbuild_parser()\n"
             "print(sorted(m for m in ('numpy', 'torch', 'dicom_node.demo.vendor_processing') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=TIMEOUT)
    assert result.stdout.strip() == "[]", result.stderr
    helptext = _dicom_node("demo-data", "--help").stdout
    assert "style pairs (--style-pair):" in helptext and "classic" in helptext and "(default classic" in helptext


def test_status_reads_the_database_without_pydicom_or_numpy(tmp_path, tiny_model_path):
    """status, retry, audit: SQL and text only (the spool's pydicom is for the node)."""
    from dicom_node.state import StateDB

    config = _config(tmp_path, tiny_model_path)
    db_path = _state_db(config)
    db_path.parent.mkdir(parents=True)
    StateDB(db_path).close()
    probe = ("import sys\nfrom dicom_node.cli import main\nrc = main(sys.argv[1:])\n"
             "print(rc, sorted(m for m in ('numpy', 'pydicom', 'torch') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe, "status", "--config", str(config)], capture_output=True,
                            text=True, timeout=TIMEOUT)
    assert result.stdout.strip().splitlines()[-1] == "0 []", result.stdout + result.stderr


def test_a_usage_error_is_exit_1_not_the_internal_error_code():
    result = _dicom_node("status", "--no-such-option")
    assert result.returncode == 1 and "unrecognized arguments: --no-such-option" in result.stderr
    assert _dicom_node("--help").returncode == 0
