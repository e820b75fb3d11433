"""The node's settings as typed objects: what a parsed config is (parsing: :mod:`.schema`).

Destinations come in kinds, each with its settings class beside its code in
:mod:`dicom_node.destinations` (a subclass of :class:`DestinationSettings`);
``DestinationSettings(name=..., type="dicom", ...)`` builds the class of that kind.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dicom_node.engine.defaults import CAUTION_LABEL, DEFAULT_FIDELITY_ACTION, DEFAULT_OVERLAP

__all__ = ["TLSSettings", "NodeSettings", "StorageSettings", "ModelSettings", "DestinationSettings",
           "RouteSettings", "RetrySettings", "ON_MAX_WAIT", "derive_route_name", "webhook_retry",
           "WebSettings", "WebhookSettings", "NOTIFICATION_EVENTS", "NodeConfig", "RELOAD", "LIVE", "RESTART",
           "EACH_FIELD", "live_items"]

# How a reload treats each setting of NodeConfig, NodeSettings and StorageSettings (field
# metadata, read by dicom_node.reload; a test checks that every field says it): LIVE is applied
# at once, RESTART keeps the value the node runs with until it restarts (the reload says so),
# EACH_FIELD is a section whose fields each say.  The sections inside a LIVE or RESTART field
# (a route, the console's settings) follow it whole.
RELOAD = "reload"
LIVE = {RELOAD: "live"}
RESTART = {RELOAD: "restart"}
EACH_FIELD = {RELOAD: "each field"}


def live_items(kind: str) -> dict[str, str]:
    """LIVE, for a collection of named items: a reload reports ``<kind> NAME added/removed/changed``."""
    return {**LIVE, "item": kind}


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
    ae_title: str = field(default="DICOMNODE", metadata=RESTART)
    host: str = field(default="127.0.0.1", metadata=RESTART)
    port: int = field(default=11112, metadata=RESTART)
    max_associations: int = field(default=16, metadata=RESTART)
    network_timeout: float = field(default=60.0, metadata=RESTART)
    dimse_timeout: float = field(default=60.0, metadata=RESTART)
    acse_timeout: float = field(default=30.0, metadata=RESTART)
    # Seconds a new connection has to send its association request: a connection that never
    # speaks holds one of max_associations slots until then (pynetdicom waits acse_timeout).
    request_timeout: float = field(default=5.0, metadata=RESTART)
    # Memory one image may need to be processed (declared Rows x Columns x the engine's working
    # bytes per pixel); a larger one is refused at C-STORE.  None: the engine's default (6 GiB,
    # dicom_node.engine.dicom_decode.DEFAULT_MAX_DECODE_BYTES).
    max_decode_bytes: int | None = field(default=None, metadata=RESTART)
    max_instance_bytes: int = field(default=2 * 1024**3, metadata=LIVE)
    tls: TLSSettings | None = field(default=None, metadata=RESTART)
    # This node among several on one PostgreSQL database and shared spool (its spool lock,
    # temp folder and row in ``status``); default: the host name.
    name: str = field(default="", metadata=RESTART)


@dataclass
class StorageSettings:
    spool_dir: Path = field(default=Path("./spool"), metadata=RESTART)
    min_free_bytes: int = field(default=256 * 1024**2, metadata=LIVE)  # refuse new instances below this free disk
    # postgresql://user@host/db; None: SQLite in the spool (state.db)
    database: str | None = field(default=None, metadata=RESTART)
    # A claimed item (a translation, a delivery batch, a notification) is its node's for this
    # long after the node's last heartbeat; then another node takes it over.
    lease_seconds: float = field(default=30.0, metadata=RESTART)
    # Sources and outputs of a delivered study stay in the spool this long after its last
    # delivery (``dicom-node reprocess`` works from them), then the node removes them; 0: at once.
    keep_sources_days: float = field(default=30.0, metadata=LIVE)


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
    """Where translated instances go: the base of each destination kind's settings (``type``
    names the kind; the kinds are :mod:`dicom_node.destinations`' modules)."""

    name: str
    type: str

    def __new__(cls, *args: Any, **kwargs: Any) -> "DestinationSettings":
        if cls is DestinationSettings:  # DestinationSettings(type="dicom", ...) -> DicomDestination
            kind = kwargs.get("type", args[1] if len(args) > 1 else None)
            cls = _settings_class(kind)
        return object.__new__(cls)


