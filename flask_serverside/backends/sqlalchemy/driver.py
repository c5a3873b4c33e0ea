"""The psycopg2 fast path: a read or a replace on a pooled driver
connection, without SQLAlchemy's execution layer."""

from __future__ import annotations

import typing as t

import sqlalchemy as sa

if t.TYPE_CHECKING:
    from .schema import DriverStatement

#: SQLSTATEs of a prepared statement that does not exist (invalid SQL
#: statement name) or exists already (duplicate prepared statement).
_LOST_PREPARED = {"26000", "42P05"}


class Driver:
    """Runs prebuilt statements on the engine's driver connections.

    :param engine: The backend's engine, on psycopg2.
    """

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        #: Whether :meth:`run` prepares its statements.
        self._prepare = True

    def run(
        self, statement: DriverStatement, params: dict[str, t.Any]
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
        sql = self._sql(statement, prepared)

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

    def _sql(self, statement: DriverStatement, prepared: set[str]) -> str:
        if not self._prepare:
            return statement.plain

        if statement.name in prepared:
            return statement.execute

        return f"{statement.prepare}; {statement.execute}"
