"""Workers: release quiet studies, translate ready instances, deliver outputs with retries.

Why separate threads from the network: a C-STORE answer must not wait for a model, and a
slow or dead destination must not stall translation or the other destinations.  So there
are three kinds of loops:

* translator(s): release studies quiet for ``study_stable_seconds``, then translate one
  ``ready`` instance at a time (engine calls serialised by one lock: one GPU, and the
  engine already uses every CPU core), check the output with the fidelity guard, write
  the Secondary Capture to the spool atomically and queue one delivery per destination
  (plus the original when the route says ``forward_original``) with the output's audit
  row, all in one transaction.  A flagged output on a ``withhold`` route is not queued
  but held for an operator (``dicom-node release`` / ``discard``).
* deliverers, one per destination: send due deliveries (one association per batch of up
  to 50), record each outcome; failures are retried with ``retry.backoff_seconds`` until
  ``retry.max_attempts``, then ``failed`` (files stay in the spool; ``dicom-node retry``).
  Finished instances' spool files are removed (the rows stay), a delivered study's
  ``storage.keep_sources_days`` after its last delivery (``dicom-node reprocess`` needs them).
* housekeeper: sweeps partial files of aborted transfers from the spool's tmp/.

Every step claims its work in the state database (a lease, :mod:`dicom_node.cluster`) and
commits its result there, so after a crash the loops simply continue, here or on another
node once the lease runs out.  Re-translating after a crash writes the same output UIDs (the
engine derives them deterministically), so a resend is idempotent at the destination.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from dicom_node.cluster import LeaseLost
from dicom_node.config import NodeConfig
from dicom_node.database import first_line
from dicom_node.engine.defaults import DEFAULT_OVERLAP, MANUFACTURER
from dicom_node.engine.devices import is_auto_device
from dicom_node.errors import UnsupportedImage, UserError
from dicom_node.interrupt import TranslationStopped, stop_between_operations
from dicom_node.spool import Spool
from dicom_node.state import DeliveryRow, InstanceRow, NewDelivery, OutputRecord, StateDB, abbreviate

__all__ = ["Broadcast", "Housekeeper", "ModelCache", "Translator", "Deliverer", "ENGINE_LOCK"]

log = logging.getLogger("dicom_node.worker")

ENGINE_LOCK = threading.Lock()  # one translation at a time in this process (GPU work serialised)
POLL_SECONDS = 0.5
ERROR_PAUSE = 5.0  # after an unexpected error (disk full, database busy) before trying again


class ModelCache:
    """Loads each configured model once, on first use (and its inverse, for the fidelity guard).

    At a reload (:meth:`refresh`) a model whose settings or file changed is loaded beside the
    one in use and swapped in only when every changed model loaded: new studies get the new
    one, an item in flight keeps the model object it holds.
    """

    def __init__(self, config: NodeConfig, spool: Spool) -> None:
        self.config = config
        self.spool = spool
        self._models: dict[str, Any] = {}
        self._fingerprints: dict[str, tuple] = {}
        self._inverses: dict[str, Any] = {}
        self._lock = threading.Lock()
        self.errors: dict[str, str] = {}  # name -> why it could not be loaded (for the console)
        self.loaded: dict[str, dict[str, Any]] = {}  # name -> what the console shows of it

    def get(self, name: str) -> Any:
        with self._lock:
            if name not in self._models:
                try:
                    self._keep(name, *self._timed_load(self.config, name))
                except Exception as exc:
                    self.errors[name] = f"{exc.__class__.__name__}: {exc}"[:300]
                    raise
            return self._models[name]

    def refresh(self, config: NodeConfig) -> list[str]:
        """Take ``config``'s models: load the routed ones that are new or changed (settings, or
        the file's size or time), then swap all at once; returns their names.  Raises (and
        changes nothing) when one cannot be loaded."""
        fresh = {}
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

    def _fingerprint(self, config: NodeConfig, name: str) -> tuple:
        from dicom_node.engine.model_file import resolve_model_path

        settings = config.models[name]
        path = resolve_model_path(settings.path)
        try:
            st = path.stat()
            stamp = (st.st_size, st.st_mtime_ns)
        except OSError:
            stamp = None
        return settings.path, settings.device, settings.inverse, str(path), stamp

    def _timed_load(self, config: NodeConfig, name: str) -> tuple[Any, tuple, dict[str, Any]]:
        t0 = time.perf_counter()
        fingerprint = self._fingerprint(config, name) if name in config.models else ()
        model = self._load(name, config)
        settings = config.models.get(name)
        info = {"name": model.name, "version": model.version, "weights_sha256": model.weights_sha256,
                "device": _device_text(settings.device if settings else "auto"),
                "loaded_at": time.time(), "load_seconds": time.perf_counter() - t0}
        return model, fingerprint, info

    def _keep(self, name: str, model: Any, fingerprint: tuple, info: dict[str, Any]) -> None:
        self._models[name], self._fingerprints[name], self.loaded[name] = model, fingerprint, info
        self.errors.pop(name, None)

    def is_loaded(self, name: str) -> bool:
        with self._lock:
            return name in self._models

    def inverse(self, name: str) -> Any:
        """The reverse model of ``name`` (config ``inverse``: a file, or ``auto``: the file next to
        the model that its metadata names by weight digest), or None.  A broken inverse only
        costs the cycle check (logged once), never the translation."""
        model = self.get(name)
        with self._lock:
            if name not in self._inverses:
                self._inverses[name] = self._load_inverse(name, model)
            return self._inverses[name]

    def _load_inverse(self, name: str, model: Any) -> Any:
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

    def _load(self, name: str, config: NodeConfig) -> Any:
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


class _Loop(threading.Thread):
    """A daemon thread that runs ``step()`` until stopped; ``step`` returns True when it did work."""

    def __init__(self, name: str, wake: threading.Event, stop: threading.Event) -> None:
        super().__init__(name=name, daemon=True)
        self.wake = wake
        self.stop_event = stop
        self.retired = False  # a reload removed what this loop serves: finish the step, then end

    def retire(self) -> None:
        self.retired = True
        self.wake.set()

    def run(self) -> None:
        while not self.stop_event.is_set() and not self.retired:
            self.wake.clear()  # before looking for work: a wake-up during step() is not lost
            try:
                did_work = self.step()
            except Exception as exc:  # noqa: BLE001 - keep serving; the row stays where it was
                # e.g. the spool's disk is full or the database is locked: the item stays in its
                # state and is tried again after a pause (no busy loop, no log flood).
                log.error("%s: %s (retrying in %gs)", self.name, first_line(exc), ERROR_PAUSE)
                self.stop_event.wait(ERROR_PAUSE)
                continue
            if not did_work:
                try:
                    idle = self.idle_seconds()
                except Exception:  # noqa: BLE001 - the database is away: look again soon, never die
                    idle = ERROR_PAUSE
                self.wake.wait(idle)

    def step(self) -> bool:
        raise NotImplementedError

    def idle_seconds(self) -> float:
        return POLL_SECONDS


class Translator(_Loop):
    """Releases stable studies and translates ready instances."""

    PREVIEW_HEIGHT = 384  # pixels: the console's thumbnails (source | restyled)

    def __init__(self, config: NodeConfig, spool: Spool, db: StateDB, models: ModelCache,
                 wake: threading.Event, stop: threading.Event, deliver_wake: "Broadcast", name: str,
                 metrics: Any = None) -> None:
        super().__init__(name, wake, stop)
        self.config, self.spool, self.db, self.models = config, spool, db, models
        self.deliver_wake = deliver_wake
        self.metrics = metrics  # dicom_node.metrics.NodeMetrics, or None

    def run(self) -> None:
        self._preload()
        super().run()

    def _preload(self) -> None:
        """Load every routed model now: the first study is not delayed, a broken model shows at start."""
        for name in dict.fromkeys(r.model for r in self.config.routes):
            if self.stop_event.is_set():
                return
            try:
                self.models.get(name)
                self.models.inverse(name)
            except Exception as exc:  # noqa: BLE001 - reported now, and again per item that needs it
                log.error("model %s cannot be loaded: %s", name, exc)

    def idle_seconds(self) -> float:
        deadline = self.db.next_study_deadline(self.config.study_timers)
        if deadline is None:
            return POLL_SECONDS
        return max(0.01, min(POLL_SECONDS, deadline - time.time() + 0.01))

    def step(self) -> bool:
        for route, study_uid, why in self.db.release_stable_studies(self.config.study_timers):
            if why == "quiet":
                log.info("study %s on route %s quiet for %gs: ready for translation", abbreviate(study_uid), route,
                         self.config.study_timers(route)[0])
            elif why == "proceed":
                log.warning("study %s on route %s still receiving after max_wait_seconds %gs: translating what "
                            "has arrived (later instances follow into the same series)", abbreviate(study_uid),
                            route, self.config.study_timers(route)[1])
            else:
                log.warning("study %s on route %s still receiving after max_wait_seconds %gs: discarded "
                            "(on_max_wait: discard)", abbreviate(study_uid), route, self.config.study_timers(route)[1])
        row = self.db.claim_ready(prefer=self._loaded_routes())
        if row is None:
            return False
        try:
            self._translate(row)
        except LeaseLost:
            log.warning("sop %s: this item was taken over while it was translated here (a corrected resend, or "
                        "another node while this one was slow or cut off from the database): this result is "
                        "dropped", abbreviate(row.sop_uid))
        finally:
            self.db.cluster.release_claims("instances", [row.id])  # unfinished (an error): free for any node
        self.deliver_wake.set()
        return True

    def _decode_budget(self) -> int:
        """node.max_decode_bytes: checked at C-STORE, and again here before decoding, for what was
        queued under a larger budget (the node restarted with a lower one)."""
        from dicom_node.engine.dicom_decode import DEFAULT_MAX_DECODE_BYTES

        return self.config.node.max_decode_bytes or DEFAULT_MAX_DECODE_BYTES

    def _loaded_routes(self) -> list[str] | None:
        """Routes whose model this process has loaded, taken first (None: all of them)."""
        routes = self.config.routes
        loaded = [r.name for r in routes if self.models.is_loaded(r.model)]
        return None if len(loaded) == len(routes) else loaded

    def _translate(self, row: InstanceRow) -> None:
        import pydicom

        route = self.config.route(row.route)
        if route is None or route.called_ae.strip() != row.called_ae:
            self.db.mark_not_translated(row.id, "failed", f"its route {row.route!r} is no longer configured")
            log.error("sop %s: route %s no longer configured", abbreviate(row.sop_uid), row.route)
            return
        originals = ([NewDelivery(d, "original", row.sop_uid, row.path) for d in route.destinations]
                     if route.forward_original else [])
        settings = self.config.models.get(route.model)
        try:
            model = self.models.get(route.model)
            ds = pydicom.dcmread(row.path)
            if is_own_output(ds):
                # A PACS that routes our SC back would otherwise start an endless restyling loop.
                raise UnsupportedImage("already a dicom-node output (never restyled twice)")
            inverse = self.models.inverse(route.model)
            version, requested_by = self.db.sources.output_version(row.id)
            series = _series_naming(route, ds, version)
            t0 = time.perf_counter()
            with ENGINE_LOCK, stop_between_operations(self.stop_event):  # SIGTERM: abandoned, stays ready
                from dicom_node.engine.pipeline import translate_radiograph
                from dicom_node.engine.pixels import decode_dataset

                result = translate_radiograph(
                    model, ds, decode_dataset(ds, max_bytes=self._decode_budget()),
                    tile=settings.tile if settings else None,
                    overlap=settings.overlap if settings else DEFAULT_OVERLAP,
                    device=_device(settings.device if settings else "auto"), inverse=inverse, label=route.label,
                    show_flag=route.fidelity_action != "record", series=series)
            seconds = time.perf_counter() - t0
        except TranslationStopped:
            log.info("sop %s: translation interrupted by the stop; the next start translates it",
                     abbreviate(row.sop_uid))
            return  # step() gives the claim back: the item stays ready
        except UnsupportedImage as exc:
            self.db.mark_not_translated(row.id, "unsupported", str(exc), originals)
            log.info("sop %s not translated (%s)%s", abbreviate(row.sop_uid), exc,
                     ", forwarding original" if originals else ", kept in spool")
            return
        except Exception as exc:  # noqa: BLE001 - a broken model or file fails this item only
            self.db.mark_not_translated(row.id, "failed", f"{exc.__class__.__name__}: {exc}")
            log.error("sop %s translation failed: %s", abbreviate(row.sop_uid), exc.__class__.__name__)
            return
        sc, report = result.sc, result.fidelity
        out_uid = str(sc.SOPInstanceUID)
        out_path = self.spool.store_dataset(sc, self.spool.output_dir(row.id) / f"{out_uid}.dcm")
        self._save_preview(row, result)
        deliveries = [NewDelivery(d, "output", out_uid, str(out_path)) for d in route.destinations] + originals
        withhold = route.fidelity_action == "withhold" and report.flagged
        output = _output_record(row, out_uid, model, report, route, version, requested_by)
        self.db.mark_translated(row.id, deliveries, output=output, withhold=withhold, model=route.model)
        if self.metrics is not None:
            self.metrics.translation_seconds.labels(model=route.model).observe(seconds)
        log.info("sop %s translated with %s in %.2fs -> sc %s, fidelity %s%s", abbreviate(row.sop_uid), route.model,
                 seconds, abbreviate(out_uid), report.verdict,
                 f" (reprocessed: output version {version}, asked by {requested_by})" if version > 1 else "")
        if report.flagged:
            # reasons are scores and thresholds only: nothing about the patient
            log.warning("sop %s: fidelity guard flagged the output of %s (%s): %s", abbreviate(row.sop_uid),
                        route.model, "withheld for an operator" if withhold else
                        ("forwarded, marked" if route.fidelity_action == "flag" else "forwarded, recorded"),
                        "; ".join(report.reasons))


    def _save_preview(self, row: InstanceRow, result: Any) -> None:
        """The console's thumbnail (source | restyled, with the verdict); never fails the item."""
        from dicom_node.engine.pipeline import save_preview

        try:
            self.spool.previews.mkdir(exist_ok=True)
            save_preview(result, self.spool.preview_path(row.id), max_height=self.PREVIEW_HEIGHT)
        except Exception as exc:  # noqa: BLE001 - a missing thumbnail must not stop the image
            log.warning("sop %s: no preview (%s: %s)", abbreviate(row.sop_uid), exc.__class__.__name__, exc)


