"""Seamless tiled inference: a layer-streamed executor that reproduces the whole-image pass.

Why not the usual sliding window?  The CycleGAN generator normalises every feature map with
InstanceNorm, i.e. with the mean/variance of the *whole* map.  Running the network on tiles
gives every tile its own statistics, so tone changes tile by tile (seams), and blending the
tiles only smears the steps (see docs/seamless.md).

What this module does instead: it walks the generator's flat layer list and runs ONE layer at
a time over the whole image, tile by tile.  Each stage keeps the full-image activation map
(on the device when it fits the memory cap, else in host memory).  A convolution tile reads
the previous map with exactly the halo that one convolution needs (reflection at the image
border where the network reflection-pads, zeros where the convolution zero-pads), and its
output is written into the next map while per-channel mean/variance are accumulated over the
tiles' own (non-overlapping) output regions.  InstanceNorm, ReLU, tanh and residual adds are
pointwise, so they are applied lazily when the next layer reads a tile -- with the exact
whole-image statistics.  The result equals the whole-image pass up to floating-point
summation order, at about the cost of one whole-image pass, and memory per step is bounded
by the tile size.

The last convolution is computed on overlapping output tiles blended with raised-cosine
weights (the ``overlap`` parameter).  Because every tile already sees its exact context, the
overlapping predictions agree to rounding error and the blend is numerically a no-op; it is
kept because it is cheap (the last layer is the cheapest: ~0.3 % of the FLOPs at ngf 64) and
feathers any rounding-level difference between tiles on reduced-precision devices.

Public API: :func:`translate` (stable, see docs/seamless.md), :func:`translate_with_base` (the output
and the model's global stage, for the fidelity guard) and :func:`translate_naive` (the
classic per-tile sliding window, kept as the baseline that benchmarks and tests compare to),
:func:`seam_lines`, :func:`planned_tile`, :func:`resolve_device` and the SEAMLESS_* bounds.
The work is done in :mod:`.tile_plan` (the memory planner), :mod:`.tile_executor` (the
layer-streamed executor) and :mod:`.tile_geometry` (tile layouts and blend weights).
"""
from __future__ import annotations

import copy
import weakref
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .defaults import DEFAULT_OVERLAP
from .devices import DEVICE_CHOICES, MIN_TILE, device_problem, is_auto_device
from .errors import UserError
from .model_file import StyleModel
from .tile_executor import Executor
from .tile_geometry import MIN_SIDE, grid, overlapping_starts, ramp_weights, round_up
from .tile_plan import MEMORY_FRACTION, Plan, choose_plan

__all__ = ["translate", "translate_with_base", "translate_naive", "planned_tile", "resolve_device", "choose_plan", "Plan", "seam_lines",
           "MEMORY_FRACTION", "SEAMLESS_MEAN_BOUND", "SEAMLESS_MAX_BOUND"]

# "Seamless" as measured: mean and max |tiled - whole-image pass| as fractions of the output
# range (tests, `dicom-node evaluate`).  The executor stays orders of magnitude below them;
# naive tiling exceeds both.
SEAMLESS_MEAN_BOUND = 0.005
SEAMLESS_MAX_BOUND = 0.05


# --------------------------------------------------------------------------------------------
# Public entry points


def translate(
    model: StyleModel,
    image: np.ndarray,
    *,
    tile: int | None = None,
    overlap: float = DEFAULT_OVERLAP,
    device: str | torch.device | None = None,
    precision: str = "auto",
    memory_cap: int | None = None,
) -> np.ndarray:
    """Translate a 2-D float32 image in model space [-1, 1]; returns the same shape (float32).

    ``tile=None`` lets the engine choose (whole image when it fits ``memory_cap``, otherwise
    the largest tile that fits); ``tile=0`` is exactly one whole-image pass of the generator
    (the reference); ``tile=N`` runs the seamless executor with tiles of N output pixels.
    ``device`` None/"auto" means CUDA when available, else CPU.  ``precision`` "auto" means
    bf16 (fp16 where bf16 is unsupported) on CUDA and fp32 on CPU; "fp32" forces fp32,
    "bf16" asks for bf16 on either device.
    ``memory_cap`` (bytes) defaults to MEMORY_FRACTION of the free device memory.
    """
    return _translate(model, image, tile=tile, overlap=overlap, device=device, precision=precision,
                      memory_cap=memory_cap)[0]


def translate_with_base(model: StyleModel, image: np.ndarray, **options: Any) -> tuple[np.ndarray, np.ndarray]:
    """:func:`translate`'s output and its *base*: what the model's global stage (its tone
    filter, ``engine.tone_filter``) made of the image, or the image itself when it has none.

    Why: the fidelity guard judges what the network added beyond the base (``engine.fidelity``,
    the ``network`` score).  The stage runs once per translation anyway; keeping its output
    costs nothing, recomputing it costs ~15 % of a 2048 x 2048 translation on a CPU.
    """
    y, base = _translate(model, image, keep_base=True, **options)
    return y, (np.asarray(image, dtype=np.float32).copy() if base is None else base)


