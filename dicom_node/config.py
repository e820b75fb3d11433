"""The node's configuration: typed settings parsed from YAML.

Contract (shared CONVENTIONS): the key names in the YAML stay; keys may be added.
``load_config`` returns a :class:`NodeConfig` or raises :class:`ConfigError` listing
every problem with its YAML path (``routes[0].model: unknown model 'x'``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dicom_node.errors import UserError

__all__ = [
    "ConfigError", "TLSSettings", "NodeSettings", "StorageSettings", "ModelSettings",
    "DestinationSettings", "RouteSettings", "RetrySettings", "NodeConfig", "load_config",
    "parse_config", "default_config",
]


class ConfigError(UserError):
    """A config with problems; ``problems`` holds one ``path: message`` string each."""

    def __init__(self, problems: list[str], source: str = "config") -> None:
        self.problems = problems
        super().__init__(f"{source}: {len(problems)} problem(s): " + "; ".join(problems))


@dataclass
class TLSSettings:
    cert: Path
    key: Path
    ca: Path | None = None
    require_client_cert: bool = False


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
    overlap: float = 0.25


@dataclass
class DestinationSettings:
    name: str
    type: str  # "dicom" or "folder"
    ae_title: str | None = None
    host: str | None = None
    port: int | None = None
    calling_ae: str | None = None  # our AE title towards this peer (default: node.ae_title)
    tls: TLSSettings | None = None
    path: Path | None = None


@dataclass
class RouteSettings:
    called_ae: str
    model: str
    destinations: list[str]
    calling_ae: list[str] | None = None  # allow-list; None allows any
    match: dict[str, list[str]] = field(default_factory=dict)  # DICOM keyword -> accepted values
    forward_original: bool = False


@dataclass
class RetrySettings:
    max_attempts: int = 10
    backoff_seconds: list[float] = field(default_factory=lambda: [5.0, 30.0, 120.0, 600.0])

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        steps = self.backoff_seconds or [0.0]
        return float(steps[min(attempt, len(steps)) - 1])


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
    source: str = "<embedded default>"


def default_config() -> NodeConfig:
    """The embedded default: loopback, called AE DEFAULT_STYLE -> bundled model 'default' -> ./outbox."""
    return NodeConfig(
        models={"default": ModelSettings(name="default", path="default")},
        destinations={"outbox": DestinationSettings(name="outbox", type="folder", path=Path("./outbox"))},
        routes=[RouteSettings(called_ae="DEFAULT_STYLE", model="default", destinations=["outbox"])],
    )


def load_config(path: str | Path | None) -> NodeConfig:
    """Read and validate a YAML config file (``None``: the embedded default)."""
    if path is None:
        return default_config()
    import yaml

    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text())
    except OSError as exc:
        raise UserError(f"cannot read config {p}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"<yaml>: {str(exc).splitlines()[0]}"], str(p)) from None
    return parse_config(raw, base_dir=p.resolve().parent, source=str(p))


def parse_config(raw: Any, base_dir: Path = Path("."), source: str = "config") -> NodeConfig:
    """Validate a parsed YAML document; relative paths are resolved against ``base_dir``.

    (Minimal version; the complete validation lives here too once written.)
    """
    raise NotImplementedError
