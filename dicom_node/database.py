"""The state database: SQLite in the spool (the embedded default) or PostgreSQL.

Why one small interface: the state machine (:mod:`dicom_node.state`) and its parts are written
once, in the SQL both engines share; this module opens the connection and, for PostgreSQL,
rewrites the few SQLite spellings the state machine uses (``?`` placeholders, ``INSERT OR
IGNORE``, ``GROUP_CONCAT``, ``SUM(a='b')``, ``INDEXED BY``, the DDL types).  A
:class:`Connection` offers ``execute`` (a cursor with ``fetchone``/``fetchall``/``rowcount``),
``executemany``, ``script``, ``begin``/``commit``/``rollback``, ``insert_id``, ``columns`` and
``has_table``; a :class:`Database` shares one connection between a process's threads, with
``tx()`` (a write transaction) and ``query()`` (a read).

PostgreSQL is selected by ``storage.database: postgresql://user@host/db`` (psycopg 3).
"""
from __future__ import annotations

import contextlib
import re
import sqlite3
import threading
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

__all__ = ["Database", "Connection", "SqliteConnection", "PostgresConnection", "open_connection", "to_postgres",
           "is_postgres_url", "is_unavailable", "is_conflict", "first_line"]


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


def open_connection(target: str | Path, *, timeout: float = 30.0) -> "Connection":
    """A connection to ``target``: a PostgreSQL URL, or the path of a SQLite file."""
    if is_postgres_url(target):
        return PostgresConnection(str(target), timeout=timeout)
    return SqliteConnection(Path(target), timeout=timeout)


class Database:
    """One connection shared by a process's threads: one lock, write transactions, reads.

    Each process (the node, the console, a CLI command) opens its own: SQLite in WAL mode lets
    readers run beside the writer.  ``target``: the SQLite file, or a ``postgresql://`` URL.
    """

    def __init__(self, target: str | Path, *, timeout: float = 30.0) -> None:
        self.target: str | Path = str(target) if is_postgres_url(target) else Path(target)
        self.lock = threading.RLock()
        self.conn = open_connection(self.target, timeout=timeout)
        self._on_abort: list[Callable[[], object]] = []

    @property
    def dialect(self) -> str:
        return self.conn.dialect

    def tx(self) -> "Transaction":
        """A write transaction: BEGIN (SQLite: IMMEDIATE) ... COMMIT (ROLLBACK on exception)."""
        return Transaction(self)

    def query(self, sql: str, params: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        with self.lock:
            rows: list[tuple[Any, ...]] = self.conn.execute(sql, tuple(params)).fetchall()
        return rows

    def on_abort(self, undo: Callable[[], object]) -> None:
        """Run ``undo`` if the transaction in progress does not commit (inside ``tx()`` only)."""
        self._on_abort.append(undo)

    def close(self) -> None:
        with self.lock:
            self.conn.close()


class Transaction:
    """``with database.tx() as c:`` holds the database's lock for the whole transaction."""

    def __init__(self, database: Database) -> None:
        self.database = database

    def __enter__(self) -> "Connection":
        db = self.database
        db.lock.acquire()
        try:
            db.conn.begin()
        except BaseException:
            db.lock.release()
            raise
        db._on_abort = []
        return db.conn

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        db = self.database
        committed = False
        try:
            if exc_type is None:
                db.conn.commit()
                committed = True
            else:
                db.conn.rollback()
        finally:
            undo, db._on_abort = db._on_abort, []
            try:
                if not committed:  # a full disk fails the COMMIT itself
                    for step in undo:
                        step()
            finally:
                db.lock.release()


class Connection:
    """What the state machine needs of a connection (one per process, guarded by :class:`Database`'s lock)."""

    dialect = ""

    def execute(self, sql: str, params: Iterable[Any] = ()) -> Any:
        raise NotImplementedError

    def executemany(self, sql: str, rows: Iterable[Iterable[Any]]) -> None:
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

    def insert_id(self, sql: str, params: Iterable[Any] = ()) -> int:
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


class SqliteConnection(Connection):
    """SQLite in WAL mode with ``synchronous=FULL``: a commit is on disk when it returns."""

    dialect = "sqlite"

    def __init__(self, path: Path, *, timeout: float = 30.0) -> None:
        self.path = Path(path)
        self._conn = sqlite3.connect(str(self.path), timeout=timeout, isolation_level=None, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute(f"PRAGMA busy_timeout={int(timeout * 1000)}")

    def execute(self, sql: str, params: Iterable[Any] = ()) -> Any:
        return self._conn.execute(sql, tuple(params))

    def executemany(self, sql: str, rows: Iterable[Iterable[Any]]) -> None:
        self._conn.executemany(sql, [tuple(r) for r in rows])

    def script(self, ddl: str) -> None:
        self._conn.executescript(ddl)

    def begin(self) -> None:
        self._conn.execute("BEGIN IMMEDIATE")  # take the write lock now: no upgrade deadlocks

    def insert_id(self, sql: str, params: Iterable[Any] = ()) -> int:
        row_id = self._conn.execute(sql, tuple(params)).lastrowid
        assert row_id is not None  # an INSERT's
        return int(row_id)

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


class PostgresConnection(Connection):
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

    def execute(self, sql: str, params: Iterable[Any] = ()) -> Any:
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

    def insert_id(self, sql: str, params: Iterable[Any] = ()) -> int:
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
