"""Style model files: generator weights plus metadata in one safetensors file.

safetensors is used because loading it can never execute code (unlike pickle-based
``torch.save`` files), it is a single flat file, and it has a free-form string metadata
header where we keep the architecture, normalisation, direction and provenance as JSON.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .atomic import atomic_write, umask_mode
from .defaults import DEFAULT_NORMALIZATION, MODEL_FORMAT
from .errors import UserError
from .generator import ResnetGenerator
from .model_paths import bundled_model_path, resolve_model_path  # torch-free (check-config, status); re-exported

__all__ = [
    "FORMAT",
    "StyleModel",
    "DEFAULT_NORMALIZATION",
    "bundled_model_path",
    "resolve_model_path",
    "load_style_model",
    "save_style_model",
    "new_style_model",
    "generator_from_architecture",
    "weights_digest",
    "pinned_digest",
    "pin_weights_digest",
    "read_model_metadata",
    "find_inverse",
    "load_inverse",
]

FORMAT = MODEL_FORMAT
FORMAT_VERSION = 1
DIGESTS_FILE = "digests.json"  # beside model files: {file name: {"weights_sha256": hex}} (see pinned_digest)
_JSON_KEYS = ("architecture", "normalization", "provenance", "output", "inverse", "fidelity")


@dataclass
class StyleModel:
    """A loaded style model: the generator (eval mode, CPU) and its metadata."""

    generator: ResnetGenerator
    metadata: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @property
    def name(self) -> str:
        return str(self.metadata.get("name", "unnamed"))

    @property
    def version(self) -> str:
        return str(self.metadata.get("version", "0"))

    @property
    def normalization(self) -> dict[str, Any]:
        return dict(self.metadata.get("normalization") or DEFAULT_NORMALIZATION)

    @property
    def weights_sha256(self) -> str:
        """The digest of the weights alone (:func:`weights_digest`): names this network whatever
        the file's metadata says, so an inverse model can be found and a DeviceUID derived."""
        return str(self.metadata.get("weights_sha256", ""))

    @property
    def identity(self) -> str:
        """A stable string naming this model, used to derive output UIDs."""
        return f"{self.name}:{self.version}:{self.metadata.get('sha256', '')}"


