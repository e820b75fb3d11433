"""The ``dicomweb`` destination kind: STOW-RS to a DICOMweb archive (Orthanc's DICOMweb plugin,
dcm4chee-arc, a cloud DICOM store), with :mod:`dicom_node.stow_client`.

YAML::

    archive:
      type: dicomweb
      url: https://pacs.example.org/dicom-web          # the base: we POST {url}/studies
      auth: {basic: {user: node, password_file: secrets/pacs}}   # or {bearer_file: FILE} or {bearer_env: VAR}
      tls: {ca: ca.pem, verify: true, cert: client.pem, key: client.key}
      max_request_bytes: 67108864                       # per POST (default 64 MiB)
      timeout: 60                                       # seconds per connect/send/read step

Secrets never sit in the config or the URL (a URL with credentials is refused, as for
webhooks): the password and the token are read from their file or variable at each request.
Retries, back-off, dead letters, held deliveries and metrics are the deliverers', per
destination name, as for every kind; an instance the archive fails is failed alone, with the
archive's reason.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from dicom_node.config.fields import boolean, file_path, integer, mapping, number, string
from dicom_node.config.settings import DestinationSettings, NodeConfig
from dicom_node.engine.yaml_config import Problems, join_path
from dicom_node.stow_client import (
    DEFAULT_MAX_REQUEST_BYTES,
    StowAuth,
    StowTarget,
    StowTLS,
    probe,
    ssl_context,
    store,
    url_problem,
    where,
)

from .base import DeliveryResult, DestinationKind, register

__all__ = ["DicomWebDestination", "DicomWebKind", "KIND"]

log = logging.getLogger(__name__)


@dataclass
class DicomWebDestination(DestinationSettings):
    """A DICOMweb archive that takes instances over STOW-RS."""

    name: str
    type: str = "dicomweb"
    url: str = ""
    auth: StowAuth = field(default_factory=StowAuth)
    tls: StowTLS = field(default_factory=StowTLS)
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    timeout: float | None = None  # None: the deliverer's default

    def target(self, timeout: float) -> StowTarget:
        """The client's view; ``timeout``: when the config sets none."""
        return StowTarget(self.url, self.auth, self.tls, self.max_request_bytes, float(self.timeout or timeout))


