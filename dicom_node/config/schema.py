"""The node config's schema: pure parsing and validation of the YAML document, no I/O.

Every check appends to one problem list instead of raising, so the user sees every mistake at
once, each with the YAML path that points at it (``routes[0].model: unknown model 'x'``).
Whether files and folders are usable on this machine is :mod:`.environment`'s job.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Iterable

from dicom_node.engine.defaults import CAUTION_LABEL, DEFAULT_FIDELITY_ACTION, DEFAULT_OVERLAP, FIDELITY_ACTIONS
from dicom_node.engine.devices import device_problem, tile_problem
from dicom_node.engine.yaml_config import ConfigError, Problems, join_path, type_name

from .fields import (MISSING, ae_title_field, ae_title_problem, boolean, check_number, folder_path, integer, mapping,
                     number, resolve, string, string_list)
from .settings import (DESTINATION_KINDS, NOTIFICATION_EVENTS, ON_MAX_WAIT, DestinationSettings, DicomDestination,
                       FolderDestination, ModelSettings, NodeConfig, NodeSettings, RetrySettings, RouteSettings,
                       StorageSettings, TLSSettings, WebhookSettings, WebSettings, derive_route_name,
                       webhook_retry)

__all__ = ["parse_schema"]



def _file(raw: dict, key: str, path: str, pr: Problems, base_dir: Path) -> Path | None:
    """A file path relative to ``base_dir`` (whether it exists: :mod:`.environment`)."""
    value = string(raw, key, path, pr)
    return None if value is None else resolve(base_dir, value)


def _tls(raw: Any, path: str, pr: Problems, base_dir: Path, server: bool) -> TLSSettings | None:
    allowed = {"cert", "key", "ca", "require_client_cert"} if server else {"cert", "key", "ca", "check_hostname"}
    m = mapping(raw, path, allowed, {"cert", "key"} if server else set(), pr)
    if m is None:
        return None
    cert = _file(m, "cert", path, pr, base_dir)
    key = _file(m, "key", path, pr, base_dir)
    ca = _file(m, "ca", path, pr, base_dir)
    if not server and (("cert" in m) != ("key" in m)):
        pr.add(path, "cert and key go together (our client certificate)")
    require = boolean(m, "require_client_cert", path, pr, False)
    if require and "ca" not in m:
        pr.add(join_path(path, "ca"), "required when require_client_cert is true (the CA that signs client certificates)")
    tls = TLSSettings(cert=cert, key=key, ca=ca, require_client_cert=require,
                      check_hostname=boolean(m, "check_hostname", path, pr, True))
    return tls


def _node(raw: Any, pr: Problems, base_dir: Path) -> NodeSettings:
    d = NodeSettings()
    m = mapping(raw, "node", {"ae_title", "host", "port", "max_associations", "network_timeout", "dimse_timeout",
                               "acse_timeout", "request_timeout", "max_instance_bytes", "max_decode_bytes", "tls",
                               "name"}, set(), pr)
    if m is None:
        return d
    name = string(m, "name", "node", pr, d.name)
    if name and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", str(name)):
        pr.add("node.name", f"{name!r}: letters, digits, '.', '_' and '-' (at most 64; it names files in the spool)")
        name = d.name
    return NodeSettings(
        name=name or "",
        ae_title=ae_title_field(m, "ae_title", "node", pr, d.ae_title),
        host=string(m, "host", "node", pr, d.host),
        port=integer(m, "port", "node", pr, d.port, 1, 65535),
        max_associations=integer(m, "max_associations", "node", pr, d.max_associations, 1),
        network_timeout=number(m, "network_timeout", "node", pr, d.network_timeout, 0, False),
        dimse_timeout=number(m, "dimse_timeout", "node", pr, d.dimse_timeout, 0, False),
        acse_timeout=number(m, "acse_timeout", "node", pr, d.acse_timeout, 0, False),
        request_timeout=number(m, "request_timeout", "node", pr, d.request_timeout, 0, False),
        max_decode_bytes=integer(m, "max_decode_bytes", "node", pr, d.max_decode_bytes, 1),
        max_instance_bytes=integer(m, "max_instance_bytes", "node", pr, d.max_instance_bytes, 1),
        tls=_tls(m["tls"], "node.tls", pr, base_dir, server=True) if m.get("tls") is not None else None,
    )


def _storage(raw: Any, pr: Problems, base_dir: Path) -> StorageSettings:
    d = StorageSettings()
    m = mapping(raw, "storage", {"spool_dir", "min_free_bytes", "database", "lease_seconds",
                                      "keep_sources_days"}, set(), pr)
    if m is None:
        return d
    database = string(m, "database", "storage", pr, None)
    if database is not None and not database.startswith(("postgresql://", "postgres://")):
        pr.add("storage.database", "must be a postgresql://user@host/db URL (omit it for SQLite in the spool)")
        database = None
    return StorageSettings(
        spool_dir=folder_path(m, "spool_dir", "storage", pr, base_dir, d.spool_dir) or d.spool_dir,
        min_free_bytes=integer(m, "min_free_bytes", "storage", pr, d.min_free_bytes, 0),
        database=database,
        lease_seconds=number(m, "lease_seconds", "storage", pr, d.lease_seconds, 1.0, True),
        keep_sources_days=number(m, "keep_sources_days", "storage", pr, d.keep_sources_days, 0.0),
    )


def _named_sections(raw: Any, key: str, what: str, pr: Problems) -> dict[str, Any] | None:
    """A top-level mapping of names to settings (``models``, ``destinations``): at least one."""
    m = mapping(raw, key, set(raw) if isinstance(raw, dict) else set(), set(), pr)
    if m is not None and not m:
        pr.add(key, f"at least one {what} is required")
    return m


def _models(raw: Any, pr: Problems, base_dir: Path) -> dict[str, ModelSettings]:
    out: dict[str, ModelSettings] = {}
    m = _named_sections(raw, "models", "model", pr)
    if m is None:
        return out
    for name, spec in m.items():
        path = join_path("models", str(name))
        s = mapping(spec, path, {"path", "device", "tile", "overlap", "inverse"}, {"path"}, pr)
        if s is None:
            continue
        model_path = _model_path(s, path, pr, base_dir)
        device = string(s, "device", path, pr, "auto")
        if device_problem(device):
            pr.add(join_path(path, "device"), device_problem(device))
        tile = None
        if s.get("tile") is not None:
            tile = integer(s, "tile", path, pr, None, 0)
            if tile is not None and tile_problem(tile):
                pr.add(join_path(path, "tile"), tile_problem(tile))
        inverse = string(s, "inverse", path, pr, "auto")
        if inverse not in (None, "auto", "none"):
            inverse = str(resolve(base_dir, inverse))
            if not Path(inverse).is_file():
                pr.add(join_path(path, "inverse"), f"model file not found: {inverse} (or 'auto' / 'none')")
        out[str(name)] = ModelSettings(
            name=str(name), path=model_path or "", device=device, tile=tile,
            overlap=number(s, "overlap", path, pr, DEFAULT_OVERLAP, 0.0, True, 1.0, False),
            inverse=inverse or "auto",
        )
    return out


def _model_path(s: dict, path: str, pr: Problems, base_dir: Path) -> str | None:
    """A model file (relative to the config's folder) or a bundled model name such as ``default``
    (kept as given: :mod:`.environment` looks for a file of that name first)."""
    value = string(s, "path", path, pr)
    if value is None:
        return None
    bare = Path(value)
    if bare.suffix == "" and len(bare.parts) == 1:
        return value
    return str(resolve(base_dir, value))


def _fidelity_action(raw: Any, path: str, pr: Problems) -> str:
    """``fidelity: {action: record | flag | withhold}`` (absent: the default action)."""
    if raw is None:
        return DEFAULT_FIDELITY_ACTION
    s = mapping(raw, path, {"action"}, set(), pr)
    if s is None:
        return DEFAULT_FIDELITY_ACTION
    action = string(s, "action", path, pr, DEFAULT_FIDELITY_ACTION)
    if action not in FIDELITY_ACTIONS:
        pr.add(join_path(path, "action"), f"must be one of {', '.join(FIDELITY_ACTIONS)}, not {action!r}")
        return DEFAULT_FIDELITY_ACTION
    return action


def _label(s: dict, path: str, pr: Problems) -> str | None:
    """``label``: the caution text (absent: the default; null, false or "": none)."""
    if "label" not in s:
        return CAUTION_LABEL
    value = s["label"]
    if value is None or value is False or value == "":
        return None
    if not isinstance(value, str):
        pr.add(join_path(path, "label"), f"must be a text, or null for no label, not {type_name(value)}")
        return CAUTION_LABEL
    if len(value) > 1024:
        pr.add(join_path(path, "label"), "must be at most 1024 characters")
    return value


def _destinations(raw: Any, pr: Problems, base_dir: Path) -> dict[str, DestinationSettings]:
    out: dict[str, DestinationSettings] = {}
    m = _named_sections(raw, "destinations", "destination", pr)
    if m is None:
        return out
    common = {"type"}
    dicom_keys = {"ae_title", "host", "port", "calling_ae", "tls", "timeout"}
    folder_keys = {"path"}
    for name, spec in m.items():
        path = join_path("destinations", str(name))
        if not isinstance(spec, dict):
            pr.add(path, f"must be a mapping, not {type_name(spec)}")
            continue
        kind = spec.get("type", MISSING)
        if kind is MISSING:
            pr.add(join_path(path, "type"), "required key missing (dicom or folder)")
            continue
        if kind == "dicom":
            s = mapping(spec, path, common | dicom_keys, {"ae_title", "host", "port"}, pr)
            tls_raw = s.get("tls")
            out[str(name)] = DicomDestination(
                name=str(name),
                ae_title=ae_title_field(s, "ae_title", path, pr),
                host=string(s, "host", path, pr),
                port=integer(s, "port", path, pr, None, 1, 65535),
                calling_ae=ae_title_field(s, "calling_ae", path, pr),
                tls=_tls(tls_raw, join_path(path, "tls"), pr, base_dir, server=False) if tls_raw is not None else None,
                timeout=number(s, "timeout", path, pr, None, 0, False),
            )
        elif kind == "folder":
            s = mapping(spec, path, common | folder_keys, {"path"}, pr)
            out[str(name)] = FolderDestination(name=str(name), path=folder_path(s, "path", path, pr, base_dir, None))
        else:
            pr.add(join_path(path, "type"), f"must be dicom or folder, not {kind!r}")
    return out


def _routes(raw: Any, pr: Problems, model_keys: set, dest_keys: set) -> list[RouteSettings]:
    out: list[RouteSettings] = []
    if not isinstance(raw, list):
        pr.add("routes", f"must be a list, not {type_name(raw)}")
        return out
    if not raw:
        pr.add("routes", "at least one route is required")
    for i, spec in enumerate(raw):
        path = join_path("routes", i)
        s = mapping(spec, path, {"name", "called_ae", "model", "destinations", "calling_ae", "match",
                                 "forward_original", "fidelity", "label", "study_stable_seconds", "max_wait_seconds",
                                 "on_max_wait", "series_description"},
                     {"called_ae", "model", "destinations"}, pr)
        if s is None:
            continue
        called = ae_title_field(s, "called_ae", path, pr)
        model = string(s, "model", path, pr)
        if model is not None and model not in model_keys:
            pr.add(join_path(path, "model"), f"unknown model {model!r}")
        dests: list[str] = []
        if "destinations" in s:
            dests = string_list(s["destinations"], join_path(path, "destinations"), pr) or []
            if not dests and isinstance(s["destinations"], list):
                pr.add(join_path(path, "destinations"), "at least one destination is required")
            for j, d in enumerate(dests):
                if d not in dest_keys:
                    pr.add(join_path(join_path(path, "destinations"), j), f"unknown destination {d!r}")
        calling = None
        if s.get("calling_ae") is not None:
            calling = string_list(s["calling_ae"], join_path(path, "calling_ae"), pr)
            for j, ae in enumerate(calling or []):
                problem = ae_title_problem(ae)
                if problem:
                    pr.add(join_path(join_path(path, "calling_ae"), j), problem)
            calling = [ae.strip() for ae in calling or []]
        match = _match(s.get("match"), join_path(path, "match"), pr) if s.get("match") is not None else {}
        route = RouteSettings(
            called_ae=called or "", model=model or "", destinations=dests, calling_ae=calling, match=match,
            forward_original=boolean(s, "forward_original", path, pr, False),
            fidelity_action=_fidelity_action(s.get("fidelity"), join_path(path, "fidelity"), pr),
            label=_label(s, path, pr),
            name=_route_name(s, path, pr, called or "", model or "", out),
            study_stable_seconds=number(s, "study_stable_seconds", path, pr, None),
            max_wait_seconds=number(s, "max_wait_seconds", path, pr, None, 0, False),
            on_max_wait=_choice(s, "on_max_wait", path, pr, ON_MAX_WAIT, "proceed"),
            **_series_description(s, path, pr),
        )
        for j, earlier in enumerate(out):
            if called and earlier.called_ae == called and _shadows(earlier, route):
                pr.add(join_path(path, "called_ae"), f"duplicate AE title {called!r}: routes[{j}] already takes "
                       "every instance this route would (give it a narrower calling_ae/match or remove one)")
                break
        out.append(route)
    _series_number_clashes(out, pr)
    return out


def _series_description(s: dict, path: str, pr: Problems) -> dict[str, str]:
    """``series_description``: a template with {route}, {model}, {source} (absent: the default)."""
    if "series_description" not in s:
        return {}
    from dicom_node.routing import series_description_problem

    value = string(s, "series_description", path, pr, None)
    problem = series_description_problem(value) if value is not None else None
    if problem:
        pr.add(join_path(path, "series_description"), problem)
    return {} if value is None or problem else {"series_description": value}


def _series_number_clashes(routes: list[RouteSettings], pr: Problems) -> None:
    """Two routes whose outputs would get the same SeriesNumbers (their names hash alike)."""
    from dicom_node.routing import series_number_block

    for i, route in enumerate(routes):
        for j, earlier in enumerate(routes[:i]):
            if series_number_block(route.name) == series_number_block(earlier.name):
                pr.add(join_path(join_path("routes", i), "name"),
                       f"route {route.name!r} would number its series like routes[{j}] ({earlier.name!r}): "
                       "give one of them another name")


def _route_name(s: dict, path: str, pr: Problems, called: str, model: str, earlier: list[RouteSettings]) -> str:
    """The route's stable name: given, or ``<called AE>-<model>`` (``-2``, ``-3``... when taken)."""
    taken = {r.name for r in earlier}
    if "name" in s:
        name = string(s, "name", path, pr, "") or ""
        if name.strip().lstrip("-").isdigit():
            pr.add(join_path(path, "name"), f"must not be a number ({name!r}): give it a word")
        elif name in taken:
            pr.add(join_path(path, "name"), f"duplicate route name {name!r}")
        return name
    base = derive_route_name(called, model)
    name, n = base, 2
    while name in taken:
        name, n = f"{base}-{n}", n + 1
    return name


def _choice(s: dict, key: str, path: str, pr: Problems, choices: tuple[str, ...], default: str) -> str:
    value = s.get(key, default)
    if value not in choices:
        pr.add(join_path(path, key), f"must be {' or '.join(choices)}, not {value!r}")
        return default
    return value


def _notifications(raw: Any, pr: Problems, base_dir: Path) -> list[WebhookSettings]:
    """``notifications:``: a list of webhooks."""
    out: list[WebhookSettings] = []
    if not isinstance(raw, list):
        pr.add("notifications", f"must be a list of webhooks, not {type_name(raw)}")
        return out
    for i, spec in enumerate(raw):
        path = join_path("notifications", i)
        m = mapping(spec, path, {"name", "url", "events", "secret", "headers", "include_phi", "tls", "timeout",
                                 "retry"}, {"url"}, pr)
        if m is None:
            continue
        url = _webhook_url(string(m, "url", path, pr, "") or "", join_path(path, "url"), pr)
        events = list(NOTIFICATION_EVENTS)
        if "events" in m:
            events = string_list(m["events"], join_path(path, "events"), pr) or []
            for j, e in enumerate(events):
                if e not in NOTIFICATION_EVENTS:
                    pr.add(join_path(join_path(path, "events"), j),
                           f"unknown event {e!r} (one of {', '.join(NOTIFICATION_EVENTS)})")
        secret = string(m, "secret", path, pr, None)
        headers = _headers(m.get("headers"), join_path(path, "headers"), pr)
        tls: dict = {}
        if m.get("tls") is not None:
            tls = mapping(m["tls"], join_path(path, "tls"), {"ca", "verify", "cert", "key"}, set(), pr) or {}
        tpath = join_path(path, "tls")
        name = string(m, "name", path, pr, None) or f"webhook-{i}"
        if name in {w.name for w in out}:
            pr.add(join_path(path, "name"), f"duplicate webhook name {name!r}")
        out.append(WebhookSettings(
            name=name, url=url, events=events, secret=secret, headers=headers,
            include_phi=boolean(m, "include_phi", path, pr, False),
            ca=_file(tls, "ca", tpath, pr, base_dir), verify=boolean(tls, "verify", tpath, pr, True),
            cert=_file(tls, "cert", tpath, pr, base_dir), key=_file(tls, "key", tpath, pr, base_dir),
            timeout=number(m, "timeout", path, pr, 10.0, 0, False),
            retry=_retry(m["retry"], pr, join_path(path, "retry"), webhook_retry()) if m.get("retry") is not None
            else webhook_retry()))
    return out


def _webhook_url(url: str, path: str, pr: Problems) -> str:
    """An http(s) URL without credentials (they would be logged, stored and shown with it)."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises for a port that is not a number
    except ValueError:
        parts = None
    if url and (parts is None or parts.scheme not in ("http", "https") or not parts.hostname):
        pr.add(path, "must be an http:// or https:// URL with a host")  # never echoed: it may hold a token
    elif parts is not None and (parts.username is not None or parts.password is not None):
        pr.add(path, "credentials in the URL are not allowed (they would end up in logs): "
                     "use the webhook's secret or headers (e.g. Authorization)")
    return url


def _headers(raw: Any, path: str, pr: Problems) -> dict[str, str]:
    """A webhook's extra HTTP headers: names and values on one line each."""
    out: dict[str, str] = {}
    if raw is None:
        return out
    if not isinstance(raw, dict):
        pr.add(path, f"must be a mapping of header name to value, not {type_name(raw)}")
        return out
    for name, value in raw.items():
        p = join_path(path, str(name))
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+", name):
            pr.add(p, "not a valid HTTP header name")
        elif not isinstance(value, str) or any(ch in value for ch in "\r\n\0"):
            pr.add(p, "must be text on one line")  # the value is a secret: not echoed
        else:
            out[name] = value
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


def _match(raw: Any, path: str, pr: Problems) -> dict[str, list[str]]:
    """``{DICOM keyword: accepted values}``; keywords are checked against the DICOM dictionary."""
    from pydicom.datadict import tag_for_keyword

    out: dict[str, list[str]] = {}
    if not isinstance(raw, dict):
        pr.add(path, f"must be a mapping of DICOM keyword to values, not {type_name(raw)}")
        return out
    for key, values in raw.items():
        p = join_path(path, str(key))
        if not isinstance(key, str) or tag_for_keyword(key) is None:
            pr.add(p, f"unknown DICOM keyword {key!r}")
            continue
        vals = string_list(values, p, pr)
        if vals is not None:
            if not vals:
                pr.add(p, "at least one value is required")
            out[key] = vals
    return out


def _retry(raw: Any, pr: Problems, path: str = "retry", d: RetrySettings | None = None) -> RetrySettings:
    """A ``retry`` mapping (the node's, or a webhook's at ``path``); missing keys from ``d``."""
    d = d or RetrySettings()
    m = mapping(raw, path, {"max_attempts", "backoff_seconds"}, set(), pr)
    if m is None:
        return d
    backoff = d.backoff_seconds
    if "backoff_seconds" in m:
        value = m["backoff_seconds"]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list) or not value:
            pr.add(f"{path}.backoff_seconds", f"must be a non-empty list of seconds, not {type_name(value)}")
        else:
            backoff = [check_number(v, f"{path}.backoff_seconds[{i}]", pr, 0.0) for i, v in enumerate(value)]
    return RetrySettings(max_attempts=integer(m, "max_attempts", path, pr, d.max_attempts, 1), backoff_seconds=backoff)


