"""Deliverers: send translated (and forwarded) instances to their destinations, with retries.

Why one thread per destination: a slow or dead destination must stall neither translation nor
the other destinations.  A deliverer sends due deliveries (one association per batch of up to
50) and records each outcome; failures are retried with ``retry.backoff_seconds`` until
``retry.max_attempts``, then ``failed`` (files stay in the spool; ``dicom-node retry``).
Finished instances' spool files are removed (the rows stay), a delivered study's
``storage.keep_sources_days`` after its last delivery (``dicom-node reprocess`` needs them).

Each batch is claimed in the state database (a lease, :mod:`dicom_node.cluster`) and its
outcome committed there, so after a crash the deliverers simply continue, here or on another
node once the lease runs out.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from pathlib import Path

from dicom_node.config import NodeConfig
from dicom_node.loops import POLL_SECONDS, Loop
from dicom_node.spool import Spool
from dicom_node.state import DeliveryRow, StateDB

__all__ = ["Deliverer"]

log = logging.getLogger("dicom_node.delivery")


class Deliverer(Loop):
    """Sends due deliveries to one destination, one association per batch.

    One deliverer per destination: a destination that is down or slow to time out (a
    black-holed host costs the whole connect timeout) never delays the others.  One more
    deliverer (``only=None``) takes deliveries to destinations no longer configured and
    lets them fail through the normal back-off, visible in ``status``.
    """

    BATCH = 50
    PURGE_IDLE_SECONDS = 2.0
    logger = log
    config: NodeConfig
    wake: threading.Event  # always given: the node broadcasts to every deliverer's

    def __init__(self, config: NodeConfig, spool: Spool, db: StateDB, wake: threading.Event,
                 stop: threading.Event, only: str | None) -> None:
        super().__init__(f"deliver-{only}" if only else "deliver-unconfigured", stop, wake)
        self.spool, self.db = spool, db
        self.only = only
        self.configure(config)

    def configure(self, config: NodeConfig) -> None:
        """Take a reloaded config (the catch-all deliverer: the new list of destinations)."""
        self.config = config
        self.exclude = [] if self.only else list(config.destinations)

    def begin(self) -> None:
        self._purge()  # finished before a crash, files not yet removed

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
            outcomes: list[tuple[DeliveryRow, bool, str | None]] = [
                (r, False, f"destination {name!r} is not configured") for r in rows]
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
