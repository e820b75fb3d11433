"""The style models a node runs: each loaded once, on first use, and swapped at a reload.

Why a cache of its own: loading a model takes seconds and much memory, so every translator of
the process shares one copy, the console shows what is loaded (and why a model is not), and a
reload loads a changed model beside the one in use before it takes its place.
"""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dicom_node.config import NodeConfig
from dicom_node.engine.devices import is_auto_device
from dicom_node.errors import UserError
from dicom_node.spool import Spool

if TYPE_CHECKING:
    from dicom_node.engine.model_file import StyleModel

# What identifies a loaded model's settings and file: a reload reloads it when this changes.
Fingerprint = tuple[object, ...]

__all__ = ["ModelCache", "engine_device", "device_text"]

log = logging.getLogger("dicom_node.model_cache")


class ModelCache:
    """Loads each configured model once, on first use (and its inverse, for the fidelity guard).

    At a reload (:meth:`configure`) a model whose settings or file changed is loaded beside the
    one in use and swapped in only when every changed model loaded: new studies get the new
    one, an item in flight keeps the model object it holds.
    """

    def __init__(self, config: NodeConfig, spool: Spool) -> None:
        self.config = config
        self.spool = spool
        self._models: dict[str, StyleModel] = {}
        self._fingerprints: dict[str, Fingerprint] = {}
        self._inverses: dict[str, StyleModel | None] = {}
        self._lock = threading.Lock()
        self.errors: dict[str, str] = {}  # name -> why it could not be loaded (for the console)
        self.loaded: dict[str, dict[str, Any]] = {}  # name -> what the console shows of it

    def get(self, name: str) -> StyleModel:
        with self._lock:
            if name not in self._models:
                try:
                    self._keep(name, *self._timed_load(self.config, name))
                except Exception as exc:
                    self.errors[name] = f"{exc.__class__.__name__}: {exc}"[:300]
                    raise
            return self._models[name]

    def configure(self, config: NodeConfig) -> list[str]:
        """Take a reloaded config's models: load the routed ones that are new or changed (settings,
        or the file's size or time), then swap all at once; returns their names.  Raises (and
        changes nothing) when one cannot be loaded: the node then refuses the whole reload."""
        fresh: dict[str, tuple[StyleModel, Fingerprint, dict[str, Any]]] = {}
        for name in dict.fromkeys(r.model for r in config.routes):
            with self._lock:
                current = self._fingerprints.get(name) if name in self._models else None
            if current is None or current != self._fingerprint(config, name):
                fresh[name] = self._timed_load(config, name)
        with self._lock:
            self.config = config
            for name, loaded in fresh.items():
                self._inverses.pop(name, None)
                self._keep(name, *loaded)
            for name in [n for n in self._models if n not in config.models]:
                for table in (self._models, self._fingerprints, self._inverses, self.loaded):
                    table.pop(name, None)
        return list(fresh)

    def _fingerprint(self, config: NodeConfig, name: str) -> Fingerprint:
        from dicom_node.engine.model_file import resolve_model_path

        settings = config.models[name]
        path = resolve_model_path(settings.path)
        try:
            st = path.stat()
            stamp: tuple[int, int] | None = (st.st_size, st.st_mtime_ns)
        except OSError:
            stamp = None
        return settings.path, settings.device, settings.inverse, str(path), stamp

    def _timed_load(self, config: NodeConfig, name: str) -> tuple[StyleModel, Fingerprint, dict[str, Any]]:
        t0 = time.perf_counter()
        fingerprint: Fingerprint = self._fingerprint(config, name) if name in config.models else ()
        model = self._load(name, config)
        settings = config.models.get(name)
        info = {"name": model.name, "version": model.version, "weights_sha256": model.weights_sha256,
                "device": device_text(settings.device if settings else "auto"),
                "loaded_at": time.time(), "load_seconds": time.perf_counter() - t0}
        return model, fingerprint, info

    def _keep(self, name: str, model: StyleModel, fingerprint: Fingerprint, info: dict[str, Any]) -> None:
        self._models[name], self._fingerprints[name], self.loaded[name] = model, fingerprint, info
        self.errors.pop(name, None)

    def is_loaded(self, name: str) -> bool:
        with self._lock:
            return name in self._models

    def inverse(self, name: str) -> StyleModel | None:
        """The reverse model of ``name`` (config ``inverse``: a file, or ``auto``: the file next to
        the model that its metadata names by weight digest), or None.  A broken inverse only
        costs the cycle check (logged once), never the translation."""
        model = self.get(name)
        with self._lock:
            if name not in self._inverses:
                self._inverses[name] = self._load_inverse(name, model)
            return self._inverses[name]

    def _load_inverse(self, name: str, model: StyleModel) -> StyleModel | None:
        from dicom_node.engine.model_file import load_inverse

        settings = self.config.models.get(name)
        try:
            inverse = load_inverse(model, settings.inverse if settings is not None else "auto")
        except Exception as exc:  # noqa: BLE001 - the cycle check is skipped, the guard still runs
            log.warning("model %s: inverse model not usable, no cycle check: %s", name, exc)
            return None
        if inverse is None:
            return None
        log.info("model %s: inverse %s loaded for the fidelity cycle check", name, inverse.name)
        return inverse

    def _load(self, name: str, config: NodeConfig) -> StyleModel:
        from dicom_node.engine import load_style_model
        from dicom_node.engine.model_file import resolve_model_path

        settings = config.models.get(name)
        if settings is None:
            raise UserError(f"model {name!r} is not configured")
        path = resolve_model_path(settings.path)
        if not path.exists() and str(settings.path) == "default":
            path = self._untrained_default()
        model = load_style_model(path)
        log.info("model %s loaded (%s %s)", name, model.name, model.version)
        return model

    def _untrained_default(self) -> Path:
        """No bundled model installed: a deterministic identity-start model, with a warning."""
        from dicom_node.engine import new_style_model, save_style_model

        path = self.spool.root / "models" / "untrained-default.safetensors"
        log.warning("bundled model 'default' is not installed: using an UNTRAINED generated model (%s)", path)
        if not path.exists():
            gen = new_style_model(ngf=8, n_blocks=2, residual=True, seed=0)
            save_style_model(gen, path, name="untrained-default", version="0",
                             provenance={"trained": False, "reason": "bundled default model missing"})
        return path


def device_text(device: str | None) -> str:
    """The device a model runs on, for the console (``auto`` resolved: ``auto: cuda:0``)."""
    from dicom_node.engine.tiling import resolve_device

    try:
        resolved = str(resolve_device(engine_device(device)))
    except Exception:  # noqa: BLE001 - the translation reports a bad device; this is display only
        return str(device)
    return f"auto: {resolved}" if is_auto_device(device) else resolved


def engine_device(device: str | None) -> str | None:
    """A model's configured device as the engine takes it (``auto``: None, the engine chooses)."""
    return None if is_auto_device(device) else device

