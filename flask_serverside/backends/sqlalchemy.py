"""Sessions in a SQL database, through SQLAlchemy Core.

The backend uses its own connections from the engine's pool and never the
application's ORM session, so saving a session neither commits nor rolls
back the application's work.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import time
import typing as t
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from datetime import timezone

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects import sqlite
from sqlalchemy.sql.compiler import SQLCompiler

from .base import Backend
from .base import Record

A = t.TypeVar("A")
R = t.TypeVar("R")

#: Seconds to wait for a database server to accept a connection.
_CONNECT_TIMEOUT = 5
#: Seconds :meth:`SQLAlchemyBackend.lock` waits for another holder of the
#: lock (and the SQLite busy timeout) before giving up.
_LOCK_TIMEOUT = 10
#: Rows removed by one statement of :meth:`SQLAlchemyBackend.cleanup`, so
#: that each holds its locks only briefly (SQLite's whole-database write lock
#: included): under 100 ms in a table of 10^6 rows, even on a busy machine.
_CLEANUP_BATCH = 500

#: Hex digits after the prefix in a session's key: a SHA-256.
_DIGEST_LENGTH = 64

#: The single-statement upsert of each database that has one; others update,
#: then insert if no row was updated.
_UPSERTS: dict[str, t.Callable[[sa.Table], postgresql.Insert | sqlite.Insert]] = {
    "postgresql": postgresql.insert,
    "sqlite": sqlite.insert,
}

#: SQLSTATEs of a prepared statement that does not exist (invalid SQL
#: statement name) or exists already (duplicate prepared statement).
_LOST_PREPARED = {"26000", "42P05"}

#: How :meth:`SQLAlchemyBackend.lock` excludes others, per database; others
#: lock the key's row (``SELECT ... FOR UPDATE``).
_LOCKS = {"postgresql": "advisory", "sqlite": "database"}


def make_table(name: str, metadata: sa.MetaData) -> sa.Table:
    """Define the session table in ``metadata``.

    The backend calls this with a private :class:`~sqlalchemy.MetaData`.
    Projects that manage their schema with migrations can call it with their
    own metadata (``make_table("sessions", db.metadata)``) so that Alembic
    generates the table, and set ``SESSION_SQLALCHEMY_CREATE_TABLE`` to
    ``False``.

    :param name: The table name, ``SESSION_SQLALCHEMY_TABLE``.
    :param metadata: The metadata the table belongs to.

    .. versionadded:: 0.1
    """
    return sa.Table(
        name,
        metadata,
        sa.Column("id", sa.String(200), primary_key=True),
        sa.Column("data", sa.LargeBinary, nullable=False),
        sa.Column("expires", sa.DateTime(timezone=True), nullable=False, index=True),
    )


class _Section(threading.local):
    """The :meth:`SQLAlchemyBackend.lock` open in a thread."""

    #: The connection of its transaction.
    conn: sa.Connection | None = None
    #: ``(key, record)``: the record read in the round trip that took the
    #: lock, which answers the section's first call if that loads ``key``.
    prefetched: tuple[str, Record | None] | None = None
    #: The row of a save not sent yet: it goes with the COMMIT, or before
    #: the section's next statement.
    pending: dict[str, t.Any] | None = None


class _Statements:
    """Every statement the backend runs per request, built once.

    Executing a prebuilt statement skips SQLAlchemy's construction, coercion
    and cache-key work, which is most of the cost of a SQLite read.
    """

    def __init__(self, table: sa.Table, dialect: sa.Dialect, own_engine: bool) -> None:
        c = table.c
        key = sa.bindparam("key", type_=c.id.type)
        now = sa.bindparam("now", type_=c.expires.type)
        new_expires = sa.bindparam("new_expires", type_=c.expires.type)

        new_data = sa.bindparam("new_data", type_=c.data.type)
        #: One indexed lookup, which skips an expired row.
        self.select = sa.select(c.data, c.expires).where(c.id == key, c.expires > now)
        #: The lookup inside a section: it locks the row (where the database
        #: has row locks), so that a :attr:`replace` waits for the section
        #: to end and then finds the data it expects gone.
        self.select_locked = sa.select(c.data, c.expires).where(c.id == key).with_for_update()
        self.replace = (
            sa.update(table)
            .where(
                c.id == key,
                c.data == sa.bindparam("old_data", type_=c.data.type),
                c.expires > now,
            )
            .values(data=new_data, expires=new_expires)
        )
        # An expired record stays expired: touching must not revive it.
        self.touch = (
            sa.update(table).where(c.id == key, c.expires > now).values(expires=new_expires)
        )
        self.delete = sa.delete(table).where(c.id == key)
        #: Executed with the ``id``, ``data`` and ``expires`` of a row.
        self.insert = sa.insert(table)
        self.update = sa.update(table).where(c.id == key).values(data=new_data, expires=new_expires)
        self.upsert: sa.Executable | None = None

        if dialect.name in _UPSERTS:
            insert = _UPSERTS[dialect.name](table)
            self.upsert = insert.on_conflict_do_update(
                index_elements=[c.id],
                set_={"data": insert.excluded.data, "expires": insert.excluded.expires},
            )

        #: ``"advisory"``, ``"database"`` or ``"row"``: see
        #: :meth:`SQLAlchemyBackend.lock`.
        self.lock_kind = _LOCKS.get(dialect.name, "row")
        self.lock_timeout = sa.text(f"SET LOCAL lock_timeout = '{_LOCK_TIMEOUT}s'")
        self.advisory_lock = sa.select(
            sa.func.pg_advisory_xact_lock(sa.bindparam("lock_id", type_=sa.BigInteger))
        )
        # A write as the transaction's first statement takes SQLite's write
        # lock now, as BEGIN IMMEDIATE would, however the engine begins.
        self.write_lock = sa.update(table).where(sa.false()).values(id=c.id)
        self.row_lock = sa.select(c.id).where(c.id == key).with_for_update()

        #: For the engine built from a URL, whose driver connection is in
        #: autocommit mode: the SQL that begins a section's transaction and
        #: takes its lock (``None``: begin through SQLAlchemy instead).
        self.begin: str | None = None
        #: Whether :attr:`begin` ends with the :attr:`select` of the key.
        self.begin_reads = False
        #: The :attr:`upsert` followed by ``COMMIT``, to end a section that
        #: saved (``None``: save at once, and commit apart).
        self.upsert_commit: str | None = None
        #: :attr:`select` and :attr:`replace` as driver SQL, to run on a
        #: pooled driver connection without SQLAlchemy's execution layer
        #: (``None``: run them through SQLAlchemy).
        self.driver_select: _DriverStatement | None = None
        self.driver_replace: _DriverStatement | None = None

        if own_engine and self.lock_kind == "database":
            self.begin = "BEGIN IMMEDIATE"
        elif own_engine and self.lock_kind == "advisory" and dialect.driver == "psycopg2":
            # psycopg2 binds parameters itself and sends several statements
            # in one message. One round trip begins the transaction, bounds
            # the lock wait, takes the lock and reads the key's row (each
            # statement takes its snapshot as it starts, so after the lock);
            # another writes the row and commits.
            self.begin = (
                "BEGIN ISOLATION LEVEL READ COMMITTED;"
                f" SET LOCAL lock_timeout = '{_LOCK_TIMEOUT}s';"
                " SELECT pg_advisory_xact_lock(%(lock_id)s);"
                f" {self.select_locked.compile(dialect=dialect)}"
            )
            self.begin_reads = True

            if self.upsert is not None:
                self.upsert_commit = f"{self.upsert.compile(dialect=dialect)}; COMMIT"

            # psycopg2 converts the parameters (bytes, aware datetimes) and
            # the results itself; SQLAlchemy's layer would add about a third
            # to the statements every request runs.
            positional = postgresql.psycopg2.dialect(  # type: ignore[no-untyped-call]
                paramstyle="numeric_dollar"
            )
            self.driver_select = _DriverStatement.build("select", self.select, dialect, positional)
            self.driver_replace = _DriverStatement.build(
                "replace", self.replace, dialect, positional
            )


@dataclass(frozen=True)
class _DriverStatement:
    """A statement every request runs, as psycopg2 SQL: prepared once per
    connection (``PREPARE``, sent with the first ``EXECUTE``), which spares
    the server parsing and planning it each time, or plain."""

    name: str
    prepare: str
    execute: str
    plain: str

    @classmethod
    def build(
        cls, what: str, stmt: sa.ClauseElement, dialect: sa.Dialect, positional: sa.Dialect
    ) -> _DriverStatement:
        """:param positional: ``dialect`` with ``$1`` parameters."""
        compiled = t.cast(SQLCompiler, stmt.compile(dialect=positional))
        name = f"flask_serverside_{what}"
        body = str(compiled).replace("%", "%%")  # psycopg2 interpolates
        args = ", ".join(f"%({param})s" for param in compiled.positiontup or ())
        return cls(
            name=name,
            prepare=f"PREPARE {name} AS {body}",
            execute=f"EXECUTE {name}({args})",
            plain=str(stmt.compile(dialect=dialect)),
        )


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
    switches (on PostgreSQL with psycopg2, a read and a :meth:`replace` take
    one round trip each, on the driver's connection directly; locking,
    re-reading and saving a record take two). On SQLite it uses WAL mode (readers never
    wait for a writer) with ``synchronous=NORMAL``, and creates the
    database file with mode 0o600.
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
            engine = _create_engine(url)
        elif url is not None or engine is None:
            raise TypeError("Pass exactly one of 'engine' and 'url' to SQLAlchemyBackend.")

        self.engine = engine
        _reject_memory_database(self.engine)
        self.table = make_table(table, sa.MetaData())
        self.create_table = create_table
        #: Whether the engine is ours, built by :func:`_create_engine`.
        self._own_engine = url is not None
        self._prefix = "session:"
        self._statements: _Statements | None = None
        self._ready_lock = threading.Lock()
        self._section = _Section()
        #: Whether :meth:`_run_driver` prepares its statements.
        self._prepare = True

    def describe(self) -> str:
        return f"sqlalchemy {self.engine.url.render_as_string(hide_password=True)}"

    def configure(self, prefix: str) -> None:
        self._prefix = prefix

    def load(self, key: str) -> Record | None:
        section = self._section

        if section.prefetched is not None and section.conn is not None:
            (prefetched_key, record), section.prefetched = section.prefetched, None

            if prefetched_key == key:
                return record

        self._start()
        if self._sql.driver_select is not None and section.conn is None:
            found, row = self._run_driver(self._sql.driver_select, {"key": key, "now": _now()})
            if found:
                return _record(row)

        return self._run(self._select, key)

    def _select(self, conn: sa.Connection, key: str) -> Record | None:
        sql = self._sql
        stmt = sql.select_locked if conn is self._section.conn else sql.select
        return _record(conn.execute(stmt, {"key": key, "now": _now()}).first())

    def save(self, key: str, data: bytes, expires: float) -> None:
        row = {"id": key, "data": data, "expires": _datetime(expires)}
        section = self._section

        if section.conn is not None and self._sql.upsert_commit is not None:
            self._flush(section)
            section.prefetched = None
            section.pending = row  # sent with the COMMIT
            return

        self._run(self._save, row)

    def _save(self, conn: sa.Connection, row: dict[str, t.Any]) -> None:
        sql = self._sql

        if sql.upsert is not None:
            conn.execute(sql.upsert, row)
            return

        # Replace a row on databases without an upsert statement.
        values = {"key": row["id"], "new_data": row["data"], "new_expires": row["expires"]}

        if conn.execute(sql.update, values).rowcount == 0:
            conn.execute(sql.insert, row)

    def replace(self, key: str, expected: bytes, data: bytes, expires: float) -> bool:
        """One ``UPDATE ... WHERE data = :expected`` of a live row.

        A :meth:`lock` section locks the row it reads, so the update waits
        for the section to commit and then matches nothing if the section
        changed the row.
        """
        values = {
            "key": key,
            "old_data": expected,
            "now": _now(),
            "new_data": data,
            "new_expires": _datetime(expires),
        }
        self._start()
        if self._sql.driver_replace is not None and self._section.conn is None:
            found, rowcount = self._run_driver(self._sql.driver_replace, values)
            if found:
                return bool(rowcount == 1)

        return self._run(self._replace, values)

    def _replace(self, conn: sa.Connection, values: dict[str, t.Any]) -> bool:
        return conn.execute(self._sql.replace, values).rowcount == 1

    def touch(self, key: str, expires: float) -> bool:
        """One ``UPDATE ... WHERE expires > now``: an expired row stays so."""
        values = {"key": key, "now": _now(), "new_expires": _datetime(expires)}
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
        section = self._section

        if section.conn is not None:
            self._flush(section)
            section.prefetched = None
            self._acquire(section.conn, key)
            yield
            return

        self._start()
        transaction = self._explicit if self._sql.begin is not None else self._managed

        with transaction(key) as conn:
            section.conn = conn

            try:
                yield
            finally:
                section.conn = None
                section.prefetched = None

    def cleanup(self, now: float) -> t.Iterator[int]:
        """Delete expired rows, at most 1000 per statement and transaction."""
        expired = (
            sa.select(self.table.c.id)
            .where(self._own_rows(), self.table.c.expires <= _datetime(now))
            .limit(_CLEANUP_BATCH)
        )
        stmt = sa.delete(self.table).where(self.table.c.id.in_(expired))

        while True:
            removed = self._run(_rowcount, stmt)

            if removed:
                yield removed

            if removed < _CLEANUP_BATCH:
                return

    def count(self, now: float) -> int:
        query = (
            sa.select(sa.func.count())
            .select_from(self.table)
            .where(self._own_rows(), self.table.c.expires > _datetime(now))
        )

        return self._run(_scalar_int, query)

    def clear(self) -> int:
        return self._run(_rowcount, sa.delete(self.table).where(self._own_rows()))

    @property
    def _sql(self) -> _Statements:
        assert self._statements is not None, "used before _start()"
        return self._statements

    def _run(self, work: t.Callable[[sa.Connection, A], R], arg: A) -> R:
        """Call ``work(conn, arg)`` in the transaction of the current
        :meth:`lock`, or else on its own (an engine passed in: in a
        transaction of its own), again on a new connection if the pooled
        one was dead."""
        section = self._section

        if section.conn is not None:
            self._flush(section)
            section.prefetched = None
            return work(section.conn, arg)

        self._start()
        return self._retrying(lambda: self._run_alone(work, arg))

    def _run_alone(self, work: t.Callable[[sa.Connection, A], R], arg: A) -> R:
        if self._own_engine:  # autocommit: each statement commits
            with self.engine.connect() as conn:
                return work(conn, arg)

        with self.engine.begin() as conn:
            return work(conn, arg)

    def _run_driver(
        self, statement: _DriverStatement, params: dict[str, t.Any]
    ) -> tuple[bool, t.Any]:
        """Run one statement on a pooled driver connection in autocommit
        mode: ``(True, row)`` for a query, ``(True, rowcount)`` otherwise.

        It runs prepared, unless the database lost a prepared statement or
        already had one (a pooler such as PgBouncer in transaction mode
        hands each statement to any server connection): from then on, this
        backend sends it plain.

        ``(False, None)`` if the connection turned out to be dead, or the
        prepared statement missing: the caller runs the statement again
        through SQLAlchemy, which replaces dead connections. Running it
        again is safe: a failed statement on its own had no effect, and a
        replace that did commit before its connection died matches nothing
        the second time. Other errors (a statement timeout, for one) are
        raised at once, as the SQLAlchemy errors they would be on
        ``engine.connect()``, and so are errors of the pool's checkout (the
        database is down).
        """
        dialect = self.engine.dialect
        dbapi_error = dialect.loaded_dbapi.Error

        try:
            conn = self.engine.raw_connection()
        except dbapi_error as exc:  # the pool raises the driver's own errors
            raise sa.exc.DBAPIError.instance(None, None, exc, dbapi_error, dialect=dialect) from exc

        prepared: set[str] = conn.info.setdefault("flask_serverside_prepared", set())
        sql = self._driver_sql(statement, prepared)

        try:
            cursor = conn.cursor()
            cursor.execute(sql, params)
            result = cursor.fetchone() if cursor.description else cursor.rowcount
            cursor.close()
            prepared.add(statement.name)
        except dbapi_error as exc:
            if getattr(exc, "pgcode", None) in _LOST_PREPARED:
                self._prepare = False
                return False, None

            if dialect.is_disconnect(exc, conn.dbapi_connection, None):
                conn.invalidate(exc)
                return False, None

            error = sa.exc.DBAPIError.instance(sql, params, exc, dbapi_error, dialect=dialect)
            raise error from exc
        finally:
            conn.close()

        return True, result

    def _driver_sql(self, statement: _DriverStatement, prepared: set[str]) -> str:
        if not self._prepare:
            return statement.plain

        if statement.name in prepared:
            return statement.execute

        return f"{statement.prepare}; {statement.execute}"

    def _retrying(self, func: t.Callable[[], R]) -> R:
        """Call ``func`` again, once, if a connection it used turned out to
        be dead.

        A database server that restarted leaves dead connections in the
        pool. SQLAlchemy flags the error (``connection_invalidated``) and
        replaces every connection the pool had then; ``func`` must have had
        no effect when it fails this way (a statement on its own, or the
        start of a transaction).
        """
        try:
            return func()
        except sa.exc.DBAPIError as exc:
            if not exc.connection_invalidated:
                raise

        return func()

    @contextmanager
    def _managed(self, key: str) -> t.Iterator[sa.Connection]:
        """The transaction of a section, begun and ended by SQLAlchemy as
        the engine does it: for an engine passed in."""
        conn = self._retrying(lambda: self._begin_managed(key))

        with conn:  # closing rolls back what is not committed
            yield conn
            conn.commit()

    @contextmanager
    def _explicit(self, key: str) -> t.Iterator[sa.Connection]:
        """The transaction of a section, begun and ended in SQL on a driver
        connection in autocommit mode: for our engine. No isolation level
        switches back and forth, and a pending save goes with the COMMIT."""
        conn = self._retrying(lambda: self._begin_explicit(key))

        try:
            yield conn
        except BaseException:
            self._section.pending = None

            with contextlib.suppress(Exception):
                _end(conn, "ROLLBACK")

            raise
        else:
            row, self._section.pending = self._section.pending, None

            if row is None:
                _end(conn, "COMMIT")
            else:
                assert self._sql.upsert_commit is not None
                _end(conn, self._sql.upsert_commit, row)
        finally:
            conn.close()

    def _begin_managed(self, key: str) -> sa.Connection:
        """Check out a connection, begin a transaction, take the lock."""
        conn = self.engine.connect()

        try:
            conn.execution_options(isolation_level=_lock_isolation(conn.dialect))
            conn.begin()
            self._acquire(conn, key)
        except BaseException:
            conn.close()  # rolls back
            raise

        return conn

    def _begin_explicit(self, key: str) -> sa.Connection:
        """Check out a connection, begin a transaction and take the lock in
        one statement (on PostgreSQL, read the key's row too)."""
        sql = self._sql
        assert sql.begin is not None
        conn = self.engine.connect()

        try:
            if sql.begin_reads:
                params = {"lock_id": _lock_id(key), "key": key, "now": _now()}
                row = conn.exec_driver_sql(sql.begin, params).first()
                self._section.prefetched = (key, _record(row))
            else:
                conn.exec_driver_sql(sql.begin)
        except BaseException:
            with contextlib.suppress(Exception):
                _end(conn, "ROLLBACK")

            conn.close()
            raise

        return conn

    def _flush(self, section: _Section) -> None:
        """Send the section's pending save, before another statement."""
        if section.pending is not None and section.conn is not None:
            row, section.pending = section.pending, None
            self._save(section.conn, row)

    def _acquire(self, conn: sa.Connection, key: str) -> None:
        """Lock ``key`` until the end of the transaction of ``conn``."""
        sql = self._sql

        if sql.lock_kind == "advisory":
            conn.execute(sql.lock_timeout)
            conn.execute(sql.advisory_lock, {"lock_id": _lock_id(key)})
        elif sql.lock_kind == "database":
            conn.execute(sql.write_lock)
        else:
            conn.execute(sql.row_lock, {"key": key})

    def _own_rows(self) -> sa.ColumnElement[bool]:
        """Select this backend's rows: the key prefix followed by exactly 64
        lowercase hex digits, as the extension builds keys.

        ``LIKE`` narrows the search (with ``%`` and ``_`` escaped), but it
        ignores case on SQLite, so the prefix is compared again exactly; a
        longer prefix that starts with this one (``app:admin:`` after
        ``app:``) gives longer keys. The digits are checked with ``GLOB`` on
        SQLite and a regular expression on PostgreSQL; on other dialects
        only their number is.
        """
        column = self.table.c.id
        start = len(self._prefix)
        tail = sa.func.substr(column, start + 1)
        conditions = [
            column.startswith(self._prefix, autoescape=True),
            sa.func.substr(column, 1, start) == self._prefix,
            sa.func.length(column) == start + _DIGEST_LENGTH,
        ]
        dialect = self.engine.dialect.name
        if dialect == "sqlite":
            conditions.append(tail.op("GLOB")("[0-9a-f]" * _DIGEST_LENGTH))
        elif dialect == "postgresql":
            conditions.append(tail.regexp_match(f"^[0-9a-f]{{{_DIGEST_LENGTH}}}$"))
        return sa.and_(*conditions)

    def _start(self) -> None:
        """On first use: create or check the table, build the statements."""
        if self._statements is not None:
            return

        with self._ready_lock:
            if self._statements is not None:
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

            self._statements = _Statements(self.table, self.engine.dialect, self._own_engine)

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


def _create_engine(url: str) -> sa.Engine:
    """Build an engine whose waits are bounded.

    Its driver connections are in autocommit mode: each statement outside
    :meth:`SQLAlchemyBackend.lock` stands alone, without BEGIN and COMMIT
    round trips, and ``lock()`` begins its transaction in SQL. Connecting
    happens on first use, not here.
    """
    parsed = sa.make_url(url)

    if parsed.get_backend_name() == "sqlite":
        engine = sa.create_engine(
            parsed,
            isolation_level="AUTOCOMMIT",
            connect_args=_timeout(parsed, "timeout", _LOCK_TIMEOUT),
        )
        sa.event.listen(engine, "do_connect", _create_sqlite_file)
        sa.event.listen(engine, "connect", _configure_sqlite)
        return engine

    connect_args: dict[str, t.Any] = {}

    if parsed.get_driver_name() in {"psycopg2", "psycopg"}:
        connect_args = _timeout(parsed, "connect_timeout", _CONNECT_TIMEOUT)

    return sa.create_engine(parsed, isolation_level="AUTOCOMMIT", connect_args=connect_args)


def _lock_isolation(dialect: sa.Dialect) -> str:
    """The isolation level of the transaction of :meth:`SQLAlchemyBackend.lock`
    on an engine passed in.

    A real transaction, whatever the engine's default (``"AUTOCOMMIT"``
    included), in which reads after the lock see the latest commits (under
    ``REPEATABLE READ`` the snapshot could predate the lock). For SQLite,
    ``"SERIALIZABLE"`` is its plain transaction mode.
    """
    return "SERIALIZABLE" if dialect.name == "sqlite" else "READ COMMITTED"


def _timeout(url: sa.URL, name: str, seconds: int) -> dict[str, t.Any]:
    """Connect arguments setting a timeout, unless the URL sets its own."""
    return {} if name in url.query else {name: seconds}


def _reject_memory_database(engine: sa.Engine) -> None:
    url = engine.url
    database = url.database or ":memory:"

    if url.get_backend_name() == "sqlite" and (
        database == ":memory:" or url.query.get("mode") == "memory"
    ):
        raise ValueError(
            f"The SQLite database {str(url)!r} is in memory: it belongs to one"
            " connection (which Flask-SQLAlchemy would share with its own"
            " session) and is lost on exit. Use a database file, for example"
            " 'sqlite:////path/to/sessions.sqlite3'."
        )


def _create_sqlite_file(
    dialect: sa.Dialect, record: t.Any, cargs: list[t.Any], cparams: dict[str, t.Any]
) -> None:
    """Create the database file, private to its owner, before SQLite does."""
    path = cargs[0] if cargs else cparams.get("database")

    if not isinstance(path, str) or cparams.get("uri"):
        return

    directory = os.path.dirname(path)

    if directory:
        os.makedirs(directory, mode=0o700, exist_ok=True)

    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))


