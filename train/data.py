"""Training data: folders of radiographs -> cached model-space arrays -> random patches.

Images are decoded and normalised exactly as the engine does it (``dicom_node.engine.pixels``),
so training and inference see identical inputs.  Each decoded image is cached once as a
float16 ``.npy`` file in the run directory and memory-mapped afterwards: epochs, resumed runs
and the other DDP ranks never decode again, and a data set larger than RAM still works.

Patches are drawn at random positions, but positions whose area is mostly flat background
(air, collimator shadow, padding outside the valid mask) are rejected a few times before one
is accepted, because such patches teach the networks nothing about the style.
"""
from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, Sequence

import numpy as np

from dicom_node.engine.atomic import atomic_write
from dicom_node.engine.errors import UserError

__all__ = ["DomainData", "pick_images", "pick_indices", "find_image_files", "load_domain", "load_pairs", "PatchSampler",
           "paired_indices"]

log = logging.getLogger("dicom_node.train")

BLOCK = 8  # content map resolution in pixels
CACHE_VERSION = 5  # 2: each entry holds the image's body part; 3: named by meaning, and its pixel size;
# 4: how it was resampled (train/pixel_pitch.py); 5: averaged bicubically (antialiased), not by area
_SKIP_SUFFIXES = {".txt", ".json", ".yaml", ".yml", ".md", ".csv", ".npy", ".safetensors", ".pt", ".zip"}


@dataclass
class DomainData:
    """One domain's usable images (memory-mapped float16 model space) and what was skipped."""

    label: str
    folder: Path
    names: list[str] = field(default_factory=list)  # relative path without suffix, for pairing
    arrays: list[np.ndarray] = field(default_factory=list)
    content: list[np.ndarray] = field(default_factory=list)  # per 8x8 block: 1 = not background
    body_parts: list[str] = field(default_factory=list)  # BodyPartExamined, "" for none (engine.body_part)
    pixel_spacings: list[float | None] = field(default_factory=list)  # mm, None for none (engine.pixel_spacing)
    # images resampled to the other domain's pixel size, by how (train/pixel_pitch.py)
    resampled: Counter[str] = field(default_factory=Counter)
    skipped_unreadable: int = 0
    skipped_small: int = 0

    def __len__(self) -> int:
        return len(self.arrays)

    def summary(self) -> dict[str, Any]:
        from dicom_node.engine.pixel_spacing import spacing_range

        from .exam_mix import mix_counts

        resampled = {"resampled_to_pixel_spacing": dict(sorted(self.resampled.items()))} if self.resampled else {}
        return {"folder": str(self.folder), "images": len(self), "skipped_unreadable": self.skipped_unreadable,
                "skipped_too_small": self.skipped_small, "body_parts": mix_counts(self.body_parts),
                "pixel_spacing_mm": spacing_range(self.pixel_spacings), **resampled}


def pick_indices(count: int, limit: int) -> list[int]:
    """The indices of an evenly spread, deterministic subset of at most ``limit`` of ``count`` images."""
    return [int(i) for i in np.unique(np.linspace(0, count - 1, num=min(limit, count)).round().astype(int))]


def pick_images(arrays: Sequence[np.ndarray], limit: int) -> list[np.ndarray]:
    """An evenly spread, deterministic subset of at most ``limit`` of a domain's images, float32."""
    return [np.asarray(arrays[i], dtype=np.float32) for i in pick_indices(len(arrays), limit)]


def find_image_files(folder: Path) -> list[Path]:
    """All candidate image files under ``folder`` (recursive, sorted; hidden files, DICOMDIR and
    text/config/cache files left out).

    DICOM files often have no suffix, so everything else is a candidate; files that turn out
    unreadable are skipped and counted by :func:`load_domain`. A file with one of the
    left-out suffixes is still taken when its content is an image (``sniff_format``, the same
    rule ``dicom-node translate`` uses), so a DICOM file the node reads is never left out here
    because of its name.
    """
    from dicom_node.engine.pixels import sniff_format

    out = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for f in sorted(files):
            if f.startswith(".") or f == "DICOMDIR":
                continue
            path = Path(root) / f
            if Path(f).suffix.lower() in _SKIP_SUFFIXES and sniff_format(path) is None:
                continue
            out.append(path)
    return out


