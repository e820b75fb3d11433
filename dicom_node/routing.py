"""Routing: which route (model + destinations) handles an instance.  Pure functions.

Semantics (documented in the README, tested in tests/test_routing.py):

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
* No route matches: the instance is still acknowledged and kept in the spool, but it is
  *not* translated ("unmatched").  Its original is forwarded untouched to the
  destinations of the **first route of that called AE that allows the calling AE** if
  that route has ``forward_original: true`` (:func:`fallback_route`); otherwise it stays
  in the spool only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from dicom_node.config import RouteSettings

__all__ = [
    "ACCEPT", "REJECT_CALLED_AE", "REJECT_CALLING_AE", "RouteChoice",
    "association_verdict", "called_aes", "routes_for", "matches", "select_route", "fallback_route",
]

ACCEPT = "accept"
REJECT_CALLED_AE = "called-ae-not-recognised"
REJECT_CALLING_AE = "calling-ae-not-allowed"


@dataclass(frozen=True)
class RouteChoice:
    """The routing decision for one instance.

    ``index`` is the route's position in the config (for the state database);
    ``matched`` False means no route condition held and ``index`` names the fallback
    route (or is None when the called AE has no route allowing the caller).
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


def matches(match: dict[str, Iterable[str]], attributes: dict[str, Any]) -> bool:
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