def _configure_sqlite(dbapi_connection: t.Any, record: t.Any) -> None:
    """Use WAL mode, which the file remembers, with its usual companion
    ``synchronous=NORMAL``: no fsync per commit, and still no corruption on
    power loss (the last commits may be lost).
    """
    cursor = dbapi_connection.cursor()

    try:
        if _use_wal(cursor, dbapi_connection.OperationalError):
            cursor.execute("PRAGMA synchronous=NORMAL")
    finally:
        cursor.close()


def _use_wal(cursor: t.Any, locked_error: type[Exception]) -> bool:
    """Switch the database to WAL mode; return whether it uses it.

    While another connection switches the mode, SQLite says "database is
    locked" at once instead of waiting, so retry until the busy timeout.
    """
    deadline = time.monotonic() + _LOCK_TIMEOUT

    while cursor.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
        try:
            return bool(cursor.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal")
        except locked_error:
            if time.monotonic() > deadline:
                raise

            time.sleep(0.01)

    return True


def _lock_id(key: str) -> int:
    """The PostgreSQL advisory lock of a key: a 64-bit hash of it."""
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def _record(row: t.Any) -> Record | None:
    """The record of a selected ``(data, expires)`` row."""
    if row is None:
        return None

    return Record(bytes(row[0]), _timestamp(row[1]))


def _rowcount(conn: sa.Connection, stmt: sa.Executable) -> int:
    return int(conn.execute(stmt).rowcount)


def _scalar_int(conn: sa.Connection, stmt: sa.Executable) -> int:
    return int(conn.execute(stmt).scalar_one())


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _datetime(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, timezone.utc)


def _timestamp(value: datetime) -> float:
    if value.tzinfo is None:  # SQLite stores no zone; the backend writes UTC.
        value = value.replace(tzinfo=timezone.utc)

    return value.timestamp()
