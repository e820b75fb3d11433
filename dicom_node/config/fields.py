"""Typed readers for one value of a YAML mapping, each adding a ``path: message`` problem
instead of raising, so a config's every mistake is reported at once with its YAML path.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, overload

from dicom_node.engine.yaml_config import Problems, join_path, type_name

from .settings import RetrySettings, TLSSettings

__all__ = ["MISSING", "mapping", "integer", "number", "check_number", "boolean", "string", "string_list",
           "ae_title_problem", "ae_title_field", "resolve", "folder_path", "file_path", "tls_settings",
           "retry_settings"]

MISSING = object()


def mapping(raw: Any, path: str, allowed: set[str], required: set[str], problems: Problems) -> dict[str, Any] | None:
    """Check that ``raw`` is a mapping with only ``allowed`` keys and all ``required`` ones."""
    if not isinstance(raw, dict):
        problems.add(path, f"must be a mapping, not {type_name(raw)}")
        return None
    for key in raw:
        if not isinstance(key, str):
            problems.add(path, f"key {key!r} must be a string")
        elif key not in allowed:
            problems.add(join_path(path, key), "unknown key")
    for key in sorted(required):
        if key not in raw:
            problems.add(join_path(path, key), "required key missing")
    return raw


def integer(raw: dict[str, Any], key: str, path: str, problems: Problems, default: Any, lo: int | None = None,
         hi: int | None = None) -> Any:
    p = join_path(path, key)
    value = raw.get(key, MISSING)
    if value is MISSING:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        problems.add(p, f"must be an integer, not {type_name(value)}")
        return default
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        if hi is None:
            problems.add(p, f"must be >= {lo}")
        else:
            problems.add(p, f"must be {lo}..{hi}")
        return default
    return value


def number(raw: dict[str, Any], key: str, path: str, problems: Problems, default: Any, lo: float = 0.0,
            lo_inclusive: bool = True, hi: float | None = None, hi_inclusive: bool = True) -> Any:
    p = join_path(path, key)
    value = raw.get(key, MISSING)
    if value is MISSING:
        return default
    return check_number(value, p, problems, default, lo, lo_inclusive, hi, hi_inclusive)


def check_number(value: Any, p: str, problems: Problems, default: Any, lo: float = 0.0,
                  lo_inclusive: bool = True, hi: float | None = None, hi_inclusive: bool = True) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        problems.add(p, f"must be a number, not {type_name(value)}")
        return default
    bad_lo = value < lo if lo_inclusive else value <= lo
    bad_hi = hi is not None and (value > hi if hi_inclusive else value >= hi)
    if bad_lo or bad_hi:
        lo_txt = f"{'>=' if lo_inclusive else '>'} {lo:g}"
        hi_txt = "" if hi is None else f" and {'<=' if hi_inclusive else '<'} {hi:g}"
        problems.add(p, f"must be {lo_txt}{hi_txt}")
        return default
    return float(value)


def boolean(raw: dict[str, Any], key: str, path: str, problems: Problems, default: bool) -> bool:
    value = raw.get(key, MISSING)
    if value is MISSING:
        return default
    if not isinstance(value, bool):
        problems.add(join_path(path, key), f"must be true or false, not {type_name(value)}")
        return default
    return value


@overload
def string(raw: dict[str, Any], key: str, path: str, problems: Problems, default: str) -> str: ...
@overload
def string(raw: dict[str, Any], key: str, path: str, problems: Problems, default: None = None) -> str | None: ...
def string(raw: dict[str, Any], key: str, path: str, problems: Problems, default: str | None = None) -> str | None:
    """``raw[key]`` when it is a non-empty string, else ``default`` (a problem when present but not one)."""
    value = raw.get(key, MISSING)
    if value is MISSING:
        return default
    if not isinstance(value, str) or not value.strip():
        what = "empty" if isinstance(value, str) else type_name(value)
        problems.add(join_path(path, key), f"must be a non-empty string, not {what}")
        return default
    return value


def ae_title_problem(value: Any) -> str | None:
    """Why ``value`` is not a usable AE title (DICOM PS3.5 AE VR), or ``None`` if it is.

    At most 16 characters of the default repertoire, no backslash, no control characters,
    not only spaces.  Leading/trailing spaces are not significant and are stripped.
    """
    if not isinstance(value, str):
        return f"AE title must be a string, not {type_name(value)}"
    if not value.strip():
        return "AE title is empty"
    if len(value) > 16:
        return f"AE title {value!r} is longer than 16 characters"
    if "\\" in value:
        return f"AE title {value!r} contains a backslash"
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        return f"AE title {value!r} contains control characters"
    if not value.isascii():
        return f"AE title {value!r} contains non-ASCII characters"
    return None


def ae_title_field(raw: dict[str, Any], key: str, path: str, problems: Problems, default: Any = None) -> Any:
    value = raw.get(key, MISSING)
    if value is MISSING:
        return default
    problem = ae_title_problem(value)
    if problem:
        problems.add(join_path(path, key), problem)
        return default
    return value.strip()


def resolve(base_dir: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base_dir / p)


def string_list(value: Any, path: str, problems: Problems) -> list[str] | None:
    """A list of strings; a single string is accepted as a one-item list."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        problems.add(path, f"must be a list of strings, not {type_name(value)}")
        return None
    out = []
    for i, item in enumerate(value):
        if isinstance(item, bool) or not isinstance(item, (str, int, float)):
            problems.add(join_path(path, i), f"must be a string, not {type_name(item)}")
        else:
            out.append(str(item))
    return out