def _content_map(image: np.ndarray, valid: np.ndarray | None) -> np.ndarray:
    """1 for each 8x8 block that holds structure: inside the valid area, not flat, not saturated."""
    h, w = (image.shape[0] // BLOCK) * BLOCK, (image.shape[1] // BLOCK) * BLOCK
    blocks = image[:h, :w].astype(np.float32).reshape(h // BLOCK, BLOCK, w // BLOCK, BLOCK)
    mean = blocks.mean(axis=(1, 3))
    std = blocks.std(axis=(1, 3))
    ok: np.ndarray = (std > 0.01) & (np.abs(mean) < 0.97)
    if valid is not None:
        vb = valid[:h, :w].reshape(h // BLOCK, BLOCK, w // BLOCK, BLOCK).all(axis=(1, 3))
        ok &= vb
    return ok.astype(np.uint8)


def _decode(path: Path, normalization: dict[str, Any], pitch_to: float | None = None
            ) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    """The image in model space, its valid mask and what its header says: ``body_part``
    (``engine.body_part``) and ``pixel_spacing`` (``engine.pixel_spacing``); a PNG or TIFF names
    neither.  With ``pitch_to``, an image of another pixel size is resampled to that size by
    :mod:`.pixel_pitch`'s rule (``resampled`` in the header says how)."""
    from dicom_node.engine.body_part import UNKNOWN, examined_body_part
    from dicom_node.engine.pixel_spacing import pixel_spacing_mm
    from dicom_node.engine.pixels import normalize, read_dicom, read_image_file, sniff_format

    from .pixel_pitch import resampling, to_pixel_size

    header: dict[str, Any] = {"body_part": UNKNOWN, "pixel_spacing": None}
    if sniff_format(path) in ("png", "tiff"):
        radiograph = read_image_file(path)
    else:
        ds, radiograph = read_dicom(path)
        header.update(body_part=examined_body_part(ds), pixel_spacing=pixel_spacing_mm(ds))
    image = np.asarray(normalize(radiograph, normalization), dtype=np.float32)
    if image.ndim != 2:
        raise UserError(f"not a single 2-D image (shape {image.shape})")
    valid = radiograph.valid
    how = resampling(header["pixel_spacing"], pitch_to, image.shape)
    if how is not None and pitch_to is not None:
        image, valid = to_pixel_size(image, valid, header["pixel_spacing"], pitch_to)
        header.update(pixel_spacing=pitch_to, resampled=how)
    return image, valid, header


def load_domain(folder: Path, label: str, cache_dir: Path, normalization: dict[str, Any], *, patch_size: int = 0,
                write_cache: bool = True, min_images: int = 1, pitch_to: float | None = None) -> DomainData:
    """Decode (or reuse the cache of) every image under ``folder``; with ``pitch_to`` (mm), images
    of another pixel size are resampled to that size (:mod:`.pixel_pitch`).

    ``write_cache=False`` (DDP ranks other than 0) reads what rank 0 wrote and decodes into
    memory whatever it cannot find there (multi-node without a shared run directory).  Raises
    :class:`UserError` for a missing or empty folder, too few usable images, or a patch size
    larger than every image.
    """
    folder = Path(folder)
    files = _domain_files(folder, label)
    cache = cache_dir / label
    cache.mkdir(parents=True, exist_ok=True)
    index_path = cache / "index.json"
    index = _read_index(index_path, normalization, pitch_to)
    entries: dict[str, Any] = index["files"]
    data = DomainData(label=label, folder=folder)
    changed = False
    first_unreadable: tuple[str, str] | None = None  # (relative path, reason), for the error
    # Skip warnings wait until one file has been read: when none is, the error alone (one line,
    # with the first reason) says it all, instead of a warning per file before it.
    held: list[tuple[str, str]] | None = []
    for n, path in enumerate(files):
        rel = path.relative_to(folder).as_posix()
        st = path.stat()
        key = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
        entry = entries.get(rel)
        in_memory: tuple[np.ndarray, np.ndarray] | None = None
        if entry is None or entry.get("key") != key or (
                entry.get("ok") and not (cache / entry["file"]).exists()):
            entry, in_memory = _decode_entry(path, f"{n:06d}", key, normalization, cache, write_cache, pitch_to)
            entries[rel] = entry
            changed = True
        if not entry["ok"]:
            data.skipped_unreadable += 1
            if first_unreadable is None:
                first_unreadable = (rel, _without_path(entry.get("reason", "?"), path))
            if write_cache:  # rank 0 reports; other DDP ranks read the same index silently
                if held is None:
                    _warn_unreadable(label, rel, entry.get("reason", "?"))
                else:
                    held.append((rel, entry.get("reason", "?")))
            continue
        if held is not None:
            for args in held:
                _warn_unreadable(label, *args)
            held = None
        h, w = entry["shape"]
        if min(h, w) < patch_size:
            data.skipped_small += 1
            if write_cache:
                log.warning("domain %s: skipping %s: %dx%d is smaller than the %d px patch",
                            label, rel, h, w, patch_size)
            continue
        data.names.append(str(Path(rel).with_suffix("")))
        data.body_parts.append(str(entry.get("body_part", "")))
        spacing = entry.get("pixel_spacing")
        data.pixel_spacings.append(float(spacing) if isinstance(spacing, (int, float)) else None)
        if entry.get("resampled"):
            data.resampled[str(entry["resampled"])] += 1
        if in_memory is not None:
            data.arrays.append(in_memory[0])
            data.content.append(in_memory[1])
        else:
            data.arrays.append(np.load(cache / entry["file"], mmap_mode="r"))
            data.content.append(np.load(cache / entry["content"]))
    if changed and write_cache:
        atomic_write(index_path, lambda tmp: tmp.write_text(json.dumps(index)), durable=False)
    if data.skipped_unreadable and write_cache and held is None:
        log.warning("domain %s: %d of %d files unreadable and skipped", label, data.skipped_unreadable, len(files))
    if len(data) < min_images:
        _too_few_images(data, len(files), min_images, patch_size, first_unreadable)
    return data


def _domain_files(folder: Path, label: str) -> list[Path]:
    """The image files under a domain's folder; a missing or empty folder is a UserError."""
    if not folder.is_dir():
        raise UserError(f"domain {label} folder not found: {folder}")
    files = find_image_files(folder)
    if not files:
        raise UserError(f"domain {label} folder {folder} holds no image files (DICOM, PNG or TIFF, "
                        f"searched recursively)")
    return files


def _read_index(index_path: Path, normalization: dict[str, Any], pitch_to: float | None) -> dict[str, Any]:
    """The cache index, or a fresh one when it is missing, unreadable, of another cache version
    or made with another normalisation or pixel size to resample to."""
    index: dict[str, Any] = {}
    if index_path.exists():
        try:
            index = json.loads(index_path.read_text())
        except json.JSONDecodeError:
            index = {}
    if (index.get("version") != CACHE_VERSION or index.get("normalization") != normalization
            or index.get("pitch_to") != pitch_to):
        index = {"version": CACHE_VERSION, "normalization": normalization, "pitch_to": pitch_to, "files": {}}
    return index


def _decode_entry(path: Path, stem: str, key: dict[str, int], normalization: dict[str, Any], cache: Path,
                  write_cache: bool, pitch_to: float | None = None
                  ) -> tuple[dict[str, Any], tuple[np.ndarray, np.ndarray] | None]:
    """Decode one file into its index entry (``ok`` False with the reason when unreadable).

    With ``write_cache`` the arrays go to ``cache/<stem>.npy`` and ``<stem>.content.npy``;
    without, they are returned (image as float16, content map) to be kept in memory.
    """
    entry: dict[str, Any] = {"key": key, "ok": False}
    try:
        image, valid, header = _decode(path, normalization, pitch_to)
    except Exception as exc:  # noqa: BLE001 - any undecodable file is skipped and counted
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        entry["reason"] = reason[:200]
        return entry, None
    entry.update(ok=True, file=f"{stem}.npy", content=f"{stem}.content.npy", shape=list(image.shape), **header)
    if write_cache:
        _save_npy(cache / entry["file"], image.astype(np.float16))
        _save_npy(cache / entry["content"], _content_map(image, valid))
        return entry, None
    # a rank on another node without rank 0's (shared) run directory
    return entry, (image.astype(np.float16), _content_map(image, valid))


def _too_few_images(data: DomainData, n_files: int, min_images: int, patch_size: int,
                    first_unreadable: tuple[str, str] | None) -> NoReturn:
    """Raise the UserError that says why a domain has fewer than ``min_images`` usable images."""
    label, folder = data.label, data.folder
    if data.skipped_small and data.skipped_small + len(data) >= min_images:
        raise UserError(f"patch_size {patch_size} is larger than {data.skipped_small} of the "
                        f"{data.skipped_small + len(data)} images in domain {label} ({folder}); "
                        f"use a smaller train.patch_size")
    example = (f"; first: {first_unreadable[0]}: {first_unreadable[1]}" if first_unreadable else "")
    raise UserError(f"domain {label} ({folder}) has {len(data)} usable image(s), at least {min_images} needed "
                    f"({data.skipped_unreadable} unreadable of {n_files} files{example})")


def _warn_unreadable(label: str, rel: str, reason: str) -> None:
    log.warning("domain %s: skipping unreadable file %s (%s)", label, rel, reason)


def _without_path(reason: str, path: Path) -> str:
    """A decoder's one-line reason without its leading ``path: `` (the caller names the file)."""
    prefix = f"{path}: "
    return reason[len(prefix):] if reason.startswith(prefix) else reason


def _save_npy(path: Path, array: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.save would append ".npy" to a path
            np.save(f, array)

    atomic_write(path, write, durable=False)


def paired_indices(a: DomainData, b: DomainData) -> list[tuple[int, int]]:
    """(index in A, index in B) for images with the same relative name and the same shape."""
    where_b = {name: i for i, name in enumerate(b.names)}
    pairs = []
    for i, name in enumerate(a.names):
        j = where_b.get(name)
        if j is not None and a.arrays[i].shape == b.arrays[j].shape:
            pairs.append((i, j))
    return pairs


def load_pairs(folder: Path, normalization: dict[str, Any], normalization_b: dict[str, Any] | None = None,
               limit: int = 16) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Validation pairs: ``folder/A/NAME`` and ``folder/B/NAME`` (any suffix) of the same image.

    Returns up to ``limit`` (name, A image, B image) in model space, float32, full resolution:
    A with ``normalization``, B with ``normalization_b`` (default: the same).
    Unreadable or mismatched pairs are skipped with a warning.
    """
    folder = Path(folder)
    subs = {p.name.lower(): p for p in folder.iterdir() if p.is_dir()} if folder.is_dir() else {}
    if "a" not in subs or "b" not in subs:
        raise UserError(f"validation folder {folder} must hold A/ and B/ subfolders with the same file names")
    b_files = {f.relative_to(subs["b"]).with_suffix("").as_posix(): f for f in find_image_files(subs["b"])}
    pairs = []
    for fa in find_image_files(subs["a"]):
        name = fa.relative_to(subs["a"]).with_suffix("").as_posix()
        fb = b_files.get(name)
        if fb is None:
            continue
        try:
            ia = _decode(fa, normalization)[0]
            ib = _decode(fb, normalization if normalization_b is None else normalization_b)[0]
        except Exception as exc:  # noqa: BLE001 - skip and go on, as for training data
            log.warning("validation: skipping %s (%s)", name, str(exc).splitlines()[0] if str(exc) else exc)
            continue
        if ia.shape != ib.shape:
            log.warning("validation: skipping %s (A is %s, B is %s)", name, ia.shape, ib.shape)
            continue
        pairs.append((name, ia, ib))
        if len(pairs) >= limit:
            break
    if not pairs:
        raise UserError(f"validation folder {folder} holds no readable A/B pairs with the same file names")
    return pairs


class PatchSampler:
    """Random training patches: unpaired A and B, or the same window of a pair in paired mode.

    The RNG is seeded from (seed, rank) so DDP ranks draw different patches, and its state is
    part of the checkpoint so a resumed run continues the same stream.
    """

    def __init__(self, a: DomainData, b: DomainData, patch_size: int, batch_size: int, *, seed: int = 0,
                 rank: int = 0, pairs: list[tuple[int, int]] | None = None, tries: int = 8,
                 weights: tuple[Sequence[float], Sequence[float]] | None = None) -> None:
        self.a, self.b = a, b
        self.patch, self.batch = patch_size, batch_size
        self.pairs = pairs or None
        self.tries = tries
        self.rng = np.random.default_rng([seed, rank])
        # unpaired: how often each image of A and of B is drawn, relatively (None: alike)
        self._cumulative = None if weights is None else tuple(np.cumsum(np.asarray(w, np.float64)) for w in weights)

    def _position(self, content: np.ndarray, shape: tuple[int, int], rng: np.random.Generator) -> tuple[int, int]:
        p = self.patch
        best, best_score = (0, 0), -1.0
        for _ in range(self.tries):
            y = int(rng.integers(0, shape[0] - p + 1))
            x = int(rng.integers(0, shape[1] - p + 1))
            cells = content[y // BLOCK:(y + p) // BLOCK, x // BLOCK:(x + p) // BLOCK]
            score = float(cells.mean()) if cells.size else 1.0
            if score >= 0.5:
                return y, x
            if score > best_score:
                best, best_score = (y, x), score
        return best

    def _crop(self, image: np.ndarray, y: int, x: int, flip_h: bool, flip_v: bool) -> np.ndarray:
        p = self.patch
        crop = np.asarray(image[y:y + p, x:x + p], dtype=np.float32)
        if flip_h:
            crop = crop[:, ::-1]
        if flip_v:
            crop = crop[::-1, :]
        return crop

    def sample(self) -> tuple[np.ndarray, np.ndarray]:
        """One batch ``(A, B)``, each float32 ``(batch, 1, patch, patch)`` in model space."""
        rng = self.rng
        out_a, out_b = [], []
        for _ in range(self.batch):
            if self.pairs:
                i, j = self.pairs[int(rng.integers(len(self.pairs)))]
                y, x = self._position(self.a.content[i], self.a.arrays[i].shape, rng)
                fh, fv = bool(rng.integers(2)), bool(rng.integers(2))
                out_a.append(self._crop(self.a.arrays[i], y, x, fh, fv))
                out_b.append(self._crop(self.b.arrays[j], y, x, fh, fv))
                continue
            for k, (dom, out) in enumerate(((self.a, out_a), (self.b, out_b))):
                i = self._draw(len(dom), k)
                y, x = self._position(dom.content[i], dom.arrays[i].shape, rng)
                out.append(self._crop(dom.arrays[i], y, x, bool(rng.integers(2)), bool(rng.integers(2))))
        return np.stack(out_a)[:, None], np.stack(out_b)[:, None]

    def _draw(self, count: int, domain: int) -> int:
        """An image index of domain ``domain`` (0: A, 1: B), by its weight when there are weights."""
        if self._cumulative is None:
            return int(self.rng.integers(count))
        cumulative = self._cumulative[domain]
        return int(np.searchsorted(cumulative, self.rng.random() * cumulative[-1], side="right"))

    def state(self) -> str:
        """The RNG state as JSON text (a plain string loads under ``torch.load(weights_only=True)``)."""
        return json.dumps(self.rng.bit_generator.state)

    def set_state(self, state: str) -> None:
        self.rng.bit_generator.state = json.loads(state)
