"""The node config's schema: pure parsing and validation of the YAML document, no I/O.

Every check appends to one problem list instead of raising, so the user sees every mistake at
once, each with the YAML path that points at it (``routes[0].model: unknown model 'x'``).
Whether files and folders are usable on this machine is :mod:`.environment`'s job.  The
sections with most to say have their own modules (:mod:`.routes`, :mod:`.webhooks`), and each
destination kind parses its own keys (:mod:`dicom_node.destinations`).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from dicom_node.engine.defaults import DEFAULT_OVERLAP
from dicom_node.engine.devices import device_problem, tile_problem
from dicom_node.engine.yaml_config import ConfigError, Problems, join_path, type_name

from .fields import (
    MISSING,
    ae_title_field,
    file_path,
    folder_path,
    integer,
    mapping,
    number,
    resolve,
    retry_settings,
    string,
    string_list,
    tls_settings,
)
from .routes import parse_routes
from .settings import (
    DestinationSettings,
    ModelSettings,
    NodeConfig,
    NodeSettings,
    RetrySettings,
    StorageSettings,
    TLSSettings,
    WebSettings,
)
from .webhooks import parse_notifications

__all__ = ["parse_schema"]


def _node(raw: Any, problems: Problems, base_dir: Path) -> NodeSettings:
    d = NodeSettings()
    m = mapping(raw, "node", {"ae_title", "host", "port", "max_associations", "network_timeout", "dimse_timeout",
                               "acse_timeout", "request_timeout", "max_instance_bytes", "max_decode_bytes", "tls",
                               "name"}, set(), problems)
    if m is None:
        return d
    name = string(m, "name", "node", problems, d.name)
    if name and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", str(name)):
        problems.add("node.name",
                     f"{name!r}: letters, digits, '.', '_' and '-' (at most 64; it names files in the spool)")
        name = d.name
    return NodeSettings(
        name=name or "",
        ae_title=ae_title_field(m, "ae_title", "node", problems, d.ae_title),
        host=string(m, "host", "node", problems, d.host),
        port=integer(m, "port", "node", problems, d.port, 1, 65535),
        max_associations=integer(m, "max_associations", "node", problems, d.max_associations, 1),
        network_timeout=number(m, "network_timeout", "node", problems, d.network_timeout, 0, False),
        dimse_timeout=number(m, "dimse_timeout", "node", problems, d.dimse_timeout, 0, False),
        acse_timeout=number(m, "acse_timeout", "node", problems, d.acse_timeout, 0, False),
        request_timeout=number(m, "request_timeout", "node", problems, d.request_timeout, 0, False),
        max_decode_bytes=integer(m, "max_decode_bytes", "node", problems, d.max_decode_bytes, 1),
        max_instance_bytes=integer(m, "max_instance_bytes", "node", problems, d.max_instance_bytes, 1),
        tls=tls_settings(m["tls"], "node.tls", problems, base_dir, server=True) if m.get("tls") is not None else None,
    )


def _storage(raw: Any, problems: Problems, base_dir: Path) -> StorageSettings:
    d = StorageSettings()
    m = mapping(raw, "storage", {"spool_dir", "min_free_bytes", "database", "lease_seconds",
                                      "keep_sources_days"}, set(), problems)
    if m is None:
        return d
    database = string(m, "database", "storage", problems, None)
    if database is not None and not database.startswith(("postgresql://", "postgres://")):
        problems.add("storage.database", "must be a postgresql://user@host/db URL (omit it for SQLite in the spool)")
        database = None
    return StorageSettings(
        spool_dir=folder_path(m, "spool_dir", "storage", problems, base_dir, d.spool_dir) or d.spool_dir,
        min_free_bytes=integer(m, "min_free_bytes", "storage", problems, d.min_free_bytes, 0),
        database=database,
        lease_seconds=number(m, "lease_seconds", "storage", problems, d.lease_seconds, 1.0, True),
        keep_sources_days=number(m, "keep_sources_days", "storage", problems, d.keep_sources_days, 0.0),
    )


def _named_sections(raw: Any, key: str, what: str, problems: Problems) -> dict[str, Any] | None:
    """A top-level mapping of names to settings (``models``, ``destinations``): at least one."""
    m = mapping(raw, key, set(raw) if isinstance(raw, dict) else set(), set(), problems)
    if m is not None and not m:
        problems.add(key, f"at least one {what} is required")
    return m


def _models(raw: Any, problems: Problems, base_dir: Path) -> dict[str, ModelSettings]:
    out: dict[str, ModelSettings] = {}
    m = _named_sections(raw, "models", "model", problems)
    if m is None:
        return out
    for name, spec in m.items():
        path = join_path("models", str(name))
        s = mapping(spec, path, {"path", "device", "tile", "overlap", "inverse"}, {"path"}, problems)
        if s is None:
            continue
        model_path = _model_path(s, path, problems, base_dir)
        device = string(s, "device", path, problems, "auto")
        bad_device = device_problem(device)
        if bad_device:
            problems.add(join_path(path, "device"), bad_device)
        tile = None
        if s.get("tile") is not None:
            tile = integer(s, "tile", path, problems, None, 0)
            bad_tile = None if tile is None else tile_problem(tile)
            if bad_tile:
                problems.add(join_path(path, "tile"), bad_tile)
        inverse = string(s, "inverse", path, problems, "auto")
        if inverse not in (None, "auto", "none"):
            inverse = str(resolve(base_dir, inverse))
            if not Path(inverse).is_file():
                problems.add(join_path(path, "inverse"), f"model file not found: {inverse} (or 'auto' / 'none')")
        out[str(name)] = ModelSettings(
            name=str(name), path=model_path or "", device=device, tile=tile,
            overlap=number(s, "overlap", path, problems, DEFAULT_OVERLAP, 0.0, True, 1.0, False),
            inverse=inverse or "auto",
        )
    return out


def _model_path(s: dict[str, Any], path: str, problems: Problems, base_dir: Path) -> str | None:
    """A model file (relative to the config's folder) or a bundled model name such as ``default``
    (kept as given: :mod:`.environment` looks for a file of that name first)."""
    value = string(s, "path", path, problems)
    if value is None:
        return None
    bare = Path(value)
    if bare.suffix == "" and len(bare.parts) == 1:
        return value
    return str(resolve(base_dir, value))


def _destinations(raw: Any, problems: Problems, base_dir: Path) -> dict[str, DestinationSettings]:
    """Each destination parsed by the kind its ``type`` names (:mod:`dicom_node.destinations`)."""
    # The kinds import this package's readers: the registry is imported when first needed, so
    # that either package can be imported first.
    from dicom_node.destinations import KINDS, kind_names

    out: dict[str, DestinationSettings] = {}
    m = _named_sections(raw, "destinations", "destination", problems)
    if m is None:
        return out
    for name, spec in m.items():
        path = join_path("destinations", str(name))
        if not isinstance(spec, dict):
            problems.add(path, f"must be a mapping, not {type_name(spec)}")
            continue
        kind = spec.get("type", MISSING)
        if kind is MISSING:
            problems.add(join_path(path, "type"), f"required key missing ({kind_names()})")
        elif not isinstance(kind, str) or kind not in KINDS:
            problems.add(join_path(path, "type"), f"must be {kind_names()}, not {kind!r}")
        else:
            out[str(name)] = KINDS[kind].parse(str(name), spec, path, problems, base_dir)
    return out


def _web(raw: Any, node: NodeSettings, problems: Problems, base_dir: Path) -> WebSettings:
    """``web:`` (absent: the defaults, on loopback; ``web: null`` is handled by the caller: off)."""
    d = WebSettings()
    m = mapping(raw, "web", {"host", "port", "users", "tls", "session_minutes", "refresh_seconds", "trusted_proxies",
                             "stow_rs"}, set(), problems)
    if m is None:
        return d
    users: dict[str, str] = {}
    if m.get("users") is not None:
        names = set(m["users"]) if isinstance(m["users"], dict) else set()
        um = mapping(m["users"], "web.users", names, set(), problems)
        for name, hashed in (um or {}).items():
            if not isinstance(hashed, str) or not hashed.startswith("$argon2"):
                problems.add(join_path("web.users", str(name)), "must be an Argon2 password hash "
                             "($argon2id$...; make one with `dicom-node hash-password`)")
            else:
                users[str(name)] = hashed
    tls = None
    if m.get("tls") == "node":
        if node.tls is None:
            problems.add("web.tls", "'node' reuses node.tls, but node.tls is not set")
        else:
            tls = TLSSettings(cert=node.tls.cert, key=node.tls.key)
    elif m.get("tls") is not None:
        tls = tls_settings(m["tls"], "web.tls", problems, base_dir, server=True)
        if tls is not None and tls.require_client_cert:
            problems.add("web.tls.require_client_cert", "not supported for the console (log in with a password)")
    tokens, client_ca, subjects, token_names = _stow_rs(m.get("stow_rs"), problems, base_dir)
    if client_ca is not None and tls is None and "tls" not in m:
        problems.add("web.stow_rs.client_ca", "needs web.tls (client certificates come with HTTPS)")
    if client_ca is not None and tls is not None and tls.ca is not None:
        problems.add("web.tls.ca", "the CA of STOW-RS client certificates is web.stow_rs.client_ca: set that one only")
    return WebSettings(
        host=string(m, "host", "web", problems, d.host),
        port=integer(m, "port", "web", problems, d.port, 0, 65535),
        users=users,
        tls=tls,
        session_minutes=number(m, "session_minutes", "web", problems, d.session_minutes, 0, False),
        refresh_seconds=number(m, "refresh_seconds", "web", problems, d.refresh_seconds, 0, False),
        trusted_proxies=_networks(m.get("trusted_proxies"), "web.trusted_proxies", problems),
        stow_rs_tokens=tokens,
        stow_rs_client_ca=client_ca,
        stow_rs_subjects=subjects,
        stow_rs_token_names=token_names,
    )


def _stow_rs(raw: Any, problems: Problems,
             base_dir: Path) -> tuple[list[str] | None, Path | None, list[str] | None, dict[str, str]]:
    """``web.stow_rs: {tokens: [argon2id hashes] | {NAME: hash}, client_ca: FILE, subjects: [RFC 4514
    names]}``: STOW-RS ingest for every called AE, by bearer token, by client certificate, or either.
    Returns (tokens, client_ca, subjects, token names); tokens None: ingest off, [] with a
    client_ca: by certificate only; token names: NAME -> hash when tokens is a mapping."""
    if raw is None:
        return None, None, None, {}
    m = mapping(raw, "web.stow_rs", {"tokens", "client_ca", "subjects"}, set(), problems)
    if m is None:
        return [], None, None, {}
    if "tokens" not in m and "client_ca" not in m:
        problems.add("web.stow_rs.tokens", "required key missing (tokens, client_ca or both)")
    names: dict[str, str] = {}
    if isinstance(m.get("tokens"), dict):
        for name, hashed in m["tokens"].items():
            if not isinstance(name, str) or not name.strip() or "=" in name or not isinstance(hashed, str):
                problems.add(join_path("web.stow_rs.tokens", str(name)), "must be NAME: ARGON2-HASH (a name "
                             "without '=', which certificate subjects have)")
            else:
                names[name.strip()] = hashed
        tokens: list[str] | None = list(names.values())
        where = {hashed: join_path("web.stow_rs.tokens", name) for name, hashed in names.items()}
    else:
        tokens = string_list(m.get("tokens"), "web.stow_rs.tokens", problems) if m.get("tokens") is not None else None
        where = {hashed: join_path("web.stow_rs.tokens", i) for i, hashed in enumerate(tokens or [])}
    if "tokens" in m and not tokens:
        problems.add("web.stow_rs.tokens",
                     "at least one token hash is required (make one with `dicom-node hash-password`)")
    for hashed in tokens or []:
        if not hashed.startswith("$argon2"):
            problems.add(where[hashed], "must be an Argon2 hash ($argon2id$...; make one with `dicom-node hash-password`)")
    client_ca = file_path(m, "client_ca", "web.stow_rs", problems, base_dir) if "client_ca" in m else None
    subjects = None
    if m.get("subjects") is not None:
        subjects = [s.strip() for s in string_list(m["subjects"], "web.stow_rs.subjects", problems) or []]
        for i, subject in enumerate(subjects):
            if "=" not in subject:
                problems.add(join_path("web.stow_rs.subjects", i),
                             "must be a certificate subject as RFC 4514 writes it (CN=name,O=organisation)")
        if not subjects:
            problems.add("web.stow_rs.subjects", "at least one subject (or leave the key out: any certificate "
                         "that client_ca signed)")
        if client_ca is None:
            problems.add("web.stow_rs.subjects", "needs web.stow_rs.client_ca")
    return ([t for t in tokens or [] if t.startswith("$argon2")], client_ca, subjects,
            {n: h for n, h in names.items() if h.startswith("$argon2")})


def _stow_rs_clients(cfg: NodeConfig, problems: Problems) -> None:
    """Each route's ``stow_rs_clients`` names a client web.stow_rs knows: a token's name, or a
    certificate subject that ``subjects`` lists (any subject when only ``client_ca`` is set)."""
    web = cfg.web
    for i, route in enumerate(cfg.routes):
        for j, client in enumerate(route.stow_rs_clients or []):
            if web is None or web.stow_rs_tokens is None:
                known = False
            elif "=" in client:
                known = web.stow_rs_client_ca is not None and (web.stow_rs_subjects is None
                                                              or client in web.stow_rs_subjects)
            else:
                known = client in web.stow_rs_token_names
            if not known:
                problems.add(join_path(join_path(join_path("routes", i), "stow_rs_clients"), j),
                             f"unknown STOW-RS client {client!r}: not a name of web.stow_rs.tokens nor a "
                             "certificate subject web.stow_rs.subjects/client_ca allows")


def _networks(raw: Any, path: str, problems: Problems) -> list[str]:
    """Addresses or CIDRs (``10.0.0.0/8``), as ``ipaddress`` writes them."""
    import ipaddress

    out: list[str] = []
    for i, value in enumerate(string_list(raw, path, problems) or [] if raw is not None else []):
        try:
            out.append(str(ipaddress.ip_network(value.strip(), strict=False)))
        except ValueError:
            problems.add(join_path(path, i), f"not an IP address or network: {value!r}")
    return out


def _check_cross(cfg: NodeConfig, problems: Problems) -> None:
    """Problems that involve two sections: each destination's kind checks its own (a loop back
    into the node, an outbox inside the spool), then the console's port."""
    from dicom_node.destinations import KINDS

    for name, dest in cfg.destinations.items():
        KINDS[dest.type].finish(dest, cfg, join_path("destinations", name), problems)
    web = cfg.web
    if web is not None and web.port == cfg.node.port and web.port and (
            web.host == cfg.node.host or {web.host, cfg.node.host} & {"0.0.0.0", "::"}):
        problems.add("web.port", f"the DICOM listener already uses port {web.port}")
    _stow_rs_clients(cfg, problems)