def folder_path(raw: dict[str, Any], key: str, path: str, problems: Problems, base_dir: Path,
                default: Path | None) -> Path | None:
    """A folder path (relative to ``base_dir``), normalised; whether it can be written is checked
    with the environment (:mod:`.probes`)."""
    value = raw.get(key, MISSING)
    if value is MISSING:
        if default is None:
            return None
        p = resolve(base_dir, str(default))
    else:
        value = string(raw, key, path, problems)
        if value is None:
            return None
        p = resolve(base_dir, value)
    return Path(os.path.normpath(p))


def file_path(raw: dict[str, Any], key: str, path: str, problems: Problems, base_dir: Path) -> Path | None:
    """A file path relative to ``base_dir`` (whether it exists: :mod:`.probes`)."""
    value = string(raw, key, path, problems)
    return None if value is None else resolve(base_dir, value)


def tls_settings(raw: Any, path: str, problems: Problems, base_dir: Path, server: bool) -> TLSSettings | None:
    """``tls:`` of our listener (``server``: cert and key required, optional client certificates)
    or towards a peer (``ca`` to trust, optional client ``cert``/``key``, ``check_hostname``)."""
    allowed = {"cert", "key", "ca", "require_client_cert"} if server else {"cert", "key", "ca", "check_hostname"}
    m = mapping(raw, path, allowed, {"cert", "key"} if server else set(), problems)
    if m is None:
        return None
    cert = file_path(m, "cert", path, problems, base_dir)
    key = file_path(m, "key", path, problems, base_dir)
    ca = file_path(m, "ca", path, problems, base_dir)
    if not server and (("cert" in m) != ("key" in m)):
        problems.add(path, "cert and key go together (our client certificate)")
    require = boolean(m, "require_client_cert", path, problems, False)
    if require and "ca" not in m:
        problems.add(join_path(path, "ca"),
                     "required when require_client_cert is true (the CA that signs client certificates)")
    return TLSSettings(cert=cert, key=key, ca=ca, require_client_cert=require,
                       check_hostname=boolean(m, "check_hostname", path, problems, True))


def retry_settings(raw: Any, problems: Problems, path: str = "retry",
                   default: RetrySettings | None = None) -> RetrySettings:
    """A ``retry`` mapping (the node's, or a webhook's at ``path``); missing keys from ``default``."""
    default = default or RetrySettings()
    m = mapping(raw, path, {"max_attempts", "backoff_seconds"}, set(), problems)
    if m is None:
        return default
    backoff = default.backoff_seconds
    if "backoff_seconds" in m:
        value = m["backoff_seconds"]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list) or not value:
            problems.add(f"{path}.backoff_seconds", f"must be a non-empty list of seconds, not {type_name(value)}")
        else:
            backoff = [check_number(v, f"{path}.backoff_seconds[{i}]", problems, 0.0) for i, v in enumerate(value)]
    return RetrySettings(max_attempts=integer(m, "max_attempts", path, problems, default.max_attempts, 1),
                         backoff_seconds=backoff)


def http_url_problem(url: str, use_instead: str) -> str | None:
    """Why ``url`` cannot be an endpoint the node calls over HTTP (a webhook receiver, a DICOMweb
    archive), or None: it must be http(s) with a host, without credentials (they would be
    logged, stored and shown with it; ``use_instead`` says where they belong).  The message
    never echoes the URL: it may hold a token."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises for a port that is not a number
    except ValueError:
        return "must be an http:// or https:// URL with a host"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "must be an http:// or https:// URL with a host"
    if parts.username is not None or parts.password is not None:
        return f"credentials in the URL are not allowed (they would end up in logs): {use_instead}"
    return None