def _file_sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over the tensors as stored (names, shapes and float32 bytes, in name order).

    Why not the file's digest: two exported models name each other, so their metadata cannot
    hold each other's file digest; the weights' digest changes exactly when the network does.
    """
    import hashlib

    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().to("cpu", torch.float32).contiguous()
        h.update(f"{key}:{tuple(t.shape)}\n".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def read_model_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The raw metadata header of a safetensors file without reading its weights (cheap: used
    to find a model's inverse among the files next to it). Empty for anything unreadable."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError):
        return {}


def find_inverse(model: "StyleModel", folders: list[Path] | None = None) -> Path | None:
    """The file of ``model``'s inverse (named in its ``inverse`` metadata by weight digest),
    searched in ``folders`` (default: the model's own folder); None when it names none or
    none is there.  Matching is by the digest recorded in each candidate's header; loading
    the candidate then verifies it against its weights."""
    named = model.metadata.get("inverse")
    wanted = named.get("weights_sha256") if isinstance(named, dict) else None
    if not wanted:
        return None
    if folders is None:
        folders = [model.path.parent] if model.path is not None else []
    for folder in folders:
        for candidate in sorted(Path(folder).glob("*.safetensors")):
            if model.path is not None and candidate.resolve() == model.path.resolve():
                continue
            if read_model_metadata(candidate).get("weights_sha256") == wanted:
                return candidate
    return None


def load_inverse(model: "StyleModel", choice: str = "auto") -> "StyleModel | None":
    """The reverse model for the fidelity guard's cycle check: ``none``, ``auto`` (the file
    :func:`find_inverse` finds, or None) or a model file.  Raises :class:`UserError` like
    :func:`load_style_model` for a file that is not a usable model."""
    if choice == "none":
        return None
    path = find_inverse(model) if choice == "auto" else Path(choice)
    return load_style_model(path) if path is not None else None


def generator_from_architecture(arch: dict[str, Any]) -> ResnetGenerator:
    """An (uninitialised) generator for a model file's ``architecture`` metadata.

    Files written before the tone filter existed have no ``tone_filter`` key and build the
    same network as then, so they load and translate identically.
    """
    tone = arch.get("tone_filter") or False
    if tone and not isinstance(tone, dict):
        raise ValueError("architecture.tone_filter must be a mapping")
    return ResnetGenerator(ngf=int(arch["ngf"]), n_blocks=int(arch["n_blocks"]),
                           residual=bool(arch.get("residual", False)), tone_filter=tone)


def pinned_digest(path: Path) -> str | None:
    """The weight digest that the model's folder pins for it: None when the folder pins nothing
    (no :data:`DIGESTS_FILE`), "" when it pins other files but not this one.

    Why a file beside the models: a model's own ``weights_sha256`` is written by whoever wrote
    the model, so altered weights with a recomputed header pass it.  The engine's ``models/``
    folder ships its digests (``make default-model`` writes them), so the bundled model is
    checked against what was released; any folder of models can be pinned the same way.
    """
    try:
        text = (path.parent / DIGESTS_FILE).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path.parent / DIGESTS_FILE}: unreadable ({exc.__class__.__name__})") from None
    try:
        pins = json.loads(text)
    except json.JSONDecodeError:
        raise UserError(f"{path.parent / DIGESTS_FILE}: not valid JSON") from None
    value = pins.get(path.name) if isinstance(pins, dict) else None
    return str(value.get("weights_sha256", "")) if isinstance(value, dict) else ""


def pin_weights_digest(path: str | os.PathLike[str]) -> str:
    """Record ``path``'s weight digest in its folder's :data:`DIGESTS_FILE` (kept sorted; other
    entries stay); returns the digest.  Loading verifies it from then on."""
    p = Path(path)
    pins_path = p.parent / DIGESTS_FILE
    pins = json.loads(pins_path.read_text(encoding="utf-8")) if pins_path.exists() else {}
    from safetensors.torch import load_file

    digest = weights_digest(load_file(str(p)))  # the file just made is the reference: not checked against the old pin
    pins[p.name] = {"weights_sha256": digest}
    atomic_write(pins_path, lambda tmp: Path(tmp).write_text(json.dumps(pins, indent=2, sort_keys=True) + "\n"),
                 mode=umask_mode())
    return digest


def _shape_problem(arch: dict[str, Any], stored: dict[str, tuple[int, ...]]) -> str | None:
    """Why the file's tensors cannot be the weights of ``arch`` (None: names and shapes match).

    Why before building: the architecture is the file's claim.  A 1.4 MB file claiming ngf 256
    and 16 blocks made the loader allocate 1.45 GB before the mismatch showed.  The generator
    is built on PyTorch's ``meta`` device (shapes, no storage) and compared with the shapes in
    the safetensors header, which lists them without reading any data.
    """
    try:
        ngf, blocks = arch["ngf"], arch["n_blocks"]
        if not (isinstance(ngf, int) and isinstance(blocks, int) and ngf >= 1 and blocks >= 0):
            return f"ngf {ngf!r} and n_blocks {blocks!r} must be whole numbers"
        if blocks > len(stored):  # every block stores tensors: more blocks than tensors cannot match
            return f"{blocks} blocks claimed, {len(stored)} tensors stored"
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in generator_from_architecture(arch).state_dict().items()}
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        return f"architecture {exc.__class__.__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    for key in sorted(expected.keys() | stored.keys()):
        if expected.get(key) != stored.get(key):
            return (f"tensor {key}: stored {list(stored[key]) if key in stored else 'none'}, "
                    f"architecture needs {list(expected[key]) if key in expected else 'none'}")
    return None


def _not_safetensors(path: Path, exc: Exception) -> str:
    """The reason a file is not safetensors, naming PyTorch/pickle files (which are never loaded:
    unpickling can run code) so that the operator knows what to do with one."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        head = b""
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return ("a PyTorch checkpoint or pickle, which is never loaded as a model because unpickling can run "
                "code; export style models with dicom-node train export")
    return f"{exc.__class__.__name__}: {exc}"


