"""The node's configuration: typed settings parsed from YAML.

Contract (shared CONVENTIONS): the key names in the YAML stay; keys may be added.
``load_config`` returns a :class:`NodeConfig` or raises :class:`ConfigError` listing
every problem with its YAML path (``routes[0].model: unknown model 'x'``).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from dicom_node.engine.yaml_config import ConfigError, Problems, join_path, read_yaml_file, type_name
from dicom_node.errors import UserError

__all__ = [
    "ConfigError", "TLSSettings", "NodeSettings", "StorageSettings", "ModelSettings",
    "DestinationSettings", "RouteSettings", "RetrySettings", "NodeConfig", "load_config",
    "parse_config", "default_config", "ae_title_problem", "style_model_file_problem", "STYLE_MODEL_FORMAT",
]


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
    timeout: float | None = None  # seconds for connect/ACSE/DIMSE; None: the caller's default


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
    p = Path(path)
    raw, duplicates = read_yaml_file(p)
    try:
        cfg = parse_config(raw, base_dir=p.resolve().parent, source=str(p))
    except ConfigError as exc:
        raise ConfigError(duplicates + exc.problems, str(p)) from None
    if duplicates:
        raise ConfigError(duplicates, str(p))
    return cfg


# --------------------------------------------------------------------------------------
# Validation.  Every check appends to one problem list instead of raising, so the user
# sees every mistake at once, each with the YAML path that points at it.
# --------------------------------------------------------------------------------------

_MISSING = object()
_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


_Problems = Problems
_join = join_path
_type_name = type_name


def _mapping(raw: Any, path: str, allowed: set[str], required: set[str], pr: _Problems) -> dict[str, Any] | None:
    """Check that ``raw`` is a mapping with only ``allowed`` keys and all ``required`` ones."""
    if not isinstance(raw, dict):
        pr.add(path, f"must be a mapping, not {_type_name(raw)}")
        return None
    for key in raw:
        if not isinstance(key, str):
            pr.add(path, f"key {key!r} must be a string")
        elif key not in allowed:
            pr.add(_join(path, key), "unknown key")
    for key in sorted(required):
        if key not in raw:
            pr.add(_join(path, key), "required key missing")
    return raw


def _int(raw: dict, key: str, path: str, pr: _Problems, default: Any, lo: int | None = None,
         hi: int | None = None) -> Any:
    p = _join(path, key)
    value = raw.get(key, _MISSING)
    if value is _MISSING:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        pr.add(p, f"must be an integer, not {_type_name(value)}")
        return default
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        if hi is None:
            pr.add(p, f"must be >= {lo}")
        else:
            pr.add(p, f"must be {lo}..{hi}")
        return default
    return value


def _number(raw: dict, key: str, path: str, pr: _Problems, default: Any, lo: float = 0.0,
            lo_inclusive: bool = True, hi: float | None = None, hi_inclusive: bool = True) -> Any:
    p = _join(path, key)
    value = raw.get(key, _MISSING)
    if value is _MISSING:
        return default
    return _check_number(value, p, pr, default, lo, lo_inclusive, hi, hi_inclusive)


def _check_number(value: Any, p: str, pr: _Problems, default: Any, lo: float = 0.0,
                  lo_inclusive: bool = True, hi: float | None = None, hi_inclusive: bool = True) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        pr.add(p, f"must be a number, not {_type_name(value)}")
        return default
    bad_lo = value < lo if lo_inclusive else value <= lo
    bad_hi = hi is not None and (value > hi if hi_inclusive else value >= hi)
    if bad_lo or bad_hi:
        lo_txt = f"{'>=' if lo_inclusive else '>'} {lo:g}"
        hi_txt = "" if hi is None else f" and {'<=' if hi_inclusive else '<'} {hi:g}"
        pr.add(p, f"must be {lo_txt}{hi_txt}")
        return default
    return float(value)


def _bool(raw: dict, key: str, path: str, pr: _Problems, default: bool) -> bool:
    value = raw.get(key, _MISSING)
    if value is _MISSING:
        return default
    if not isinstance(value, bool):
        pr.add(_join(path, key), f"must be true or false, not {_type_name(value)}")
        return default
    return value


def _str(raw: dict, key: str, path: str, pr: _Problems, default: Any = None) -> Any:
    value = raw.get(key, _MISSING)
    if value is _MISSING:
        return default
    if not isinstance(value, str) or not value.strip():
        what = "empty" if isinstance(value, str) else _type_name(value)
        pr.add(_join(path, key), f"must be a non-empty string, not {what}")
        return default
    return value


def ae_title_problem(value: Any) -> str | None:
    """Why ``value`` is not a usable AE title (DICOM PS3.5 AE VR), or ``None`` if it is.

    At most 16 characters of the default repertoire, no backslash, no control characters,
    not only spaces.  Leading/trailing spaces are not significant and are stripped.
    """
    if not isinstance(value, str):
        return f"AE title must be a string, not {_type_name(value)}"
    if not value.strip():
        return "AE title is empty"
    if len(value) > 16:
        return f"AE title {value!r} is longer than 16 characters"
    if "\\" in value:
        return f"AE title {value!r} contains a backslash"
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        return f"AE title {value!r} contains control characters"
    if not value.isascii():
        return f"AE title {value!r} contains non-ASCII characters"
    return None


def _ae(raw: dict, key: str, path: str, pr: _Problems, default: Any = None) -> Any:
    value = raw.get(key, _MISSING)
    if value is _MISSING:
        return default
    problem = ae_title_problem(value)
    if problem:
        pr.add(_join(path, key), problem)
        return default
    return value.strip()


def _resolve(base_dir: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base_dir / p)


def _existing_file(raw: dict, key: str, path: str, pr: _Problems, base_dir: Path) -> Path | None:
    value = _str(raw, key, path, pr)
    if value is None:
        return None
    p = _resolve(base_dir, value)
    if not p.is_file():
        pr.add(_join(path, key), f"file not found: {p}")
    return p


def _writable_dir(raw: dict, key: str, path: str, pr: _Problems, base_dir: Path, default: Path | None) -> Path | None:
    """A folder we must write into: it exists and is writable, or can be created."""
    value = raw.get(key, _MISSING)
    if value is _MISSING:
        if default is None:
            return None
        p = _resolve(base_dir, str(default))
    else:
        value = _str(raw, key, path, pr)
        if value is None:
            return None
        p = _resolve(base_dir, value)
    p = Path(os.path.normpath(p))
    probe = p
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent  # the folder would be created below its nearest existing parent
    if probe.exists() and not probe.is_dir():
        pr.add(_join(path, key), f"not a folder: {probe}")
    elif not _can_write(probe):
        pr.add(_join(path, key), f"not writable: {p}" if probe == p else f"not writable (cannot create): {p}")
    return p


def _can_write(folder: Path) -> bool:
    """Really try: permission bits lie for root and on read-only mounts."""
    import tempfile

    if not os.access(folder, os.W_OK | os.X_OK):
        return False
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=".dicom-node-probe-"):
            return True
    except OSError:
        return False


def _tls(raw: Any, path: str, pr: _Problems, base_dir: Path, server: bool) -> TLSSettings | None:
    allowed = {"cert", "key", "ca", "require_client_cert"} if server else {"cert", "key", "ca", "check_hostname"}
    m = _mapping(raw, path, allowed, {"cert", "key"} if server else set(), pr)
    if m is None:
        return None
    cert = _existing_file(m, "cert", path, pr, base_dir)
    key = _existing_file(m, "key", path, pr, base_dir)
    ca = _existing_file(m, "ca", path, pr, base_dir)
    if not server and (("cert" in m) != ("key" in m)):
        pr.add(path, "cert and key go together (our client certificate)")
    require = _bool(m, "require_client_cert", path, pr, False)
    if require and "ca" not in m:
        pr.add(_join(path, "ca"), "required when require_client_cert is true (the CA that signs client certificates)")
    tls = TLSSettings(cert=cert, key=key, ca=ca, require_client_cert=require,
                      check_hostname=_bool(m, "check_hostname", path, pr, True))
    files = [p for p in (cert, key, ca) if p is not None]
    complete = cert is not None and key is not None if server else bool(files)
    if complete and all(p.is_file() for p in files):
        # Load them now, as the node will: a key that does not match its certificate, a
        # password-protected key or a file that is not PEM is found by check-config.
        from dicom_node import tls as tls_module

        try:
            (tls_module.server_context if server else tls_module.client_context)(tls)
        except UserError as exc:
            pr.add(path, str(exc).removeprefix("tls: ").removeprefix("node.tls: "))
    return tls


def _node(raw: Any, pr: _Problems, base_dir: Path) -> NodeSettings:
    d = NodeSettings()
    m = _mapping(raw, "node", {"ae_title", "host", "port", "max_associations", "network_timeout", "dimse_timeout",
                               "acse_timeout", "max_instance_bytes", "tls"}, set(), pr)
    if m is None:
        return d
    return NodeSettings(
        ae_title=_ae(m, "ae_title", "node", pr, d.ae_title),
        host=_str(m, "host", "node", pr, d.host),
        port=_int(m, "port", "node", pr, d.port, 1, 65535),
        max_associations=_int(m, "max_associations", "node", pr, d.max_associations, 1),
        network_timeout=_number(m, "network_timeout", "node", pr, d.network_timeout, 0, False),
        dimse_timeout=_number(m, "dimse_timeout", "node", pr, d.dimse_timeout, 0, False),
        acse_timeout=_number(m, "acse_timeout", "node", pr, d.acse_timeout, 0, False),
        max_instance_bytes=_int(m, "max_instance_bytes", "node", pr, d.max_instance_bytes, 1),
        tls=_tls(m["tls"], "node.tls", pr, base_dir, server=True) if m.get("tls") is not None else None,
    )


def _storage(raw: Any, pr: _Problems, base_dir: Path) -> StorageSettings:
    d = StorageSettings()
    m = _mapping(raw, "storage", {"spool_dir", "min_free_bytes"}, set(), pr)
    if m is None:
        return d
    return StorageSettings(
        spool_dir=_writable_dir(m, "spool_dir", "storage", pr, base_dir, d.spool_dir) or d.spool_dir,
        min_free_bytes=_int(m, "min_free_bytes", "storage", pr, d.min_free_bytes, 0),
    )


def _models(raw: Any, pr: _Problems, base_dir: Path) -> dict[str, ModelSettings]:
    out: dict[str, ModelSettings] = {}
    m = _mapping(raw, "models", set(raw) if isinstance(raw, dict) else set(), set(), pr)
    if m is None:
        return out
    if not m:
        pr.add("models", "at least one model is required")
    for name, spec in m.items():
        path = _join("models", str(name))
        s = _mapping(spec, path, {"path", "device", "tile", "overlap"}, {"path"}, pr)
        if s is None:
            continue
        model_path = _model_path(s, path, pr, base_dir)
        device = _str(s, "device", path, pr, "auto")
        if not _DEVICE_RE.match(device):
            pr.add(_join(path, "device"), f"must be auto, cpu, cuda, cuda:N or mps, not {device!r}")
        tile = None
        if s.get("tile") is not None:
            tile = _int(s, "tile", path, pr, None, 0)
            if tile is not None and 0 < tile < 64:
                pr.add(_join(path, "tile"), "must be 0 (whole image) or >= 64 pixels")
        out[str(name)] = ModelSettings(
            name=str(name), path=model_path or "", device=device, tile=tile,
            overlap=_number(s, "overlap", path, pr, 0.25, 0.0, True, 1.0, False),
        )
    return out


def _model_path(s: dict, path: str, pr: _Problems, base_dir: Path) -> str | None:
    """A model file (relative to the config's folder) or a bundled model name such as ``default``."""
    value = _str(s, "path", path, pr)
    if value is None:
        return None
    p = _resolve(base_dir, value)
    if p.is_file():
        problem = style_model_file_problem(p)
        if problem:
            pr.add(_join(path, "path"), f"{problem}: {p}")
        return str(p)
    bare = Path(value)
    if bare.suffix == "" and len(bare.parts) == 1:
        from dicom_node.engine.model_file import resolve_model_path

        bundled = resolve_model_path(value)
        if bundled.is_file():
            return value  # the engine resolves bundled names itself
        pr.add(_join(path, "path"), f"bundled model {value!r} not found (and no file {p})")
        return value
    pr.add(_join(path, "path"), f"file not found: {p}")
    return str(p)


# Same value as dicom_node.engine.model_file.FORMAT (a test pins it); not imported from
# there because that module pulls in torch, and check-config should stay quick.
STYLE_MODEL_FORMAT = "dicom-node-style-model"


def style_model_file_problem(path: Path) -> str | None:
    """Cheap check that ``path`` is a style model: the safetensors header names our format.

    Reads only the JSON header (the weights are checked when the node loads the model).
    """
    import json
    import struct

    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return "not a style model file (too short)"
            (size,) = struct.unpack("<Q", head)
            if size > 100 * 1024**2:
                return "not a style model file (no safetensors header)"
            header = json.loads(f.read(size).decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return "not a style model file (no safetensors header)"
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != STYLE_MODEL_FORMAT:
        return "not a dicom-node style model (safetensors file without our metadata)"
    return None


def _destinations(raw: Any, pr: _Problems, base_dir: Path) -> dict[str, DestinationSettings]:
    out: dict[str, DestinationSettings] = {}
    m = _mapping(raw, "destinations", set(raw) if isinstance(raw, dict) else set(), set(), pr)
    if m is None:
        return out
    if not m:
        pr.add("destinations", "at least one destination is required")
    common = {"type"}
    dicom_keys = {"ae_title", "host", "port", "calling_ae", "tls", "timeout"}
    folder_keys = {"path"}
    for name, spec in m.items():
        path = _join("destinations", str(name))
        if not isinstance(spec, dict):
            pr.add(path, f"must be a mapping, not {_type_name(spec)}")
            continue
        kind = spec.get("type", _MISSING)
        if kind is _MISSING:
            pr.add(_join(path, "type"), "required key missing (dicom or folder)")
            continue
        if kind == "dicom":
            s = _mapping(spec, path, common | dicom_keys, {"ae_title", "host", "port"}, pr)
            tls_raw = s.get("tls")
            out[str(name)] = DestinationSettings(
                name=str(name), type="dicom",
                ae_title=_ae(s, "ae_title", path, pr),
                host=_str(s, "host", path, pr),
                port=_int(s, "port", path, pr, None, 1, 65535),
                calling_ae=_ae(s, "calling_ae", path, pr),
                tls=_tls(tls_raw, _join(path, "tls"), pr, base_dir, server=False) if tls_raw is not None else None,
                timeout=_number(s, "timeout", path, pr, None, 0, False),
            )
        elif kind == "folder":
            s = _mapping(spec, path, common | folder_keys, {"path"}, pr)
            out[str(name)] = DestinationSettings(
                name=str(name), type="folder", path=_writable_dir(s, "path", path, pr, base_dir, None),
            )
        else:
            pr.add(_join(path, "type"), f"must be dicom or folder, not {kind!r}")
    return out


def _str_list(value: Any, path: str, pr: _Problems) -> list[str] | None:
    """A list of strings; a single string is accepted as a one-item list."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        pr.add(path, f"must be a list of strings, not {_type_name(value)}")
        return None
    out = []
    for i, item in enumerate(value):
        if isinstance(item, bool) or not isinstance(item, (str, int, float)):
            pr.add(_join(path, i), f"must be a string, not {_type_name(item)}")
        else:
            out.append(str(item))
    return out


def _routes(raw: Any, pr: _Problems, model_keys: set, dest_keys: set) -> list[RouteSettings]:
    out: list[RouteSettings] = []
    if not isinstance(raw, list):
        pr.add("routes", f"must be a list, not {_type_name(raw)}")
        return out
    if not raw:
        pr.add("routes", "at least one route is required")
    for i, spec in enumerate(raw):
        path = _join("routes", i)
        s = _mapping(spec, path, {"called_ae", "model", "destinations", "calling_ae", "match", "forward_original"},
                     {"called_ae", "model", "destinations"}, pr)
        if s is None:
            continue
        called = _ae(s, "called_ae", path, pr)
        model = _str(s, "model", path, pr)
        if model is not None and model not in model_keys:
            pr.add(_join(path, "model"), f"unknown model {model!r}")
        dests: list[str] = []
        if "destinations" in s:
            dests = _str_list(s["destinations"], _join(path, "destinations"), pr) or []
            if not dests and isinstance(s["destinations"], list):
                pr.add(_join(path, "destinations"), "at least one destination is required")
            for j, d in enumerate(dests):
                if d not in dest_keys:
                    pr.add(_join(_join(path, "destinations"), j), f"unknown destination {d!r}")
        calling = None
        if s.get("calling_ae") is not None:
            calling = _str_list(s["calling_ae"], _join(path, "calling_ae"), pr)
            for j, ae in enumerate(calling or []):
                problem = ae_title_problem(ae)
                if problem:
                    pr.add(_join(_join(path, "calling_ae"), j), problem)
            calling = [ae.strip() for ae in calling or []]
        match = _match(s.get("match"), _join(path, "match"), pr) if s.get("match") is not None else {}
        route = RouteSettings(
            called_ae=called or "", model=model or "", destinations=dests, calling_ae=calling, match=match,
            forward_original=_bool(s, "forward_original", path, pr, False),
        )
        for j, earlier in enumerate(out):
            if called and earlier.called_ae == called and _shadows(earlier, route):
                pr.add(_join(path, "called_ae"), f"duplicate AE title {called!r}: routes[{j}] already takes "
                       "every instance this route would (give it a narrower calling_ae/match or remove one)")
                break
        out.append(route)
    return out


def _fold(values: Iterable[str]) -> set[str]:
    return {str(v).strip().casefold() for v in values}


def _shadows(first: RouteSettings, later: RouteSettings) -> bool:
    """Whether ``first`` (same called AE, earlier in the file) wins every instance ``later`` could.

    Several routes may share a called AE title (first match wins, see dicom_node.routing),
    but one that can never be chosen is a mistake: it is reported as a duplicate.
    """
    if first.calling_ae is not None:
        if later.calling_ae is None or not set(later.calling_ae) <= set(first.calling_ae):
            return False
    for keyword, accepted in first.match.items():
        if keyword not in later.match or not _fold(later.match[keyword]) <= _fold(accepted):
            return False
    return True


def _match(raw: Any, path: str, pr: _Problems) -> dict[str, list[str]]:
    """``{DICOM keyword: accepted values}``; keywords are checked against the DICOM dictionary."""
    from pydicom.datadict import tag_for_keyword

    out: dict[str, list[str]] = {}
    if not isinstance(raw, dict):
        pr.add(path, f"must be a mapping of DICOM keyword to values, not {_type_name(raw)}")
        return out
    for key, values in raw.items():
        p = _join(path, str(key))
        if not isinstance(key, str) or tag_for_keyword(key) is None:
            pr.add(p, f"unknown DICOM keyword {key!r}")
            continue
        vals = _str_list(values, p, pr)
        if vals is not None:
            if not vals:
                pr.add(p, "at least one value is required")
            out[key] = vals
    return out


def _retry(raw: Any, pr: _Problems) -> RetrySettings:
    d = RetrySettings()
    m = _mapping(raw, "retry", {"max_attempts", "backoff_seconds"}, set(), pr)
    if m is None:
        return d
    backoff = d.backoff_seconds
    if "backoff_seconds" in m:
        value = m["backoff_seconds"]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list) or not value:
            pr.add("retry.backoff_seconds", f"must be a non-empty list of seconds, not {_type_name(value)}")
        else:
            backoff = [_check_number(v, f"retry.backoff_seconds[{i}]", pr, 0.0) for i, v in enumerate(value)]
    return RetrySettings(max_attempts=_int(m, "max_attempts", "retry", pr, d.max_attempts, 1), backoff_seconds=backoff)


_LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "0.0.0.0", "::"}


def _check_cross(cfg: NodeConfig, pr: _Problems) -> None:
    """Problems that involve two sections: loops back into the node, outbox inside the spool."""
    called = {r.called_ae for r in cfg.routes}
    spool = Path(os.path.abspath(cfg.storage.spool_dir))
    for name, dest in cfg.destinations.items():
        path = f"destinations.{name}"
        if (dest.type == "dicom" and dest.port == cfg.node.port and dest.ae_title in called
                and (dest.host in _LOCAL_HOSTS or dest.host == cfg.node.host)):
            pr.add(path, f"sends back to this node's own route {dest.ae_title!r} (an endless loop)")
        if dest.type == "folder" and dest.path is not None:
            out = Path(os.path.abspath(dest.path))
            if out == spool or spool in out.parents or out in spool.parents:
                pr.add(_join(path, "path"), f"overlaps storage.spool_dir {spool} (keep them apart)")


_TOP_KEYS = {"node", "storage", "study_stable_seconds", "models", "destinations", "routes", "retry", "workers"}


def parse_config(raw: Any, base_dir: Path = Path("."), source: str = "config") -> NodeConfig:
    """Validate a parsed YAML document; relative paths are resolved against ``base_dir``.

    Raises :class:`ConfigError` listing every problem found (not just the first), each
    prefixed with its YAML path, e.g. ``routes[1].model: unknown model 'soft2'``.
    """
    pr = _Problems()
    base_dir = Path(base_dir)
    if raw is None:
        raise ConfigError(["<root>: the config is empty"], source)
    top = _mapping(raw, "", _TOP_KEYS, {"models", "destinations", "routes"}, pr)
    if top is None:
        raise ConfigError(pr.items, source)
    node = _node(top["node"], pr, base_dir) if top.get("node") is not None else NodeSettings()
    storage = (_storage(top["storage"], pr, base_dir) if top.get("storage") is not None
               else _storage({}, pr, base_dir))
    models = _models(top["models"], pr, base_dir) if "models" in top else {}
    destinations = _destinations(top["destinations"], pr, base_dir) if "destinations" in top else {}
    model_keys = set(top["models"]) if isinstance(top.get("models"), dict) else set()
    dest_keys = set(top["destinations"]) if isinstance(top.get("destinations"), dict) else set()
    routes = _routes(top["routes"], pr, model_keys, dest_keys) if "routes" in top else []
    cfg = NodeConfig(
        node=node,
        storage=storage,
        study_stable_seconds=_number(top, "study_stable_seconds", "", pr, 10.0),
        models=models,
        destinations=destinations,
        routes=routes,
        retry=_retry(top["retry"], pr) if top.get("retry") is not None else RetrySettings(),
        workers=_int(top, "workers", "", pr, 1, 1),
        source=source,
    )
    for dest in cfg.destinations.values():
        if dest.type == "dicom" and dest.calling_ae is None:
            dest.calling_ae = node.ae_title
    _check_cross(cfg, pr)
    if pr.items:
        raise ConfigError(pr.items, source)
    return cfg
