"""The layer-streamed executor behind :func:`dicom_node.engine.tiling.translate` (how: see there).

One layer at a time over the whole image, tile by tile; pointwise layers (InstanceNorm with
the exact whole-image statistics, ReLU, tanh, residual adds) wait as pending ops on the map
and are applied when the next layer reads a tile.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator, Union

import torch
import torch.nn.functional as F
from torch import nn

from .generator import ResnetBlock
from .tile_geometry import Window, grid, overlapping_regions, ramp_weights
from .tile_plan import Plan

__all__ = ["Executor", "Norm", "Relu", "Tanh", "Add", "PendingOp"]


# Pending pointwise ops, applied in order when a tile of the map is read.


@dataclass(frozen=True)
class Norm:
    """InstanceNorm with whole-image statistics: ``x * scale + shift`` (per channel, (1, C, 1, 1))."""

    shift: torch.Tensor
    scale: torch.Tensor


@dataclass(frozen=True)
class Relu:
    pass


@dataclass(frozen=True)
class Tanh:
    pass


@dataclass(frozen=True)
class Add:
    """A residual skip: add the same region of ``skip`` (a full-image map)."""

    skip: torch.Tensor


PendingOp = Union[Norm, Relu, Tanh, Add]


@dataclass(frozen=True)
class TileJob:
    """One output tile (rows ``rows``, columns ``cols`` of the layer's output) and what it reads."""

    rows: tuple[int, int]
    cols: tuple[int, int]
    window: Window


@dataclass
class _Lazy:
    """A full-image activation map plus pointwise ops still to apply when a tile is read."""

    raw: torch.Tensor  # (1, C, H, W) in the storage dtype, on the storage device
    ops: list[PendingOp] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, int, int]:
        _, c, h, w = self.raw.shape
        return c, h, w


