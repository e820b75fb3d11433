"""The state database's tables, and bringing an older database up to date at open.

The tables of the state machine (``instances``, ``studies``, ``deliveries``, ``outputs``,
``study_info``) are here; each part keeps its own (counters, operator and association logs,
notifications, nodes) beside its code, and :func:`create_schema` makes them all.  Columns
added since a database was made are added at open, so a node updated in place keeps its queue.
"""
from __future__ import annotations

from dicom_node.cluster import LEASE_COLUMNS, LEASED_TABLES, NODES_SCHEMA
from dicom_node.counters import COUNTERS_SCHEMA, Counters
from dicom_node.database import Database
from dicom_node.operations_log import OPERATIONS_SCHEMA
from dicom_node.outbox import NOTIFICATIONS_SCHEMA
from dicom_node.reprocessing import REPROCESS_COLUMNS

__all__ = ["SCHEMA", "create_schema"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    id          INTEGER PRIMARY KEY,
    called_ae   TEXT NOT NULL,
    calling_ae  TEXT NOT NULL,
    sop_uid     TEXT NOT NULL,
    sop_class   TEXT NOT NULL,
    study_uid   TEXT NOT NULL,
    series_uid  TEXT NOT NULL,
    route       TEXT,                    -- the route's name (databases before names: its position)
    path        TEXT NOT NULL,
    size        INTEGER NOT NULL,
    state       TEXT NOT NULL,
    received_at REAL NOT NULL,
    updated_at  REAL NOT NULL,
    error       TEXT,
    purged      INTEGER NOT NULL DEFAULT 0,  -- 1: its spool files were removed after delivery
    UNIQUE (called_ae, sop_uid)
);
CREATE INDEX IF NOT EXISTS instances_state ON instances (state, id);
CREATE INDEX IF NOT EXISTS instances_study ON instances (called_ae, route, study_uid);
CREATE TABLE IF NOT EXISTS studies (
    id                INTEGER PRIMARY KEY,
    called_ae         TEXT NOT NULL,
    route             TEXT NOT NULL,         -- the route's name
    study_uid         TEXT NOT NULL,
    last_received_at  REAL NOT NULL,
    state             TEXT NOT NULL,         -- pending | released
    first_received_at REAL,                  -- of this round (max_wait_seconds counts from it)
    UNIQUE (called_ae, route, study_uid)
);
CREATE INDEX IF NOT EXISTS studies_state ON studies (state, last_received_at);
CREATE TABLE IF NOT EXISTS deliveries (
    id              INTEGER PRIMARY KEY,
    instance_id     INTEGER NOT NULL REFERENCES instances (id),
    destination     TEXT NOT NULL,
    kind            TEXT NOT NULL,           -- output | original
    sop_uid         TEXT NOT NULL,
    path            TEXT NOT NULL,
    state           TEXT NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    updated_at      REAL NOT NULL,
    last_error      TEXT,
    UNIQUE (instance_id, destination, sop_uid)
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (state, next_attempt_at);
CREATE INDEX IF NOT EXISTS deliveries_claim ON deliveries (state, destination, next_attempt_at, id);
CREATE TABLE IF NOT EXISTS outputs (
    id              INTEGER PRIMARY KEY,
    instance_id     INTEGER NOT NULL,        -- no foreign key: the audit outlives forgotten rows
    called_ae       TEXT NOT NULL,
    study_uid       TEXT NOT NULL,
    source_sop_uid  TEXT NOT NULL,
    output_sop_uid  TEXT NOT NULL,
    model           TEXT NOT NULL,
    model_version   TEXT NOT NULL,
    model_digest    TEXT NOT NULL,           -- sha256 of the weights
    device_uid      TEXT NOT NULL,
    verdict         TEXT NOT NULL,           -- ok | flagged
    reasons         TEXT NOT NULL,           -- JSON list
    scores          TEXT NOT NULL,           -- JSON object
    thresholds      TEXT NOT NULL,           -- JSON object
    action          TEXT NOT NULL,           -- the route's fidelity action
    disposition     TEXT NOT NULL,           -- forwarded | withheld | released | discarded
    created_at      REAL NOT NULL,
    updated_at      REAL NOT NULL,
    UNIQUE (called_ae, source_sop_uid, output_sop_uid)
);
CREATE INDEX IF NOT EXISTS outputs_study ON outputs (study_uid, created_at);
CREATE INDEX IF NOT EXISTS outputs_time ON outputs (created_at);
CREATE INDEX IF NOT EXISTS outputs_instance ON outputs (instance_id);
CREATE INDEX IF NOT EXISTS deliveries_instance ON deliveries (instance_id);
CREATE INDEX IF NOT EXISTS deliveries_done ON deliveries (state, updated_at);
CREATE INDEX IF NOT EXISTS instances_received ON instances (received_at);
-- What the console shows of a study; the only table with patient data (behind the console's
-- login; never logged).  Forgotten with the study's instances.
CREATE TABLE IF NOT EXISTS study_info (
    study_uid    TEXT PRIMARY KEY,
    patient_name TEXT NOT NULL,
    patient_id   TEXT NOT NULL,
    accession    TEXT NOT NULL,
    study_date   TEXT NOT NULL,
    description  TEXT NOT NULL,
    modality     TEXT NOT NULL
);
""" + COUNTERS_SCHEMA + OPERATIONS_SCHEMA + NOTIFICATIONS_SCHEMA + NODES_SCHEMA

# A resend of an instance with other content (same SOP Instance UID: corrected demographics) is
# processed again: the instance keeps the digest of what it holds and counts its revisions, and
# its audit row says from which revision the output was made.
_REVISION_COLUMNS = (("instances", "content_sha256", "TEXT"), ("instances", "revision", "INTEGER NOT NULL DEFAULT 0"),
                     ("outputs", "source_revision", "INTEGER NOT NULL DEFAULT 0"))


def create_schema(database: Database) -> None:
    """Make the tables that are missing and add the columns a database from before lacks
    (under the schema lock: several nodes may start at once)."""
    conn = database.conn
    with database.lock, conn.schema_lock():
        had_counters = conn.has_table("counters")
        conn.script(SCHEMA)
        if "purged" not in conn.columns("instances"):  # a database from before spool clean-up
            conn.script("ALTER TABLE instances ADD COLUMN purged INTEGER NOT NULL DEFAULT 0")
        if "first_received_at" not in conn.columns("studies"):  # from before max_wait
            conn.script("ALTER TABLE studies ADD COLUMN first_received_at REAL")
        for table, column, ddl in _REVISION_COLUMNS + REPROCESS_COLUMNS:  # from before corrected resends were processed
            if column not in conn.columns(table):
                conn.script(f"ALTER TABLE {table} ADD COLUMN {column} {ddl}")
        # Only the few rows whose files are still in the spool: the purge query stays cheap
        # however many delivered instances the table remembers.
        conn.script("CREATE INDEX IF NOT EXISTS instances_unpurged ON instances (id) WHERE purged=0")
        for table in LEASED_TABLES:
            have = conn.columns(table)
            for column, kind in LEASE_COLUMNS:
                if column not in have:
                    # script: the DDL spelling of each engine (REAL is DOUBLE PRECISION on PostgreSQL)
                    conn.script(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
        for table in LEASED_TABLES:  # the heartbeat's renewal stays cheap
            conn.script(f"CREATE INDEX IF NOT EXISTS {table}_leased ON {table} (lease_owner) "
                        "WHERE lease_owner IS NOT NULL")
    if not had_counters:
        with database.tx() as conn:
            Counters.seed(conn)