_TOP_KEYS = {"node", "storage", "study_stable_seconds", "models", "destinations", "routes", "retry", "workers",
             "web", "notifications"}


def parse_schema(raw: Any, base_dir: Path = Path("."), source: str = "config") -> tuple[NodeConfig, list[str]]:
    """Parse a YAML document into a :class:`NodeConfig` and its problems (``path: message``).

    Relative paths are resolved against ``base_dir`` (nothing is read).  Raises
    :class:`ConfigError` only when the document is not a mapping at all.
    """
    problems = Problems()
    base_dir = Path(base_dir)
    if raw is None:
        raise ConfigError(["<root>: the config is empty"], source)
    top = mapping(raw, "", _TOP_KEYS, {"models", "destinations", "routes"}, problems)
    if top is None:
        raise ConfigError(problems.items, source)
    node = _node(top["node"], problems, base_dir) if top.get("node") is not None else NodeSettings()
    storage = (_storage(top["storage"], problems, base_dir) if top.get("storage") is not None
               else _storage({}, problems, base_dir))
    models = _models(top["models"], problems, base_dir) if "models" in top else {}
    destinations = _destinations(top["destinations"], problems, base_dir) if "destinations" in top else {}
    model_keys = set(top["models"]) if isinstance(top.get("models"), dict) else set()
    dest_keys = set(top["destinations"]) if isinstance(top.get("destinations"), dict) else set()
    routes = parse_routes(top["routes"], problems, model_keys, dest_keys) if "routes" in top else []
    cfg = NodeConfig(
        node=node,
        storage=storage,
        study_stable_seconds=number(top, "study_stable_seconds", "", problems, 10.0),
        models=models,
        destinations=destinations,
        routes=routes,
        retry=retry_settings(top["retry"], problems) if top.get("retry") is not None else RetrySettings(),
        workers=integer(top, "workers", "", problems, 1, 1),
        web=None if "web" in top and top["web"] is None else _web(top.get("web") or {}, node, problems, base_dir),
        notifications=(parse_notifications(top["notifications"], problems, base_dir)
                       if top.get("notifications") is not None else []),
        source=source,
    )
    _check_cross(cfg, problems)
    return cfg, problems.items