def _series_naming(route: Any, ds: Any, version: int) -> Any:
    """The route's output series: its description template, its block of SeriesNumbers and the
    route as the series' identity (a retrained model's outputs stay in the series)."""
    from dicom_node.engine.secondary_capture import SeriesNaming
    from dicom_node.routing import series_description, series_numbers

    return SeriesNaming(
        description=series_description(route.series_description, route=route.name, model=route.model,
                                       source=ds.get("SeriesDescription", "")),
        numbers=series_numbers(route.name, ds.get("SeriesNumber")), key=f"route {route.name}", version=version)


def _output_record(row: InstanceRow, out_uid: str, model: Any, report: Any, route: Any, version: int = 1,
                   requested_by: str | None = None) -> OutputRecord:
    from dicom_node.engine.secondary_capture import device_uid

    return OutputRecord(source_sop_uid=row.sop_uid, output_sop_uid=out_uid, model=model.name,
                        model_version=model.version, model_digest=model.weights_sha256, device_uid=device_uid(model),
                        verdict=report.verdict, reasons=report.reasons, scores=report.scores,
                        thresholds=report.thresholds, action=route.fidelity_action, output_version=version,
                        requested_by=requested_by)


def is_own_output(ds: Any) -> bool:
    """True for a Secondary Capture written by dicom-node (its SC equipment names it)."""
    return str(ds.get("SecondaryCaptureDeviceManufacturer", "") or "").strip() == MANUFACTURER


