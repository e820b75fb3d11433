"""Procedural radiograph phantoms: anatomy as thickness maps, rendered with Beer-Lambert.

Why: no radiograph data set can be downloaded here, yet the project needs realistic
paired images to train and evaluate style models.  A phantom is built as *thickness
maps* (cm of soft tissue, cm of bone, cm of air inside the body) on the detector grid,
so the rendering can be physical: the transmitted fraction is
``exp(-(mu_soft * t_soft + mu_bone * t_bone))`` plus a blurred scatter component, the
detector blurs a little, and quanta are counted with Poisson noise.  The result is the
raw "for processing" log signal ``-ln(counts / counts_unattenuated)`` that the vendor
styles in :mod:`dicom_node.demo.vendor_processing` post-process.

Only numpy is used (FFT-based filters), so rendering a 1024² image takes well under a
second and 2048² a few seconds.  Everything is deterministic for a seed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "MU_SOFT", "MU_BONE", "Phantom", "gaussian_blur", "smooth_noise",
    "chest_phantom", "knee_phantom", "make_phantom", "render",
]

# Linear attenuation coefficients (1/cm) at an effective energy of ~60 keV.
MU_SOFT = 0.20
MU_BONE = 0.48


@dataclass
class Phantom:
    """Thickness maps (cm) on the detector grid plus the header facts they imply."""

    soft: np.ndarray  # soft tissue path length, cm
    bone: np.ndarray  # cortical-bone-equivalent path length, cm
    pixel_spacing_mm: float
    body_part: str  # DICOM BodyPartExamined
    laterality: str = ""  # "L"/"R" for paired organs, "" otherwise
    view: str = "PA"
    dose: float = 40000.0  # unattenuated quanta per pixel
    scatter_fraction: float = 0.4
    info: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- filters

def gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur by FFT with reflected borders (no scipy needed)."""
    if sigma <= 0:
        return img.astype(np.float64, copy=True)
    h, w = img.shape
    pad = int(min(math.ceil(3.5 * sigma), min(h, w) - 1))
    x = np.pad(img.astype(np.float64, copy=False), pad, mode="reflect") if pad > 0 else img.astype(np.float64)
    fy = np.fft.fftfreq(x.shape[0])[:, None]
    fx = np.fft.rfftfreq(x.shape[1])[None, :]
    kernel = np.exp(-2.0 * (math.pi * sigma) ** 2 * (fy * fy + fx * fx))
    out = np.fft.irfft2(np.fft.rfft2(x) * kernel, s=x.shape)
    return out[pad:pad + h, pad:pad + w] if pad > 0 else out


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], scale_px: float,
                 anisotropy: float = 1.0, band: bool = False) -> np.ndarray:
    """Zero-mean, unit-std random field with correlation length ``scale_px``.

    ``band=True`` makes it band-pass around that scale (a texture, not a trend);
    ``anisotropy > 1`` stretches the structures along the vertical axis.
    """
    white = rng.standard_normal(shape)
    fy = np.fft.fftfreq(shape[0])[:, None] * anisotropy
    fx = np.fft.rfftfreq(shape[1])[None, :]
    f2 = (fy * fy + fx * fx) * scale_px * scale_px
    filt = np.exp(-2.0 * math.pi**2 * f2)
    if band:
        filt = filt * (1.0 - np.exp(-8.0 * math.pi**2 * f2))
    field_ = np.fft.irfft2(np.fft.rfft2(white) * filt, s=shape)
    field_ -= field_.mean()
    std = field_.std()
    return field_ / std if std > 0 else field_


# --------------------------------------------------------------------------- primitives

