"""Redoing a delivered study, and how long its files stay for that (``StateDB.sources``).

Why: after a model is retrained and reloaded, a radiologist wants last week's study in the new
style.  A resent study is a duplicate (nothing to do), and ``retry`` only covers failures, so
``dicom-node reprocess`` (and the console's button) puts a delivered study's instances back to
``ready``: the translators take them as new work, from the source kept in the spool.

The re-translated output is a **new output version in the same series**: the node names a
route's series by the route, not by the model (``engine.secondary_capture.SeriesNaming``), so
SeriesInstanceUID stays; the SOP Instance UIDs are new (version 2, 3, ...), because a PACS
ignores a resend under a UID it already has.  Each instance counts its ``output_version`` and
who asked for it (``reprocess_by``); the audit row of the new output records both
(``outputs.output_version``, ``outputs.requested_by``) beside the model's digest and the time,
and the operator log records the request.

Sources and outputs of delivered studies stay in the spool ``storage.keep_sources_days``
after the study's last change (0: removed as soon as delivered, as before the setting
existed); the deliverers remove them after that (:meth:`SourceKeeping.finished_unpurged`).
A study whose files are gone cannot be reprocessed: a one-line error.
"""
from __future__ import annotations

import time
from typing import Any, Iterable

from dicom_node.database import Database
from dicom_node.errors import UserError
from dicom_node.operations_log import OperationsLog

__all__ = ["SourceKeeping", "REPROCESS_COLUMNS", "REPROCESSABLE"]

# Added to existing databases at open (like the revision columns of corrected resends).
REPROCESS_COLUMNS = (("instances", "output_version", "INTEGER NOT NULL DEFAULT 1"),
                     ("instances", "reprocess_by", "TEXT"),
                     ("outputs", "output_version", "INTEGER NOT NULL DEFAULT 1"),
                     ("outputs", "requested_by", "TEXT"))

REPROCESSABLE = "delivered"  # only finished work is redone; anything else is still in the node's hands
_BUSY = ("received", "ready", "translated", "withheld", "failed")


class SourceKeeping:
    """The sources a delivered study keeps in the spool, and putting such a study back to work."""

    def __init__(self, database: Database) -> None:
        self.database = database

    def reprocess(self, study_uid: str, route: str | None = None, *, user: str,
                  configured: Iterable[str] | None = None, now: float | None = None) -> dict[str, int]:
        """Queue a delivered study (of one route, or of every route that handled it) for
        translation again; returns {route: instances queued}.  Raises :class:`UserError` when
        there is nothing to redo, the study is not finished, its sources are gone, or (given
        ``configured``, the config's route names) one of its routes is no longer configured."""
        now = time.time() if now is None else now
        where, params = "study_uid=?", [study_uid]
        if route is not None:
            where += " AND route=?"
            params.append(route)
        what = f"study {study_uid}" + (f" on route {route!r}" if route else "")
        with self.database.tx() as conn:
            rows = conn.execute(f"SELECT id, route, state, purged FROM instances WHERE {where}", params).fetchall()
            translated = [r for r in rows if r[2] in (REPROCESSABLE, *_BUSY)]
            if not translated:
                raise UserError(f"{what}: nothing translated on this node to reprocess"
                                + (" (unknown study, or forgotten)" if not rows else ""))
            busy = sorted({r[2] for r in translated if r[2] in _BUSY})
            if busy:
                raise UserError(f"{what} is not finished ({', '.join(busy)}): reprocess it once it is delivered "
                                "('dicom-node retry', 'release' or 'discard' first)")
            gone = sorted({str(r[1]) for r in translated} - set(configured)) if configured is not None else []
            if gone:
                raise UserError(f"{what}: route {', '.join(gone)} is no longer configured (nothing could translate it)")
            if any(int(r[3]) for r in translated):
                raise UserError(f"{what}: its sources are no longer kept (removed after storage.keep_sources_days)")
            ids = [int(r[0]) for r in translated]
            marks = ",".join("?" * len(ids))
            conn.execute(f"UPDATE instances SET state='ready', error=NULL, output_version=output_version+1, "
                      f"reprocess_by=?, updated_at=?, lease_owner=NULL, lease_until=NULL WHERE id IN ({marks})",
                      (user[:100], now, *ids))
            queued: dict[str, int] = {}
            for r in translated:
                queued[str(r[1])] = queued.get(str(r[1]), 0) + 1
            OperationsLog.write_action(conn, user, "reprocess", what,
                                       ", ".join(f"{n} instance(s) on {name}" for name, n in sorted(queued.items())))
        return queued

    def output_version(self, instance_id: int) -> tuple[int, str | None]:
        """(output version, who asked for it or None) of the instance's next output."""
        rows = self.database.query("SELECT output_version, reprocess_by FROM instances WHERE id=?",
                                   (int(instance_id),))
        return (int(rows[0][0] or 1), rows[0][1]) if rows else (1, None)

    # -- spool clean-up ----------------------------------------------------------------
    def finished_unpurged(self, limit: int = 500, *, keep_seconds: float = 0.0,
                          now: float | None = None) -> list[tuple[int, str]]:
        """(id, original path) of finished instances whose spool files can go.

        Finished: ``delivered``, or ``unmatched``/``unsupported`` whose forwarded original
        reached every destination, or ``discarded``.  Instances kept on purpose (not forwarded)
        and anything failed or pending keep their files.  With ``keep_seconds``, a delivered
        instance waits until its study (on its route) is wholly delivered and unchanged for that
        long: ``dicom-node reprocess`` needs the sources.
        """
        delivered = "state='delivered'"
        params: list[Any] = []
        if keep_seconds > 0:
            now = time.time() if now is None else now
            # the cheap test first: the study's other rows are looked at only for old instances
            delivered += (" AND i.updated_at <= ? AND NOT EXISTS (SELECT 1 FROM instances j WHERE "
                          "j.called_ae=i.called_ae AND j.study_uid=i.study_uid AND j.route=i.route AND "
                          f"(j.updated_at > ? OR j.state IN ({','.join(repr(s) for s in _BUSY)})))")
            params += [now - keep_seconds] * 2
        return [(int(i), str(p)) for i, p in self.database.query(
            f"SELECT id, path FROM instances i INDEXED BY instances_unpurged WHERE purged=0 AND (({delivered}) OR "
            "(state IN ('unmatched','unsupported') AND EXISTS (SELECT 1 FROM deliveries d WHERE d.instance_id=i.id) "
            "AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.instance_id=i.id AND d.state!='delivered')) OR "
            "(state='discarded' AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.instance_id=i.id "
            "AND d.state!='delivered'))) ORDER BY id LIMIT ?", (*params, limit))]

    def mark_purged(self, instance_ids: Iterable[int]) -> None:
        with self.database.tx() as conn:
            conn.executemany("UPDATE instances SET purged=1 WHERE id=?", [(int(i),) for i in instance_ids])
