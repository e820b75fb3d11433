"""Test certificates made with the ``openssl`` command line (no extra Python package).

``make_pki(folder)`` writes a throw-away CA, a server certificate valid for 127.0.0.1 and
localhost, a client certificate signed by the same CA, and a second "rogue" CA with its
own client certificate (for "wrong certificate is refused" tests).  EC P-256 keys keep it
fast (~50 ms per certificate).
"""
from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import require_tool


@dataclass
class PKI:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_ca: Path
    rogue_client_cert: Path
    rogue_client_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed: {proc.stderr.strip()[:500]}")


def make_ca(folder: Path, name: str) -> tuple[Path, Path]:
    """A self-signed CA certificate and key: ``(NAME.pem, NAME.key)``."""
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", key.name, "-out", cert.name, "-days", "2", "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             cwd=folder)
    return cert, key


def make_cert(folder: Path, name: str, ca: tuple[Path, Path], *, server: bool,
              subject: str | None = None) -> tuple[Path, Path]:
    """A leaf certificate signed by ``ca``: server (SAN 127.0.0.1, localhost) or client;
    ``subject`` in openssl's ``-subj`` form (default ``/CN=NAME``)."""
    cert, key, csr, ext = (folder / f"{name}.pem", folder / f"{name}.key", folder / f"{name}.csr",
                           folder / f"{name}.ext")
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", key.name, "-out", csr.name, "-subj", subject or f"/CN={name}", cwd=folder)
    usage = "serverAuth" if server else "clientAuth"
    lines = ["basicConstraints=CA:FALSE", "keyUsage=critical,digitalSignature", f"extendedKeyUsage={usage}"]
    if server:
        lines.append("subjectAltName=IP:127.0.0.1,DNS:localhost")
    ext.write_text("\n".join(lines) + "\n")
    _openssl("x509", "-req", "-in", csr.name, "-CA", ca[0].name, "-CAkey", ca[1].name, "-CAcreateserial",
             "-out", cert.name, "-days", "2", "-extfile", ext.name, cwd=folder)
    return cert, key


def make_pki(folder: Path) -> PKI:
    """Everything a TLS test needs, written into ``folder`` (skips when openssl is missing)."""
    require_tool("openssl")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ca = make_ca(folder, "ca")
    server = make_cert(folder, "server", ca, server=True)
    client = make_cert(folder, "client", ca, server=False)
    rogue = make_ca(folder, "rogue-ca")
    rogue_client = make_cert(folder, "rogue-client", rogue, server=False)
    return PKI(ca=ca[0], server_cert=server[0], server_key=server[1], client_cert=client[0], client_key=client[1],
               rogue_ca=rogue[0], rogue_client_cert=rogue_client[0], rogue_client_key=rogue_client[1])
