"""The ``routes:`` section's schema: each route's keys, its name, and the checks between routes
(a route that an earlier one always wins is a duplicate; two routes whose series would be
numbered alike).  Pure, like :mod:`.schema`, which calls :func:`parse_routes`.
"""
from __future__ import annotations

from typing import Any, Iterable

from dicom_node.engine.defaults import CAUTION_LABEL, DEFAULT_FIDELITY_ACTION, FIDELITY_ACTIONS
from dicom_node.engine.yaml_config import Problems, join_path, type_name

from .fields import ae_title_field, ae_title_problem, boolean, mapping, number, string, string_list
from .settings import ON_MAX_WAIT, RouteSettings, derive_route_name

__all__ = ["parse_routes"]


def parse_routes(raw: Any, problems: Problems, model_keys: set[str], dest_keys: set[str]) -> list[RouteSettings]:
    """``routes:``, a list; ``model_keys``/``dest_keys``: the names a route may refer to."""
    out: list[RouteSettings] = []
    if not isinstance(raw, list):
        problems.add("routes", f"must be a list, not {type_name(raw)}")
        return out
    if not raw:
        problems.add("routes", "at least one route is required")
    for i, spec in enumerate(raw):
        path = join_path("routes", i)
        s = mapping(spec, path, {"name", "called_ae", "model", "destinations", "calling_ae", "match",
                                 "forward_original", "fidelity", "label", "study_stable_seconds", "max_wait_seconds",
                                 "on_max_wait", "series_description", "stow_rs_clients"},
                     {"called_ae", "model", "destinations"}, problems)
        if s is None:
            continue
        called = ae_title_field(s, "called_ae", path, problems)
        model = string(s, "model", path, problems)
        if model is not None and model not in model_keys:
            problems.add(join_path(path, "model"), f"unknown model {model!r}")
        dests: list[str] = []
        if "destinations" in s:
            dests = string_list(s["destinations"], join_path(path, "destinations"), problems) or []
            if not dests and isinstance(s["destinations"], list):
                problems.add(join_path(path, "destinations"), "at least one destination is required")
            for j, d in enumerate(dests):
                if d not in dest_keys:
                    problems.add(join_path(join_path(path, "destinations"), j), f"unknown destination {d!r}")
        calling = None
        if s.get("calling_ae") is not None:
            calling = string_list(s["calling_ae"], join_path(path, "calling_ae"), problems)
            for j, ae in enumerate(calling or []):
                problem = ae_title_problem(ae)
                if problem:
                    problems.add(join_path(join_path(path, "calling_ae"), j), problem)
            calling = [ae.strip() for ae in calling or []]
        clients = None
        if s.get("stow_rs_clients") is not None:
            clients = [c.strip() for c in string_list(s["stow_rs_clients"], join_path(path, "stow_rs_clients"),
                                                      problems) or []]
            if not clients:
                problems.add(join_path(path, "stow_rs_clients"), "at least one client (or leave the key out: "
                             "every STOW-RS client)")
        match = _match(s.get("match"), join_path(path, "match"), problems) if s.get("match") is not None else {}
        route = RouteSettings(
            called_ae=called or "", model=model or "", destinations=dests, calling_ae=calling, match=match,
            stow_rs_clients=clients,
            forward_original=boolean(s, "forward_original", path, problems, False),
            fidelity_action=_fidelity_action(s.get("fidelity"), join_path(path, "fidelity"), problems),
            label=_label(s, path, problems),
            name=_route_name(s, path, problems, called or "", model or "", out),
            study_stable_seconds=number(s, "study_stable_seconds", path, problems, None),
            max_wait_seconds=number(s, "max_wait_seconds", path, problems, None, 0, False),
            on_max_wait=_choice(s, "on_max_wait", path, problems, ON_MAX_WAIT, "proceed"),
            **_series_description(s, path, problems),
        )
        for j, earlier in enumerate(out):
            if called and earlier.called_ae == called and _shadows(earlier, route):
                problems.add(join_path(path, "called_ae"), f"duplicate AE title {called!r}: routes[{j}] already takes "
                             "every instance this route would (give it a narrower calling_ae/match or remove one)")
                break
        out.append(route)
    _series_number_clashes(out, problems)
    return out


