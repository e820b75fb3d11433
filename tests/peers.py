"""Real, independent DICOM peers for the interop suite: Orthanc, dcmtk, dciodvfy.

Why: tests where pynetdicom talks to pynetdicom only prove we agree with ourselves.
These helpers start the programs a hospital actually runs (Orthanc as the PACS, dcmtk
``storescp`` as a second archive, dcmtk ``storescu``/``echoscu`` as the modality) on
127.0.0.1 with free ports and temporary directories, and stop them again.

Every helper finds its tool through :func:`tests.conftest.require_tool`, so a missing
tool skips the test locally and fails it under ``DICOM_NODE_INTEROP=1`` (CI).
"""
from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from tests import nodeproc
from tests.conftest import require_file, require_tool

LOOPBACK = "127.0.0.1"
# Never route loopback REST calls through an HTTP proxy from the environment.
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    """A TCP port that is free right now on loopback (the OS picks it: no clashes between runs)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 20.0, proc: subprocess.Popen | None = None) -> None:
    """Block until something accepts TCP connections on ``port`` (or fail with a clear message)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection((LOOPBACK, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {LOOPBACK}:{port} after {timeout} s")


def _stop(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if it does not exit in time; always reaps the child."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)


# --------------------------------------------------------------------------- Orthanc

ORTHANC_DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"  # Debian's orthanc-dicomweb


@dataclass
class Orthanc:
    """One Orthanc process on loopback, used as the PACS destination.

    Storage lives in ``workdir`` and survives :meth:`stop`/:meth:`start`, so a test can
    take the PACS down in the middle of a study and bring the same archive back.
    """

    workdir: Path
    ae_title: str = "ORTHANC"
    modalities: dict[str, tuple[str, str, int]] = field(default_factory=dict)  # name -> (aet, host, port)
    dicom_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    # DICOMweb (the orthanc-dicomweb plugin) at dicomweb_url; users: HTTP basic auth for the
    # REST API and DICOMweb alike (the REST helpers below log in as the first one)
    dicomweb: bool = False
    users: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    def write_config(self) -> Path:
        config = {
            "Name": "dicom-node-interop",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "DicomAet": self.ae_title,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "HttpServerEnabled": True,
            "DicomServerEnabled": True,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "UnknownSopClassAccepted": False,
            "DicomModalities": {k: list(v) for k, v in self.modalities.items()},
            "Plugins": [],
            "StableAge": 1,
            "ConcurrentJobs": 1,
            "HttpThreadsCount": 4,
            "DicomThreadsCount": 4,
            "StorageCompression": False,
            "MaximumStorageSize": 0,
            "LimitFindResults": 0,
            "SaveJobs": False,
            "OverwriteInstances": False,
        }
        if self.users:
            config.update(AuthenticationEnabled=True, RegisteredUsers=dict(self.users))
        if self.dicomweb:
            config["Plugins"] = [require_file(ORTHANC_DICOMWEB_PLUGIN, "orthanc-dicomweb")]
            config["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/", "EnableWado": False}
        self.workdir.mkdir(parents=True, exist_ok=True)
        path = self.workdir / "orthanc.json"
        path.write_text(json.dumps(config, indent=2))
        return path

    def start(self, timeout: float = 30.0) -> "Orthanc":
        exe = require_tool("Orthanc")
        config = self.write_config()
        log = open(self.workdir / "orthanc.log", "ab")
        self.proc = subprocess.Popen([exe, str(config)], stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=str(self.workdir))
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                self.get("/system")
                break
            except (OSError, urllib.error.URLError):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"Orthanc REST did not answer in {timeout} s:\n{self.log_tail()}")
                time.sleep(0.1)
        wait_for_port(self.dicom_port, timeout=max(1.0, deadline - time.monotonic()), proc=self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc)
            self.proc = None

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join((self.workdir / "orthanc.log").read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    # REST helpers (urllib only: no extra dependencies) ------------------------------
    def _request(self, path: str, data: bytes | None = None) -> urllib.request.Request:
        req = urllib.request.Request(self.url + path, data=data, method="GET" if data is None else "POST")
        if self.users:
            user, password = next(iter(self.users.items()))
            req.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
        return req

    def get(self, path: str, timeout: float = 10.0) -> Any:
        with _HTTP.open(self._request(path), timeout=timeout) as resp:
            return json.loads(resp.read())

    def post(self, path: str, body: Any, timeout: float = 30.0) -> Any:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        with _HTTP.open(self._request(path, data), timeout=timeout) as resp:
            return json.loads(resp.read())

    def get_bytes(self, path: str, timeout: float = 30.0) -> bytes:
        with _HTTP.open(self._request(path), timeout=timeout) as resp:
            return resp.read()

    def find_study(self, study_uid: str) -> str | None:
        """Orthanc's id of the study with this StudyInstanceUID, or None."""
        ids = self.post("/tools/lookup", study_uid.encode())
        for hit in ids:
            if hit.get("Type") == "Study":
                return hit["ID"]
        return None

    def sop_instance_uids(self) -> list[str]:
        """SOP Instance UIDs of every instance Orthanc stores (duplicates would show twice)."""
        uids = []
        for oid in self.get("/instances"):
            uids.append(self.get(f"/instances/{oid}/simplified-tags")["SOPInstanceUID"])
        return uids

    def instance_count(self) -> int:
        return int(self.get("/statistics")["CountInstances"])

    def study_series(self, study_uid: str) -> list[dict]:
        """Every series of the study with its main tags and instance ids."""
        sid = self.find_study(study_uid)
        if sid is None:
            return []
        return self.get(f"/studies/{sid}/series")

    def instance_tags(self, instance_id: str) -> dict:
        return self.get(f"/instances/{instance_id}/simplified-tags")

    def instance_file(self, instance_id: str) -> bytes:
        return self.get_bytes(f"/instances/{instance_id}/file")

    def wait_for_instances(self, count: int, timeout: float, where: str = "/statistics") -> int:
        """Poll until Orthanc holds at least ``count`` instances; returns the final count."""
        deadline = time.monotonic() + timeout
        n = self.instance_count()
        while n < count and time.monotonic() < deadline:
            time.sleep(0.25)
            n = self.instance_count()
        return n


# --------------------------------------------------------------------------- dcmtk


@dataclass
class StoreSCP:
    """dcmtk ``storescp`` writing every received object to ``out_dir`` (a second archive)."""

    out_dir: Path
    ae_title: str = "STORESCP"
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    def start(self) -> "StoreSCP":
        exe = require_tool("storescp")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        # +xa: accept all supported transfer syntaxes; -uf: name files by SOP Instance UID
        # (a duplicate delivery overwrites, so duplicates are counted via the log instead).
        self.proc = subprocess.Popen(
            [exe, "-aet", self.ae_title, "+xa", "-od", str(self.out_dir), "-uf", "-v", str(self.port)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        log.close()
        wait_for_port(self.port, proc=self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc)
            self.proc = None

    def files(self) -> list[Path]:
        return sorted(p for p in self.out_dir.iterdir() if p.is_file() and not p.name.startswith("."))

    @property
    def log_path(self) -> Path:
        return self.out_dir.parent / f"storescp-{self.port}.log"

    def store_requests(self) -> int:
        """C-STORE requests received so far, duplicates included (files are named by UID,
        so a duplicate would overwrite its file: count it from the log instead)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return 0
        return sum("Received Store Request" in line for line in text.splitlines())


# dcmtk names of the transfer syntaxes a modality may send (used in storescu's -xf profile).
DCMTK_SYNTAX_NAMES = {
    "1.2.840.10008.1.2.1": "LittleEndianExplicit",
    "1.2.840.10008.1.2": "LittleEndianImplicit",
    "1.2.840.10008.1.2.4.70": "JPEGLossless:Non-hierarchical-1stOrderPrediction",
    "1.2.840.10008.1.2.4.80": "JPEGLSLossless",
    "1.2.840.10008.1.2.4.90": "JPEG2000LosslessOnly",
    "1.2.840.10008.1.2.5": "RLELossless",
}


def storescu_profile(path: Path, files: Iterable[Path | str]) -> tuple[Path, str]:
    """An association profile for storescu proposing, per SOP class, each file's own syntax.

    Why: plain ``storescu`` proposes uncompressed syntaxes only and cannot decompress
    JPEG itself, so it would fail on the compressed files; a modality configured like
    this sends every image exactly as encoded.  Each (SOP class, syntax) is its own
    presentation context, as many modalities do.
    """
    import pydicom

    pairs: set[tuple[str, str]] = set()
    for f in files:
        meta = pydicom.dcmread(str(f), stop_before_pixels=True).file_meta
        pairs.add((str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)))
    syntaxes = sorted({ts for _, ts in pairs})
    lines = ["[[TransferSyntaxes]]"]
    for n, ts in enumerate(syntaxes):
        lines += [f"[TS{n}]", f"TransferSyntax1 = {DCMTK_SYNTAX_NAMES.get(ts, ts)}"]
    lines += ["[[PresentationContexts]]", "[Mixed]"]
    for n, (sop, ts) in enumerate(sorted(pairs), start=1):
        lines.append(f"PresentationContext{n} = {sop}\\TS{syntaxes.index(ts)}")
    lines += ["[[Profiles]]", "[Mixed]", "PresentationContexts = Mixed"]
    path.write_text("\n".join(lines) + "\n")
    return path, "Mixed"


def storescu(files: Iterable[Path | str], port: int, called_ae: str, *, calling_ae: str = "MODALITY",
             extra: Iterable[str] = (), profile_dir: Path | None = None,
             timeout: float = 120.0) -> subprocess.CompletedProcess:
    """Send files with dcmtk ``storescu`` in one association, each in its own encoding.

    With ``profile_dir`` an association profile proposing each file's own transfer syntax
    is written there (needed for compressed files); without it storescu proposes only the
    uncompressed syntaxes (fine for uncompressed files, e.g. over TLS).
    """
    exe = require_tool("storescu")
    files = [Path(f) for f in files]
    negotiation: list[str] = []
    if profile_dir is not None:
        cfg, name = storescu_profile(Path(profile_dir) / f"storescu-{os.getpid()}-{id(files)}.cfg", files)
        negotiation = ["-xf", str(cfg), name]
    cmd = [exe, "-v", "-aet", calling_ae, "-aec", called_ae, *negotiation, *extra, LOOPBACK, str(port),
           *[str(f) for f in files]]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def echoscu(port: int, called_ae: str, *, calling_ae: str = "MODALITY", extra: Iterable[str] = (),
            timeout: float = 30.0) -> subprocess.CompletedProcess:
    """dcmtk ``echoscu`` (C-ECHO): the cheapest proof that a node still serves."""
    exe = require_tool("echoscu")
    cmd = [exe, "-aet", calling_ae, "-aec", called_ae, *extra, LOOPBACK, str(port)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def acknowledged_sop_uids(storescu_output: str, files: list[Path]) -> set[str]:
    """SOP Instance UIDs that storescu saw answered with Success, from its ``-v`` log.

    storescu logs "Sending file: F" then "Received Store Response (Success)" per file; a
    kill of the peer in between leaves the last file unacknowledged.
    """
    import pydicom

    by_name = {str(f): f for f in files}
    acked: set[str] = set()
    current: str | None = None
    for line in storescu_output.splitlines():
        if "Sending file:" in line:
            current = line.split("Sending file:", 1)[1].strip()
        elif "Received Store Response" in line and current is not None:
            if "(Success" in line:
                path = by_name.get(current, Path(current))
                acked.add(str(pydicom.dcmread(str(path), stop_before_pixels=True).SOPInstanceUID))
            current = None
    return acked


# --------------------------------------------------------------------------- dciodvfy


def dciodvfy_errors(path: Path | str) -> list[str]:
    """The ``Error`` lines dciodvfy reports for one DICOM file (an empty list means valid)."""
    exe = require_tool("dciodvfy")
    res = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=60)
    out = res.stdout + res.stderr
    return [line.strip() for line in out.splitlines() if line.strip().startswith("Error")]



# --------------------------------------------------------------------------- the node


class NodeProcess(nodeproc.NodeProcess):
    """``dicom-node serve`` as a real subprocess (kill -9 is a real kill -9), built from a dict.

    Reuses the node team's :class:`tests.nodeproc.NodeProcess` (start waits for the
    "listening on" log line); this adds the config-from-dict and the log helpers the
    interop tests use.  ``workdir`` keeps the spool, config and log across
    :meth:`kill` / :meth:`start`, like a service restart.
    """

    def __init__(self, workdir: Path, config: dict, port: int | None = None, role: str = "all") -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        port = port or free_port()
        self.config = config
        self.config.setdefault("node", {})
        self.config["node"].update({"host": LOOPBACK, "port": port})
        self.config.setdefault("storage", {"spool_dir": str(self.workdir / "spool"), "min_free_bytes": 0})
        super().__init__(self.workdir / "node.yaml", port, self.workdir / "node.log", role=role)

    def launch(self) -> "NodeProcess":
        nodeproc.write_config(self.config_path, self.config)
        super().launch()
        return self

    def kill(self) -> None:
        """kill -9: no cleanup, no flush, exactly what a power cut does to the process."""
        self.kill9()
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            try:
                self.terminate()
            except subprocess.TimeoutExpired:
                self.kill9()
            self.proc = None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        return self.log()

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def count_log(self, needle: str) -> int:
        return sum(needle in line for line in self.log_text().splitlines())


def tiny_node_config(model: Path, destinations: dict, *, called_ae: str = "DR_KIM_STYLE",
                     stable: float = 1.0, match: dict | None = None, backoff: list[float] | None = None,
                     max_attempts: int = 50) -> dict:
    """A node config for interop tests: one route to ``destinations`` with a tiny model on CPU."""
    return {
        "node": {"ae_title": "DICOMNODE", "max_associations": 16, "network_timeout": 30, "dimse_timeout": 30},
        "study_stable_seconds": stable,
        "models": {"tiny": {"path": str(model), "device": "cpu", "tile": 0}},
        "destinations": destinations,
        "routes": [{"called_ae": called_ae, "model": "tiny", "destinations": list(destinations),
                    "match": match if match is not None else {"Modality": ["CR", "DX"]}}],
        "retry": {"max_attempts": max_attempts, "backoff_seconds": backoff or [0.5, 1.0]},
        "web": None,  # no console (tests that want one set web: {port: 0})
    }


def wait_until(predicate, timeout: float, interval: float = 0.2, message: str = "condition") -> None:
    """Poll ``predicate`` until it is true; fail with ``message`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {message}")
        time.sleep(interval)
