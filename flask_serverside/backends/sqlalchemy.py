"""Sessions in a SQL database, through SQLAlchemy Core.

The backend uses its own connections from the engine's pool and never the
application's ORM session, so saving a session neither commits nor rolls
back the application's work.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
import typing as t
from contextlib import contextmanager
from datetime import datetime
from datetime import timezone

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects import sqlite

from .base import Backend
from .base import Record

#: Seconds to wait for a database server to accept a connection.
_CONNECT_TIMEOUT = 5
#: Seconds :meth:`SQLAlchemyBackend.lock` waits for another holder of the
#: lock (and the SQLite busy timeout) before giving up.
_LOCK_TIMEOUT = 10
#: Rows removed by one statement of :meth:`SQLAlchemyBackend.cleanup`, so
#: that each holds its locks only briefly (SQLite's whole-database write lock
#: included): about 30 ms in a table of 10^6 rows.
_CLEANUP_BATCH = 1000

_UPSERTS: dict[str, t.Callable[[sa.Table], postgresql.Insert | sqlite.Insert]] = {
    "postgresql": postgresql.insert,
    "sqlite": sqlite.insert,
}


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


class _Held(threading.local):
    """The connection of the :meth:`SQLAlchemyBackend.lock` open in a thread."""

    conn: sa.Connection | None = None


class SQLAlchemyBackend(Backend):
    """Store sessions in a table of a SQL database.

    Nothing connects to the database until the first session is read or
    written, so an application starts while its database is down. The table
    (and its index on ``expires``) is created then, if ``create_table`` is
    true.

    An engine built from ``url`` checks pooled connections before using them,
    so a database restart costs no failed request; on a database server it
    runs each statement outside :meth:`lock` in autocommit mode (no BEGIN
    and COMMIT round trips). On SQLite it uses WAL mode
    (readers never wait for a writer) with ``synchronous=NORMAL``, and
    creates the database file with mode 0o600. An engine passed in is used
    as configured; give it ``pool_pre_ping=True`` for the same resilience.

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
        self._prefix = ""
        self._ready = False
        self._ready_lock = threading.Lock()
        self._held = _Held()

    def configure(self, prefix: str) -> None:
        self._prefix = prefix

    def load(self, key: str) -> Record | None:
        query = sa.select(self.table.c.data, self.table.c.expires).where(
            self.table.c.id == key, self.table.c.expires > _now()
        )

        with self._connect() as conn:
            row = conn.execute(query).first()

        if row is None:
            return None

        return Record(bytes(row.data), _timestamp(row.expires))

    def save(self, key: str, data: bytes, expires: float) -> None:
        values = {"id": key, "data": data, "expires": _datetime(expires)}

        with self._connect() as conn:
            if conn.dialect.name in _UPSERTS:
                self._upsert(conn, values)
            else:
                self._update_or_insert(conn, values)

    def touch(self, key: str, expires: float) -> None:
        # An expired record stays expired: touching must not revive it.
        stmt = (
            sa.update(self.table)
            .where(self.table.c.id == key, self.table.c.expires > _now())
            .values(expires=_datetime(expires))
        )

        with self._connect() as conn:
            conn.execute(stmt)

    def delete(self, key: str) -> bool:
        with self._connect() as conn:
            result = conn.execute(sa.delete(self.table).where(self.table.c.id == key))

        return result.rowcount > 0

    @contextmanager
    def lock(self, key: str) -> t.Iterator[None]:
        """Hold an exclusive section for ``key`` in a database transaction.

        Every call this thread makes on the backend inside the section runs
        in that transaction, which commits when the section ends (or rolls
        back if it raises). A section entered again from inside joins it.

        -   PostgreSQL: a transaction-level advisory lock on a 64-bit hash of
            the key, so it covers a key that has no row yet.
        -   SQLite: the database's write lock. Other writers wait; readers
            don't, in WAL mode.
        -   Other databases: a row lock (``SELECT ... FOR UPDATE``), which
            excludes others while the record exists.

        Waiting is bounded: after ten seconds (on SQLite, the engine's busy
        timeout) the database raises an error listed in
        :attr:`unavailable_errors`.
        """
        conn = self._held.conn

        if conn is not None:
            self._acquire(conn, key)
            yield
            return

        self._ensure_table()

        with self.engine.connect() as conn:
            conn.execution_options(isolation_level=_lock_isolation(conn.dialect))

            with conn.begin():
                self._acquire(conn, key)
                self._held.conn = conn

                try:
                    yield
                finally:
                    self._held.conn = None

    def cleanup(self, now: float) -> t.Iterator[int]:
        """Delete expired rows, at most 1000 per statement and transaction."""
        expired = (
            sa.select(self.table.c.id)
            .where(self._own_rows(), self.table.c.expires <= _datetime(now))
            .limit(_CLEANUP_BATCH)
        )
        stmt = sa.delete(self.table).where(self.table.c.id.in_(expired))

        while True:
            with self._connect() as conn:
                removed = conn.execute(stmt).rowcount

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

        with self._connect() as conn:
            return int(conn.execute(query).scalar_one())

    def clear(self) -> int:
        with self._connect() as conn:
            return conn.execute(sa.delete(self.table).where(self._own_rows())).rowcount

    @contextmanager
    def _connect(self) -> t.Iterator[sa.Connection]:
        """Use the transaction of the current :meth:`lock`, or a new one."""
        conn = self._held.conn

        if conn is not None:
            yield conn
            return

        self._ensure_table()

        with self.engine.begin() as conn:
            yield conn

    def _acquire(self, conn: sa.Connection, key: str) -> None:
        """Lock ``key`` until the end of the transaction of ``conn``."""
        _LOCKS.get(conn.dialect.name, _lock_row)(conn, self.table, key)

    def _upsert(self, conn: sa.Connection, values: dict[str, t.Any]) -> None:
        stmt = _UPSERTS[conn.dialect.name](self.table).values(values)
        conn.execute(
            stmt.on_conflict_do_update(
                index_elements=[self.table.c.id],
                set_={"data": stmt.excluded.data, "expires": stmt.excluded.expires},
            )
        )

    def _update_or_insert(self, conn: sa.Connection, values: dict[str, t.Any]) -> None:
        """Replace a row on databases without an upsert statement."""
        update = (
            sa.update(self.table)
            .where(self.table.c.id == values["id"])
            .values(data=values["data"], expires=values["expires"])
        )

        if conn.execute(update).rowcount == 0:
            conn.execute(sa.insert(self.table).values(values))

    def _own_rows(self) -> sa.ColumnElement[bool]:
        """Select the rows under this backend's key prefix."""
        if not self._prefix:
            return sa.true()

        return self.table.c.id.startswith(self._prefix, autoescape=True)

    def _ensure_table(self) -> None:
        """Create or check the table, once, on first use."""
        if self._ready:
            return

        with self._ready_lock:
            if self._ready:
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

            self._ready = True

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


