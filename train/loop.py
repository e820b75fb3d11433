"""The training run: data, the step loop, logging, samples, validation, checkpoints, export.

Everything a run produces lives in ``output.dir``::

    config.yaml                the effective config (after flag overrides)
    cache/A, cache/B           decoded images, float16 .npy, memory-mapped
    checkpoints/step_N.pt      resumable state (weights_only-safe), newest few kept
    metrics.csv                losses, lr, patches/s; validation PSNR/SSIM at checkpoints
    samples/step_N.png         A | G(A) | F(G(A)) over B | F(B) | G(F(B))
    models/NAME_A2B.safetensors, models/NAME_B2A.safetensors   the style models

Under torchrun every rank trains on its own patches; rank 0 alone writes the cache, logs,
samples, validates, checkpoints and exports, and the others wait for it at barriers.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dicom_node.engine.errors import UserError
from dicom_node.engine.pixel_spacing import unlike_domains

from .config import TrainConfig, local_tone_bins
from .cyclegan import CycleGAN
from .data import DomainData, PatchSampler, find_image_files, load_domain, load_pairs, paired_indices
from .distributed import DistInfo, barrier, init_distributed, pick_device, shutdown
from .export import checkpoint_normalizations, export_models, latest_checkpoint, load_checkpoint, save_checkpoint
from .networks import tone_filter_arguments
from .pixel_pitch import AVERAGED, MAX_RESAMPLING, left_alone, pitch_target
from .run_log import RunLog
from .selection import PSEUDO_IMAGES, CheckpointSelector

__all__ = ["train", "TrainResult", "lr_factor"]

log = logging.getLogger("dicom_node.train")

@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    models: list[Path] = field(default_factory=list)
    losses: dict[str, float] = field(default_factory=dict)
    validation: dict[str, float] = field(default_factory=dict)
    resumed_from: int = 0
    weights_sha256: str = ""  # of all four networks; identical on every DDP rank


def lr_factor(step: int, steps: int, decay_from: int) -> float:
    """Constant until ``decay_from``, then linear to zero at ``steps`` (0-based step index)."""
    if step < decay_from or steps <= decay_from:
        return 1.0
    return max(0.0, 1.0 - (step - decay_from) / (steps - decay_from))


def train(cfg: TrainConfig, *, resume: bool = False, progress: bool = True) -> TrainResult:
    """Run (or resume) training as configured; under torchrun, one call per rank."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(cfg.train.device, local_rank)
    threads = torch.get_num_threads()
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    info = init_distributed(device)
    try:
        return _Run(cfg, info, device, resume, progress).run()
    finally:
        shutdown(info)
        torch.set_num_threads(threads)


def _broadcast_error(info: DistInfo, error: str | None) -> None:
    """Rank 0's set-up error (or None) reaches every rank, so nobody waits at a barrier forever."""
    if info.enabled:
        error = _broadcast_object(info, error)
    if error:
        raise UserError(error)