class _Stats:
    """Exact per-channel mean/variance over tiles (Chan's parallel combination, float64)."""

    def __init__(self, channels: int, device: torch.device) -> None:
        self.n = 0
        self.mean = torch.zeros(channels, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(channels, dtype=torch.float64, device=device)

    def add(self, out: torch.Tensor) -> None:
        """``out``: (B, C, h, w) tiles; each tile contributes its own output region only."""
        # One pass for sum and sum of squares (vector_norm: ~10x faster than torch.var_mean on
        # CPU, no temporary).  sum(x^2) - n*mean^2 loses accuracy when a channel's mean is large
        # against its spread, so such tiles are redone with two passes (mean, then deviations).
        f = out.float()
        nb = f.shape[2] * f.shape[3]
        s = f.sum(dim=(2, 3)).double()
        sq = torch.linalg.vector_norm(f, dim=(2, 3)).double() ** 2
        mean = s / nb
        m2 = sq - s * mean
        if bool((m2 < 1e-3 * sq).any()):
            mean32 = f.mean(dim=(2, 3), keepdim=True)
            m2 = (torch.linalg.vector_norm(f - mean32, dim=(2, 3)) ** 2).double()
            mean = mean32[:, :, 0, 0].double()
        for b in range(out.shape[0]):
            mb, m2b = mean[b], m2[b]
            n = self.n + nb
            delta = mb - self.mean
            self.mean += delta * (nb / n)
            self.m2 += m2b + delta * delta * (self.n * nb / n)
            self.n = n

    def norm_op(self, norm: nn.InstanceNorm2d, dtype: torch.dtype = torch.float32) -> Norm:
        var = self.m2 / self.n
        scale = torch.rsqrt(var + norm.eps)
        if norm.affine:
            scale = scale * norm.weight.double()
        shift = -self.mean * scale  # float64: y = x * scale + shift == (x - mean) * scale
        if norm.affine:
            shift = shift + norm.bias.double()
        return Norm(shift.to(dtype).view(1, -1, 1, 1), scale.to(dtype).view(1, -1, 1, 1))


class Executor:
    """Runs a ResnetGenerator one layer at a time over tiles (see the module docstring)."""

    def __init__(self, gen: nn.Module, dev: torch.device, cdtype: torch.dtype, plan: Plan, overlap: float) -> None:
        self.gen = gen
        self.dev = dev
        self.cdtype = cdtype
        self.plan = plan
        self.overlap = overlap
        self.sdev = plan.storage_device
        self.cl = dev.type == "cuda"  # channels_last on CUDA
        self._weights: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}

    # -- driver ------------------------------------------------------------------------------

    def run(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: (1, 1, H, W) fp32, H and W already padded to multiples of 4."""
        inp = x.to(self.sdev, torch.float32)
        tone = getattr(self.gen, "tone_filter", None)
        if tone is not None:  # global (large-support, 1 channel): the whole image at once, as a whole pass does
            inp = tone(inp.to(self.dev)).to(self.sdev)
        layers = list(self.gen.get_submodule("model").children())
        self._last_conv = [m for m in layers if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))][-1]
        y = self._run_layers(layers, _Lazy(inp), full_h=x.shape[-2])
        out = self._materialise(y)
        if getattr(self.gen, "residual", False):
            out = torch.clamp(inp.to(out.device) + out, -1.0, 1.0)
        return out

    def _run_layers(self, layers: list[nn.Module], x: _Lazy, full_h: int,
                    keep_input: list[torch.Tensor] | None = None) -> _Lazy:
        reflect = 0
        stats: _Stats | None = None
        for i, m in enumerate(layers):
            nxt = layers[i + 1] if i + 1 < len(layers) else None
            want_stats = isinstance(nxt, nn.InstanceNorm2d)
            if isinstance(m, nn.ReflectionPad2d):
                pads = set(int(p) for p in m.padding)
                if len(pads) != 1:
                    raise NotImplementedError("asymmetric reflection padding")
                reflect = pads.pop()
            elif isinstance(m, nn.Conv2d):
                keep = keep_input if (keep_input is not None and not keep_input) else None
                x, stats = self._conv(x, m, reflect, full_h, want_stats, keep)
                reflect = 0
            elif isinstance(m, nn.ConvTranspose2d):
                if reflect:
                    raise NotImplementedError("reflection padding before a transposed convolution")
                x, stats = self._conv_transpose(x, m, full_h, want_stats)
            elif isinstance(m, nn.InstanceNorm2d):
                if stats is None or m.track_running_stats:
                    raise NotImplementedError("InstanceNorm must directly follow a convolution")
                x.ops.append(stats.norm_op(m))
                stats = None
            elif isinstance(m, nn.ReLU):
                x.ops.append(Relu())
            elif isinstance(m, nn.Tanh):
                x.ops.append(Tanh())
            elif isinstance(m, ResnetBlock):
                x = self._block(m, x, full_h)
            else:
                raise NotImplementedError(f"layer {m.__class__.__name__} is not supported by the tiled executor")
        return x

    def _block(self, block: ResnetBlock, x: _Lazy, full_h: int) -> _Lazy:
        """x + block(x): the block's first convolution materialises x while it reads it."""
        kept: list[torch.Tensor] = []
        if x.ops:
            y = self._run_layers(list(block.block), x, full_h, keep_input=kept)
            skip = kept[0]
        else:
            skip = x.raw
            y = self._run_layers(list(block.block), x, full_h)
        y.ops.append(Add(skip))
        return y

    # -- reading tiles -------------------------------------------------------------------------

    def _eval_into(self, x: _Lazy, r0: int, r1: int, c0: int, c1: int, out: torch.Tensor) -> None:
        """Write ``x`` (raw + pending ops) on rows r0:r1, cols c0:c1 into ``out`` (fp32, device).

        The first normalisation is fused with the copy (addcmul into ``out``); the rest are
        in place, so a tile costs one pass per op and no extra copy.
        """
        raw = x.raw[:, :, r0:r1, c0:c1]
        if raw.device != self.dev:
            raw = raw.to(self.dev, non_blocking=True)
        ops = x.ops
        if ops and isinstance(ops[0], Norm):
            torch.addcmul(ops[0].shift, raw, ops[0].scale, out=out)
            ops = ops[1:]
        else:
            out.copy_(raw)
        for op in ops:
            if isinstance(op, Norm):
                out.mul_(op.scale).add_(op.shift)
            elif isinstance(op, Relu):
                out.relu_()
            elif isinstance(op, Tanh):
                out.tanh_()
            elif isinstance(op, Add):
                out.add_(op.skip[:, :, r0:r1, c0:c1].to(self.dev, non_blocking=True))

    def _read(self, x: _Lazy, r0: int, r1: int, c0: int, c1: int) -> torch.Tensor:
        """Evaluate ``x`` on rows r0:r1, cols c0:c1 as a new fp32 tensor on the device."""
        out = torch.empty((1, x.shape[0], r1 - r0, c1 - c0), dtype=torch.float32, device=self.dev)
        self._eval_into(x, r0, r1, c0, c1, out)
        return out

    def _read_windows(self, x: _Lazy, windows: list[Window], reflect: int) -> torch.Tensor:
        """Evaluate ``x`` on same-sized windows (rows lo:hi, cols lo:hi; may reach outside the
        image) into one fp32 batch, padded the way the network pads the map.

        The in-image part is written straight into the batch buffer; the border strips are then
        filled by reflection (within ``reflect`` of the image border) or zeros.  Same result as
        ``F.pad`` after evaluation, without copying each tile a second time.
        """
        c, h, w = x.shape
        mf = torch.channels_last if self.cl else torch.contiguous_format
        buf = torch.empty((len(windows), c, *windows[0].shape), dtype=torch.float32, device=self.dev,
                          memory_format=mf)
        for i, win in enumerate(windows):
            lo_r, hi_r, lo_c, hi_c = win.top, win.bottom, win.left, win.right
            a, b, cc, d = max(lo_r, 0), min(hi_r, h), max(lo_c, 0), min(hi_c, w)
            view = buf[i:i + 1]
            self._eval_into(x, a, b, cc, d, view[:, :, a - lo_r:b - lo_r, cc - lo_c:d - lo_c])
            _fill_border(view, a - lo_r, hi_r - b, cc - lo_c, hi_c - d, reflect)
        return buf

    def _new_map(self, c: int, h: int, w: int) -> torch.Tensor:
        mf = torch.channels_last if self.cl and self.sdev.type == "cuda" else torch.contiguous_format
        return torch.empty((1, c, h, w), dtype=self.cdtype, device=self.sdev, memory_format=mf)

    def _materialise(self, x: _Lazy) -> torch.Tensor:
        """Apply pending ops to a (small, 1-channel) map in one go."""
        c, h, w = x.shape
        return self._read(x, 0, h, 0, w)

    def _weights_of(self, m: nn.Conv2d | nn.ConvTranspose2d) -> tuple[torch.Tensor, torch.Tensor | None]:
        key = id(m)
        if key not in self._weights:
            wgt = m.weight.to(self.dev, self.cdtype)
            if self.cl:
                wgt = wgt.contiguous(memory_format=torch.channels_last)
            b = m.bias.to(self.dev, self.cdtype) if m.bias is not None else None
            self._weights[key] = (wgt, b)
        return self._weights[key]

    def _tile_side(self, h_out: int, full_h: int, channels: int) -> int:
        """Tile side (in this layer's pixels) for a layer with ``channels`` output channels.

        ``tile`` N is in output pixels: full-resolution layers use N x N tiles.  Lower-
        resolution layers have more channels; they use tiles with the same working memory
        (side N * sqrt(ngf / channels)), which covers a larger image area, so there are fewer,
        larger tiles (less halo, fewer calls) at no extra memory.
        """
        if h_out >= full_h:
            return self.plan.tile
        ngf = int(getattr(self.gen, "ngf", channels))
        return max(2, math.ceil(self.plan.tile * math.sqrt(ngf / max(channels, ngf))))

    def _batch_size(self, channels: int, side: int) -> int:
        """Tiles per call: the plan's (memory-based) batch on CUDA.  On CPU, small tiles are
        batched up to ~1 M elements per call: thousands of tiny calls cost more in per-call and
        thread-synchronisation overhead than the arithmetic (measured 6x slower at ngf 4)."""
        if self.dev.type == "cuda":
            return self.plan.batch
        return int(max(1, min(16, (1 << 20) // max(1, channels * side * side))))

    def _prep(self, t: torch.Tensor) -> torch.Tensor:
        t = t.to(self.cdtype)
        return t.contiguous(memory_format=torch.channels_last) if self.cl else t

    # -- convolutions --------------------------------------------------------------------------

    def _conv(self, x: _Lazy, m: nn.Conv2d, reflect: int, full_h: int, want_stats: bool,
              keep: list[torch.Tensor] | None) -> tuple[_Lazy, _Stats | None]:
        if m.groups != 1 or tuple(m.dilation) != (1, 1) or m.padding_mode != "zeros" or isinstance(m.padding, str):
            raise NotImplementedError("only plain convolutions are supported")
        cin, h, w = x.shape
        (kh, kw), (sh, sw), (ph, pw) = m.kernel_size, m.stride, m.padding
        ho = (h + 2 * (reflect + ph) - kh) // sh + 1
        wo = (w + 2 * (reflect + pw) - kw) // sw + 1
        cout = m.out_channels
        wgt, bias = self._weights_of(m)
        blend = m is self._last_conv and not want_stats and self.overlap > 0
        if keep is not None and ((sh, sw) != (1, 1) or (ho, wo) != (h, w)):
            raise NotImplementedError("skip connections need a same-size convolution")

        if blend:
            t = self._tile_side(ho, full_h, cout)
            rows = overlapping_regions(ho, t, self.overlap)
            cols = overlapping_regions(wo, t, self.overlap)
            acc: torch.Tensor | None = torch.zeros((1, cout, ho, wo), dtype=torch.float32, device=self.sdev)
            wsum: torch.Tensor | None = torch.zeros((1, 1, ho, wo), dtype=torch.float32, device=self.sdev)
            out_map: torch.Tensor | None = None
        else:
            t = self._tile_side(ho, full_h, cout)
            rows, cols = grid(ho, t), grid(wo, t)
            out_map = self._new_map(cout, ho, wo)
            acc = wsum = None
        stats = _Stats(cout, self.dev) if want_stats else None
        kept = self._new_map(cin, h, w) if keep is not None else None

        def job(r: tuple[int, int], c: tuple[int, int]) -> TileJob:
            return TileJob(r, c, Window(r[0] * sh - reflect - ph, (r[1] - 1) * sh + kh - reflect - ph,
                                        c[0] * sw - reflect - pw, (c[1] - 1) * sw + kw - reflect - pw))

        jobs = [job(r, c) for r in rows for c in cols]
        for batch in _batches(jobs, self._batch_size(cin + cout, t)):
            src = self._read_windows(x, [j.window for j in batch], reflect)
            if kept is not None:  # same-size conv: output region == input region
                for i, j in enumerate(batch):
                    (r, c), win = (j.rows, j.cols), j.window
                    kept[:, :, r[0]:r[1], c[0]:c[1]] = src[i:i + 1, :, r[0] - win.top:r[1] - win.top,
                                                           c[0] - win.left:c[1] - win.left].to(self.sdev, self.cdtype)
            out = F.conv2d(self._prep(src), wgt, bias, stride=(sh, sw))
            if stats is not None:
                stats.add(out)
            for i, j in enumerate(batch):
                r, c = j.rows, j.cols
                o = out[i:i + 1]
                if acc is not None and wsum is not None:  # blend
                    wt = (ramp_weights([p[0] for p in rows], rows.index(r), r[1] - r[0], self.dev)[:, None]
                          * ramp_weights([p[0] for p in cols], cols.index(c), c[1] - c[0], self.dev)[None, :])
                    acc[:, :, r[0]:r[1], c[0]:c[1]] += (o.float() * wt).to(self.sdev)
                    wsum[:, :, r[0]:r[1], c[0]:c[1]] += wt.to(self.sdev)
                elif out_map is not None:
                    out_map[:, :, r[0]:r[1], c[0]:c[1]] = o.to(self.sdev, self.cdtype)
        if keep is not None and kept is not None:
            keep.append(kept)
        if acc is not None and wsum is not None:
            return _Lazy(acc / wsum), None
        assert out_map is not None  # not blended: written tile by tile
        return _Lazy(out_map), stats

    def _conv_transpose(self, x: _Lazy, m: nn.ConvTranspose2d, full_h: int,
                        want_stats: bool) -> tuple[_Lazy, _Stats | None]:
        if m.groups != 1 or tuple(m.dilation) != (1, 1) or isinstance(m.padding, str):
            raise NotImplementedError("only plain transposed convolutions are supported")
        cin, h, w = x.shape
        (kh, kw), (sh, sw), (ph, pw) = m.kernel_size, m.stride, m.padding
        oph, opw = m.output_padding
        if kh < sh or kw < sw or kh - 1 < sh - 1:
            raise NotImplementedError("transposed convolution with kernel smaller than stride")
        ho, wo = (h - 1) * sh - 2 * ph + kh + oph, (w - 1) * sw - 2 * pw + kw + opw
        cout = m.out_channels
        wgt, bias = self._weights_of(m)
        t = self._tile_side(ho, full_h, cout)
        rows, cols = grid(ho, t), grid(wo, t)
        out_map = self._new_map(cout, ho, wo)
        stats = _Stats(cout, self.dev) if want_stats else None

        def inputs_for(o0: int, o1: int, s: int, p: int, k: int) -> tuple[int, int]:
            # output o = i*s - p + kk (0 <= kk < k): inputs that reach outputs [o0, o1)
            return -((-(o0 + p - k + 1)) // s), (o1 - 1 + p) // s + 1

        jobs = []
        for r in rows:
            i0r, i1r = inputs_for(r[0], r[1], sh, ph, kh)
            for c in cols:
                i0c, i1c = inputs_for(c[0], c[1], sw, pw, kw)
                jobs.append(TileJob(r, c, Window(i0r, i1r, i0c, i1c)))
        for batch in _batches(jobs, self._batch_size(cin + cout, t)):
            src = self._read_windows(x, [j.window for j in batch], 0)  # zeros: no input there
            full = F.conv_transpose2d(self._prep(src), wgt, bias, stride=(sh, sw))
            for i, j in enumerate(batch):
                r, c = j.rows, j.cols
                i0r, i0c = j.window.top, j.window.left
                y0, x0 = r[0] - i0r * sh + ph, c[0] - i0c * sw + pw
                o = full[i:i + 1, :, y0:y0 + r[1] - r[0], x0:x0 + c[1] - c[0]]
                if stats is not None:
                    stats.add(o)
                out_map[:, :, r[0]:r[1], c[0]:c[1]] = o.to(self.sdev, self.cdtype)
        return _Lazy(out_map), stats


def _fill_border(t: torch.Tensor, top: int, bottom: int, left: int, right: int, reflect: int) -> None:
    """Fill the border strips of a (1, C, H, W) window whose inner part is the image.

    Up to ``reflect`` rows/columns next to the image edge mirror it (ReflectionPad2d: row -k
    = row k); anything further out is zero (the convolution's own zero padding, or no input
    for a transposed convolution).  Rows first, then columns over the full height, so the
    corners match a 2-D reflection pad.
    """
    for dim, lo, hi in ((2, top, bottom), (3, left, right)):
        n = t.shape[dim]
        if lo:
            r = min(reflect, lo)
            if r:
                t.narrow(dim, lo - r, r).copy_(t.narrow(dim, lo + 1, r).flip(dim))
            if lo - r:
                t.narrow(dim, 0, lo - r).zero_()
        if hi:
            e = n - hi - 1  # last row/column inside the image
            r = min(reflect, hi)
            if r:
                t.narrow(dim, e + 1, r).copy_(t.narrow(dim, e - r, r).flip(dim))
            if hi - r:
                t.narrow(dim, e + 1 + r, hi - r).zero_()


def _batches(jobs: list[TileJob], size: int) -> Iterator[list[TileJob]]:
    """Consecutive jobs with the same padded input shape, at most ``size`` at a time."""
    groups: dict[tuple[int, int], list[TileJob]] = {}
    for j in jobs:
        groups.setdefault(j.window.shape, []).append(j)
    for group in groups.values():
        for i in range(0, len(group), max(1, size)):
            yield group[i:i + size]