def _create_engine(url: str) -> sa.Engine:
    """Build an engine whose waits are bounded.

    Connecting happens on first use, not here.
    """
    parsed = sa.make_url(url)

    if parsed.get_backend_name() == "sqlite":
        engine = sa.create_engine(parsed, connect_args=_timeout(parsed, "timeout", _LOCK_TIMEOUT))
        sa.event.listen(engine, "do_connect", _create_sqlite_file)
        sa.event.listen(engine, "connect", _configure_sqlite)
        return engine

    connect_args: dict[str, t.Any] = {}

    if parsed.get_driver_name() in {"psycopg2", "psycopg"}:
        connect_args = _timeout(parsed, "connect_timeout", _CONNECT_TIMEOUT)

    # Each statement outside lock() stands alone: autocommit saves the
    # BEGIN and COMMIT round trips. lock() opens a real transaction.
    return sa.create_engine(
        parsed, pool_pre_ping=True, isolation_level="AUTOCOMMIT", connect_args=connect_args
    )


def _lock_isolation(dialect: sa.Dialect) -> str:
    """The isolation level of the transaction of :meth:`SQLAlchemyBackend.lock`.

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


def _lock_advisory(conn: sa.Connection, table: sa.Table, key: str) -> None:
    """PostgreSQL: an advisory lock on a hash of the key, which covers a key
    that has no row."""
    conn.execute(sa.text(f"SET LOCAL lock_timeout = '{_LOCK_TIMEOUT}s'"))
    digest = hashlib.sha256(key.encode()).digest()
    lock_id = int.from_bytes(digest[:8], "big", signed=True)
    conn.execute(sa.select(sa.func.pg_advisory_xact_lock(sa.literal(lock_id, sa.BigInteger))))


def _lock_database(conn: sa.Connection, table: sa.Table, key: str) -> None:
    """SQLite: the database's write lock. Readers go on, in WAL mode.

    A write as the transaction's first statement takes the lock now, waiting
    up to the busy timeout, as ``BEGIN IMMEDIATE`` would, however the engine
    begins its transactions.
    """
    conn.execute(sa.update(table).where(sa.false()).values(id=table.c.id))


def _lock_row(conn: sa.Connection, table: sa.Table, key: str) -> None:
    """Other databases: a row lock, which excludes others while the record
    exists (merging only matters then)."""
    conn.execute(sa.select(table.c.id).where(table.c.id == key).with_for_update())


_LOCKS = {"postgresql": _lock_advisory, "sqlite": _lock_database}


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _datetime(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, timezone.utc)


def _timestamp(value: datetime) -> float:
    if value.tzinfo is None:  # SQLite stores no zone; the backend writes UTC.
        value = value.replace(tzinfo=timezone.utc)

    return value.timestamp()