def _translate(model: StyleModel, image: np.ndarray, *, tile: int | None = None, overlap: float = DEFAULT_OVERLAP,
               device: str | torch.device | None = None, precision: str = "auto", memory_cap: int | None = None,
               keep_base: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    image = _check_image(image)
    _check_args(tile, overlap)
    dev = resolve_device(device)
    cdtype = _compute_dtype(dev, precision)
    h, w = image.shape
    x = _pad_input(torch.from_numpy(image)[None, None])
    plan = choose_plan(model.generator, x.shape[-2], x.shape[-1], dev, cdtype, tile=tile, memory_cap=memory_cap)
    gen = _generator_on(model.generator, dev)
    stage = getattr(gen, "tone_filter", None) if keep_base else None
    kept: list[torch.Tensor] = []
    hook = stage.register_forward_hook(lambda _m, _i, out: kept.append(out)) if stage is not None else None
    try:
        with torch.inference_mode():
            if plan.tile == 0:
                y = _whole_pass(gen, x, dev, cdtype)
            else:
                y = Executor(gen, dev, cdtype, plan, overlap).run(x)
    finally:
        if hook is not None:
            hook.remove()
    base = kept[-1][0, 0, :h, :w].to("cpu", torch.float32).numpy().copy() if kept else None
    return y[0, 0, :h, :w].to("cpu", torch.float32).numpy().copy(), base


def translate_naive(
    model: StyleModel,
    image: np.ndarray,
    *,
    tile: int,
    overlap: float = DEFAULT_OVERLAP,
    device: str | torch.device | None = None,
    precision: str = "auto",
) -> np.ndarray:
    """The classic sliding window: the whole generator on each overlapping tile, raised-cosine blend.

    Not used by the node.  It exists as the baseline: every tile gets its own InstanceNorm
    statistics, which is what makes naive tiling visibly wrong (tests and bench/engine.py).
    """
    image = _check_image(image)
    _check_args(tile, overlap)
    if not tile:
        raise UserError("translate_naive needs a tile size > 0")
    dev = resolve_device(device)
    cdtype = _compute_dtype(dev, precision)
    h, w = image.shape
    x = _pad_input(torch.from_numpy(image)[None, None])
    hp, wp = x.shape[-2:]
    t = round_up(tile, 4)
    ys, xs = overlapping_starts(hp, t, overlap), overlapping_starts(wp, t, overlap)
    th, tw = min(t, hp), min(t, wp)
    gen = _generator_on(model.generator, dev)
    acc = torch.zeros(1, 1, hp, wp, dtype=torch.float32, device=dev)
    wsum = torch.zeros_like(acc)
    with torch.inference_mode():
        for iy, y0 in enumerate(ys):
            wy = ramp_weights(ys, iy, th, dev)
            for ix, x0 in enumerate(xs):
                wx = ramp_weights(xs, ix, tw, dev)
                out = _whole_pass(gen, x[:, :, y0:y0 + th, x0:x0 + tw], dev, cdtype).float()
                wt = wy[:, None] * wx[None, :]
                acc[0, 0, y0:y0 + th, x0:x0 + tw] += out[0, 0] * wt
                wsum[0, 0, y0:y0 + th, x0:x0 + tw] += wt
    result: np.ndarray = (acc / wsum)[0, 0, :h, :w].cpu().numpy().copy()
    return result


def seam_lines(n: int, tile: int, overlap: float = DEFAULT_OVERLAP) -> list[tuple[float, int]]:
    """Where tiles meet along one image axis of ``n`` output pixels: ``(centre, width)`` pairs.

    Why: a seam metric must look where a seam could be.  Tiles of ``tile`` pixels meet in two
    ways: the overlapping output tiles of the last layer (also :func:`translate_naive`'s
    tiles) are blended over ``width`` pixels around ``centre``; the executor's other
    full-resolution layers abut on a balanced grid (``width`` 0, the line between pixels
    ``centre - 1`` and ``centre``).  Empty for ``tile`` 0 or a tile covering the axis.
    Coordinates are of the padded image the engine runs on (multiples of 4); positions past
    a smaller image's edge are simply outside it.
    """
    if tile <= 0:
        return []
    t = round_up(int(tile), 4)
    n_pad = max(round_up(int(n), 4), MIN_SIDE)
    if t >= n_pad:
        return []
    starts = overlapping_starts(n_pad, t, overlap)
    lines: dict[float, int] = {}
    for s0, s1 in zip(starts, starts[1:]):
        width = max(0, s0 + t - s1)
        lines[(s1 + s0 + t) / 2 if width else float(s1)] = width
    for lo, _hi in grid(n_pad, t)[1:]:
        lines.setdefault(float(lo), 0)
    return sorted(lines.items())


def planned_tile(model: StyleModel, shape: tuple[int, int], *, device: str | torch.device | None = None,
                 precision: str = "auto", memory_cap: int | None = None) -> int:
    """The tile size :func:`translate` with ``tile=None`` picks for an image of ``shape`` (0 = whole image)."""
    h, w = shape
    hp, wp = max(round_up(h, 4), MIN_SIDE), max(round_up(w, 4), MIN_SIDE)
    dev = resolve_device(device)
    return int(choose_plan(model.generator, hp, wp, dev, _compute_dtype(dev, precision), tile=None,
                           memory_cap=memory_cap).tile)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None/"auto" -> CUDA when available, else CPU; otherwise what was asked (checked).

    The names accepted are :func:`.devices.device_problem`'s, the config's rule too; ``mps`` is
    Apple's GPU (when this machine has one)."""
    if device is None or is_auto_device(device):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device, str) and device_problem(device):
        raise UserError(f"unsupported device {device!r} (use {DEVICE_CHOICES})")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise UserError(f"unknown device {device!r} ({exc})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {device!r} requested but CUDA is not available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"device {device!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise UserError(f"device {device!r} requested but MPS is not available")
    elif dev.type != "cpu":
        raise UserError(f"unsupported device {device!r} (use {DEVICE_CHOICES})")
    return dev


# --------------------------------------------------------------------------------------------
# Helpers


def _whole_pass(gen: nn.Module, x: torch.Tensor, dev: torch.device, cdtype: torch.dtype) -> torch.Tensor:
    """One forward of the generator on the whole (padded) image: the reference."""
    x = x.to(dev, torch.float32)
    if dev.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    if cdtype == torch.float32:
        out: torch.Tensor = gen(x)
        return out
    with torch.autocast(dev.type, dtype=cdtype):
        out = gen(x)
        return out.float()


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 2:
        raise UserError(f"image must be 2-D, got shape {image.shape}")
    if image.size == 0:
        raise UserError("image is empty")
    return np.ascontiguousarray(image, dtype=np.float32)


def _check_args(tile: int | None, overlap: float) -> None:
    if tile is not None and (int(tile) != tile or tile < 0):
        raise UserError(f"tile must be a non-negative integer, got {tile!r}")
    if tile and tile < MIN_TILE:
        raise UserError(f"tile must be 0 (whole image) or at least {MIN_TILE}, got {tile}")
    if not (0.0 <= float(overlap) < 1.0):
        raise UserError(f"overlap must be in [0, 1), got {overlap!r}")


def _pad_input(x: torch.Tensor) -> torch.Tensor:
    """Pad (bottom/right) to multiples of 4 and at least MIN_SIDE, as the generator needs.

    Reflection where the image is large enough, else edge replication.  Both the whole-image
    and the tiled path use this, so they see the same input.
    """
    h, w = x.shape[-2:]
    hp, wp = max(round_up(h, 4), MIN_SIDE), max(round_up(w, 4), MIN_SIDE)
    ph, pw = hp - h, wp - w
    if not (ph or pw):
        return x
    mode = "reflect" if h > ph and w > pw else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode)


def _compute_dtype(dev: torch.device, precision: str) -> torch.dtype:
    """auto: bf16 (fp16 without bf16 support) on CUDA, fp32 on CPU.  bf16 may be asked for on
    CPU too (fast on CPUs with AMX; also how the tests exercise the reduced-precision path)."""
    p = (precision or "auto").lower()
    if p in ("fp32", "float32"):
        return torch.float32
    if p not in ("auto", "bf16", "fp16"):
        raise UserError(f"precision must be auto, fp32, bf16 or fp16, got {precision!r}")
    if dev.type != "cuda":
        if p == "fp16":
            raise UserError("precision fp16 is only supported on CUDA (use bf16 or fp32 on CPU)")
        return torch.bfloat16 if p == "bf16" else torch.float32
    if p == "fp16":
        return torch.float16
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


_DEVICE_COPIES: "weakref.WeakKeyDictionary[nn.Module, dict[str, tuple[tuple[int, ...], nn.Module]]]" = (
    weakref.WeakKeyDictionary())


def _generator_on(gen: nn.Module, dev: torch.device) -> nn.Module:
    """The generator on ``dev`` (cached per device; refreshed when its weights change)."""
    if dev.type == "cpu":
        return gen  # used as is (InstanceNorm without running stats: train/eval mode is the same)
    first = next(gen.parameters(), None)
    if first is not None and first.device == dev:
        return gen  # already there (e.g. the trainer's validation): no copy, caller's module untouched
    try:
        version = tuple(p._version for p in gen.parameters())
    except RuntimeError:  # inference tensors have no version counter: copy every time
        return _device_copy(gen, dev)
    per_dev = _DEVICE_COPIES.setdefault(gen, {})
    hit = per_dev.get(str(dev))
    if hit is None or hit[0] != version:
        per_dev[str(dev)] = (version, _device_copy(gen, dev))
        hit = per_dev[str(dev)]
    return hit[1]


def _device_copy(gen: nn.Module, dev: torch.device) -> nn.Module:
    """A copy of ``gen`` on ``dev`` in eval mode, its weights channels-last (faster convolutions)."""
    g = copy.deepcopy(gen).to(dev).eval()
    moved: nn.Module = g.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # Module.to takes memory_format; torch's stubs omit it
    return moved
