"""Translators: release quiet studies, translate ready instances, queue their deliveries.

Why threads apart from the network: a C-STORE answer must not wait for a model.  A translator
releases studies quiet for ``study_stable_seconds``, then translates one ``ready`` instance at a
time (engine calls serialised by one lock: one GPU, and the engine already uses every CPU core),
checks the output with the fidelity guard, writes the Secondary Capture to the spool atomically
and queues one delivery per destination (plus the original when the route says
``forward_original``) with the output's audit row, all in one transaction.  A flagged output on
a ``withhold`` route is not queued but held for an operator (``dicom-node release`` /
``discard``).

Each item is claimed in the state database (a lease, :mod:`dicom_node.cluster`) and its result
committed there, so after a crash the translators simply continue, here or on another node once
the lease runs out.  Re-translating after a crash writes the same output UIDs (the engine
derives them deterministically), so a resend is idempotent at the destination.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from dicom_node.cluster import LeaseLost
from dicom_node.config import NodeConfig, RouteSettings
from dicom_node.engine.defaults import DEFAULT_OVERLAP, MANUFACTURER
from dicom_node.errors import UnsupportedImage
from dicom_node.interrupt import TranslationStopped, stop_between_operations
from dicom_node.loops import POLL_SECONDS, Broadcast, Loop
from dicom_node.model_cache import ModelCache, engine_device
from dicom_node.spool import Spool
from dicom_node.state import InstanceRow, NewDelivery, OutputRecord, StateDB, abbreviate

if TYPE_CHECKING:
    from pydicom import Dataset

    from dicom_node.engine.fidelity import FidelityReport
    from dicom_node.engine.model_file import StyleModel
    from dicom_node.engine.pipeline import Translation
    from dicom_node.engine.secondary_capture import SeriesNaming
    from dicom_node.metrics import NodeMetrics

__all__ = ["Translator", "ENGINE_LOCK", "is_own_output"]

log = logging.getLogger("dicom_node.translator")

ENGINE_LOCK = threading.Lock()  # one translation at a time in this process (GPU work serialised)


class Translator(Loop):
    """Releases stable studies and translates ready instances."""

    PREVIEW_HEIGHT = 384  # pixels: the console's thumbnails (source | restyled)

    config: NodeConfig

    def __init__(self, config: NodeConfig, spool: Spool, db: StateDB, models: ModelCache,
                 wake: threading.Event, stop: threading.Event, deliver_wake: Broadcast, name: str,
                 metrics: NodeMetrics | None = None) -> None:
        super().__init__(name, stop, wake, config)
        self.spool, self.db, self.models = spool, db, models
        self.deliver_wake = deliver_wake
        self.metrics = metrics  # dicom_node.metrics.NodeMetrics, or None

    logger = log

    def begin(self) -> None:
        self._preload()

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
        deadline = self.db.studies.next_deadline(self.config.study_timers)
        if deadline is None:
            return POLL_SECONDS
        return max(0.01, min(POLL_SECONDS, deadline - time.time() + 0.01))

    def step(self) -> bool:
        for route, study_uid, why in self.db.studies.release_due(self.config.study_timers):
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
                    device=engine_device(settings.device if settings else "auto"), inverse=inverse, label=route.label,
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
        assert report is not None  # translate_radiograph's guard (on by default) always reports
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

    def _save_preview(self, row: InstanceRow, result: Translation) -> None:
        """The console's thumbnail (source | restyled, with the verdict); never fails the item."""
        from dicom_node.engine.pipeline import save_preview

        try:
            self.spool.previews.mkdir(exist_ok=True)
            save_preview(result, self.spool.preview_path(row.id), max_height=self.PREVIEW_HEIGHT)
        except Exception as exc:  # noqa: BLE001 - a missing thumbnail must not stop the image
            log.warning("sop %s: no preview (%s: %s)", abbreviate(row.sop_uid), exc.__class__.__name__, exc)


def _series_naming(route: RouteSettings, ds: Dataset, version: int) -> SeriesNaming:
    """The route's output series: its description template, its block of SeriesNumbers and the
    route as the series' identity (a retrained model's outputs stay in the series)."""
    from dicom_node.engine.secondary_capture import SeriesNaming
    from dicom_node.routing import series_description, series_numbers

    return SeriesNaming(
        description=series_description(route.series_description, route=route.name, model=route.model,
                                       source=ds.get("SeriesDescription", "")),
        numbers=series_numbers(route.name, ds.get("SeriesNumber")), key=f"route {route.name}", version=version)


def _output_record(row: InstanceRow, out_uid: str, model: StyleModel, report: FidelityReport, route: RouteSettings, version: int = 1,
                   requested_by: str | None = None) -> OutputRecord:
    from dicom_node.engine.secondary_capture import device_uid

    return OutputRecord(source_sop_uid=row.sop_uid, output_sop_uid=out_uid, model=model.name,
                        model_version=model.version, model_digest=model.weights_sha256, device_uid=device_uid(model),
                        verdict=report.verdict, reasons=report.reasons, scores=report.scores,
                        thresholds=report.thresholds, action=route.fidelity_action, output_version=version,
                        requested_by=requested_by)


def is_own_output(ds: Dataset) -> bool:
    """True for a Secondary Capture written by dicom-node (its SC equipment names it)."""
    return str(ds.get("SecondaryCaptureDeviceManufacturer", "") or "").strip() == MANUFACTURER

