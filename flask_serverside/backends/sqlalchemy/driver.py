"""The fast path of the statements every request runs (a read, a
replace), on a pooled driver connection without SQLAlchemy's execution
layer: for PostgreSQL (psycopg2 and psycopg 3) and SQLite."""

from __future__ import annotations

import typing as t

import sqlalchemy as sa

from .schema import DriverStatement
from .schema import SQLiteStatement

#: SQLSTATEs of a prepared statement that does not exist (invalid SQL
#: statement name) or exists already (duplicate prepared statement).
_LOST_PREPARED = {"26000", "42P05"}


def make_driver(engine: sa.Engine, poll_busy: bool) -> Driver | SQLiteDriver:
    """The fast path of ``engine``'s database.

    :param poll_busy: Whether SQLite's write lock is waited for in Python
        (see :attr:`.Connections.poll_busy`).
    """
    if engine.dialect.name == "sqlite":
        return SQLiteDriver(engine, poll_busy)

    return Driver(engine)


class SQLiteDriver:
    """Runs prebuilt statements on the engine's sqlite3 connections.

    :param engine: The backend's engine, on SQLite.
    :param poll_busy: Whether a statement that finds the database locked is
        left to the caller, which waits for the lock in Python.
    """

    def __init__(self, engine: sa.Engine, poll_busy: bool) -> None:
        self.engine = engine
        self._poll_busy = poll_busy

    def run(
        self, statement: DriverStatement | SQLiteStatement, params: dict[str, t.Any]
    ) -> tuple[bool, t.Any]:
        """Run one statement on a pooled connection in autocommit mode:
        ``(True, row)`` for a query, ``(True, rowcount)`` otherwise.

        ``(False, None)`` if the connection turned out to be closed, or the
        database locked while the caller waits for it in Python: the caller
        runs the statement again through SQLAlchemy (a failed statement on
        its own had no effect). SQLite waits for a lock itself otherwise.
        Other errors are raised as the SQLAlchemy errors they would be on
        ``engine.connect()``.
        """
        assert isinstance(statement, SQLiteStatement)
        conn = _checkout(self.engine)
        args = statement.args(params)

        try:
            cursor = conn.driver_connection.execute(statement.sql, args)
            result = statement.row(cursor.fetchone()) if statement.columns else cursor.rowcount
            cursor.close()
        except self.engine.dialect.loaded_dbapi.Error as exc:
            if self._poll_busy and "database is locked" in str(exc):
                return False, None

            _drop_or_raise(self.engine, conn, exc, statement.sql, args)
            return False, None
        finally:
            conn.close()

        return True, result


class Driver:
    """Runs prebuilt statements on the engine's driver connections.

    On psycopg 3, through a cursor that binds parameters on the client, as
    psycopg2 does: it sends ``PREPARE`` and the first ``EXECUTE`` in one
    message, under a name of the statement's own (psycopg 3's protocol-level
    prepared statements are named ``_pg3_0``, ... in every connection, which
    behind PgBouncer may stand for another client's statement). Unless the
    connection lets psycopg 3 prepare statements itself (its
    ``prepare_threshold`` is a number, set in the URL): then it does, and
    binds the parameters on the server, which costs less.

    :param engine: The backend's engine, on psycopg2 or psycopg 3.
    """

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        #: Whether :meth:`run` prepares its statements.
        self._prepare = True
        #: psycopg 3 rather than psycopg2.
        self._psycopg3 = engine.dialect.driver == "psycopg"
        self._client_cursor: t.Any = None

        if self._psycopg3:
            import psycopg

            self._client_cursor = psycopg.ClientCursor

    def run(
        self, statement: DriverStatement | SQLiteStatement, params: dict[str, t.Any]
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
        assert isinstance(statement, DriverStatement)
        conn = _checkout(self.engine)
        prepared: set[str] = conn.info.setdefault("flask_serverside_prepared", set())
        # psycopg 3 prepares itself where the URL lets it (prepare_threshold).
        threshold = conn.driver_connection.prepare_threshold if self._psycopg3 else None
        protocol = self._prepare and threshold is not None
        sql = statement.plain if protocol else self._sql(statement, prepared)

        if sql is statement.plain:
            args: t.Any = params
        else:
            args = tuple([params[name] for name in statement.order])

        try:
            cursor = self._cursor(conn, protocol)
            if protocol:
                cursor.execute(sql, args, prepare=True)
            else:
                cursor.execute(sql, args)
            # With PREPARE, psycopg 3 starts at the result of PREPARE,
            # psycopg2 keeps only the last one.
            several = sql is not statement.execute and sql is not statement.plain
            while self._psycopg3 and several and cursor.nextset():
                pass
            # Not ``cursor.description``, which psycopg 3 builds each time.
            result = cursor.fetchone() if statement.query else cursor.rowcount
            if self._client_cursor is None:  # psycopg 3's is kept
                cursor.close()
            prepared.add(statement.name)
        except self.engine.dialect.loaded_dbapi.Error as exc:
            if _sqlstate(exc) in _LOST_PREPARED:
                self._prepare = False
                return False, None

            _drop_or_raise(self.engine, conn, exc, sql, args)
            return False, None
        finally:
            conn.close()

        return True, result

    def _cursor(self, conn: t.Any, protocol: bool) -> t.Any:
        """A cursor of ``conn``: on psycopg 3, the one kept for it, binding
        parameters on the server if ``protocol``, else on the client."""
        if self._client_cursor is None:
            return conn.cursor()

        # One psycopg 3 cursor per connection (the pool clears ``info`` when
        # it reconnects): with a new one each time, a read on the driver's
        # connection took 1.7 times psycopg2's; with one kept, 1.1 to 1.2.
        name = "flask_serverside_cursor" + ("_protocol" if protocol else "")
        cursor = conn.info.get(name)

        if cursor is None or cursor.connection is not conn.driver_connection:
            driver = conn.driver_connection
            cursor = driver.cursor() if protocol else self._client_cursor(driver)
            conn.info[name] = cursor

        return cursor

    def _sql(self, statement: DriverStatement, prepared: set[str]) -> str:
        if not self._prepare:
            return statement.plain

        if statement.name in prepared:
            return statement.execute

        return f"{statement.prepare}; {statement.execute}"


def _checkout(engine: sa.Engine) -> t.Any:
    """A pooled connection of ``engine``.

    :raises sqlalchemy.exc.DBAPIError: The pool could not connect (the
        database is down): the driver's error, as SQLAlchemy's.
    """
    dialect = engine.dialect
    dbapi_error = dialect.loaded_dbapi.Error

    try:
        return engine.raw_connection()
    except dbapi_error as exc:  # the pool raises the driver's own errors
        raise sa.exc.DBAPIError.instance(None, None, exc, dbapi_error, dialect=dialect) from exc


def _drop_or_raise(engine: sa.Engine, conn: t.Any, exc: t.Any, sql: str, args: t.Any) -> None:
    """Invalidate ``conn`` if ``exc`` says it is dead (the caller runs the
    statement again through SQLAlchemy); else raise ``exc`` as the
    SQLAlchemy error it would be on ``engine.connect()``."""
    dialect = engine.dialect

    if dialect.is_disconnect(exc, conn.dbapi_connection, None):
        conn.invalidate(exc)
        return

    error = sa.exc.DBAPIError.instance(sql, args, exc, dialect.loaded_dbapi.Error, dialect=dialect)
    raise error from exc


def _sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE of a psycopg2 or psycopg 3 error."""
    code = getattr(exc, "pgcode", None) or getattr(exc, "sqlstate", None)
    return code if isinstance(code, str) else None
