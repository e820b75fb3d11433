"""Event counters kept in the state database (``StateDB.counters``), for Prometheus.

Why in the database and not in process memory: a Prometheus counter must only grow, and the
node restarts (updates, crashes); counting in the same transaction as the state change it
counts makes each counter exactly what the database says happened, across restarts and
kill -9, and it survives the housekeeper forgetting old instance rows.  Histograms (timings)
stay in memory (:mod:`dicom_node.metrics`): a restart may reset those.

Counters (``metric`` -> labels):

    received     called_ae, protocol       instances acknowledged (duplicates not counted); protocol
                                           dimse or stow-rs (rows from before it: dimse)
    translated   model                     outputs written (the config's model name)
    flagged      model                     outputs the fidelity guard flagged
    deliveries   destination, outcome      attempts: delivered | retry | failed (gave up)
    associations outcome                   released | aborted | rejected
    notifications webhook, outcome         sends: sent | retry | failed (gave up)
"""
from __future__ import annotations

import json
from typing import Any

from dicom_node.database import Connection, Database

__all__ = ["COUNTERS_SCHEMA", "bump", "Counters"]

COUNTERS_SCHEMA = """
CREATE TABLE IF NOT EXISTS counters (
    metric TEXT NOT NULL,
    labels TEXT NOT NULL,                    -- JSON object, keys sorted
    value  INTEGER NOT NULL,
    PRIMARY KEY (metric, labels)
);
"""


def bump(conn: Connection, metric: str, n: int = 1, **labels: str) -> None:
    """Add ``n`` to a counter inside the caller's transaction."""
    if n:
        conn.execute("INSERT INTO counters (metric, labels, value) VALUES (?,?,?) ON CONFLICT (metric, labels) "
                  "DO UPDATE SET value=counters.value+excluded.value", (metric, json.dumps(labels, sort_keys=True), int(n)))


class Counters:
    """Reads the counters (they are bumped with :func:`bump` inside the changes they count)."""

    def __init__(self, database: Database) -> None:
        self.database = database

    def values(self) -> dict[str, list[tuple[dict[str, str], int]]]:
        """metric -> [(labels, value)], for the metrics endpoint."""
        out: dict[str, list[tuple[dict[str, str], int]]] = {}
        for metric, labels, value in self.database.query("SELECT metric, labels, value FROM counters "
                                                         "ORDER BY metric, labels"):
            out.setdefault(str(metric), []).append((json.loads(labels), int(value)))
        return out

    @staticmethod
    def seed(conn: Connection) -> None:
        """A database from before the counters: start them from what its rows still say."""
        if conn.execute("SELECT 1 FROM counters LIMIT 1").fetchone():
            return
        seeds: list[tuple[str, str, Any]] = [
            ("received", "SELECT called_ae, COUNT(*) FROM instances GROUP BY called_ae", "called_ae"),
            ("translated", "SELECT model, COUNT(*) FROM outputs GROUP BY model", "model"),
            ("flagged", "SELECT model, COUNT(*) FROM outputs WHERE verdict='flagged' GROUP BY model", "model"),
        ]
        for metric, sql, key in seeds:
            for value, n in conn.execute(sql).fetchall():
                bump(conn, metric, int(n), **{key: str(value)})
        for dest, state, n in conn.execute("SELECT destination, state, COUNT(*) FROM deliveries "
                                        "WHERE state IN ('delivered','failed') GROUP BY destination, state"):
            bump(conn, "deliveries", int(n), destination=str(dest), outcome=str(state))
