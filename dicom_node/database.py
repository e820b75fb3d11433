"""The state database's connection: SQLite in the spool (the embedded default) or PostgreSQL.

Why one small interface: the state machine (:mod:`dicom_node.state` and its parts) is written
once, in the SQL both engines share; this module opens the connection and, for PostgreSQL,
rewrites the few SQLite spellings the state machine uses (``?`` placeholders, ``INSERT OR
IGNORE``, ``GROUP_CONCAT``, ``SUM(a='b')``, ``INDEXED BY``, the DDL types).  Callers see
``execute`` (a cursor with ``fetchone``/``fetchall``/``rowcount``), ``executemany``,
``script``, ``begin``/``commit``/``rollback``, ``insert_id``, ``columns`` and ``has_table``.

PostgreSQL is selected by ``storage.database: postgresql://user@host/db`` (psycopg 3).
"""
from __future__ import annotations

import contextlib
import re
import sqlite3
from pathlib import Path
from typing import Any, Iterable, Iterator

__all__ = ["Database", "SqliteDatabase", "PostgresDatabase", "open_database", "to_postgres", "is_postgres_url",
           "is_unavailable", "is_conflict", "first_line"]


def is_postgres_url(target: Any) -> bool:
    return isinstance(target, str) and target.startswith(("postgresql://", "postgres://"))


def is_unavailable(exc: BaseException) -> bool:
    """The database is away or busy right now (a server restart, a network cut, a lock held
    too long): an operational condition, answered with a failure status and one log line, not
    a bug with a traceback."""
    if isinstance(exc, ConnectionError):
        return True
    if isinstance(exc, sqlite3.OperationalError):
        return any(word in str(exc) for word in ("locked", "busy", "disk I/O"))
    try:
        import psycopg
    except ImportError:
        return False
    return isinstance(exc, psycopg.OperationalError)


def is_conflict(exc: BaseException) -> bool:
    """A unique key that another connection committed first (a race, not a bug: try again)."""
    if isinstance(exc, sqlite3.IntegrityError):
        return "UNIQUE" in str(exc)
    try:
        import psycopg
    except ImportError:
        return False
    return isinstance(exc, psycopg.errors.UniqueViolation)


def first_line(exc: BaseException) -> str:
    """``Name: first line of the message`` (psycopg's messages run over several lines)."""
    text = (str(exc).strip().splitlines() or [""])[0]
    return f"{exc.__class__.__name__}: {text}"[:300]


def open_database(target: str | Path, *, timeout: float = 30.0) -> "Database":
    """A connection to ``target``: a PostgreSQL URL, or the path of a SQLite file."""
    if is_postgres_url(target):
        return PostgresDatabase(str(target), timeout=timeout)
    return SqliteDatabase(Path(target), timeout=timeout)


class Database:
    """What the state machine needs of a connection (one per process, guarded by its lock)."""

    dialect = ""

    def execute(self, sql: str, params: Iterable = ()) -> Any:
        raise NotImplementedError

    def executemany(self, sql: str, rows: Iterable[Iterable]) -> None:
        for row in rows:
            self.execute(sql, row)

    def script(self, ddl: str) -> None:
        raise NotImplementedError

    def begin(self) -> None:
        raise NotImplementedError

    def commit(self) -> None:
        self.execute("COMMIT")

    def rollback(self) -> None:
        self.execute("ROLLBACK")

    def insert_id(self, sql: str, params: Iterable = ()) -> int:
        """Run an INSERT and return the new row's ``id``."""
        raise NotImplementedError

    def columns(self, table: str) -> set[str]:
        raise NotImplementedError

    def has_table(self, table: str) -> bool:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    @contextlib.contextmanager
    def schema_lock(self) -> Iterator[None]:
        """Held while a process creates or migrates the schema (several nodes start at once)."""
        yield


class SqliteDatabase(Database):
    """SQLite in WAL mode with ``synchronous=FULL``: a commit is on disk when it returns."""

    dialect = "sqlite"

    def __init__(self, path: Path, *, timeout: float = 30.0) -> None:
        self.path = Path(path)
        self._conn = sqlite3.connect(str(self.path), timeout=timeout, isolation_level=None, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute(f"PRAGMA busy_timeout={int(timeout * 1000)}")

    def execute(self, sql: str, params: Iterable = ()) -> Any:
        return self._conn.execute(sql, tuple(params))

    def executemany(self, sql: str, rows: Iterable[Iterable]) -> None:
        self._conn.executemany(sql, [tuple(r) for r in rows])

    def script(self, ddl: str) -> None:
        self._conn.executescript(ddl)

    def begin(self) -> None:
        self._conn.execute("BEGIN IMMEDIATE")  # take the write lock now: no upgrade deadlocks

    def insert_id(self, sql: str, params: Iterable = ()) -> int:
        return int(self._conn.execute(sql, tuple(params)).lastrowid)

    def columns(self, table: str) -> set[str]:
        return {row[1] for row in self._conn.execute(f"PRAGMA table_info({table})")}

    def has_table(self, table: str) -> bool:
        return bool(self._conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?",
                                       (table,)).fetchone())

    def close(self) -> None:
        self._conn.close()


