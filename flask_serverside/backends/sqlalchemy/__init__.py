"""Sessions in a SQL database, through SQLAlchemy Core.

The backend uses its own connections from the engine's pool and never the
application's ORM session, so saving a session neither commits nor rolls
back the application's work.

The package has one module per concern: :mod:`.schema` (the table and its
statements), :mod:`.engine` (the engine built from a URL, SQLite's set-up),
:mod:`.sections` (transactions and locks), :mod:`.driver` (the fast
path of PostgreSQL and SQLite).
"""

from __future__ import annotations

import logging
import threading
import typing as t
from contextlib import contextmanager

import sqlalchemy as sa

from ..base import Backend
from ..base import INDEX_TAG
from ..base import Record
from ..base import utc_datetime
from ..base import utc_now
from .driver import make_driver
from .engine import create_engine
from .engine import reject_memory_database
from .schema import make_table
from .schema import own_rows
from .schema import record
from .schema import Statements
from .schema import write_row
from .sections import Connections

logger = logging.getLogger("flask_serverside")

__all__ = ["SQLAlchemyBackend", "make_table"]

A = t.TypeVar("A")
R = t.TypeVar("R")

#: Rows removed by one statement of :meth:`SQLAlchemyBackend.cleanup`, so
#: that each holds its locks only briefly (SQLite's whole-database write lock
#: included): under 100 ms in a table of 10^6 rows, even on a busy machine.
CLEANUP_BATCH = 500


