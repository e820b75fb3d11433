"""The node's settings as typed objects: what a parsed config is (parsing: :mod:`.schema`).

Destinations come in kinds, one class each (:class:`DicomDestination`, :class:`FolderDestination`);
``DestinationSettings(name=..., type="dicom", ...)`` builds the class of that kind.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dicom_node.engine.defaults import CAUTION_LABEL, DEFAULT_FIDELITY_ACTION, DEFAULT_OVERLAP

__all__ = ["TLSSettings", "NodeSettings", "StorageSettings", "ModelSettings", "DestinationSettings",
           "DicomDestination", "FolderDestination", "DESTINATION_KINDS", "RouteSettings", "RetrySettings",
           "WebSettings", "NodeConfig", "default_config"]


@dataclass
class TLSSettings:
    """TLS for the node's listener (cert and key required) or towards one destination.

    For a destination, ``cert``/``key`` are our client certificate (only needed when the
    peer asks for one) and ``ca`` is what we trust for the peer (``None``: the system store).
    """
    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None
    require_client_cert: bool = False
    check_hostname: bool = True  # client side: the peer's certificate must name the host we dial


@dataclass
class NodeSettings:
    ae_title: str = "DICOMNODE"
    host: str = "127.0.0.1"
    port: int = 11112
    max_associations: int = 16
    network_timeout: float = 60.0
    dimse_timeout: float = 60.0
    acse_timeout: float = 30.0
    max_instance_bytes: int = 2 * 1024**3
    tls: TLSSettings | None = None


@dataclass
class StorageSettings:
    spool_dir: Path = Path("./spool")
    min_free_bytes: int = 256 * 1024**2  # refuse new instances below this much free disk


@dataclass
class ModelSettings:
    name: str
    path: str  # file path, or a bundled model name such as "default"
    device: str = "auto"
    tile: int | None = None  # None: the engine chooses; 0: whole-image pass
    overlap: float = DEFAULT_OVERLAP
    inverse: str = "auto"  # the reverse model for the fidelity cycle check: "auto", "none" or a file


@dataclass
class DestinationSettings:
    """Where translated instances go; the base of the destination kinds (``type`` names the kind)."""

    name: str
    type: str

    def __new__(cls, *args: Any, **kwargs: Any) -> "DestinationSettings":
        if cls is DestinationSettings:  # DestinationSettings(type="dicom", ...) -> DicomDestination
            kind = kwargs.get("type", args[1] if len(args) > 1 else None)
            cls = DESTINATION_KINDS.get(kind, cls)
        return object.__new__(cls)


@dataclass
class DicomDestination(DestinationSettings):
    """A DICOM peer (C-STORE), optionally over TLS."""

    name: str
    type: str = "dicom"
    ae_title: str | None = None
    host: str | None = None
    port: int | None = None
    calling_ae: str | None = None  # our AE title towards this peer (default: node.ae_title)
    tls: TLSSettings | None = None
    timeout: float | None = None  # seconds for connect/ACSE/DIMSE; None: the caller's default


@dataclass
class FolderDestination(DestinationSettings):
    """A folder the node writes the instances into (atomically, one file each)."""

    name: str
    type: str = "folder"
    path: Path | None = None


DESTINATION_KINDS: dict[str, type[DestinationSettings]] = {"dicom": DicomDestination, "folder": FolderDestination}


@dataclass
class RouteSettings:
    called_ae: str
    model: str
    destinations: list[str]
    calling_ae: list[str] | None = None  # allow-list; None allows any
    match: dict[str, list[str]] = field(default_factory=dict)  # DICOM keyword -> accepted values
    forward_original: bool = False
    fidelity_action: str = DEFAULT_FIDELITY_ACTION  # record | flag | withhold (YAML: fidelity: {action: ...})
    label: str | None = CAUTION_LABEL  # caution text in every output's ImageComments; None: none


@dataclass
class RetrySettings:
    max_attempts: int = 10
    backoff_seconds: list[float] = field(default_factory=lambda: [5.0, 30.0, 120.0, 600.0])

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        steps = self.backoff_seconds or [0.0]
        return float(steps[min(attempt, len(steps)) - 1])


@dataclass
class WebSettings:
    """The operations console, Prometheus metrics and health checks (``dicom_node.web``).

    ``users`` maps a login name to an Argon2id hash (``dicom-node hash-password``); with no
    users the node makes a random token at start and prints the login link (as Jupyter does).
    ``tls``: the console over HTTPS with this certificate and key (``web.tls: node`` reuses
    the DICOM listener's).
    """
    host: str = "127.0.0.1"
    port: int = 8080
    users: dict[str, str] = field(default_factory=dict)
    tls: TLSSettings | None = None
    session_minutes: float = 12 * 60.0  # a session ends after this long without a request
    refresh_seconds: float = 5.0  # how often the console pages refresh themselves


@dataclass
class NodeConfig:
    node: NodeSettings = field(default_factory=NodeSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    study_stable_seconds: float = 10.0
    models: dict[str, ModelSettings] = field(default_factory=dict)
    destinations: dict[str, DestinationSettings] = field(default_factory=dict)
    routes: list[RouteSettings] = field(default_factory=list)
    retry: RetrySettings = field(default_factory=RetrySettings)
    workers: int = 1
    web: WebSettings | None = None  # a config file without ``web:`` gets WebSettings() (schema)
    source: str = "<embedded default>"


def default_config() -> NodeConfig:
    """The embedded default: loopback, called AE DEFAULT_STYLE -> bundled model 'default' -> ./outbox,
    the console on 127.0.0.1:8080 with a login token printed at start."""
    return NodeConfig(
        models={"default": ModelSettings(name="default", path="default")},
        destinations={"outbox": FolderDestination(name="outbox", path=Path("./outbox"))},
        routes=[RouteSettings(called_ae="DEFAULT_STYLE", model="default", destinations=["outbox"])],
        web=WebSettings(),
    )