def _tube(d: np.ndarray, r_out: np.ndarray | float, r_in: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
    """Projected path lengths through a hollow cylinder at distance ``d`` from its axis.

    Returns (cortical shell path, marrow path), in the units of the radii.
    """
    outer = 2.0 * np.sqrt(np.maximum(np.square(r_out) - d * d, 0.0))
    inner = 2.0 * np.sqrt(np.maximum(np.square(r_in) - d * d, 0.0))
    return outer - inner, inner


def _ellipsoid(x: np.ndarray, y: np.ndarray, cx: float, cy: float, rx: float, ry: float,
               depth: float, power: float = 2.0) -> np.ndarray:
    """Projected thickness of a (super)ellipsoid: ``depth * sqrt(1 - r^power)``."""
    r = np.abs((x - cx) / rx) ** power + np.abs((y - cy) / ry) ** power
    return depth * np.sqrt(np.clip(1.0 - r, 0.0, None))


def _smoothstep(t: np.ndarray) -> np.ndarray:
    t = np.clip(t, 0.0, 1.0)
    smooth: np.ndarray = t * t * (3.0 - 2.0 * t)  # numpy's operators are typed Any
    return smooth


def _rows(y: np.ndarray, lo: float, hi: float) -> slice:
    """The band of image rows where ``y`` reaches into [lo, hi] (to draw small parts cheaply)."""
    hit = np.flatnonzero(((y >= lo) & (y <= hi)).any(axis=1))
    return slice(int(hit[0]), int(hit[-1]) + 1) if hit.size else slice(0, 0)


def _grid(size: int, fov_mm: float, rng: np.random.Generator, tilt_deg: float = 3.0,
          shift_mm: float = 8.0) -> tuple[np.ndarray, np.ndarray, float]:
    """Detector coordinates in mm (origin at the centre), with a small random tilt and shift."""
    spacing = fov_mm / size
    c = (np.arange(size) - (size - 1) / 2.0) * spacing
    yy, xx = np.meshgrid(c, c, indexing="ij")
    a = math.radians(rng.uniform(-tilt_deg, tilt_deg))
    dx, dy = rng.uniform(-shift_mm, shift_mm, 2)
    x = math.cos(a) * xx - math.sin(a) * yy + dx
    y = math.sin(a) * xx + math.cos(a) * yy + dy
    return x, y, spacing


# --------------------------------------------------------------------------- chest

def chest_phantom(size: int, rng: np.random.Generator) -> Phantom:
    """A PA chest: body, lungs, heart, aortic knob, trachea, spine, ribs, clavicles, humeral heads.

    Coordinates are mm on a 430 mm detector; x > 0 is the patient's left (viewer's right
    in the usual PA display).
    """
    x, y, spacing = _grid(size, 430.0, rng)
    s = rng.uniform(0.92, 1.08)  # patient size
    depth_cm = rng.uniform(19.0, 26.0)  # AP thickness of the chest

    # Body outline: half-width as a function of height (neck, shoulders, chest, abdomen).
    knots_y = np.array([-260, -185, -150, -110, 40, 140, 260]) * s
    knots_a = np.array([55, 60, 205, 170, 165, 150, 150]) * s * rng.uniform(0.95, 1.05)
    a = np.interp(y, knots_y, knots_a)
    body = depth_cm * np.sqrt(np.clip(1.0 - (x / a) ** 2, 0.0, None))
    body *= 1.0 + 0.04 * smooth_noise(rng, body.shape, 60.0 / spacing)

    # Lungs (air inside the body), with a diaphragm dome; the heart displaces the left lung.
    air = np.zeros_like(x)
    lung_depth = depth_cm * rng.uniform(0.45, 0.6)
    for side in (-1.0, 1.0):
        cx = side * rng.uniform(72, 86) * s
        cy = rng.uniform(-25, -5) * s
        rx = rng.uniform(58, 70) * s
        ry = rng.uniform(118, 135) * s
        lung = _ellipsoid(x, y, cx, cy, rx, ry, lung_depth, power=2.4)
        dome = cy + 0.8 * ry - 0.004 * (x - cx) ** 2 + (12.0 if side > 0 else 0.0)
        lung *= _smoothstep((dome - y) / (12.0 * s))  # fades into the diaphragm
        air = np.maximum(air, lung)
    heart_cx, heart_cy = rng.uniform(18, 40) * s, rng.uniform(45, 70) * s
    heart = _ellipsoid(x, y, heart_cx, heart_cy, rng.uniform(68, 85) * s, rng.uniform(55, 68) * s,
                       depth_cm * 0.55)
    knob = _ellipsoid(x, y, 22 * s, -45 * s, 20 * s, 18 * s, depth_cm * 0.3)
    mediastinum = _ellipsoid(x, y, 0, -30 * s, 32 * s, 150 * s, depth_cm * 0.5, power=3.0)
    air = np.clip(air - np.maximum(np.maximum(heart, knob), mediastinum), 0.0, None)
    trachea = _ellipsoid(x, y, 0, -150 * s, 9 * s, 110 * s, 1.8, power=4.0)
    air = air + trachea
    # Vessels: the lung markings, soft tissue branching out from the hila.
    vessels = np.clip(smooth_noise(rng, x.shape, 2.5 / spacing, band=True), 0, None)
    hila = np.exp(-(((np.abs(x) - 55 * s) / 70) ** 2 + ((y + 10 * s) / 90) ** 2))
    air = np.clip(air - 0.8 * vessels * hila * (air > 0.5), 0.0, None)
    soft = np.clip(body - air, 0.0, None)

    bone = np.zeros_like(x)
    bone += _spine(x, y, s, rng)
    bone += _ribs(x, y, s, rng)
    for side in (-1.0, 1.0):
        # Clavicle: an S-shaped tube from the sternal notch up and out to the shoulder.
        t = np.clip((side * x - 18 * s) / (135 * s), 0.0, 1.0)
        yc = (-150 + rng.uniform(-6, 6)) * s - 22 * s * t + 9 * s * np.sin(2 * math.pi * t)
        d = np.abs(y - yc) / np.sqrt(1 + (22 * s / (135 * s)) ** 2)
        inside = ((side * x) > 18 * s) & ((side * x) < 155 * s)
        cortex, marrow = _tube(d, 7.5 * s, 5.0 * s)
        bone += inside * (cortex + 0.25 * marrow) / 10.0
        # Humeral head at the shoulder, partly in the field.
        hx, hy = side * rng.uniform(185, 200) * s, rng.uniform(-150, -130) * s
        r = np.hypot(x - hx, y - hy)
        cortex, marrow = _tube(r, 26 * s, 23 * s)
        bone += (cortex + 0.3 * marrow) / 10.0 * 0.6
    bone *= body > 0
    return Phantom(soft=soft, bone=bone, pixel_spacing_mm=spacing, body_part="CHEST", view="PA",
                   dose=rng.uniform(25000, 60000), scatter_fraction=rng.uniform(0.3, 0.6),
                   info={"kind": "chest"})


def _spine(x: np.ndarray, y: np.ndarray, s: float, rng: np.random.Generator) -> np.ndarray:
    """Vertebral bodies (trabecular cylinders with a cortical rim), pedicles and spinous processes."""
    bone = np.zeros_like(x)
    height = rng.uniform(19, 24) * s
    gap = rng.uniform(4, 6) * s
    y0 = -230.0 * s + rng.uniform(0, height)
    while y0 < 260 * s:
        yc = y0 + height / 2
        rs = _rows(y, y0 - 12 * s, y0 + height + 12 * s)
        x_, y_ = x[rs], y[rs]
        part = bone[rs]
        growth = 0.75 + 0.35 * (yc + 230 * s) / (490 * s)  # vertebrae grow caudally
        r = 20.0 * s * growth
        inside = np.abs(y_ - yc) < height / 2
        cortex, marrow = _tube(x_, r, r - 2.0)
        part += inside * (cortex * 0.6 + marrow * 0.18) / 10.0
        for side in (-1.0, 1.0):  # pedicles: cortical rings seen end-on
            rr = np.hypot(x_ - side * 0.7 * r, (y_ - yc) * 1.3)
            c2, m2 = _tube(rr, 5.5 * s, 3.5 * s)
            part += (c2 + 0.2 * m2) / 10.0
        rr = np.hypot(x_ * 1.6, y_ - yc - 0.3 * height)  # spinous process
        c3, m3 = _tube(rr, 6.0 * s, 4.0 * s)
        part += 0.6 * (c3 + 0.2 * m3) / 10.0
        y0 += height + gap
    return bone


def _ribs(x: np.ndarray, y: np.ndarray, s: float, rng: np.random.Generator) -> np.ndarray:
    """Posterior ribs (arching out from the spine) and fainter anterior ribs (sloping down medially)."""
    bone = np.zeros_like(x)
    n = 10
    spacing_y = rng.uniform(21, 25) * s
    top = rng.uniform(-150, -135) * s
    for side in (-1.0, 1.0):
        for i in range(n):
            y0 = top + i * spacing_y
            extent = (155 + 3 * i) * s
            k2 = (0.0030 + 0.0004 * i) / s
            half = (5.5 + 0.15 * i) * s
            # Rows this rib (posterior and anterior part) can reach.
            y_lo = y0 - 0.2 * extent - 12 * s
            y_hi = max(y0 + k2 * extent**2, y0 + 55 * s + 0.42 * extent) + 12 * s
            rs = _rows(y, y_lo, y_hi)
            xr, yr, part = x[rs], y[rs], bone[rs]
            u = side * xr  # lateral distance, positive outwards on this side
            # Posterior rib: from the spine slightly upwards, then down at the lateral edge.
            xp = u - 16 * s
            yc = y0 - 0.20 * xp + k2 * xp * xp
            slope = -0.20 + 2 * k2 * xp
            d = np.abs(yr - yc) / np.sqrt(1 + slope * slope)
            inside = _smoothstep(xp / (8 * s)) * _smoothstep((extent - xp) / (15 * s))
            cortex, marrow = _tube(d, half, half - 1.3 * s)
            part += inside * (cortex + 0.25 * marrow) / 10.0 * 0.55
            # Anterior rib: from the lateral edge medially and downwards (cartilage medially is invisible).
            ya = y0 + 55 * s + 0.42 * (extent - u)
            da = np.abs(yr - ya) / np.sqrt(1 + 0.42**2)
            inside_a = _smoothstep((u - 60 * s) / (20 * s)) * _smoothstep((extent + 8 * s - u) / (10 * s))
            cortex, marrow = _tube(da, half * 0.8, half * 0.8 - 0.9 * s)
            part += inside_a * (cortex + 0.2 * marrow) / 10.0 * 0.35
    return bone


# --------------------------------------------------------------------------- knee

def knee_phantom(size: int, rng: np.random.Generator) -> Phantom:
    """An AP knee: soft tissue, femur and tibia with condyles, fibula, patella, trabecular texture.

    The fibula lies on the patient's lateral side: image left for a right knee.
    """
    x, y, spacing = _grid(size, 240.0, rng, tilt_deg=5.0, shift_mm=6.0)
    laterality = "R" if rng.random() < 0.5 else "L"
    lateral = -1.0 if laterality == "R" else 1.0
    s = rng.uniform(0.9, 1.1)
    joint = rng.uniform(-10, 10)

    radius = np.interp(y, [-150, -40, 0, 60, 150], np.array([75, 62, 58, 55, 48]) * s)
    soft = 2.0 * np.sqrt(np.clip(radius**2 - x**2, 0.0, None)) / 10.0
    soft *= 1.0 + 0.03 * smooth_noise(rng, x.shape, 30.0 / spacing)

    trabecular = np.clip(0.55 + 0.45 * smooth_noise(rng, x.shape, 0.9 / spacing, anisotropy=0.5, band=True), 0, 1.2)
    bone = np.zeros_like(x)

    # Femur: shaft widening into the condyles, ending in a rounded surface above the joint.
    dy = y - joint  # < 0 above the joint
    r_f = np.interp(dy, [-200, -70, -25, 0], np.array([14, 16, 38, 40]) * s)
    c_f = np.interp(dy, [-200, -70, -25, 0], np.array([5.0, 4.0, 1.5, 1.2]) * s)
    cap = np.sqrt(np.clip(1.0 - (np.clip(dy + 18 * s, 0, None) / (18 * s)) ** 2, 0.0, 1.0))
    notch = 1.0 - 0.35 * np.exp(-(x / (8 * s)) ** 2) * _smoothstep((dy + 14 * s) / (8 * s))
    ro = r_f * cap * notch
    cortex, marrow = _tube(x - 0.03 * dy, ro, np.clip(ro - c_f, 0, None))
    dens = np.interp(dy, [-200, -80, -20], [0.05, 0.15, 0.35])
    bone += (dy < 0) * (cortex + marrow * dens * trabecular) / 10.0

    # Tibia: plateau just below the joint space narrowing to the shaft.
    ty = y - joint - rng.uniform(5, 7) * s  # > 0 below the joint space
    r_t = np.interp(ty, [0, 25, 80, 200], np.array([40, 36, 17, 14]) * s)
    c_t = np.interp(ty, [0, 25, 80, 200], np.array([1.2, 1.5, 4.0, 5.0]) * s)
    cap_t = np.sqrt(np.clip(1.0 - (np.clip(6 * s - ty, 0, None) / (6 * s)) ** 2, 0.0, 1.0))
    ro = r_t * cap_t
    cortex, marrow = _tube(x - 0.02 * ty, ro, np.clip(ro - c_t, 0, None))
    dens = np.interp(ty, [0, 60, 140], [0.35, 0.15, 0.05])
    bone += (ty > 0) * (cortex + marrow * dens * trabecular) / 10.0

    # Fibula: lateral, head just below the tibial plateau.
    fy = ty - 18 * s
    r_fib = np.interp(fy, [0, 20, 60, 200], np.array([11, 10, 6.5, 6]) * s)
    cap_f = np.sqrt(np.clip(1.0 - (np.clip(6 * s - fy, 0, None) / (6 * s)) ** 2, 0.0, 1.0))
    fx = x - lateral * (38 * s - 0.04 * fy)
    cortex, marrow = _tube(fx, r_fib * cap_f, np.clip(r_fib * cap_f - 2.0 * s, 0, None))
    bone += (fy > 0) * (cortex + marrow * 0.2 * trabecular) / 10.0

    # Patella: superimposed over the femoral condyles.
    pat = _ellipsoid(x, y, rng.uniform(-4, 4), joint - 30 * s, 22 * s, 26 * s, 2.2)
    bone += pat * (0.35 + 0.25 * trabecular) / 1.0 * 0.5

    return Phantom(soft=soft, bone=bone, pixel_spacing_mm=spacing, body_part="KNEE", laterality=laterality,
                   view="AP", dose=rng.uniform(20000, 50000), scatter_fraction=rng.uniform(0.1, 0.25),
                   info={"kind": "knee"})


def make_phantom(index: int, size: int, seed: int) -> Phantom:
    """The ``index``-th phantom of a data set: two chests for every knee, varied by ``seed``."""
    rng = np.random.default_rng([seed, index])
    if index % 3 == 2:
        return knee_phantom(size, rng)
    return chest_phantom(size, rng)


# --------------------------------------------------------------------------- rendering

def render(ph: Phantom, rng: np.random.Generator) -> np.ndarray:
    """Beer-Lambert transmission + scatter + detector blur + Poisson quanta -> raw log signal.

    Returns ``-ln(counts / dose)``: 0 for unattenuated pixels, larger behind more tissue
    (bone bright once displayed as MONOCHROME2).
    """
    line = MU_SOFT * ph.soft + MU_BONE * ph.bone
    primary = np.exp(-line)
    scatter = gaussian_blur(primary, 25.0 / ph.pixel_spacing_mm)  # scatter spreads over ~2.5 cm
    signal = primary + ph.scatter_fraction * scatter
    signal = gaussian_blur(signal, 0.6)  # detector MTF
    counts = rng.poisson(np.clip(signal, 0.0, None) * ph.dose).astype(np.float64)
    return -np.log(np.maximum(counts, 0.5) / (ph.dose * (1.0 + ph.scatter_fraction)))