def load_style_model(path: str | os.PathLike[str]) -> StyleModel:
    """Load a style model file; never executes code from it.

    Raises :class:`UserError` with a one-line reason for anything that is not a valid model.
    """
    from safetensors import SafetensorError, safe_open

    p = resolve_model_path(path)
    if not p.is_file():
        raise UserError(f"model file not found: {p}")
    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:  # the header only, no weights yet
            raw_meta = f.metadata() or {}
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{p}: not a style model file ({_not_safetensors(p, exc)})") from None
    if raw_meta.get("format") != FORMAT:
        raise UserError(f"{p}: not a dicom-node style model (metadata 'format' is {raw_meta.get('format')!r})")
    meta: dict[str, Any] = {}
    for k, v in raw_meta.items():
        if k in _JSON_KEYS:
            try:
                meta[k] = json.loads(v)
            except json.JSONDecodeError:
                raise UserError(f"{p}: metadata field {k!r} is not valid JSON") from None
        else:
            meta[k] = v
    arch = meta.get("architecture") or {}
    if not isinstance(arch, dict) or arch.get("type") != "resnet_generator":
        raise UserError(f"{p}: unsupported architecture "
                        f"{arch.get('type') if isinstance(arch, dict) else type(arch).__name__!r}")
    problem = _shape_problem(arch, shapes)  # before anything the size of the claimed network exists
    if problem:
        raise UserError(f"{p}: weights do not match the architecture ({problem})")
    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{p}: not a style model file ({exc.__class__.__name__}: {exc})") from None
    try:
        gen = generator_from_architecture(arch)
        gen.load_state_dict(tensors, strict=True)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise UserError(f"{p}: weights do not match the architecture ({first})") from None
    _check_windows(p, meta)
    digest = weights_digest(tensors)
    stored = meta.get("weights_sha256")
    if stored and stored != digest:
        raise UserError(f"{p}: weights do not match their recorded digest (corrupted file)")
    pinned = pinned_digest(p)
    if pinned is not None and pinned != digest:
        raise UserError(f"{p}: weights differ from the digest pinned in {p.parent / DIGESTS_FILE} "
                        f"({'not listed' if not pinned else 'altered or corrupted'}); refusing the model")
    gen.eval()
    gen.requires_grad_(False)
    meta["sha256"] = _file_sha256(p)
    meta["weights_sha256"] = digest
    return StyleModel(generator=gen, metadata=meta, path=p)


def _check_windows(path: Path, meta: dict[str, Any]) -> None:
    """A fixed input or output window must be two finite numbers, low below high: a broken one
    is refused at load, not at the first image (``engine.radiograph``)."""
    from .radiograph import output_scale

    norm = meta.get("normalization")
    try:
        if isinstance(norm, dict) and norm.get("method") == "fixed":
            low, high = float(norm["low"]), float(norm["high"])
            if not (math.isfinite(low) and math.isfinite(high) and high > low):
                raise ValueError(f"input window {low!r}..{high!r}")
        output_scale(meta.get("output"))
    except (KeyError, TypeError, ValueError, UserError) as exc:
        raise UserError(f"{path}: invalid intensity window in its metadata ({exc})") from None


def save_style_model(
    generator: ResnetGenerator,
    path: str | os.PathLike[str],
    *,
    name: str,
    direction: str = "A->B",
    version: str = "1",
    normalization: dict[str, Any] | None = None,
    provenance: dict[str, Any] | None = None,
    description: str = "",
    inverse: dict[str, Any] | None = None,
    fidelity: dict[str, Any] | None = None,
    output: dict[str, Any] | None = None,
) -> Path:
    """Write a style model atomically (temp file + fsync + rename), with the umask's file mode.

    ``inverse`` names the reverse model (``{"name", "weights_sha256"}``); ``fidelity`` holds the
    guard's calibration (``thresholds``, ``domain``, ``calibration``, see ``engine.fidelity``);
    ``output`` how model space becomes output pixels (``normalization``: domain B's window,
    ``window``: the display window; see ``engine.radiograph``).
    """
    from safetensors.torch import save_file

    meta = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "name": name,
        "version": str(version),
        "direction": direction,
        "description": description,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "architecture": json.dumps(generator.architecture()),
        "normalization": json.dumps(normalization or DEFAULT_NORMALIZATION),
        "provenance": json.dumps(provenance or {}),
    }
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in generator.state_dict().items()}
    meta["weights_sha256"] = weights_digest(state)
    if inverse:
        meta["inverse"] = json.dumps(inverse)
    if fidelity:
        meta["fidelity"] = json.dumps(fidelity)
    if output:
        meta["output"] = json.dumps(output)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(out, lambda tmp: save_file(state, str(tmp), metadata=meta), mode=umask_mode())


def new_style_model(ngf: int = 64, n_blocks: int = 9, residual: bool = False, seed: int = 0) -> ResnetGenerator:
    """An untrained generator with the standard N(0, 0.02) init (deterministic for a seed)."""
    g = torch.Generator().manual_seed(seed)
    gen = ResnetGenerator(ngf=ngf, n_blocks=n_blocks, residual=residual)
    with torch.no_grad():
        for m in gen.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
                m.weight.normal_(0.0, 0.02, generator=g)
                if m.bias is not None:
                    m.bias.zero_()
    if residual:
        last = [m for m in gen.modules() if isinstance(m, torch.nn.Conv2d)][-1]
        with torch.no_grad():
            last.weight.zero_()
    return gen.eval()
