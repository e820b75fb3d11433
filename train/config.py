"""The trainer's configuration: typed settings parsed from YAML (shape: docs/training.md).

Every problem is collected with its YAML path (``train.steps: must be an integer >= 1``) and
reported at once as a :class:`~dicom_node.engine.yaml_config.ConfigError` (a UserError: one line, exit 1),
so a user fixes a config in one round instead of one error per run.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dicom_node.engine.tone_filter import DEFAULT_BRIGHTNESS_BINS, MAX_BRIGHTNESS_BINS
from dicom_node.engine.yaml_config import ConfigError, load_config_file

__all__ = [
    "DataSettings", "ModelSettings", "TrainSettings", "OutputSettings", "TrainConfig",
    "load_train_config", "parse_train_config", "apply_overrides", "local_tone_bins", "AUTO_LOCAL_TONE_BINS",
]


@dataclass
class DataSettings:
    a: Path
    b: Path
    val: Path | None = None
    min_images: int = 1  # fewer usable images than this in a domain is an error
    # domain: one fixed intensity window per domain, measured over all its images (a style maps
    # absolute values: engine/radiograph.py); image: each image stretched between its own
    # percentiles (archives of mixed origin, and every model trained before this choice existed)
    normalization: str = "domain"
    # weigh: when the domains hold other mixes of body parts (BodyPartExamined), each part weighs
    # alike in both, in the first stage's fit and in the training patches (train/exam_mix.py);
    # ignore: every image alike (headers whose body parts are wrong or named differently)
    body_parts: str = "weigh"
    # match: where the domains' pixel sizes do not overlap (more than 1.25x apart), B's images are
    # resampled to A's pixel size, a finer B averaged, a coarser one interpolated (a vendor's
    # processing works in pixels: train/pixel_pitch.py); keep: every image as it is
    pixel_spacing: str = "match"


@dataclass
class ModelSettings:
    ngf: int = 64
    n_blocks: int = 9
    ndf: int = 64
    residual: bool = True  # the network adds a change to its input and starts as the identity
    tone_filter: bool = True  # global tone/band-gain stage fitted from the domains (engine/tone_filter.py)
    # in that stage, one curve per band (amplitude-dependent gains: multiscale contrast
    # equalisation, coring) instead of one gain; false: one gain per band, as before
    band_curves: bool = True
    # band curves per band of local brightness (the gain may depend on where a detail sits on the
    # grey scale: a vendor's gradation curve applied after its multiscale processing); 1: one
    # curve per band, as before
    brightness_bins: int = DEFAULT_BRIGHTNESS_BINS
    # local tone curves after that stage, one per bin of local brightness (a value may map
    # differently in dark and in bright surroundings: adaptive equalisation); 1: off.  auto:
    # AUTO_LOCAL_TONE_BINS with data.val pairs, which keep them only where they show a gain
    # (train/tone_fit.py), off without: on crops of different anatomy they cost up to 1.3 dB.
    local_tone_bins: int | str = "auto"


# model.local_tone_bins: auto, given validation pairs (bench/local_tone.py --with-pairs)
AUTO_LOCAL_TONE_BINS = 8


def local_tone_bins(model: dict[str, Any], validation_pairs: bool) -> int:
    """How many local tone curves ``model`` (a config's model section, as saved) asks for:
    ``auto`` is :data:`AUTO_LOCAL_TONE_BINS` with validation pairs (``data.val``) and off (1)
    without, since only pairs can show whether they help; a section saved before the key
    existed had none."""
    bins = model.get("local_tone_bins", 1)
    if bins == "auto":
        return AUTO_LOCAL_TONE_BINS if validation_pairs and model.get("tone_filter", True) else 1
    return int(bins)


@dataclass
class TrainSettings:
    patch_size: int = 256
    batch_size: int = 1
    steps: int = 200_000
    decay_from: int = 100_000  # linear decay to zero from here; >= steps means a constant lr
    lr: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    lambda_cycle: float = 10.0
    # Times lambda_cycle, as in the CycleGAN paper (0.5 there).  0 by default: with a tone filter in
    # front, G_ab(B) is *meant* to differ from B, so "leave target-domain images alone" is wrong.
    lambda_identity: float = 0.0
    pool_size: int = 50
    paired: str = "auto"  # auto: supervised L1 when A and B hold the same file names; "on"/"off"
    lambda_paired: float = 10.0
    # The network's change over its first stage, averaged over coarse_size-px blocks, times this
    # (train/losses.coarse_change_loss): level and large-scale contrast stay the tone filter's.
    # 0 (off) by default: it limits a drift but gained nothing measured (bench/README.md).
    lambda_coarse: float = 0.0
    coarse_size: int = 16
    # What picks the exported checkpoint and decides whether its network beats the first stage
    # (train/selection.py): the validation pairs (auto, when data.val is set), how much closer
    # to the target domain's band distribution the network brings its outputs ("distribution",
    # auto without data.val), or pseudo-pairs made from the target domain ("pseudo", to compare)
    select_by: str = "auto"
    amp: str = "auto"  # auto: bf16 autocast on CUDA where supported, and on CPUs with native bf16; "bf16"; "off"
    seed: int = 0
    device: str = "auto"
    channels_last: str = "auto"  # auto: on CUDA only (NHWC was slower on the CPUs measured); "on"; "off"
    threads: int = 0  # CPU threads for torch (0: torch's default); 1 is fastest on a busy small machine


@dataclass
class OutputSettings:
    dir: Path = Path("runs/style")
    name: str = ""  # model name in the exported files (default: the run directory's name)
    sample_every: int = 1000
    checkpoint_every: int = 5000
    log_every: int = 50


@dataclass
class TrainConfig:
    data: DataSettings
    model: ModelSettings = field(default_factory=ModelSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    output: OutputSettings = field(default_factory=OutputSettings)
    source: str = "config"

    @property
    def local_tone_bins(self) -> int:
        """``model.local_tone_bins`` as it acts (:func:`local_tone_bins`)."""
        return local_tone_bins(asdict(self.model), self.data.val is not None)

    @property
    def model_name(self) -> str:
        return self.output.name or self.output.dir.name or "style"

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML/JSON-serialisable form (paths as strings); round-trips through parse."""
        out = asdict(self)
        out.pop("source")

        def conv(v: Any) -> Any:
            if isinstance(v, Path):
                return str(v)
            if isinstance(v, dict):
                return {k: conv(x) for k, x in v.items()}
            return v

        converted: dict[str, Any] = conv(out)
        return converted


_SECTIONS: dict[str, type[DataSettings | ModelSettings | TrainSettings | OutputSettings]] = {
    "data": DataSettings, "model": ModelSettings, "train": TrainSettings, "output": OutputSettings}
_CHOICES = {("data", "normalization"): ("domain", "image"), ("data", "body_parts"): ("weigh", "ignore"),
            ("data", "pixel_spacing"): ("match", "keep"), ("train", "amp"): ("auto", "bf16", "off"),
            ("train", "paired"): ("auto", "on", "off"), ("train", "select_by"): ("auto", "pairs", "distribution", "pseudo"),
            ("train", "channels_last"): ("auto", "on", "off")}
_PATHS = {("data", "a"), ("data", "b"), ("data", "val"), ("output", "dir")}
_POSITIVE = {("model", "ngf"), ("model", "ndf"), ("train", "patch_size"), ("train", "batch_size"),
             ("train", "steps"), ("output", "sample_every"), ("output", "checkpoint_every"),
             ("output", "log_every"), ("data", "min_images"), ("model", "brightness_bins"),
             ("model", "local_tone_bins"), ("train", "coarse_size")}


def load_train_config(path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read a trainer YAML file (the node's strict loader: duplicate keys and YAML errors with
    their line), apply ``section.key -> value`` overrides, validate; every problem at once."""
    return load_config_file(
        path, lambda raw, base_dir, source: parse_train_config(raw, base_dir=base_dir, source=source),
        prepare=lambda raw: apply_overrides(raw if raw is not None else {}, overrides or {}))


def apply_overrides(raw: Any, overrides: dict[str, Any]) -> Any:
    """Return a copy of ``raw`` with dotted keys (``train.steps``) set; values already typed."""
    if not isinstance(raw, dict):
        return raw
    out = copy.deepcopy(raw)
    for dotted, value in overrides.items():
        section, _, key = dotted.partition(".")
        if not isinstance(out.get(section), dict):
            out[section] = {}
        out[section][key] = value
    return out


def parse_train_config(raw: Any, base_dir: Path = Path("."), source: str = "config") -> TrainConfig:
    """Validate a parsed YAML document; relative paths resolve against ``base_dir``."""
    problems: list[str] = []
    if not isinstance(raw, dict):
        raise ConfigError(["<root>: must be a mapping with data/model/train/output sections"], source)
    for key in raw:
        if key not in _SECTIONS:
            problems.append(f"{key}: unknown section (expected one of {', '.join(_SECTIONS)})")
    values: dict[str, dict[str, Any]] = {}
    for section, cls in _SECTIONS.items():
        sec = raw.get(section, {}) or {}
        if not isinstance(sec, dict):
            problems.append(f"{section}: must be a mapping")
            sec = {}
        fields = cls.__dataclass_fields__
        values[section] = {}
        for key, value in sec.items():
            where = f"{section}.{key}"
            if key not in fields:
                problems.append(f"{where}: unknown key")
                continue
            checked = _check_value(section, key, value, fields[key].type, base_dir, where, problems)
            if checked is not _BAD:
                values[section][key] = checked
    for key in ("a", "b"):
        if key not in values["data"] and not any(p.startswith(f"data.{key}:") for p in problems):
            problems.append(f"data.{key}: required (folder of domain {key.upper()} radiographs)")
    t = values["train"]
    steps, decay = t.get("steps", TrainSettings.steps), t.get("decay_from")
    if decay is None and "steps" in t:
        t["decay_from"] = steps // 2
    for key in ("brightness_bins", "local_tone_bins"):
        bins = values["model"].get(key, 1)
        if isinstance(bins, int) and bins > MAX_BRIGHTNESS_BINS:
            problems.append(f"model.{key}: {bins} is more than {MAX_BRIGHTNESS_BINS}")
    if values["model"].get("local_tone_bins", 1) not in (1, "auto") and values["model"].get("tone_filter") is False:
        problems.append("model.local_tone_bins: needs model.tone_filter")
    ps = t.get("patch_size", TrainSettings.patch_size)
    if isinstance(ps, int) and ps % 4:
        problems.append(f"train.patch_size: {ps} must be a multiple of 4 (the generator downsamples twice)")
    if isinstance(ps, int) and 0 < ps < 32:
        problems.append(f"train.patch_size: {ps} is too small for the 70x70 PatchGAN (use >= 32)")
    if problems:
        raise ConfigError(problems, source)
    return TrainConfig(
        data=DataSettings(**values["data"]),
        model=ModelSettings(**values["model"]),
        train=TrainSettings(**values["train"]),
        output=OutputSettings(**values["output"]),
        source=source,
    )


_BAD = object()


def _check_value(section: str, key: str, value: Any, typ: Any, base_dir: Path, where: str,
                 problems: list[str]) -> Any:
    typ = str(typ)
    if (section, key) in _PATHS:
        if value is None and key == "val":
            return None
        if not isinstance(value, (str, Path)) or not str(value):
            problems.append(f"{where}: must be a folder path")
            return _BAD
        p = Path(value).expanduser()
        return p if p.is_absolute() else (base_dir / p)
    if (section, key) in _CHOICES:
        if value is True:
            value = "bf16" if key == "amp" else "on"
        if value is False:
            value = "off"
        if value not in _CHOICES[(section, key)]:
            problems.append(f"{where}: {value!r} is not one of {', '.join(_CHOICES[(section, key)])}")
            return _BAD
        return value
    if typ == "bool":
        if not isinstance(value, bool):
            problems.append(f"{where}: must be true or false")
            return _BAD
        return value
    if typ == "int | str" and value == "auto":
        return value
    if typ in ("int", "int | str"):
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{where}: must be an integer" + (" or auto" if typ != "int" else ""))
            return _BAD
        if (section, key) in _POSITIVE and value < 1:
            problems.append(f"{where}: must be >= 1")
            return _BAD
        if value < 0:
            problems.append(f"{where}: must be >= 0")
            return _BAD
        return value
    if typ == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{where}: must be a number")
            return _BAD
        if value < 0:
            problems.append(f"{where}: must be >= 0")
            return _BAD
        return float(value)
    if typ == "str":
        if not isinstance(value, str):
            problems.append(f"{where}: must be a string")
            return _BAD
        return value
    return value
