"""The ``notifications:`` section's schema: a list of webhooks (:class:`WebhookSettings`).

Credentials go in a webhook's ``secret`` or ``headers``, never in its URL: a problem message
never echoes a URL or a header value, since either may hold a token.  Pure, like :mod:`.schema`,
which calls :func:`parse_notifications`.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from dicom_node.engine.yaml_config import Problems, join_path, type_name

from .fields import boolean, file_path, http_url_problem, mapping, number, retry_settings, string, string_list
from .settings import NOTIFICATION_EVENTS, WebhookSettings, webhook_retry

__all__ = ["parse_notifications"]


def parse_notifications(raw: Any, problems: Problems, base_dir: Path) -> list[WebhookSettings]:
    """``notifications:``: a list of webhooks."""
    out: list[WebhookSettings] = []
    if not isinstance(raw, list):
        problems.add("notifications", f"must be a list of webhooks, not {type_name(raw)}")
        return out
    for i, spec in enumerate(raw):
        path = join_path("notifications", i)
        m = mapping(spec, path, {"name", "url", "events", "secret", "headers", "include_phi", "tls", "timeout",
                                 "retry"}, {"url"}, problems)
        if m is None:
            continue
        url = _webhook_url(string(m, "url", path, problems, "") or "", join_path(path, "url"), problems)
        events = list(NOTIFICATION_EVENTS)
        if "events" in m:
            events = string_list(m["events"], join_path(path, "events"), problems) or []
            for j, e in enumerate(events):
                if e not in NOTIFICATION_EVENTS:
                    problems.add(join_path(join_path(path, "events"), j),
                                 f"unknown event {e!r} (one of {', '.join(NOTIFICATION_EVENTS)})")
        secret = string(m, "secret", path, problems, None)
        headers = _headers(m.get("headers"), join_path(path, "headers"), problems)
        tls: dict[str, Any] = {}
        if m.get("tls") is not None:
            tls = mapping(m["tls"], join_path(path, "tls"), {"ca", "verify", "cert", "key"}, set(), problems) or {}
        tpath = join_path(path, "tls")
        name = string(m, "name", path, problems, None) or f"webhook-{i}"
        if name in {w.name for w in out}:
            problems.add(join_path(path, "name"), f"duplicate webhook name {name!r}")
        out.append(WebhookSettings(
            name=name, url=url, events=events, secret=secret, headers=headers,
            include_phi=boolean(m, "include_phi", path, problems, False),
            ca=file_path(tls, "ca", tpath, problems, base_dir), verify=boolean(tls, "verify", tpath, problems, True),
            cert=file_path(tls, "cert", tpath, problems, base_dir),
            key=file_path(tls, "key", tpath, problems, base_dir),
            timeout=number(m, "timeout", path, problems, 10.0, 0, False),
            retry=(retry_settings(m["retry"], problems, join_path(path, "retry"), webhook_retry())
                   if m.get("retry") is not None else webhook_retry())))
    return out


def _webhook_url(url: str, path: str, problems: Problems) -> str:
    """An http(s) URL without credentials (they would be logged, stored and shown with it)."""
    if url and (problem := http_url_problem(url, "use the webhook's secret or headers (e.g. Authorization)")):
        problems.add(path, problem)
    return url


def _headers(raw: Any, path: str, problems: Problems) -> dict[str, str]:
    """A webhook's extra HTTP headers: names and values on one line each."""
    out: dict[str, str] = {}
    if raw is None:
        return out
    if not isinstance(raw, dict):
        problems.add(path, f"must be a mapping of header name to value, not {type_name(raw)}")
        return out
    for name, value in raw.items():
        p = join_path(path, str(name))
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+", name):
            problems.add(p, "not a valid HTTP header name")
        elif not isinstance(value, str) or any(ch in value for ch in "\r\n\0"):
            problems.add(p, "must be text on one line")  # the value is a secret: not echoed
        else:
            out[name] = value
    return out

