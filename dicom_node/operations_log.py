"""Who talked to the node and who changed what (``StateDB.operations``): the console's logs.

* ``associations``: one row per DICOM association: calling and called AE, the peer's
  address, instances stored and refused, start and end, and how it ended (released,
  aborted, or rejected with the reason).  Written when the association ends, after its
  last C-STORE answer, so it never delays one.
* ``operator_actions``: every change an operator made from the console or the CLI (who,
  what, on which item, when): requeue, release, discard, login.

Neither holds patient data: AE titles, addresses, counts and UIDs only.  Associations are
trimmed with the housekeeper's forgetting; operator actions are kept (an audit trail).
"""
from __future__ import annotations

import time
from typing import Any

from dicom_node.counters import bump
from dicom_node.database import Connection, Database

__all__ = ["OPERATIONS_SCHEMA", "OperationsLog"]

OPERATIONS_SCHEMA = """
CREATE TABLE IF NOT EXISTS associations (
    id          INTEGER PRIMARY KEY,
    calling_ae  TEXT NOT NULL,
    called_ae   TEXT NOT NULL,
    peer        TEXT NOT NULL,               -- address:port
    stored      INTEGER NOT NULL,            -- C-STOREs answered Success
    refused     INTEGER NOT NULL,            -- C-STOREs answered with a failure status
    started_at  REAL NOT NULL,
    ended_at    REAL NOT NULL,
    outcome     TEXT NOT NULL,               -- released | aborted | rejected
    reason      TEXT                         -- why it was rejected or aborted
);
CREATE INDEX IF NOT EXISTS associations_time ON associations (ended_at);
CREATE TABLE IF NOT EXISTS operator_actions (
    id      INTEGER PRIMARY KEY,
    at      REAL NOT NULL,
    who     TEXT NOT NULL,                   -- console login name, or cli:<os user> ("user" is reserved SQL)
    action  TEXT NOT NULL,                   -- requeue | release | discard | login | logout | login-failed
    target  TEXT NOT NULL,                   -- what it applied to (UIDs, "all failed", ...)
    result  TEXT NOT NULL                    -- what it did ("3 deliveries requeued")
);
CREATE INDEX IF NOT EXISTS operator_actions_time ON operator_actions (at);
"""

ASSOCIATION_COLS = ("id", "calling_ae", "called_ae", "peer", "stored", "refused", "started_at", "ended_at", "outcome",
                    "reason")
ACTION_COLS = ("id", "at", "who", "action", "target", "result")
ACTION_KEYS = ("id", "at", "user", "action", "target", "result")  # what actions() returns


class OperationsLog:
    """The association log and the operator log."""

    def __init__(self, database: Database) -> None:
        self.database = database

    def record_association(self, *, calling_ae: str, called_ae: str, peer: str, stored: int, refused: int,
                           started_at: float, outcome: str, reason: str | None = None,
                           ended_at: float | None = None) -> None:
        ended_at = time.time() if ended_at is None else ended_at
        with self.database.tx() as conn:
            conn.execute("INSERT INTO associations (calling_ae, called_ae, peer, stored, refused, started_at, ended_at, "
                      "outcome, reason) VALUES (?,?,?,?,?,?,?,?,?)",
                      (calling_ae, called_ae, peer, int(stored), int(refused), started_at, ended_at, outcome,
                       (reason or None) and reason[:200]))
            bump(conn, "associations", outcome=outcome)

    def associations(self, limit: int = 100) -> list[dict[str, Any]]:
        """The newest associations, newest first."""
        rows = self.database.query(f"SELECT {', '.join(ASSOCIATION_COLS)} FROM associations "
                                   "ORDER BY ended_at DESC, id DESC LIMIT ?", (int(limit),))
        return [dict(zip(ASSOCIATION_COLS, r)) for r in rows]

    def record_action(self, user: str, action: str, target: str, result: str) -> None:
        with self.database.tx() as conn:
            self.write_action(conn, user, action, target, result)

    @staticmethod
    def write_action(conn: Connection, user: str, action: str, target: str, result: str) -> None:
        """An operator action, inside the caller's transaction (the change it records)."""
        conn.execute("INSERT INTO operator_actions (at, who, action, target, result) VALUES (?,?,?,?,?)",
                  (time.time(), user[:100], action, target[:500], result[:500]))

    def actions(self, limit: int = 100) -> list[dict[str, Any]]:
        """The newest operator actions, newest first."""
        rows = self.database.query(f"SELECT {', '.join(ACTION_COLS)} FROM operator_actions "
                                   "ORDER BY at DESC, id DESC LIMIT ?", (int(limit),))
        return [dict(zip(ACTION_KEYS, r)) for r in rows]

    @staticmethod
    def forget(conn: Connection, cutoff: float) -> None:
        conn.execute("DELETE FROM associations WHERE ended_at < ?", (cutoff,))