def _settings_class(kind: Any) -> type[DestinationSettings]:
    """The settings class of destination type ``kind``: the subclass whose ``type`` defaults to it
    (a kind's module defines it; the kinds are imported with :mod:`dicom_node.destinations`)."""
    pending = list(DestinationSettings.__subclasses__())
    while pending:
        cls = pending.pop()
        if cls.__dict__.get("type") == kind:
            return cls
        pending += cls.__subclasses__()
    raise TypeError(f"no destination settings of type {kind!r} (import dicom_node.destinations first)")


ON_MAX_WAIT = ("proceed", "discard")


@dataclass
class RouteSettings:
    """One route.  ``name`` is its identity in the state database (queued work refers to it,
    so reordering or editing other routes never misroutes work in the spool); the schema
    derives one from the called AE and the model when the config gives none."""

    called_ae: str
    model: str
    destinations: list[str]
    calling_ae: list[str] | None = None  # allow-list; None allows any
    # STOW-RS clients (web.stow_rs.tokens names, certificate subjects) that may post to this
    # route's called AE; None: every authenticated STOW-RS client
    stow_rs_clients: list[str] | None = None
    match: dict[str, list[str]] = field(default_factory=dict)  # DICOM keyword -> accepted values
    forward_original: bool = False
    fidelity_action: str = DEFAULT_FIDELITY_ACTION  # record | flag | withhold (YAML: fidelity: {action: ...})
    label: str | None = CAUTION_LABEL  # caution text in every output's ImageComments; None: none
    name: str = ""  # "" until the schema names it (derive_route_name)
    study_stable_seconds: float | None = None  # None: the config's global study_stable_seconds
    max_wait_seconds: float | None = None  # since the study's first instance; None: no limit
    on_max_wait: str = "proceed"  # proceed: translate what has arrived; discard: drop it
    # The output series' SeriesDescription: {route} (the route's name), {model}, {source} (the
    # source series' description); at most 64 characters are kept (dicom_node.routing).
    series_description: str = "{route} style: {source}"

    def __post_init__(self) -> None:
        if not self.name:
            self.name = derive_route_name(self.called_ae, self.model)


def derive_route_name(called_ae: str, model: str) -> str:
    """The default route name: ``<called AE>-<model>`` in lower case (``dr_kim_style-soft``)."""
    return f"{called_ae.strip()}-{model.strip()}".lower().replace(" ", "_")


@dataclass
class RetrySettings:
    max_attempts: int = 10
    backoff_seconds: list[float] = field(default_factory=lambda: [5.0, 30.0, 120.0, 600.0])

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        steps = self.backoff_seconds or [0.0]
        return float(steps[min(attempt, len(steps)) - 1])


NOTIFICATION_EVENTS = ("study.delivered", "delivery.failed", "output.flagged", "output.withheld")