def _route_name(s: dict[str, Any], path: str, problems: Problems, called: str, model: str, earlier: list[RouteSettings]) -> str:
    """The route's stable name: given, or ``<called AE>-<model>`` (``-2``, ``-3``... when taken)."""
    taken = {r.name for r in earlier}
    if "name" in s:
        name = string(s, "name", path, problems, "") or ""
        if name.strip().lstrip("-").isdigit():
            problems.add(join_path(path, "name"), f"must not be a number ({name!r}): give it a word")
        elif name in taken:
            problems.add(join_path(path, "name"), f"duplicate route name {name!r}")
        return name
    base = derive_route_name(called, model)
    name, n = base, 2
    while name in taken:
        name, n = f"{base}-{n}", n + 1
    return name


def _series_description(s: dict[str, Any], path: str, problems: Problems) -> dict[str, str]:
    """``series_description``: a template with {route}, {model}, {source} (absent: the default)."""
    if "series_description" not in s:
        return {}
    from dicom_node.routing import series_description_problem

    value = string(s, "series_description", path, problems, None)
    problem = series_description_problem(value) if value is not None else None
    if problem:
        problems.add(join_path(path, "series_description"), problem)
    return {} if value is None or problem else {"series_description": value}


def _series_number_clashes(routes: list[RouteSettings], problems: Problems) -> None:
    """Two routes whose outputs would get the same SeriesNumbers (their names hash alike)."""
    from dicom_node.routing import series_number_block

    for i, route in enumerate(routes):
        for j, earlier in enumerate(routes[:i]):
            if series_number_block(route.name) == series_number_block(earlier.name):
                problems.add(join_path(join_path("routes", i), "name"),
                             f"route {route.name!r} would number its series like routes[{j}] ({earlier.name!r}): "
                             "give one of them another name")


def _choice(s: dict[str, Any], key: str, path: str, problems: Problems, choices: tuple[str, ...], default: str) -> str:
    value = s.get(key, default)
    if value not in choices:
        problems.add(join_path(path, key), f"must be {' or '.join(choices)}, not {value!r}")
        return default
    return str(value)  # one of ``choices``


def _fidelity_action(raw: Any, path: str, problems: Problems) -> str:
    """``fidelity: {action: record | flag | withhold}`` (absent: the default action)."""
    if raw is None:
        return DEFAULT_FIDELITY_ACTION
    s = mapping(raw, path, {"action"}, set(), problems)
    if s is None:
        return DEFAULT_FIDELITY_ACTION
    action = string(s, "action", path, problems, DEFAULT_FIDELITY_ACTION)
    if action not in FIDELITY_ACTIONS:
        problems.add(join_path(path, "action"), f"must be one of {', '.join(FIDELITY_ACTIONS)}, not {action!r}")
        return DEFAULT_FIDELITY_ACTION
    return action


def _label(s: dict[str, Any], path: str, problems: Problems) -> str | None:
    """``label``: the caution text (absent: the default; null, false or "": none)."""
    if "label" not in s:
        return CAUTION_LABEL
    value = s["label"]
    if value is None or value is False or value == "":
        return None
    if not isinstance(value, str):
        problems.add(join_path(path, "label"), f"must be a text, or null for no label, not {type_name(value)}")
        return CAUTION_LABEL
    if len(value) > 1024:
        problems.add(join_path(path, "label"), "must be at most 1024 characters")
    return value


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


def _fold(values: Iterable[str]) -> set[str]:
    return {str(v).strip().casefold() for v in values}


def _match(raw: Any, path: str, problems: Problems) -> dict[str, list[str]]:
    """``{DICOM keyword: accepted values}``; keywords are checked against the DICOM dictionary."""
    from pydicom.datadict import tag_for_keyword

    out: dict[str, list[str]] = {}
    if not isinstance(raw, dict):
        problems.add(path, f"must be a mapping of DICOM keyword to values, not {type_name(raw)}")
        return out
    for key, values in raw.items():
        p = join_path(path, str(key))
        if not isinstance(key, str) or tag_for_keyword(key) is None:
            problems.add(p, f"unknown DICOM keyword {key!r}")
            continue
        vals = string_list(values, p, problems)
        if vals is not None:
            if not vals:
                problems.add(p, "at least one value is required")
            out[key] = vals
    return out