class DicomWebKind(DestinationKind[DicomWebDestination]):
    type = "dicomweb"
    keys = frozenset({"url", "auth", "tls", "max_request_bytes", "timeout"})
    required = frozenset({"url"})

    def parse(self, name: str, raw: dict[str, Any], path: str, problems: Problems,
              base_dir: Path) -> DicomWebDestination:
        raw = self.fields(raw, path, problems)
        url = string(raw, "url", path, problems, "") or ""
        if url and (problem := url_problem(url)):
            problems.add(join_path(path, "url"), problem)  # the URL is never echoed: it may hold a token
        return DicomWebDestination(
            name=name, url=url,
            auth=_auth(raw.get("auth"), join_path(path, "auth"), problems, base_dir),
            tls=_tls(raw.get("tls"), join_path(path, "tls"), problems, base_dir),
            max_request_bytes=integer(raw, "max_request_bytes", path, problems, DEFAULT_MAX_REQUEST_BYTES, 1),
            timeout=number(raw, "timeout", path, problems, None, 0, False),
        )

    def finish(self, dest: DicomWebDestination, cfg: NodeConfig, path: str, problems: Problems) -> None:
        """Not the node's own web server: its STOW-RS ingest would take the outputs back in."""
        from urllib.parse import urlsplit

        web = cfg.web
        try:
            parts = urlsplit(dest.url)
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            return  # parse reported it
        if web is not None and port == web.port and parts.hostname in {web.host, "localhost", "127.0.0.1", "::1"}:
            problems.add(join_path(path, "url"), "points at this node's own web server (a loop)")

    def check(self, dest: DicomWebDestination, path: str, problems: Problems) -> None:
        """The secret's file or variable is there (its value never shown) and the TLS files load."""
        auth = dest.auth
        for key, secret_file in (("auth.basic.password_file", auth.password_file), ("auth.bearer_file", auth.bearer_file)):
            if secret_file is not None and not os.access(secret_file, os.R_OK):
                problems.add(join_path(path, key), f"cannot read {secret_file}")
        if auth.bearer_env is not None and not os.environ.get(auth.bearer_env, "").strip():
            problems.add(join_path(path, "auth.bearer_env"), f"environment variable {auth.bearer_env} is not set")
        tls = dest.tls
        for key, p in (("ca", tls.ca), ("cert", tls.cert), ("key", tls.key)):
            if p is not None and not p.is_file():
                problems.add(join_path(path, f"tls.{key}"), f"file not found: {p}")
        if all(p is None or p.is_file() for p in (tls.ca, tls.cert, tls.key)):
            try:
                ssl_context(tls)
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                problems.add(join_path(path, "tls"), f"cannot load: {getattr(exc, 'reason', None) or exc}")

    def reach(self, dest: DicomWebDestination, path: str, problems: Problems) -> None:
        """The archive answers at its base URL with our credentials (check-config only: the node
        itself starts, and queues, while the archive is down).  At most 10 s."""
        from dataclasses import replace

        why = probe(replace(dest.target(10.0), timeout=min(float(dest.timeout or 10.0), 10.0)))
        if why is not None:
            problems.add(join_path(path, "url"), f"cannot reach the archive: {why}")

    def describe(self, dest: DicomWebDestination) -> str:
        return f"STOW-RS {where(dest.url)}, {dest.auth.describe()}"

    def deliver(self, dest: DicomWebDestination, files: Sequence[Path], *, calling_ae: str,
                timeout: float) -> list[DeliveryResult]:
        results = store(dest.target(timeout), files)
        warned = [r for r in results if r.ok and r.warning]
        if warned:
            log.warning("destination %s: %d instance(s) stored with a warning (%s)", dest.name, len(warned),
                        "; ".join(sorted({r.warning for r in warned if r.warning})))
        return [DeliveryResult(r.path, r.ok, status=r.status, error=r.error) for r in results]


def _auth(raw: Any, path: str, problems: Problems, base_dir: Path) -> StowAuth:
    """``auth``: exactly one of ``basic: {user, password_file}``, ``bearer_file``, ``bearer_env``."""
    if raw is None:
        return StowAuth()
    m = mapping(raw, path, {"basic", "bearer_file", "bearer_env"}, set(), problems)
    if m is None:
        return StowAuth()
    if len(m) != 1:
        problems.add(path, "give exactly one of basic, bearer_file or bearer_env")
        return StowAuth()
    if "basic" in m:
        bpath = join_path(path, "basic")
        b = mapping(m["basic"], bpath, {"user", "password_file"}, {"user", "password_file"}, problems) or {}
        user = string(b, "user", bpath, problems, None)
        if isinstance(user, str) and ":" in user:
            problems.add(join_path(bpath, "user"), "may not contain ':' (HTTP basic auth)")
        return StowAuth(user=user, password_file=file_path(b, "password_file", bpath, problems, base_dir))
    if "bearer_file" in m:
        return StowAuth(bearer_file=file_path(m, "bearer_file", path, problems, base_dir))
    var = string(m, "bearer_env", path, problems, None)
    return StowAuth(bearer_env=var)


def _tls(raw: Any, path: str, problems: Problems, base_dir: Path) -> StowTLS:
    """``tls``: ``ca`` to trust (default: the system store), ``verify``, client ``cert``/``key``."""
    if raw is None:
        return StowTLS()
    m = mapping(raw, path, {"ca", "verify", "cert", "key"}, set(), problems) or {}
    if ("cert" in m) != ("key" in m):
        problems.add(path, "cert and key go together (our client certificate)")
    return StowTLS(ca=file_path(m, "ca", path, problems, base_dir), verify=boolean(m, "verify", path, problems, True),
                   cert=file_path(m, "cert", path, problems, base_dir), key=file_path(m, "key", path, problems, base_dir))


KIND = register(DicomWebKind())
