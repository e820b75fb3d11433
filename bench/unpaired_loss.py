"""A non-adversarial unpaired objective for the network after the first stage, measured.

Why: ``dicom-node train``'s networks gain nothing over their first stage without pairs
(``bench/quality.py``: -0.13 to +0.17 dB on the phantom pairs), while the same network told the
answer gains several dB.  The first stage matches each band's *marginal* distribution; what it
leaves is in the *joint* statistics of the bands (and mostly at coarse scales:
``tone_filter`` error energy on ``multiscale`` is 75 % at sigma >= 11.2 px).  This benchmark
trains the residual network on top of a fixed, fitted first stage T with:

* ``shift`` (no pairs): a sliced-Wasserstein loss on per-pixel joint features (the octave band
  coefficients up to ``--sigmas`` and the low-pass, each scaled by B's spread).  For random
  directions from a fixed bank, the batch's sorted projections of G(a) are pulled towards the
  batch's own sorted projections of T(a) moved by the *population* difference between B and
  T(A) at the same quantile (B's and T(A)'s projections over all training images, sorted once).
  A batch of two patches shows other anatomy than the population; taking the difference cancels
  the batch's content to first order, which plain SWD against B's patches does not (that lost
  0.9 dB in 60 steps on ``multiscale`` in the prototype);
* ``paired`` (the ceiling, ``--methods shift,paired``): L1 against the true pairs of the same style pair
  (``demo-data`` paired data), same network, patches and budget.

Scores are affine PSNR on the held-out true pairs, as in ``bench/quality.py`` (its helpers are
used), every ``--eval-every`` steps.  The network is ``dicom-node train``'s residual ResNet
generator (``train.networks.build_generator``, last convolution zero: it starts at T), run on
T's output, T applied to whole images as the engine applies it.  Nothing here is in the product.

    python bench/unpaired_loss.py --pairs multiscale,clahe --methods shift,paired --out bench/results/unpaired-loss.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality as Q  # noqa: E402  (bench/ is not a package)

BANK = 1024  # fixed random directions; each step uses --proj of them
POPULATION = 200_000  # pixels per domain for the population quantiles


def features(x, sigmas: list[float]):
    """``(pixels, bands + 1)``: each pixel's band coefficients and low-pass, away from the border."""
    from dicom_node.train.band_distance import pixel_features

    return pixel_features(x, sigmas, int(2 * sigmas[-1]))