class SQLAlchemyBackend(Backend):
    """Store sessions in a table of a SQL database.

    Nothing connects to the database until the first session is read or
    written, so an application starts while its database is down. The table
    (and its index on ``expires``) is created then, if ``create_table`` is
    true.

    A statement that fails because its pooled connection was dead (the
    database server restarted) runs again, once, on a new connection, unless
    it was part of a transaction that had done something already: a
    restart costs no failed request, and the pool is not pinged before
    every use. This holds for an engine passed in too.

    An engine built from ``url`` runs each statement outside :meth:`lock`
    in autocommit mode (no BEGIN and COMMIT round trips), and :meth:`lock`
    begins and ends its transaction in SQL, without isolation level
    switches. On PostgreSQL with psycopg2 or psycopg 3, a read and a
    :meth:`replace` take one round trip each, as statements prepared on the
    driver's connection directly under a name of their text (plain ones
    once a pooler loses one); with psycopg2, locking, re-reading and saving
    a record take two. On SQLite it uses WAL mode (readers never
    wait for a writer) with ``synchronous=NORMAL``, and creates the
    database file with mode 0o600; a read and a :meth:`replace` run on
    the driver's connection directly there too.
    An engine passed in is used as configured: every statement outside
    :meth:`lock` runs in a transaction of its own.

    An in-memory SQLite database is refused: it cannot be shared between
    connections or processes.

    :param engine: An existing engine, for example Flask-SQLAlchemy's
        ``db.engine``.
    :param url: A database URL to build an engine from, if ``engine`` is
        not given.
    :param table: The table name.
    :param create_table: Create the table if it does not exist. Pass
        ``False`` when migrations create it (see :func:`make_table`).

    .. versionadded:: 0.1
    """

    unavailable_errors = (
        sa.exc.OperationalError,
        sa.exc.InterfaceError,
        sa.exc.TimeoutError,
        OSError,
    )

    def __init__(
        self,
        *,
        engine: sa.Engine | None = None,
        url: str | None = None,
        table: str = "sessions",
        create_table: bool = True,
    ) -> None:
        if url is not None and engine is None:
            engine = create_engine(url)
        elif url is not None or engine is None:
            raise TypeError("Pass exactly one of 'engine' and 'url' to SQLAlchemyBackend.")

        self.engine = engine
        reject_memory_database(self.engine)
        self.table = make_table(table, sa.MetaData())
        self.create_table = create_table
        self._prefix = "session:"
        self._ready_lock = threading.Lock()
        #: The engine's connections; it is ours if built from ``url``.
        self._connections = Connections(self.engine, own_engine=url is not None)
        self._driver = make_driver(self.engine, self._connections.poll_busy)

    def describe(self) -> str:
        return f"sqlalchemy {self.engine.url.render_as_string(hide_password=True)}"

    def configure(self, prefix: str) -> None:
        self._prefix = prefix

    def load(self, key: str) -> Record | None:
        try:
            return self._load(key)
        except ValueError as exc:
            # SQLite keeps any text in the expiry column, and SQLAlchemy's
            # row conversion raises on text that is no time.
            logger.warning("Session record %r cannot be read (%s); ignoring it.", key, exc)
            return None

    def _load(self, key: str) -> Record | None:
        section = self._connections.section

        if section.prefetched is not None and section.conn is not None:
            (prefetched_key, prefetched), section.prefetched = section.prefetched, None

            if prefetched_key == key:
                return prefetched

        self._start()
        if self._sql.driver_select is not None and section.conn is None:
            # By key alone: an expired row comes back, for the store to skip.
            found, row = self._driver.run(self._sql.driver_select, {"key": key})
            if found:
                return record(row)

        return self._run(self._select, key)

    def _select(self, conn: sa.Connection, key: str) -> Record | None:
        sql = self._sql
        stmt = sql.select_locked if conn is self._connections.section.conn else sql.select
        return record(conn.execute(stmt, {"key": key, "now": utc_now()}).first())

    def save(self, key: str, data: bytes, expires: float) -> None:
        row = {"id": key, "data": data, "expires": utc_datetime(expires)}
        section = self._connections.section

        if section.conn is not None and self._sql.upsert_commit is not None:
            self._connections.flush(section)
            section.prefetched = None
            section.pending = row  # sent with the COMMIT
            return

        self._run(self._save, row)

    def _save(self, conn: sa.Connection, row: dict[str, t.Any]) -> None:
        write_row(conn, self._sql, row)

    def replace(self, key: str, expected: bytes, data: bytes, expires: float) -> bool:
        """One ``UPDATE ... WHERE data = :expected`` of a live row.

        A :meth:`lock` section locks the row it reads, so the update waits
        for the section to commit and then matches nothing if the section
        changed the row.
        """
        values = {
            "key": key,
            "old_data": expected,
            "now": utc_now(),
            "new_data": data,
            "new_expires": utc_datetime(expires),
        }
        self._start()
        if self._sql.driver_replace is not None and self._connections.section.conn is None:
            found, rowcount = self._driver.run(self._sql.driver_replace, values)
            if found:
                return bool(rowcount == 1)

        return self._run(self._replace, values)

    def _replace(self, conn: sa.Connection, values: dict[str, t.Any]) -> bool:
        return conn.execute(self._sql.replace, values).rowcount == 1

    def touch(self, key: str, expires: float) -> bool:
        """One ``UPDATE ... WHERE expires > now``: an expired row stays so."""
        values = {"key": key, "now": utc_now(), "new_expires": utc_datetime(expires)}
        return self._run(self._touch, values)

    def _touch(self, conn: sa.Connection, values: dict[str, t.Any]) -> bool:
        return bool(conn.execute(self._sql.touch, values).rowcount == 1)

    def delete(self, key: str) -> bool:
        return self._run(self._delete, key)

    def _delete(self, conn: sa.Connection, key: str) -> bool:
        return conn.execute(self._sql.delete, {"key": key}).rowcount > 0

    @contextmanager
    def lock(self, key: str) -> t.Iterator[None]:
        """Hold an exclusive section for ``key`` in a database transaction.

        Every call this thread makes on the backend inside the section runs
        in that transaction, which commits when the section ends (or rolls
        back if it raises). A section entered again from inside joins it.
        Reads after the lock see the latest commits (``READ COMMITTED``,
        where the database has isolation levels).

        -   PostgreSQL: a transaction-level advisory lock on a 64-bit hash of
            the key, so it covers a key that has no row yet.
        -   SQLite: the database's write lock (``BEGIN IMMEDIATE``). Other
            writers wait; readers don't, in WAL mode.
        -   Other databases: a row lock (``SELECT ... FOR UPDATE``), which
            excludes others while the record exists.

        Where the database has row locks, a load inside the section locks
        the row it reads, so a :meth:`replace` of that row waits for the
        section to end.

        Waiting is bounded: after ten seconds (on SQLite, the engine's busy
        timeout) the database raises an error listed in
        :attr:`unavailable_errors`.

        On the engine built from a PostgreSQL URL with psycopg2, taking the
        lock also reads the key's row (the section's first :meth:`load` of
        that key gets it), and a :meth:`save` is sent with the ``COMMIT``,
        or before the section's next statement: if the database refuses it,
        the error is raised when the section ends, and nothing is committed.
        """
        section = self._connections.section

        if section.conn is not None:
            self._connections.flush(section)
            section.prefetched = None
            self._connections.acquire(section.conn, key)
            yield
            return

        self._start()
        connections = self._connections
        transaction = connections.explicit if self._sql.begin is not None else connections.managed

        with transaction(key) as conn:
            section.conn = conn

            try:
                yield
            finally:
                section.conn = None
                section.prefetched = None

    def cleanup(self, now: float) -> t.Iterator[int]:
        """Delete expired rows, at most :data:`CLEANUP_BATCH` per statement
        and transaction: the sessions' (counted), then users' indexes'."""
        yield from self._delete_expired(self._own_rows(), now)
        for _ in self._delete_expired(self._index_rows(), now):
            pass

    def _delete_expired(self, rows: sa.ColumnElement[bool], now: float) -> t.Iterator[int]:
        expired = (
            sa.select(self.table.c.id)
            .where(rows, self.table.c.expires <= utc_datetime(now))
            .limit(CLEANUP_BATCH)
        )
        stmt = sa.delete(self.table).where(self.table.c.id.in_(expired))
        while True:
            removed = self._run(_rowcount, stmt)
            if removed:
                yield removed
            if removed < CLEANUP_BATCH:
                return

    def count(self, now: float) -> int:
        query = (
            sa.select(sa.func.count())
            .select_from(self.table)
            .where(self._own_rows(), self.table.c.expires > utc_datetime(now))
        )

        return self._run(_scalar_int, query)

    def clear(self) -> int:
        self._run(_rowcount, sa.delete(self.table).where(self._index_rows()))
        return self._run(_rowcount, sa.delete(self.table).where(self._own_rows()))

    def _own_rows(self) -> sa.ColumnElement[bool]:
        """The rows of sessions."""
        return own_rows(self.table, self._prefix, self.engine.dialect.name)

    def _index_rows(self) -> sa.ColumnElement[bool]:
        """The rows of users' indexes of their sessions."""
        return own_rows(self.table, self._prefix + INDEX_TAG, self.engine.dialect.name)

    @property
    def _sql(self) -> Statements:
        return self._connections.sql

    def _run(self, work: t.Callable[[sa.Connection, A], R], arg: A) -> R:
        """Call ``work(conn, arg)`` in the section's transaction, or alone;
        see :meth:`.Connections.run`."""
        self._start()
        return self._connections.run(work, arg)

    def _start(self) -> None:
        """On first use: create or check the table, build the statements."""
        if self._connections.statements is not None:
            return

        with self._ready_lock:
            if self._connections.statements is not None:
                return

            if self.create_table:
                self._create_table()
            elif not self._table_exists():
                raise RuntimeError(
                    f"The session table {self.table.name!r} does not exist in"
                    f" {self.engine.url}. Create it in a migration (see"
                    " flask_serverside.backends.sqlalchemy.make_table), or set"
                    " SESSION_SQLALCHEMY_CREATE_TABLE to True to let the"
                    " extension create it."
                )

            self._connections.statements = Statements(
                self.table, self.engine.dialect, self._connections.own_engine
            )

    def _create_table(self) -> None:
        try:
            self.table.create(self.engine, checkfirst=True)
        except sa.exc.DBAPIError:
            # Another process created it between the check and the CREATE.
            if not self._table_exists():
                raise

    def _table_exists(self) -> bool:
        with self.engine.connect() as conn:
            return sa.inspect(conn).has_table(self.table.name)



def _rowcount(conn: sa.Connection, stmt: sa.Executable) -> int:
    return int(conn.execute(stmt).rowcount)


def _scalar_int(conn: sa.Connection, stmt: sa.Executable) -> int:
    return int(conn.execute(stmt).scalar_one())