_REWRITES = [
    (re.compile(r"\bINDEXED BY \w+\s*", re.I), ""),
    (re.compile(r"\bGROUP_CONCAT\(([\w.]+)\)", re.I), r"STRING_AGG(\1, ',')"),
    (re.compile(r"\bSUM\(([\w.]+)='(\w+)'\)", re.I), r"SUM(CASE WHEN \1='\2' THEN 1 ELSE 0 END)"),
]
_DDL_REWRITES = [
    (re.compile(r"\bINTEGER PRIMARY KEY\b", re.I), "BIGSERIAL PRIMARY KEY"),
    (re.compile(r"\bINTEGER\b", re.I), "BIGINT"),
    (re.compile(r"\bREAL\b", re.I), "DOUBLE PRECISION"),
]


_CREATES = re.compile(r"\s*CREATE\s+(?:UNIQUE\s+)?(?:TABLE|INDEX)\s+IF\s+NOT\s+EXISTS\s+(\w+)", re.I)


def ddl_statements(ddl: str) -> list[str]:
    """The statements of a schema script (``--`` comments dropped; no string in it holds ``;``)."""
    text = re.sub(r"--[^\n]*", "", ddl)
    return [s.strip() for s in text.split(";") if s.strip()]


def to_postgres(sql: str, ddl: bool = False) -> str:
    """The PostgreSQL spelling of one of the state machine's SQLite statements."""
    for pattern, repl in _DDL_REWRITES if ddl else ():
        sql = pattern.sub(repl, sql)
    for pattern, repl in _REWRITES:
        sql = pattern.sub(repl, sql)
    if re.match(r"\s*INSERT OR IGNORE INTO", sql, re.I):
        sql = re.sub(r"INSERT OR IGNORE INTO", "INSERT INTO", sql, count=1, flags=re.I) + " ON CONFLICT DO NOTHING"
    return sql.replace("?", "%s")


class PostgresDatabase(Database):
    """PostgreSQL through psycopg 3, autocommit with explicit transactions (as the SQLite side)."""

    dialect = "postgresql"

    def __init__(self, url: str, *, timeout: float = 30.0) -> None:
        self.url, self.timeout = url, timeout
        self._conn: Any = None
        self._in_tx = False
        self._connect()

    def _connect(self) -> None:
        import psycopg

        self._conn = psycopg.connect(self.url, autocommit=True, connect_timeout=max(1, int(self.timeout)))
        self._conn.execute(f"SET lock_timeout = '{int(self.timeout * 1000)}ms'")

    def _live(self) -> Any:
        """The connection; a new one when the server went away and came back (a restart or a
        network cut): the statement that noticed failed, the next ones work again.  Never
        inside a transaction: a transaction that lost its connection is lost as a whole."""
        if self._conn is None or self._conn.closed or self._conn.broken:
            if self._in_tx:
                raise ConnectionError("the connection to PostgreSQL was lost inside a transaction")
            self._connect()
        return self._conn

    def execute(self, sql: str, params: Iterable = ()) -> Any:
        return self._live().execute(to_postgres(sql), tuple(params))

    def script(self, ddl: str) -> None:
        """Each statement on its own, none whose table or index exists: a script sent at once is
        one transaction on PostgreSQL, and CREATE INDEX locks its table even when the index is
        there, so a second process opening the schema (a node starting, ``dicom-node status``)
        piled up locks and deadlocked with a running node's writes."""
        for statement in ddl_statements(ddl):
            created = _CREATES.match(statement)
            if created and self._live().execute("SELECT to_regclass(%s)", (created.group(1),)).fetchone()[0]:
                continue
            self._live().execute(to_postgres(statement, ddl=True))

    def begin(self) -> None:
        self._live().execute("BEGIN")
        self._in_tx = True

    def commit(self) -> None:
        try:
            self._live().execute("COMMIT")
        finally:
            self._in_tx = False

    def rollback(self) -> None:
        try:
            if self._conn is not None and not (self._conn.closed or self._conn.broken):
                self._conn.execute("ROLLBACK")  # a broken connection has nothing left to roll back
        finally:
            self._in_tx = False

    def insert_id(self, sql: str, params: Iterable = ()) -> int:
        return int(self._live().execute(to_postgres(sql) + " RETURNING id", tuple(params)).fetchone()[0])

    def columns(self, table: str) -> set[str]:
        rows = self._live().execute("SELECT column_name FROM information_schema.columns WHERE table_name=%s",
                                  (table,)).fetchall()
        return {r[0] for r in rows}

    def has_table(self, table: str) -> bool:
        return bool(self._live().execute("SELECT 1 FROM information_schema.tables WHERE table_name=%s",
                                       (table,)).fetchone())

    SCHEMA_LOCK = 0x64636D6E  # an advisory lock key of our own ("dcmn")

    @contextlib.contextmanager
    def schema_lock(self) -> Iterator[None]:
        # CREATE TABLE IF NOT EXISTS and ADD COLUMN race when two nodes start together
        self._live().execute("SELECT pg_advisory_lock(%s)", (self.SCHEMA_LOCK,))
        try:
            yield
        finally:
            if not (self._conn.closed or self._conn.broken):
                self._conn.execute("SELECT pg_advisory_unlock(%s)", (self.SCHEMA_LOCK,))

    def close(self) -> None:
        self._conn.close()