def population(images: list[np.ndarray], sigmas: list[float], rng: np.random.Generator):
    import torch

    out = []
    with torch.no_grad():
        for im in images:
            f = features(torch.from_numpy(np.ascontiguousarray(im))[None, None], sigmas)
            keep = rng.choice(f.shape[0], min(POPULATION // len(images), f.shape[0]), replace=False)
            out.append(f[torch.from_numpy(keep)])
    return torch.cat(out)


class QuantileShift:
    """The ``shift`` loss (module doc): population quantiles of B and T(A) along a bank of
    directions, sorted once."""

    def __init__(self, toned_a: list[np.ndarray], b: list[np.ndarray], sigmas: list[float], seed: int,
                 shrink: float = 0.0) -> None:
        import torch

        rng = np.random.default_rng(seed)
        self.sigmas = sigmas
        pop_t, pop_b = population(toned_a, sigmas, rng), population(b, sigmas, rng)
        self.scale = pop_b.std(0, keepdim=True).clamp_min(1e-4)
        gen = torch.Generator().manual_seed(seed)
        bank = torch.randn(pop_b.shape[1], BANK, generator=gen)
        self.bank = bank / bank.norm(dim=0, keepdim=True)
        self.sorted_b = torch.sort((pop_b / self.scale) @ self.bank, dim=0)[0]
        self.sorted_t = torch.sort((pop_t / self.scale) @ self.bank, dim=0)[0]
        self.gen = gen
        if shrink > 0:  # keep of each quantile's shift only what exceeds the content noise
            self.sorted_b = self.sorted_t + self._shrunk(toned_a, b, shrink, rng)

    def _shrunk(self, toned_a: list[np.ndarray], b: list[np.ndarray], k: float, rng: np.random.Generator):
        """The population shift B - T(A) per direction and quantile, soft-thresholded at ``k``
        times its split-half noise (the shift between halves of B's images, and of T(A)'s)."""
        import torch

        levels = torch.linspace(0, 1, self.sorted_b.shape[0])

        def quantiles(images: list[np.ndarray]):
            z = torch.sort((population(images, self.sigmas, rng) / self.scale) @ self.bank, dim=0)[0]
            return z[(levels * (z.shape[0] - 1)).round().long()]

        def halves(images: list[np.ndarray]):
            return quantiles(images[:len(images) // 2]), quantiles(images[len(images) // 2:])

        b1, b2 = halves(b)
        t1, t2 = halves(toned_a)
        noise = ((b1 - b2).abs() + (t1 - t2).abs()) / 2
        shift = self.sorted_b - self.sorted_t
        return torch.sign(shift) * (shift.abs() - k * noise).clamp_min(0)

    def __call__(self, out, toned, n_proj: int):
        import torch
        import torch.nn.functional as F

        pick = torch.randperm(BANK, generator=self.gen)[:n_proj]
        directions = self.bank[:, pick]
        z_out = torch.sort((features(out, self.sigmas) / self.scale) @ directions, dim=0)[0]
        with torch.no_grad():
            z_t = torch.sort((features(toned, self.sigmas) / self.scale) @ directions, dim=0)[0]
            u = (torch.arange(z_out.shape[0], dtype=torch.float32) + 0.5) / z_out.shape[0]
            at = (u * (self.sorted_b.shape[0] - 1)).round().long()[:, None]
            target = z_t + self.sorted_b[at, pick[None, :]] - self.sorted_t[at, pick[None, :]]
        return F.mse_loss(z_out, target)


def run(pair: str, method: str, args: argparse.Namespace, seed: int) -> dict:
    """Train one network on top of the first stage (``method`` shift or paired); its scores."""
    import torch
    import torch.nn.functional as F

    from dicom_node.train.networks import build_generator
    from dicom_node.train.tone_fit import fit_tone_filter

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    data = Q.make_data(pair, args.work, args)
    norms = Q.domain_windows(data)
    test = Q.load_test_pairs(data, norms)
    source = Q.make_data(pair, args.work, args, paired=True) if method == "paired" else data
    a = Q.load_domain_arrays(source / "A", norms["A"])
    b = Q.load_domain_arrays(source / "B", norms["B"])
    tf = fit_tone_filter(a, b, band_curves=True, brightness_bins=4, local_bins=args.local_tone_bins,
                         seed=seed)  # the trainer's defaults without pairs (local curves: --local-tone-bins)
    with torch.no_grad():
        toned = [tf(torch.from_numpy(x)[None, None])[0, 0].numpy() for x in a]
    sigmas = [float(s) for s in args.sigmas.split(",")]
    loss_fn = QuantileShift(toned, b, sigmas, seed, args.shrink) if method == "shift" else None
    net = build_generator(args.ngf, args.blocks, residual=True)
    opt = torch.optim.Adam(net.parameters(), lr=args.lr, betas=(0.5, 0.999))

    def crops(images: list[np.ndarray], where: list[tuple[int, int, int]] | None = None):
        p, out, spots = args.patch, [], []
        for k in range(args.batch):
            if where:
                i, y, x = where[k]
            else:
                i = int(rng.integers(len(images)))
                y, x = int(rng.integers(images[i].shape[0] - p + 1)), int(rng.integers(images[i].shape[1] - p + 1))
            out.append(images[i][y:y + p, x:x + p])
            spots.append((i, y, x))
        return torch.from_numpy(np.stack(out)[:, None].copy()), spots

    @torch.no_grad()
    def translate(img: np.ndarray) -> np.ndarray:
        t = tf(torch.from_numpy(img)[None, None])
        h, w = t.shape[-2:]
        padded = F.pad(t, (0, (-w) % 4, 0, (-h) % 4), mode="reflect")
        return net(padded)[..., :h, :w][0, 0].numpy()

    @torch.no_grad()
    def first_stage(img: np.ndarray) -> np.ndarray:
        return tf(torch.from_numpy(img)[None, None])[0, 0].numpy()

    first = Q.score(first_stage, test)
    curve, t0 = [], time.perf_counter()
    for step in range(1, args.steps + 1):
        x, spots = crops(toned)
        out = net(x)
        if method == "paired":
            loss = F.l1_loss(out, crops(b, spots)[0])
        else:
            loss = loss_fn(out, x, args.proj)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % args.eval_every == 0 or step == args.steps:
            s = Q.score(translate, test)
            curve.append({"step": step, "psnr": s["psnr"], "loss": float(loss.detach())})
            print(f"  {pair} {method} seed {seed} step {step}: {s['psnr']:.2f} dB "
                  f"(first stage {first['psnr']:.2f}, {time.perf_counter() - t0:.0f} s)", flush=True)
    final = Q.score(translate, test)
    return {"psnr": final["psnr"], "first_stage": first["psnr"], "gain_db": final["psnr"] - first["psnr"],
            "worst_margin_db": final["worst_margin_db"], "identity": Q.score(lambda img: img, test)["psnr"],
            "curve": curve, "seconds": time.perf_counter() - t0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", default="multiscale,clahe", help="demo style pairs, NAME or NAME@real")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--methods", default="shift", help="shift (no pairs) and/or paired (the L1 ceiling)")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--patch", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--proj", type=int, default=64, help="directions per step")
    ap.add_argument("--sigmas", default="0.7,1.4,2.8,5.6,11.2,22.4", help="octave bands of the features (px)")
    ap.add_argument("--local-tone-bins", type=int, default=1,
                    help="the first stage's local tone curves (model.local_tone_bins; default 1: off, as "
                         "without pairs)")
    ap.add_argument("--shrink", type=float, default=0.0,
                    help="soft-threshold each quantile's shift at this many times its split-half noise (0: off)")
    ap.add_argument("--ngf", type=int, default=16)
    ap.add_argument("--blocks", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    Q.add_data_arguments(ap)
    ap.add_argument("--work", type=Path, default=Path("runs/bench-quality"), help="demo data (shared with quality.py)")
    ap.add_argument("--out", type=Path, default=Q.RESULTS / "unpaired-loss.json")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    results: dict = {}
    for pair in args.pairs.split(","):
        for method in args.methods.split(","):
            for seed in (int(s) for s in args.seeds.split(",")):
                results.setdefault(pair, {}).setdefault(method, {})[str(seed)] = run(pair, method, args, seed)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"settings": settings, "results": results}, indent=1))
    print("\n| style pair | method | identity | first stage | network on top | gain | worst image vs identity |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for pair, methods in results.items():
        for method, runs in methods.items():
            for seed, r in runs.items():
                print(f"| {pair} | {method} (seed {seed}) | {r['identity']:.2f} | {r['first_stage']:.2f} | {r['psnr']:.2f} "
                      f"| {r['gain_db']:+.2f} | {r['worst_margin_db']:+.1f} |")
    print(f"\nwritten {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