def _web(raw: Any, node: NodeSettings, pr: Problems, base_dir: Path) -> WebSettings:
    """``web:`` (absent: the defaults, on loopback; ``web: null`` is handled by the caller: off)."""
    d = WebSettings()
    m = mapping(raw, "web", {"host", "port", "users", "tls", "session_minutes", "refresh_seconds", "trusted_proxies",
                             "stow_rs"}, set(), pr)
    if m is None:
        return d
    users: dict[str, str] = {}
    if m.get("users") is not None:
        um = mapping(m["users"], "web.users", set(m["users"]) if isinstance(m["users"], dict) else set(), set(), pr)
        for name, hashed in (um or {}).items():
            if not isinstance(hashed, str) or not hashed.startswith("$argon2"):
                pr.add(join_path("web.users", str(name)),
                       "must be an Argon2 password hash ($argon2id$...; make one with `dicom-node hash-password`)")
            else:
                users[str(name)] = hashed
    tls = None
    if m.get("tls") == "node":
        if node.tls is None:
            pr.add("web.tls", "'node' reuses node.tls, but node.tls is not set")
        else:
            tls = TLSSettings(cert=node.tls.cert, key=node.tls.key)
    elif m.get("tls") is not None:
        tls = _tls(m["tls"], "web.tls", pr, base_dir, server=True)
        if tls is not None and tls.require_client_cert:
            pr.add("web.tls.require_client_cert", "not supported for the console (log in with a password)")
    return WebSettings(
        host=string(m, "host", "web", pr, d.host),
        port=integer(m, "port", "web", pr, d.port, 0, 65535),
        users=users,
        tls=tls,
        session_minutes=number(m, "session_minutes", "web", pr, d.session_minutes, 0, False),
        refresh_seconds=number(m, "refresh_seconds", "web", pr, d.refresh_seconds, 0, False),
        trusted_proxies=_networks(m.get("trusted_proxies"), "web.trusted_proxies", pr),
        stow_rs_tokens=_stow_rs(m.get("stow_rs"), pr),
    )


