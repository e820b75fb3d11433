"""Routing: which route (model + destinations) handles an instance.  Pure functions.

Semantics (documented in docs/operations.md "Routing", tested in tests/test_routing.py):

* A route belongs to one **called AE title** (compared exactly, after stripping spaces).
* ``calling_ae`` is an allow-list of sender AE titles; ``None`` allows every sender.
  An association is accepted when at least one route of its called AE allows its calling
  AE (:func:`association_verdict`); otherwise it is rejected before any data flows.
* ``match`` maps a DICOM keyword to accepted values; **every** keyword must match
  (AND), one of its values suffices (OR).  Comparison is case-insensitive after
  stripping spaces; for a multi-valued element (e.g. ImageType) any of its values may
  match.  A missing or empty element matches only if ``""`` is among the accepted values.
* Routes are tried in config order; the **first** route of the called AE that allows the
  calling AE and whose ``match`` holds wins (:func:`select_route`).
* Each route's outputs form series of their own: SeriesDescription from the route's
  ``series_description`` template (:func:`series_description`), SeriesNumber from the source
  series number and a block of numbers that the route's *name* picks (:func:`series_numbers`),
  so reordering routes changes nothing and two radiologists' series in one study differ.
* No route matches: the instance is still acknowledged and kept in the spool, but it is
  *not* translated ("unmatched").  Its original is forwarded untouched to the
  destinations of the **first route of that called AE that allows the calling AE** if
  that route has ``forward_original: true`` (:func:`fallback_route`); otherwise it stays
  in the spool only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from dicom_node.config.settings import RouteSettings

__all__ = [
    "ACCEPT", "REJECT_CALLED_AE", "REJECT_CALLING_AE", "RouteChoice",
    "association_verdict", "called_aes", "routes_for", "matches", "select_route", "fallback_route",
    "series_description", "series_description_problem", "series_number_block", "series_numbers",
]

ACCEPT = "accept"
REJECT_CALLED_AE = "called-ae-not-recognised"
REJECT_CALLING_AE = "calling-ae-not-allowed"


@dataclass(frozen=True)
class RouteChoice:
    """The routing decision for one instance.

    ``index`` is the route's position in this config's route list, to look it up there: what
    is recorded (state database, logs) is the route's *name* (``routes[index].name``), which
    survives reordering and reloads.  ``matched`` False means no route condition held and
    ``index`` is the fallback route's (or None when the called AE has no route allowing the
    caller).
    """

    index: int | None
    matched: bool


def _norm(text: Any) -> str:
    return str(text).strip()


def called_aes(routes: Sequence[RouteSettings]) -> set[str]:
    return {_norm(r.called_ae) for r in routes}


def _allows(route: RouteSettings, calling_ae: str) -> bool:
    if route.calling_ae is None:
        return True
    return _norm(calling_ae) in {_norm(a) for a in route.calling_ae}


def routes_for(routes: Sequence[RouteSettings], called_ae: str, calling_ae: str) -> list[int]:
    """Indexes of the routes of ``called_ae`` that allow ``calling_ae``, in config order."""
    called = _norm(called_ae)
    return [i for i, r in enumerate(routes) if _norm(r.called_ae) == called and _allows(r, calling_ae)]


def stow_rs_unlisted(routes: Sequence[RouteSettings], called_ae: str, calling_ae: str, client: str) -> str | None:
    """The name of a route of ``called_ae`` taking ``calling_ae`` whose ``stow_rs_clients`` does not
    list ``client`` (a STOW-RS client's identity), else None.  Why every route, not one: each route
    of the called AE gets what is posted to it, so each must admit the client."""
    for i in routes_for(routes, called_ae, calling_ae):
        clients = routes[i].stow_rs_clients
        if clients is not None and client not in clients:
            return routes[i].name
    return None


def association_verdict(routes: Sequence[RouteSettings], called_ae: str, calling_ae: str) -> str:
    """ACCEPT, or why an association request must be rejected."""
    if _norm(called_ae) not in called_aes(routes):
        return REJECT_CALLED_AE
    if not routes_for(routes, called_ae, calling_ae):
        return REJECT_CALLING_AE
    return ACCEPT


def _values(element_value: Any) -> list[str]:
    if element_value is None:
        return []
    if isinstance(element_value, (list, tuple)) or type(element_value).__name__ == "MultiValue":
        return [_norm(v).upper() for v in element_value if _norm(v)]
    text = _norm(element_value)
    return [text.upper()] if text else []


def matches(match: Mapping[str, Iterable[str]], attributes: dict[str, Any]) -> bool:
    """True when every keyword in ``match`` has one of its accepted values in ``attributes``."""
    for keyword, accepted in match.items():
        wanted = {_norm(v).upper() for v in accepted}
        have = _values(attributes.get(keyword))
        if not have:
            if "" not in wanted:
                return False
        elif not wanted.intersection(have):
            return False
    return True


def select_route(
    routes: Sequence[RouteSettings], called_ae: str, calling_ae: str, attributes: dict[str, Any]
) -> RouteChoice:
    """The first matching route, else the fallback (see module docstring)."""
    candidates = routes_for(routes, called_ae, calling_ae)
    for i in candidates:
        if matches(routes[i].match or {}, attributes):
            return RouteChoice(index=i, matched=True)
    return RouteChoice(index=candidates[0] if candidates else None, matched=False)


def fallback_route(routes: Sequence[RouteSettings], choice: RouteChoice) -> RouteSettings | None:
    """The route whose ``forward_original`` applies to an unmatched instance, if any."""
    if choice.matched or choice.index is None:
        return None
    route = routes[choice.index]
    return route if route.forward_original else None


def match_keywords(routes: Sequence[RouteSettings]) -> set[str]:
    """Every DICOM keyword some route conditions on (what the SCP must read from a dataset)."""
    return {k for r in routes for k in (r.match or {})}


# -- naming a route's output series ------------------------------------------------------
SERIES_BLOCKS = 899  # a route's SeriesNumbers: block * 1000 + source number % 1000, block 1..899
FLAGGED_SERIES_ADD = 1_000_000  # a flagged output's series: the same number + this
_TEMPLATE_FIELDS = ("route", "model", "source")


def series_number_block(route_name: str) -> int:
    """The route's block of SeriesNumbers (1..899), from a CRC-32 of its name: stable when routes
    are reordered or added (``check-config`` reports two routes that draw the same block)."""
    import zlib

    return 1 + zlib.crc32(route_name.encode("utf-8")) % SERIES_BLOCKS


def series_numbers(route_name: str, source_series_number: object) -> tuple[int, int]:
    """(SeriesNumber, SeriesNumber of the flagged series) of a route's output of a source series:
    ``block * 1000 + source % 1000`` (source 3 on a route of block 412: 412003), flagged
    + 1,000,000 (1412003).  A missing or odd source number counts as 0."""
    try:
        base = int(str(source_series_number or 0).strip() or 0)
    except ValueError:
        base = 0
    number = series_number_block(route_name) * 1000 + base % 1000
    return number, number + FLAGGED_SERIES_ADD


def series_description_problem(template: str) -> str | None:
    """Why ``template`` cannot be a route's ``series_description`` (None: it can)."""
    import string

    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        return f"is not a valid template ({exc}): use {{route}}, {{model}}, {{source}}"
    unknown = sorted({f for f in fields if f not in _TEMPLATE_FIELDS})
    if unknown:
        return f"unknown field(s) {', '.join('{' + f + '}' for f in unknown)}: use {{route}}, {{model}}, {{source}}"
    if not template.strip():
        return "must not be empty"
    return None


def series_description(template: str, *, route: str, model: str, source: object) -> str:
    """The route's SeriesDescription for an output of a source series described ``source``;
    separators left dangling by an empty source are dropped ("kim style: " -> "kim style").
    The engine cuts it to 64 characters (with the flagged prefix where it applies)."""
    source_text = " ".join(str(source or "").split())
    text = template.format(route=route, model=model, source=source_text)
    return " ".join(text.split()).rstrip(" :-/|,")