def _broadcast_object(info: DistInfo, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class _Run:
    def __init__(self, cfg: TrainConfig, info: DistInfo, device: torch.device, resume: bool, progress: bool):
        self.cfg, self.info, self.device, self.resume, self.progress = cfg, info, device, resume, progress
        self.run_dir = Path(cfg.output.dir)
        # Each domain's normalisation (train/intensity.py): decided by rank 0 in _setup_main
        # (measured, or the checkpoint's on resume: model space must not move under a run).
        self.norms: dict[str, dict[str, Any]] = {}
        self.validation: dict[str, float] = {}
        self.selector = CheckpointSelector(cfg.train.select_by, self.run_dir, device)
        self.last_losses: dict[str, float] = {}
        self.val_pairs: list[tuple[str, np.ndarray, np.ndarray]] = []

    # ------------------------------------------------------------------ set-up

    def _load_data(self, write: bool) -> tuple[DomainData, DomainData]:
        cfg = self.cfg
        cache = self.run_dir / "cache"
        kw: dict[str, Any] = dict(patch_size=cfg.train.patch_size, write_cache=write, min_images=cfg.data.min_images)
        a = load_domain(cfg.data.a, "A", cache, self.norms["A"], **kw)
        pitch_to = None
        if cfg.data.pixel_spacing == "match" and Path(cfg.data.b).is_dir():
            pitch_to = pitch_target(a.summary()["pixel_spacing_mm"], find_image_files(Path(cfg.data.b)))
        b = load_domain(cfg.data.b, "B", cache, self.norms["B"], pitch_to=pitch_to, **kw)
        for how, count in sorted(b.resampled.items()) if write else ():
            log.info("domain B: %d of %d images %s to A's pixel size, %.3f mm, from %s pixels (a vendor's "
                     "processing works in pixels; data.pixel_spacing: keep leaves them)", count, len(b), how, pitch_to,
                     "finer" if how == AVERAGED else "coarser")
        far = left_alone(b.pixel_spacings, pitch_to) if pitch_to is not None and write else []
        if far:
            log.warning("domain B: %d of %d images left at their own pixel size (%.3f to %.3f mm): more than %gx "
                        "from A's %.3f mm or too large to interpolate; check their headers", len(far), len(b),
                        min(far), max(far), MAX_RESAMPLING, pitch_to)
        return a, b

    def _decide_normalizations(self) -> dict[str, dict[str, Any]]:
        """The checkpoint's windows when resuming one, else ``data.normalization``'s, measured."""
        from .intensity import run_normalizations

        ckpt = latest_checkpoint(self.run_dir) if self.resume else None
        if ckpt is not None:
            return checkpoint_normalizations(load_checkpoint(ckpt)["meta"])
        cfg = self.cfg
        a, b = run_normalizations(cfg.data.normalization, cfg.data.a, cfg.data.b, self.run_dir / "cache")
        return {"A": a, "B": b}

    def _setup_main(self) -> None:
        """Rank 0: check the run directory, write the config copy, build the data cache."""
        import yaml

        ckpt = latest_checkpoint(self.run_dir)
        if ckpt is not None and not self.resume:
            raise UserError(f"{self.run_dir} already holds checkpoints; add --resume to continue that run "
                            f"or choose another output.dir")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))
        self.norms = self._decide_normalizations()
        self.data = self._load_data(write=True)
        differ = unlike_domains(*(d.summary()["pixel_spacing_mm"] for d in self.data))
        if differ:
            log.warning("%s", differ)
        if self.cfg.data.val is not None:
            self.val_pairs = load_pairs(self.cfg.data.val, self.norms["A"], self.norms["B"])
            log.info("validation: %d pairs from %s", len(self.val_pairs), self.cfg.data.val)

    def run(self) -> TrainResult:
        cfg, info = self.cfg, self.info
        error = None
        if info.is_main:
            try:
                self._setup_main()
            except UserError as exc:
                error = str(exc)
        _broadcast_error(info, error)
        if info.enabled:
            self.norms = _broadcast_object(info, self.norms)
        if not info.is_main:
            self.data = self._load_data(write=False)
        a, b = self.data
        pairs, paired = self._pairing(a, b)
        # paired training without data.val: its own pairs judge the network (train/selection.py)
        self.train_pairs = ([(a.names[i], np.asarray(a.arrays[i], np.float32), np.asarray(b.arrays[j], np.float32))
                             for i, j in pairs[:PSEUDO_IMAGES]] if paired else [])
        val_pairs = self.val_pairs

        model = self._build_model(paired)
        sampler = PatchSampler(a, b, cfg.train.patch_size, cfg.train.batch_size, seed=cfg.train.seed, rank=info.rank,
                               pairs=pairs if paired else None, weights=None if paired else self._mix_weights(a, b))
        start, resumed = self._resume(model, sampler)
        if not resumed and cfg.model.tone_filter:  # every rank fits the same (deterministic) filters
            from .tone_fit import fit_tone_filter

            stage: dict[str, Any] = {"band_curves": cfg.model.band_curves,
                                     "brightness_bins": cfg.model.brightness_bins,
                                     "local_bins": cfg.local_tone_bins, "seed": cfg.train.seed}
            ab, ba = [(x, y) for _, x, y in val_pairs], [(y, x) for _, x, y in val_pairs]  # local curves checked on them
            parts_a, parts_b = (d.body_parts if cfg.data.body_parts == "weigh" else [] for d in (a, b))
            model.set_tone_filters(fit_tone_filter(a.arrays, b.arrays, pairs=ab, src_parts=parts_a, dst_parts=parts_b,
                                                   **stage),
                                   fit_tone_filter(b.arrays, a.arrays, pairs=ba, src_parts=parts_b, dst_parts=parts_a,
                                                   **stage))
        if info.enabled:
            model.wrap_ddp([self.device.index] if self.device.type == "cuda" else None)

        self.meta_base = self._meta_base(model, a, b, len(pairs) if paired else 0, paired)
        if info.is_main:
            self.run_log = RunLog(self.run_dir, start)
            fixed = PatchSampler(a, b, cfg.train.patch_size, min(4, max(1, cfg.train.batch_size)),
                                 seed=cfg.train.seed + 7919, pairs=pairs if paired else None)
            self.sample_batch = fixed.sample()
        self._loop(model, sampler, start, paired, val_pairs)
        return self._finish(model, start)

    def _mix_weights(self, a: DomainData, b: DomainData) -> tuple[list[int], list[int]] | None:
        """How often the unpaired patches come from each image: each body part alike in both
        domains (:mod:`.exam_mix`, the first stage's rule), or None when the domains hold one mix.
        Why: a discriminator shown mostly knees as B and a generator fed mostly chests from A
        would learn to make chests look like knees, the mix read as style."""
        from .exam_mix import describe_mix, mix_repeats, weighs_anything

        if self.cfg.data.body_parts != "weigh":
            return None
        repeats = mix_repeats(a.body_parts, b.body_parts)
        if not weighs_anything(repeats):
            return None
        if self.info.is_main:
            log.info("training patches weighted by body part, each alike in both domains (A: %s; B: %s)",
                     describe_mix(a.body_parts), describe_mix(b.body_parts))
        return repeats

    def _pairing(self, a: DomainData, b: DomainData) -> tuple[list[tuple[int, int]], bool]:
        """The (A, B) pairs sharing a file name, and whether to train in paired mode."""
        cfg, info = self.cfg, self.info
        pairs = paired_indices(a, b)
        paired = cfg.train.paired == "on" or (cfg.train.paired == "auto" and len(pairs) == len(a) == len(b))
        if cfg.train.paired == "on" and not pairs:
            raise UserError("train.paired is on but A and B share no file names (with equal image sizes)")
        if info.is_main and cfg.train.decay_from >= cfg.train.steps:
            log.warning("train.decay_from %d >= train.steps %d: the learning rate stays constant (no decay)",
                        cfg.train.decay_from, cfg.train.steps)
        if info.is_main:
            log.info("data: A %d images, B %d images (%d/%d unreadable skipped)%s", len(a), len(b),
                     a.skipped_unreadable, b.skipped_unreadable,
                     f"; paired mode on {len(pairs)} pairs" if paired else "; unpaired")
        return pairs, paired

    def _step_settings(self) -> tuple[bool, bool]:
        """(bf16 autocast, channels_last) for this device: train.amp/channels_last, 'auto' decided here."""
        cfg = self.cfg
        amp = cfg.train.amp == "bf16" or (cfg.train.amp == "auto" and self.device.type == "cuda"
                                        and torch.cuda.is_bf16_supported())
        channels_last = cfg.train.channels_last == "on" or (cfg.train.channels_last == "auto"
                                                          and self.device.type == "cuda")
        if self.device.type == "cpu":  # what pays depends on the CPU's instructions (bench/train.py)
            from .cpu_speed import cpu_fast_settings

            fast = cpu_fast_settings(cfg.train.amp, cfg.train.channels_last)
            amp, channels_last = fast["amp"], fast["channels_last"]
            if self.info.is_main:
                log.info("CPU step: %s, %s", "bf16 autocast" if amp else "fp32",
                         "channels_last" if channels_last else "NCHW")
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        return amp, channels_last

    def _build_model(self, paired: bool) -> CycleGAN:
        cfg = self.cfg
        amp, channels_last = self._step_settings()
        return CycleGAN(ngf=cfg.model.ngf, n_blocks=cfg.model.n_blocks, ndf=cfg.model.ndf, residual=cfg.model.residual,
                        tone_filter=tone_filter_arguments(cfg.model.tone_filter, cfg.model.band_curves,
                                                          cfg.model.brightness_bins, cfg.local_tone_bins),
                        lr=cfg.train.lr, betas=(cfg.train.beta1, cfg.train.beta2), lambda_cycle=cfg.train.lambda_cycle,
                        lambda_identity=cfg.train.lambda_identity,
                        lambda_paired=cfg.train.lambda_paired if paired else 0.0, pool_size=cfg.train.pool_size,
                        lambda_coarse=cfg.train.lambda_coarse, coarse_size=cfg.train.coarse_size,
                        device=self.device, amp=amp, seed=cfg.train.seed,
                        channels_last=channels_last,
                        rank=self.info.rank)

    def _resume(self, model: CycleGAN, sampler: PatchSampler) -> tuple[int, bool]:
        """With --resume, load the latest checkpoint into ``model`` and ``sampler``.

        Returns (the step to start from, whether a checkpoint was loaded).
        """
        cfg, info = self.cfg, self.info
        ckpt = latest_checkpoint(self.run_dir) if self.resume else None
        if ckpt is None:
            if self.resume and info.is_main:
                log.info("no checkpoint in %s: starting a new run", self.run_dir)
            return 0, False
        payload = load_checkpoint(ckpt)
        # older runs had no tone filter, then no band curves, then no brightness bins; local tone
        # curves compare as they act (auto: by whether each run had validation pairs)
        saved_config = payload["meta"]["config"]
        saved_model = {"tone_filter": False, "band_curves": False, "brightness_bins": 1, "local_tone_bins": 1,
                       **saved_config["model"]}
        saved_model["local_tone_bins"] = local_tone_bins(saved_model, saved_config.get("data", {}).get("val") is not None)
        own_model = {**cfg.to_dict()["model"], "local_tone_bins": cfg.local_tone_bins}
        if saved_model != own_model:
            raise UserError(f"{ckpt.name} was trained with model {saved_model}, the config says "
                            f"{own_model}; resume with the same model settings")
        model.load_state_dict(payload["state"])
        start = payload["step"]
        if info.rank == 0:
            sampler.set_state(payload["sampler"])
        else:  # only rank 0's stream was saved; the others continue on a fresh, distinct one
            sampler.rng = np.random.default_rng([cfg.train.seed, info.rank, start])
        self.last_losses = payload["meta"].get("losses", {})
        self.validation = payload["meta"].get("validation", {})
        if info.is_main:
            log.info("resuming from %s at step %d", ckpt, start)
        return start, True

    def _meta_base(self, model: CycleGAN, a: DomainData, b: DomainData, n_pairs: int,
                   paired: bool) -> dict[str, Any]:
        """What every checkpoint and exported model records about the run."""
        cfg = self.cfg
        return {
            "name": cfg.model_name,
            "trainer": _trainer_version(),
            "config": cfg.to_dict(),
            "normalization": self.norms["A"],  # G_ab's input (as before per-domain windows)
            "normalizations": self.norms,
            "architecture": model.generator("g_ab").architecture(),
            "data": {"A": a.summary(), "B": b.summary(), "pairs": n_pairs,
                     "world_size": self.info.world_size},
            "paired": paired,
        }

    def _finish(self, model: CycleGAN, start: int) -> TrainResult:
        """The result of the run; rank 0 exports the models."""
        cfg, info = self.cfg, self.info
        result = TrainResult(run_dir=self.run_dir, steps=cfg.train.steps, losses=self.last_losses,
                             validation=self.validation, resumed_from=start, weights_sha256=_digest(model))
        if info.enabled:  # every rank says what it ended with: DDP must keep them identical
            log.info("rank %d/%d: final weights sha256 %s", info.rank, info.world_size, result.weights_sha256)
        if info.is_main:
            result.models = export_models(self.run_dir)
            for p in result.models:
                log.info("exported %s", p)
        barrier(info)
        return result

    # ------------------------------------------------------------------ the loop

    def _loop(self, model: CycleGAN, sampler: PatchSampler, start: int, paired: bool,
              val_pairs: list[tuple[str, np.ndarray, np.ndarray]]) -> None:
        cfg, info = self.cfg, self.info
        steps = cfg.train.steps
        bar = None
        if info.is_main and self.progress:
            from tqdm import tqdm

            bar = tqdm(total=steps, initial=start, unit="step", dynamic_ncols=True, disable=None)
        sums: dict[str, torch.Tensor] = {}
        n_sum = 0
        t0 = t_last = time.perf_counter()
        step = start
        if step >= steps and info.is_main:
            log.info("already at step %d of %d: nothing to train", step, steps)
        while step < steps:
            lr = cfg.train.lr * lr_factor(step, steps, cfg.train.decay_from)
            model.set_lr(lr)
            batch_a, batch_b = sampler.sample()
            losses = model.step(torch.from_numpy(batch_a), torch.from_numpy(batch_b), paired=paired)
            step += 1
            for k, v in losses.items():
                sums[k] = sums[k] + v if k in sums else v.clone()
            n_sum += 1
            if bar is not None:
                bar.update(1)
            last = step == steps
            if info.is_main and (step % cfg.output.log_every == 0 or last):
                now = time.perf_counter()
                means = {k: float(v) / n_sum for k, v in sums.items()}
                rate = n_sum * cfg.train.batch_size * info.world_size / max(now - t_last, 1e-9)
                self.last_losses = means
                self.run_log.write({"step": step, "elapsed_s": round(now - t0, 3), "lr": lr, **means,
                                    "patches_per_s": round(rate, 3)})
                if bar is not None:
                    bar.set_postfix(G=f"{means['g_total']:.3f}", D=f"{means['d_a'] + means['d_b']:.3f}",
                                    cyc=f"{means['cycle_a'] + means['cycle_b']:.3f}", pps=f"{rate:.1f}")
                if bar is None or bar.disable:
                    log.info("step %d/%d  G %.4f  D_A %.4f  D_B %.4f  cycle %.4f  lr %.2e  %.1f patches/s",
                             step, steps, means["g_total"], means["d_a"], means["d_b"],
                             means["cycle_a"] + means["cycle_b"], lr, rate)
                sums, n_sum, t_last = {}, 0, time.perf_counter()
            if info.is_main and (step % cfg.output.sample_every == 0 or last):
                self.run_log.write_sample(model, self.sample_batch, step)
            if step % cfg.output.checkpoint_every == 0 or last:
                if info.is_main:
                    self.validation = self._style_check(model)
                    self.validation.update(self.selector.gains(model.generator("g_ab"), model.generator("g_ba"),
                                                               self.data, val_pairs or self.train_pairs))
                    if val_pairs:
                        self.validation.update(self._validate(model, val_pairs))
                        log.info("validation at step %d: %s", step, "  ".join(
                            f"{k[4:]} {v:.4f}" for k, v in self.validation.items() if k.startswith("val_")))
                    self.run_log.write({"step": step, "elapsed_s": round(time.perf_counter() - t0, 3),
                                        **self.validation})
                    meta = {**self.meta_base, "losses": self.last_losses, "validation": self.validation,
                            "gain_by": self.selector.criterion}
                    path = save_checkpoint(self.run_dir, step, model.state_dict(), sampler.state(), meta)
                    self.selector.keep_best(path, step, self.validation.get("gain_a2b"))
                barrier(info)
        if bar is not None:
            bar.close()

    def _style_check(self, model: CycleGAN) -> dict[str, float]:
        """Style distance of G(A) from B on a few training images (no pairs needed)."""
        from dicom_node.engine.style_stats import style_distance, style_statistics

        from .data import pick_images
        from .validate import STYLE_IMAGES, style_check

        if not hasattr(self, "_style_ref"):
            a, b = self.data
            a_images = pick_images(a.arrays, STYLE_IMAGES)
            b_stats = style_statistics(pick_images(b.arrays, STYLE_IMAGES))
            self._style_ref = (a_images, b_stats, style_distance(style_statistics(a_images), b_stats)["total"])
        a_images, b_stats, identity = self._style_ref
        result = style_check(model.generator("g_ab"), a_images, b_stats, identity, device=self.device)
        log.info("style distance of G(A) from B: %.3f (A itself: %.3f)", result["style_distance"], identity)
        return result

    def _validate(self, model: CycleGAN, val_pairs: list[tuple[str, np.ndarray, np.ndarray]]) -> dict[str, float]:
        from .validate import validate

        return validate(model.generator("g_ab"), model.generator("g_ba"), val_pairs, device=self.device, norms=self.norms)


def _digest(model: CycleGAN) -> str:
    """sha256 over the four networks' weight digests (a cheap equality check across DDP ranks)."""
    import hashlib

    from dicom_node.engine.model_file import weights_digest

    h = hashlib.sha256()
    for name in sorted(model.nets):
        h.update(f"{name}:{weights_digest(model.module(name).state_dict())}\n".encode())
    return h.hexdigest()


def _trainer_version() -> str:
    from dicom_node.engine.version import __version__

    return f"dicom-node {__version__} train"
