"""How the console shows things: its Jinja2 environment, the filters its pages use (times,
sizes, person names, UIDs) and the throughput chart.  Pure functions of their values, so the
pages' handlers in :mod:`.app` only fetch and pass data.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from jinja2 import Environment

__all__ = ["templates", "bar_chart"]



def templates(folder: Path) -> Environment:
    """The console's template environment: autoescaping (patient names are text, never markup)
    and the filters the pages use to show times, sizes, names and UIDs."""
    from jinja2 import Environment, FileSystemLoader, select_autoescape

    env = Environment(loader=FileSystemLoader(str(folder)), autoescape=select_autoescape(["html"]))
    env.filters.update(when=_when, ago=_ago, size=_size, short=_short, person=_person)
    return env


def _when(t: float | None) -> str:
    return "-" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(t)))


def _ago(t: float | None) -> str:
    if t is None:
        return "never"
    s = max(0.0, time.time() - float(t))
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if s >= size:
            return f"{s / size:.0f} {unit} ago"
    return f"{s:.0f} s ago"


def _size(n: float | None) -> str:
    n = float(n or 0)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _person(name: str | None) -> str:
    """A DICOM person name (``Family^Given^Middle``) as people read it: ``Family, Given Middle``."""
    parts = [p for p in str(name or "").split("=")[0].split("^")]
    if not any(parts):
        return "(no name)"
    family, rest = parts[0], " ".join(p for p in parts[1:] if p)
    return f"{family}, {rest}" if family and rest else family or rest


def _short(uid: str | None, keep: int = 12) -> str:
    uid = str(uid or "")
    return uid if len(uid) <= keep + 3 else "..." + uid[-keep:]


def bar_chart(series: dict[str, list[int]], width: int = 600, height: int = 120) -> dict[str, Any]:
    """Grouped bars (received, translated, delivered per time bin) as SVG rectangles."""
    names = list(series)
    bins = len(next(iter(series.values()))) if series else 0
    top = max([1] + [v for values in series.values() for v in values])
    group = width / max(1, bins)
    bar = group * 0.8 / max(1, len(names))
    bars = []
    for b in range(bins):
        for k, name in enumerate(names):
            value = series[name][b]
            h = (height - 14) * value / top
            bars.append({"x": round(b * group + group * 0.1 + k * bar, 1), "y": round(height - h, 1),
                         "w": round(bar * 0.9, 1), "h": round(h, 1), "cls": name,
                         "title": f"{name}: {value} ({(bins - b) * 5} to {(bins - b - 1) * 5} min ago)"})
    return {"width": width, "height": height, "bars": bars, "top": top, "names": names,
            "totals": {n: sum(v) for n, v in series.items()}}
