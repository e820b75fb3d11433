"""Study quiet periods (``StateDB.studies``): when a study's instances go to the translator.

Why per study and in the database: a model sees a study's instances together (one output
series per study and route), so an instance waits until its study has been quiet for its
route's ``study_stable_seconds``, or until ``max_wait_seconds`` since the study's first
instance (then ``on_max_wait``: ``proceed`` or ``discard``).  The timers live in the
``studies`` table (per called AE, route name and Study Instance UID), so a restart neither
loses a pending study nor releases it early, and two workers on one PostgreSQL database never
release a study twice.

A study released before opens a new round when an instance joins it again: a follow-up,
translated into the same output series after its own quiet period.
"""
from __future__ import annotations

import time
from typing import Any, Callable

from dicom_node.database import Connection, Database

__all__ = ["StudyTimers", "Studies"]

# route name -> (study_stable_seconds, max_wait_seconds or None, on_max_wait)
StudyTimers = Callable[[str], "tuple[float, float | None, str]"]


def due(timers: StudyTimers, route: str, last: float, first: float) -> tuple[float, str]:
    """When a pending study is due, and what happens then (quiet | proceed | discard)."""
    stable, max_wait, on_max_wait = timers(route)
    quiet_at = last + stable
    if max_wait is not None and first + max_wait < quiet_at:
        return first + max_wait, on_max_wait
    return quiet_at, "quiet"


class Studies:
    """The ``studies`` table: each pending study's quiet-period timer."""

    def __init__(self, database: Database) -> None:
        self.database = database

    @staticmethod
    def join(conn: Connection, called_ae: str, route: str | None, study_uid: str, now: float) -> None:
        """An instance to translate joins its study's quiet period (in the caller's transaction,
        the one that records the instance)."""
        conn.execute(
            "INSERT INTO studies (called_ae, route, study_uid, last_received_at, state, first_received_at) "
            "VALUES (?,?,?,?, 'pending', ?) ON CONFLICT (called_ae, route, study_uid) "
            "DO UPDATE SET last_received_at=excluded.last_received_at, first_received_at=CASE "
            "WHEN studies.state='pending' THEN COALESCE(studies.first_received_at, studies.last_received_at) "
            "ELSE excluded.first_received_at END, state='pending'",
            (called_ae, route, study_uid, now, now))

    @staticmethod
    def _pending(conn: Connection, lock: bool = False) -> list[tuple[Any, ...]]:
        """``lock``: PostgreSQL row locks for a release (two workers never release one study twice;
        a study another worker is releasing right now is skipped)."""
        sql = ("SELECT id, called_ae, route, study_uid, last_received_at, "
               "COALESCE(first_received_at, last_received_at) FROM studies WHERE state='pending'")
        rows: list[tuple[Any, ...]] = conn.execute(sql + (" FOR UPDATE SKIP LOCKED" if lock and conn.dialect == "postgresql"
                                                       else "")).fetchall()
        return rows

    def release_due(self, timers: StudyTimers, now: float | None = None) -> list[tuple[str, str, str]]:
        """Release every study that is due: quiet for its route's ``study_stable_seconds``
        (instances -> ``ready``), or waiting for ``max_wait_seconds`` since its first instance
        (``proceed``: -> ``ready``; ``discard``: -> ``discarded``).  ``timers(route name)`` gives
        (stable seconds, max wait seconds or None, on_max_wait).  Returns (route, study, why)."""
        now = time.time() if now is None else now
        done = []
        with self.database.tx() as conn:
            for sid, called_ae, route, study_uid, last, first in self._pending(conn, lock=True):
                when, why = due(timers, route, last, first)
                if when > now:
                    continue
                state, error = ("discarded", "study discarded: max_wait_seconds reached") if why == "discard" \
                    else ("ready", None)
                conn.execute("UPDATE instances SET state=?, error=?, updated_at=? WHERE called_ae=? AND route=? "
                             "AND study_uid=? AND state='received'", (state, error, now, called_ae, route, study_uid))
                conn.execute("UPDATE studies SET state='released' WHERE id=?", (sid,))
                done.append((str(route), str(study_uid), why))
        return done

    def next_deadline(self, timers: StudyTimers) -> float | None:
        """When the next pending study is due (None: none is pending)."""
        with self.database.lock:
            when = [due(timers, r[2], r[4], r[5])[0] for r in self._pending(self.database.conn)]
        return min(when) if when else None
