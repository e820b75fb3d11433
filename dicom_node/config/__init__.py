"""The node's configuration: typed settings parsed from YAML.

Contract (README "Configuration"): the key names in the YAML stay; keys may be added.
``load_config`` returns a :class:`NodeConfig` or raises :class:`ConfigError` listing
every problem with its YAML path (``routes[0].model: unknown model 'x'``).

- :mod:`.settings`: the typed settings (each destination kind's settings are its own, beside
  its code in :mod:`dicom_node.destinations`, which also parses and checks them);
- :mod:`.schema`: parsing and validation of the document (pure, no I/O; the routes in
  :mod:`.routes`, the webhooks in :mod:`.webhooks`), on :mod:`.fields`' typed readers;
- :mod:`.environment`: checks against this machine (folders writable, TLS files load, model
  files are style models; :mod:`.probes` for folders and TLS files), run by ``check-config``
  and ``serve`` through :func:`load_config`;
- the strict YAML loader and :class:`ConfigError` are the engine's
  (:mod:`dicom_node.engine.yaml_config`), shared with the trainer's config.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from dicom_node.engine.yaml_config import ConfigError, load_config_file

from .environment import STYLE_MODEL_FORMAT, check_environment, style_model_file_problem
from .fields import ae_title_problem
from .schema import parse_schema
from .settings import (
    DestinationSettings,
    ModelSettings,
    NodeConfig,
    NodeSettings,
    RetrySettings,
    RouteSettings,
    StorageSettings,
    TLSSettings,
    WebhookSettings,
    WebSettings,
)

__all__ = [
    "ConfigError", "TLSSettings", "NodeSettings", "StorageSettings", "ModelSettings", "DestinationSettings",
    "RouteSettings", "RetrySettings", "WebSettings", "WebhookSettings", "NodeConfig", "load_config", "parse_config",
    "parse_schema", "check_environment", "default_config", "ae_title_problem", "style_model_file_problem",
    "STYLE_MODEL_FORMAT",
]


def load_config(path: str | Path | None) -> NodeConfig:
    """Read and validate a YAML config file (``None``: the embedded default)."""
    if path is None:
        return default_config()
    return load_config_file(path, lambda raw, base_dir, source: parse_config(raw, base_dir=base_dir, source=source))


def parse_config(raw: Any, base_dir: Path = Path("."), source: str = "config") -> NodeConfig:
    """Validate a parsed YAML document (schema, then this machine); relative paths are resolved
    against ``base_dir``.

    Raises :class:`ConfigError` listing every problem found (not just the first), each
    prefixed with its YAML path, e.g. ``routes[1].model: unknown model 'soft2'``.
    """
    cfg, problems = parse_schema(raw, base_dir, source)
    problems += check_environment(cfg, Path(base_dir))
    if problems:
        raise ConfigError(problems, source)
    return cfg


def default_config() -> NodeConfig:
    """The embedded default: loopback, called AE DEFAULT_STYLE -> bundled model 'default' -> ./outbox,
    the console on 127.0.0.1:8080 with a login token printed at start."""
    from dicom_node.destinations.folder import FolderDestination  # the kinds import this package

    return NodeConfig(
        models={"default": ModelSettings(name="default", path="default")},
        destinations={"outbox": FolderDestination(name="outbox", path=Path("./outbox"))},
        routes=[RouteSettings(called_ae="DEFAULT_STYLE", model="default", destinations=["outbox"])],
        web=WebSettings(),
    )
