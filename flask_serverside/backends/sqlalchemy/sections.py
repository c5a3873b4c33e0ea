"""How the backend runs statements: alone, or in the transaction of the
:meth:`~flask_serverside.backends.sqlalchemy.SQLAlchemyBackend.lock`
section open in the thread."""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
import typing as t
from contextlib import contextmanager

import sqlalchemy as sa

from ..base import gevent_patched
from ..base import Record
from ..base import utc_now
from .engine import lock_isolation
from .schema import LOCK_TIMEOUT
from .schema import record
from .schema import Statements
from .schema import write_row

A = t.TypeVar("A")
R = t.TypeVar("R")


class Section(threading.local):
    """The :meth:`SQLAlchemyBackend.lock` open in a thread."""

    #: The connection of its transaction.
    conn: sa.Connection | None = None
    #: ``(key, record)``: the record read in the round trip that took the
    #: lock, which answers the section's first call if that loads ``key``.
    prefetched: tuple[str, Record | None] | None = None
    #: The row of a save not sent yet: it goes with the COMMIT, or before
    #: the section's next statement.
    pending: dict[str, t.Any] | None = None



class Connections:
    """The engine's connections, as the backend uses them.

    :param engine: The backend's engine.
    :param own_engine: Whether the engine was built from a URL by the
        backend (its driver connections are in autocommit mode).
    """

    def __init__(self, engine: sa.Engine, own_engine: bool) -> None:
        self.engine = engine
        self.own_engine = own_engine
        #: Whether SQLite's write lock is waited for here, in Python, rather
        #: than in C (see :func:`.engine.create_engine`): under gevent.
        self.poll_busy = own_engine and engine.dialect.name == "sqlite" and gevent_patched()
        #: The section open in each thread.
        self.section = Section()
        #: The statements, set once the table is ready.
        self.statements: Statements | None = None

    @property
    def sql(self) -> Statements:
        assert self.statements is not None, "used before the backend started"
        return self.statements

    def run(self, work: t.Callable[[sa.Connection, A], R], arg: A) -> R:
        """Call ``work(conn, arg)`` in the transaction of the current
        :meth:`lock`, or else on its own (an engine passed in: in a
        transaction of its own), again on a new connection if the pooled
        one was dead."""
        section = self.section

        if section.conn is not None:
            self.flush(section)
            section.prefetched = None
            return work(section.conn, arg)

        return self.retrying(lambda: self._alone(work, arg))

    def _alone(self, work: t.Callable[[sa.Connection, A], R], arg: A) -> R:
        if self.own_engine:  # autocommit: each statement commits
            with self.engine.connect() as conn:
                return work(conn, arg)

        with self.engine.begin() as conn:
            return work(conn, arg)

    def retrying(self, func: t.Callable[[], R]) -> R:
        """Call ``func`` again, once, if a connection it used turned out to
        be dead.

        A database server that restarted leaves dead connections in the
        pool. SQLAlchemy flags the error (``connection_invalidated``) and
        replaces every connection the pool had then; ``func`` must have had
        no effect when it fails this way (a statement on its own, or the
        start of a transaction).
        """
        try:
            return self._polling(func) if self.poll_busy else func()
        except sa.exc.DBAPIError as exc:
            if not exc.connection_invalidated:
                raise

        return func()

    def _polling(self, func: t.Callable[[], R]) -> R:
        """Call ``func`` until SQLite's write lock is free, for at most
        :data:`.LOCK_TIMEOUT` seconds, sleeping in between with gevent's
        :func:`time.sleep`, which lets the process's other requests run
        (the lock's holder among them)."""
        deadline = time.monotonic() + LOCK_TIMEOUT
        delay = 0.001
        while True:
            try:
                return func()
            except sa.exc.OperationalError as exc:
                if "database is locked" not in str(exc.orig) or time.monotonic() > deadline:
                    raise
            time.sleep(delay)
            delay = min(delay * 2, 0.02)

    @contextmanager
    def managed(self, key: str) -> t.Iterator[sa.Connection]:
        """The transaction of a section, begun and ended by SQLAlchemy as
        the engine does it: for an engine passed in."""
        conn = self.retrying(lambda: self._begin_managed(key))

        with conn:  # closing rolls back what is not committed
            yield conn
            conn.commit()

    @contextmanager
    def explicit(self, key: str) -> t.Iterator[sa.Connection]:
        """The transaction of a section, begun and ended in SQL on a driver
        connection in autocommit mode: for our engine. No isolation level
        switches back and forth, and a pending save goes with the COMMIT."""
        conn = self.retrying(lambda: self._begin_explicit(key))

        try:
            yield conn
        except BaseException:
            self.section.pending = None

            with contextlib.suppress(Exception):
                _end(conn, "ROLLBACK")

            raise
        else:
            row, self.section.pending = self.section.pending, None

            if row is None:
                _end(conn, "COMMIT")
            else:
                assert self.sql.upsert_commit is not None
                _end(conn, self.sql.upsert_commit, row)
        finally:
            conn.close()

    def _begin_managed(self, key: str) -> sa.Connection:
        """Check out a connection, begin a transaction, take the lock."""
        conn = self.engine.connect()

        try:
            conn.execution_options(isolation_level=lock_isolation(conn.dialect))
            conn.begin()
            self.acquire(conn, key)
        except BaseException:
            conn.close()  # rolls back
            raise

        return conn

    def _begin_explicit(self, key: str) -> sa.Connection:
        """Check out a connection, begin a transaction and take the lock in
        one statement (on PostgreSQL, read the key's row too)."""
        sql = self.sql
        assert sql.begin is not None
        conn = self.engine.connect()

        try:
            if sql.begin_reads:
                params = {"lock_id": _lock_id(key), "key": key, "now": utc_now()}
                row = conn.exec_driver_sql(sql.begin, params).first()
                self.section.prefetched = (key, record(row))
            else:
                conn.exec_driver_sql(sql.begin)
        except BaseException:
            with contextlib.suppress(Exception):
                _end(conn, "ROLLBACK")

            conn.close()
            raise

        return conn

    def flush(self, section: Section) -> None:
        """Send the section's pending save, before another statement."""
        if section.pending is not None and section.conn is not None:
            row, section.pending = section.pending, None
            write_row(section.conn, self.sql, row)

    def acquire(self, conn: sa.Connection, key: str) -> None:
        """Lock ``key`` until the end of the transaction of ``conn``."""
        sql = self.sql

        if sql.lock_kind == "advisory":
            conn.execute(sql.lock_timeout)
            conn.execute(sql.advisory_lock, {"lock_id": _lock_id(key)})
        elif sql.lock_kind == "database":
            conn.execute(sql.write_lock)
        else:
            conn.execute(sql.row_lock, {"key": key})


def _end(conn: sa.Connection, sql: str, params: dict[str, t.Any] | None = None) -> None:
    """End a transaction begun in SQL: ``sql`` ends with ``COMMIT`` or is
    ``ROLLBACK``.

    The driver's ``rollback()``, which the pool calls on a returned
    connection, does nothing in autocommit mode; so a connection whose
    transaction could not be ended is discarded: the pool never hands out a
    connection inside a transaction (holding a lock).
    """
    if conn.invalidated:  # a dead connection: its transaction died with it
        return

    try:
        conn.exec_driver_sql(sql, params)
    except BaseException:
        if not conn.invalidated:
            conn.invalidate()

        raise



def _lock_id(key: str) -> int:
    """The PostgreSQL advisory lock of a key: a 64-bit hash of it."""
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)
