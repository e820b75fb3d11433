"""Which speed settings pay for the training step on this CPU (``train.amp`` / ``train.channels_last: auto``).

The step's cost is almost all convolutions (the residual blocks' 3x3 convolutions are ~90 % of
the generator's FLOPs), so what matters is which convolution kernels oneDNN has for the CPU:

* **bf16 autocast** pays where the CPU multiplies bf16 natively (``avx512_bf16``: AMD Zen 4+,
  Intel Cooper Lake / Sapphire Rapids+; ``amx_bf16``: Sapphire Rapids+).  Measured on a 2-core
  AMD EPYC with avx512_bf16 (bench/train.py, ngf 64 / 9 blocks / 256 px): ~0.5x the fp32 step.
  Without those instructions oneDNN converts to fp32 and back around each kernel and bf16 only
  costs time, so ``auto`` keeps fp32 there (the earlier Intel Xeons of this project had none).
  Losses under bf16 stay within a few per cent of the fp32 ones step by step (bench/train.py
  records both); the loss reductions, the history pool and the optimiser stay in float32.
* **channels_last** (NHWC): slower than NCHW for fp32 on both CPUs measured; under bf16 about
  even.  ``auto`` keeps NCHW unless a measurement on this machine says NHWC is faster.

:func:`cpu_fast_settings` decides from the CPU's flags by default.  ``measure=True`` also times a
residual block (forward + backward at the real channel count, ~1-2 s once) in each candidate
setting and keeps the fastest; the result is cached per CPU model, flags, torch version and
ngf in ``$XDG_CACHE_HOME/dicom-node/cpu_speed.json`` so later runs decide instantly.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

__all__ = ["cpu_features", "native_bf16", "cpu_fast_settings", "measure_settings"]

BF16_FLAGS = ("avx512_bf16", "amx_bf16")
_ON = {"on", "bf16", "true", "1", "yes"}
_OFF = {"off", "fp32", "false", "0", "no"}


def _cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str]:
    try:
        for line in Path(cpuinfo).read_text(errors="replace").splitlines():
            if line.startswith(("flags", "Features")):  # x86 / arm
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _cpu_model(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    try:
        for line in Path(cpuinfo).read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def cpu_features(cpuinfo: str | Path = "/proc/cpuinfo") -> dict[str, Any]:
    """What the decision looks at: CPU model, torch's CPU capability, bf16-related flags, oneDNN."""
    flags = _cpu_flags(cpuinfo)
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except Exception:  # very old torch
        capability = "unknown"
    try:
        onednn_bf16 = bool(torch.backends.mkldnn.is_available()  # type: ignore[no-untyped-call]  # torch leaves it unannotated
                           and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:
        onednn_bf16 = False
    return {
        "cpu": _cpu_model(cpuinfo),
        "capability": capability,
        "bf16_flags": sorted(f for f in flags if f in BF16_FLAGS),
        "avx512": "avx512f" in flags,
        "onednn": bool(torch.backends.mkldnn.is_available()),  # type: ignore[no-untyped-call]  # as above
        "onednn_bf16": onednn_bf16,
        "torch": torch.__version__,
    }


def native_bf16(features: dict[str, Any] | None = None) -> bool:
    """True where this CPU multiplies bf16 in hardware and torch's oneDNN uses it."""
    f = features if features is not None else cpu_features()
    return bool(f.get("bf16_flags")) and bool(f.get("onednn_bf16")) and str(f.get("capability", "")).startswith("AVX512")


def _choice(value: Any, name: str) -> bool | None:
    """A config/override value as True / False, or None for auto."""
    if value is None or isinstance(value, bool):
        return value
    v = str(value).strip().lower()
    if v == "auto":
        return None
    if v in _ON:
        return True
    if v in _OFF:
        return False
    raise ValueError(f"{name}: {value!r} is not one of auto, on/bf16, off")


# ---------------------------------------------------------------------- micro-benchmark

def _block(channels: int) -> torch.nn.Module:
    from dicom_node.engine.generator import ResnetBlock

    return ResnetBlock(channels)


def _time_block(amp: bool, channels_last: bool, channels: int, size: int, repeats: int) -> float:
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net = _block(channels).to(memory_format=fmt)  # type: ignore[call-overload]  # Module.to takes memory_format; torch's stubs omit it
    x = torch.randn(2, channels, size, size).contiguous(memory_format=fmt).requires_grad_(True)
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if amp else contextlib.nullcontext
    best = float("inf")
    for i in range(repeats + 1):  # first run: warm-up (oneDNN primitive creation)
        t0 = time.perf_counter()
        with ctx():
            y = net(x)
        y.float().square().mean().backward()
        dt = time.perf_counter() - t0
        if i:
            best = min(best, dt)
        net.zero_grad(set_to_none=True)
        x.grad = None
    return best


def measure_settings(candidates: list[tuple[bool, bool]], *, channels: int = 256, size: int = 32,
                     repeats: int = 3) -> dict[str, Any]:
    """Time a residual block (fwd + bwd) in each ``(amp, channels_last)`` candidate; fastest wins.

    Candidates are interleaved per repeat so that other load on the machine hits them alike.
    """
    times: dict[tuple[bool, bool], float] = {c: float("inf") for c in candidates}
    for _ in range(repeats):
        for c in candidates:
            times[c] = min(times[c], _time_block(c[0], c[1], channels, size, 1))
    best = min(times, key=times.__getitem__)
    return {"amp": best[0], "channels_last": best[1],
            "times_s": {f"{'bf16' if a else 'fp32'}{' NHWC' if cl else ''}": t for (a, cl), t in times.items()}}


def _cache_file() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dicom-node" / "cpu_speed.json"


def _cache_key(features: dict[str, Any], channels: int, candidates: list[tuple[bool, bool]]) -> str:
    flags = ",".join(sorted(_cpu_flags()))
    raw = json.dumps([features.get("cpu"), features.get("capability"), features.get("torch"), flags, channels,
                      sorted(candidates)])
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def _measured(candidates: list[tuple[bool, bool]], features: dict[str, Any], channels: int,
              cache: Path | None) -> dict[str, Any]:
    key = _cache_key(features, channels, candidates)
    entries: dict[str, Any] = {}
    if cache is not None:
        try:
            entries = json.loads(cache.read_text())
        except (OSError, ValueError):
            entries = {}
        hit = entries.get(key)
        if isinstance(hit, dict) and "amp" in hit and "channels_last" in hit:
            return hit
    m = measure_settings(candidates, channels=channels)
    m["candidates"] = [list(c) for c in candidates]
    if cache is not None:
        entries[key] = m
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(entries, indent=1))
            tmp.replace(cache)
        except OSError:
            pass  # a read-only home: measure again next time
    return m