@dataclass
class WebhookSettings:
    """One webhook of ``notifications:``: HTTP POST of a JSON event (:mod:`dicom_node.notifications`).

    ``secret``: sign each body with HMAC-SHA256 (header ``X-Dicom-Node-Signature: sha256=<hex>``);
    ``include_phi``: add patient name, ID and accession number (off by default); ``tls``: ``ca``
    to verify an https receiver (default: the system store), ``verify: false`` to skip (test
    set-ups only), ``cert``/``key`` for a client certificate.  ``headers``: sent with every
    POST (``Authorization: Bearer ...``: credentials go here or in ``secret``, never in the URL);
    like ``secret``, their values are never logged, stored or shown.
    """
    name: str
    url: str
    events: list[str] = field(default_factory=lambda: list(NOTIFICATION_EVENTS))
    secret: str | None = field(default=None, repr=False)
    headers: dict[str, str] = field(default_factory=dict, repr=False)
    include_phi: bool = False
    ca: Path | None = None
    verify: bool = True
    cert: Path | None = None
    key: Path | None = None
    timeout: float = 10.0
    retry: "RetrySettings" = field(default_factory=lambda: webhook_retry())


def webhook_retry() -> "RetrySettings":
    """A webhook's default retries: up to 20 sends over about 8 hours (a receiver down overnight
    loses nothing; the node's own ``retry`` is for DICOM deliveries)."""
    return RetrySettings(max_attempts=20, backoff_seconds=[5.0, 30.0, 120.0, 600.0, 1800.0])


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
    # proxies (addresses or CIDRs) whose X-Forwarded-For is believed for the login limit and the
    # operator log; default none: the TCP peer is the client
    trusted_proxies: list[str] = field(default_factory=list)
    # web.stow_rs.tokens: Argon2id hashes of the bearer tokens that may POST to STOW-RS ingest
    # (dicom_node.web.stow); None: no STOW-RS ingest (the default)
    stow_rs_tokens: list[str] | None = None
    # the hashes of web.stow_rs.tokens given as a mapping: client name -> hash (the name is the
    # client's identity for routes' stow_rs_clients and the log; a list's clients are anonymous)
    stow_rs_token_names: dict[str, str] = field(default_factory=dict)
    # web.stow_rs.client_ca: the CA whose client certificates may POST to STOW-RS without a token
    # (needs web.tls; dicom_node.web.client_certs); web.stow_rs.subjects: only these RFC 4514
    # subjects (None: any certificate that CA signed)
    stow_rs_client_ca: Path | None = None
    stow_rs_subjects: list[str] | None = None


@dataclass
class NodeConfig:
    node: NodeSettings = field(default_factory=NodeSettings, metadata=EACH_FIELD)
    storage: StorageSettings = field(default_factory=StorageSettings, metadata=EACH_FIELD)
    study_stable_seconds: float = field(default=10.0, metadata=LIVE)
    models: dict[str, ModelSettings] = field(default_factory=dict, metadata=live_items("model"))
    destinations: dict[str, DestinationSettings] = field(default_factory=dict, metadata=live_items("destination"))
    routes: list[RouteSettings] = field(default_factory=list, metadata=live_items("route"))
    retry: RetrySettings = field(default_factory=RetrySettings, metadata=LIVE)
    workers: int = field(default=1, metadata=RESTART)
    # a config file without ``web:`` gets WebSettings() (schema)
    web: WebSettings | None = field(default=None, metadata=RESTART)
    notifications: list["WebhookSettings"] = field(default_factory=list, metadata=live_items("webhook"))
    source: str = field(default="<embedded default>", metadata=LIVE)  # the file it was read from

    def route(self, name: str | None) -> RouteSettings | None:
        """The route with this name (queued work names its route), or None."""
        return next((r for r in self.routes if r.name == name), None)

    def stable_seconds(self, route: RouteSettings | None) -> float:
        """The quiet period of ``route``'s studies (the route's own, else the global one)."""
        if route is not None and route.study_stable_seconds is not None:
            return route.study_stable_seconds
        return self.study_stable_seconds

    def study_timers(self, name: str) -> tuple[float, float | None, str]:
        """(quiet seconds, max wait seconds or None, on_max_wait) of the route named ``name``
        (a route no longer configured: the global quiet period, no limit)."""
        route = self.route(name)
        if route is None:
            return self.study_stable_seconds, None, "proceed"
        return self.stable_seconds(route), route.max_wait_seconds, route.on_max_wait