def _device_text(device: str | None) -> str:
    """The device a model runs on, for the console (``auto`` resolved: ``auto: cuda:0``)."""
    from dicom_node.engine.tiling import resolve_device

    try:
        resolved = str(resolve_device(_device(device)))
    except Exception:  # noqa: BLE001 - the translation reports a bad device; this is display only
        return str(device)
    return f"auto: {resolved}" if is_auto_device(device) else resolved


def _device(device: str | None) -> str | None:
    return None if is_auto_device(device) else device


class Housekeeper(_Loop):
    """Once a minute: sweep partial files of aborted transfers from the spool's tmp/, and
    forget finished rows older than ``FORGET_AFTER`` (the database stays small)."""

    INTERVAL = 60.0
    FORGET_AFTER = 30 * 86400.0  # duplicates re-sent within 30 days are recognised

    def __init__(self, config: NodeConfig, spool: Spool, db: StateDB, stop: threading.Event) -> None:
        super().__init__("housekeeper", threading.Event(), stop)
        self.config, self.spool, self.db = config, spool, db
        node = config.node
        self.max_age = 2 * max(node.network_timeout, node.dimse_timeout, node.acse_timeout) + 60

    def run(self) -> None:
        while not self.stop_event.wait(self.INTERVAL):  # returns at once when the node stops
            try:
                removed = self.spool.sweep_tmp(self.max_age)
                forgotten = self.db.forget_older_than(self.FORGET_AFTER)
                self.spool.sweep_previews(self.FORGET_AFTER)
            except Exception as exc:  # noqa: BLE001 - housekeeping must never stop the node
                log.error("housekeeper: %s: %s", exc.__class__.__name__, exc)
                continue
            if removed:
                log.info("removed %d partial file(s) of aborted transfers from the spool", removed)
            if forgotten:
                log.info("forgot %d instance(s) finished more than %d days ago", forgotten,
                         self.FORGET_AFTER // 86400)


class Broadcast:
    """Wakes several loops at once (the translator wakes every deliverer)."""

    def __init__(self, events: list[threading.Event]) -> None:
        self.events = events

    def set(self) -> None:
        for e in self.events:
            e.set()


class Deliverer(_Loop):
    """Sends due deliveries to one destination, one association per batch.

    One deliverer per destination: a destination that is down or slow to time out (a
    black-holed host costs the whole connect timeout) never delays the others.  One more
    deliverer (``only=None``) takes deliveries to destinations no longer configured and
    lets them fail through the normal back-off, visible in ``status``.
    """

    BATCH = 50
    PURGE_IDLE_SECONDS = 2.0

    def __init__(self, config: NodeConfig, spool: Spool, db: StateDB, wake: threading.Event,
                 stop: threading.Event, only: str | None) -> None:
        super().__init__(f"deliver-{only}" if only else "deliver-unconfigured", wake, stop)
        self.spool, self.db = spool, db
        self.only = only
        self.configure(config)

    def configure(self, config: NodeConfig) -> None:
        """Take a reloaded config (the catch-all deliverer: the new list of destinations)."""
        self.config = config
        self.exclude = [] if self.only else list(config.destinations)

    def run(self) -> None:
        self._purge()  # finished before a crash, files not yet removed
        super().run()

    def _purge(self) -> None:
        """Remove the spool files of finished instances (the node is a router, not an archive);
        a delivered study's after ``storage.keep_sources_days`` (``dicom-node reprocess``).

        The row stays (marked purged), so a re-sent duplicate is still recognised.  Runs
        after the state commit; a crash in between leaves files that the next start removes.
        Several deliverers may purge the same instance: both steps are idempotent.
        """
        self._purged_at = time.monotonic()
        keep = self.config.storage.keep_sources_days * 86400.0
        while True:
            rows = self.db.sources.finished_unpurged(keep_seconds=keep)
            if not rows:
                return
            for iid, original in rows:
                self.spool.remove_instance_files(iid, Path(original))
            self.db.sources.mark_purged(i for i, _ in rows)

    def idle_seconds(self) -> float:
        nxt = self.db.deliveries.next_time(only=self.only, exclude=self.exclude)
        if nxt is None:
            return POLL_SECONDS
        return max(0.01, min(POLL_SECONDS, nxt - time.time()))

    def step(self) -> bool:
        due = self.db.deliveries.claim(limit=self.BATCH * 4, only=self.only, exclude=self.exclude)
        if not due:
            if time.monotonic() - self._purged_at > self.PURGE_IDLE_SECONDS:
                # instances finished without a delivery of ours (an operator discarded a
                # withheld output): their files go too
                self._purge()
            return False
        by_dest: dict[str, list[DeliveryRow]] = defaultdict(list)
        for d in due:
            by_dest[d.destination].append(d)
        try:
            for name, rows in by_dest.items():
                for i in range(0, len(rows), self.BATCH):
                    if self.stop_event.is_set():
                        return True
                    self._send(name, rows[i:i + self.BATCH])
        finally:
            self.db.cluster.release_claims("deliveries", [d.id for d in due])  # those not sent: free for any node
        return True

    def _send(self, name: str, rows: list[DeliveryRow]) -> None:
        from dicom_node.destinations import deliver

        dest = self.config.destinations.get(name)
        retry = self.config.retry
        if dest is None:
            outcomes = [(r, False, f"destination {name!r} is not configured") for r in rows]
        else:
            try:
                results = deliver(dest, [Path(r.path) for r in rows], calling_ae=self.config.node.ae_title)
            except Exception as exc:  # noqa: BLE001 - counts as a failed attempt, retried with back-off
                results = []
                log.error("destination %s: delivery raised %s", name, exc.__class__.__name__)
            outcomes = [(r, res.ok, res.error) for r, res in zip(rows, results)]
            outcomes += [(r, False, "no result") for r in rows[len(results):]]
        ok, retrying, failed = self.db.deliveries.record_results(outcomes, retry.max_attempts, retry.delay)
        if ok:
            self._purge()
        errors = sorted({e for _, good, e in outcomes if not good and e})
        if retrying or failed:
            log.warning("destination %s: %d delivered, %d to retry, %d failed (%s)", name, ok, retrying, failed,
                        "; ".join(errors)[:300])
        else:
            log.info("destination %s: %d delivered", name, ok)