# ---------------------------------------------------------------------- the decision

def cpu_fast_settings(amp: Any = "auto", channels_last: Any = "auto", *, measure: bool = False, ngf: int = 64,
                      cache: str | Path | None = "default", features: dict[str, Any] | None = None) -> dict[str, bool]:
    """``{"amp": bool, "channels_last": bool}`` for the training step on this CPU.

    ``amp`` / ``channels_last`` take the trainer's config values: ``"auto"`` decides here,
    ``"bf16"``/``"on"``/``True`` and ``"off"``/``False`` are returned as given (an override).
    The environment variables ``DICOM_NODE_CPU_AMP`` and ``DICOM_NODE_CPU_CHANNELS_LAST``
    (``on``/``off``) override ``"auto"`` too.

    ``auto`` rule: bf16 autocast where the CPU has native bf16 (``avx512_bf16`` / ``amx_bf16``
    with an AVX-512 torch build and oneDNN), NCHW memory format.  With ``measure=True`` the
    candidates the rule allows (fp32 always; bf16 only with native bf16; NCHW and NHWC) are timed
    on a residual block of ``4 * ngf`` channels and the fastest is used, cached per machine
    (``cache=None``: no cache file).  Never raises for an unknown CPU: it then answers fp32/NCHW.
    """
    want_amp = _choice(amp, "train.amp")
    want_cl = _choice(channels_last, "train.channels_last")
    if want_amp is None:
        want_amp = _choice(os.environ.get("DICOM_NODE_CPU_AMP"), "DICOM_NODE_CPU_AMP")
    if want_cl is None:
        want_cl = _choice(os.environ.get("DICOM_NODE_CPU_CHANNELS_LAST"), "DICOM_NODE_CPU_CHANNELS_LAST")
    if want_amp is not None and want_cl is not None:
        return {"amp": want_amp, "channels_last": want_cl}
    try:
        f = features if features is not None else cpu_features()
        bf16_ok = native_bf16(f)
    except Exception:
        f, bf16_ok = {}, False
    decided = {"amp": bf16_ok, "channels_last": False}
    if measure:
        amps = [want_amp] if want_amp is not None else ([False, True] if bf16_ok else [False])
        cls = [want_cl] if want_cl is not None else [False, True]
        cache_path = _cache_file() if cache == "default" else (Path(cache) if cache else None)
        try:
            m = _measured([(a, c) for a in amps for c in cls], f, 4 * ngf, cache_path)
            decided = {"amp": bool(m["amp"]), "channels_last": bool(m["channels_last"])}
        except Exception:  # a measurement must never stop training
            pass
    return {"amp": decided["amp"] if want_amp is None else want_amp,
            "channels_last": decided["channels_last"] if want_cl is None else want_cl}