def _stow_rs(raw: Any, pr: Problems) -> list[str] | None:
    """``web.stow_rs: {tokens: [argon2id hashes]}``: STOW-RS ingest for every called AE (None: off)."""
    if raw is None:
        return None
    m = mapping(raw, "web.stow_rs", {"tokens"}, {"tokens"}, pr)
    tokens = string_list(m.get("tokens"), "web.stow_rs.tokens", pr) if m and m.get("tokens") is not None else None
    if m is not None and "tokens" in m and not tokens:
        pr.add("web.stow_rs.tokens", "at least one token hash is required (make one with `dicom-node hash-password`)")
    for i, hashed in enumerate(tokens or []):
        if not hashed.startswith("$argon2"):
            pr.add(join_path("web.stow_rs.tokens", i),
                   "must be an Argon2 hash ($argon2id$...; make one with `dicom-node hash-password`)")
    return [t for t in tokens or [] if t.startswith("$argon2")]


def _networks(raw: Any, path: str, pr: Problems) -> list[str]:
    """Addresses or CIDRs (``10.0.0.0/8``), as ``ipaddress`` writes them."""
    import ipaddress

    out: list[str] = []
    for i, value in enumerate(string_list(raw, path, pr) or [] if raw is not None else []):
        try:
            out.append(str(ipaddress.ip_network(value.strip(), strict=False)))
        except ValueError:
            pr.add(join_path(path, i), f"not an IP address or network: {value!r}")
    return out


_LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "0.0.0.0", "::"}


def _check_cross(cfg: NodeConfig, pr: Problems) -> None:
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
                pr.add(join_path(path, "path"), f"overlaps storage.spool_dir {spool} (keep them apart)")
    web = cfg.web
    if web is not None and web.port == cfg.node.port and web.port and (
            web.host == cfg.node.host or {web.host, cfg.node.host} & {"0.0.0.0", "::"}):
        pr.add("web.port", f"the DICOM listener already uses port {web.port}")


_TOP_KEYS = {"node", "storage", "study_stable_seconds", "models", "destinations", "routes", "retry", "workers",
             "web", "notifications"}


def parse_schema(raw: Any, base_dir: Path = Path("."), source: str = "config") -> tuple[NodeConfig, list[str]]:
    """Parse a YAML document into a :class:`NodeConfig` and its problems (``path: message``).

    Relative paths are resolved against ``base_dir`` (nothing is read).  Raises
    :class:`ConfigError` only when the document is not a mapping at all.
    """
    pr = Problems()
    base_dir = Path(base_dir)
    if raw is None:
        raise ConfigError(["<root>: the config is empty"], source)
    top = mapping(raw, "", _TOP_KEYS, {"models", "destinations", "routes"}, pr)
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
        study_stable_seconds=number(top, "study_stable_seconds", "", pr, 10.0),
        models=models,
        destinations=destinations,
        routes=routes,
        retry=_retry(top["retry"], pr) if top.get("retry") is not None else RetrySettings(),
        workers=integer(top, "workers", "", pr, 1, 1),
        web=None if "web" in top and top["web"] is None else _web(top.get("web") or {}, node, pr, base_dir),
        notifications=(_notifications(top["notifications"], pr, base_dir) if top.get("notifications") is not None
                       else []),
        source=source,
    )
    for dest in cfg.destinations.values():
        if dest.type == "dicom" and dest.calling_ae is None:
            dest.calling_ae = node.ae_title
    _check_cross(cfg, pr)
    return cfg, pr.items
