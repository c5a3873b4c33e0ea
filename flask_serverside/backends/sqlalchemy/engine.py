"""The engine the backend builds from a URL, and SQLite's set-up."""

from __future__ import annotations

import os
import time
import typing as t

import sqlalchemy as sa

from ..base import gevent_patched
from . import schema

#: Seconds to wait for a database server to accept a connection.
_CONNECT_TIMEOUT = 5


def create_engine(url: str) -> sa.Engine:
    """Build an engine whose waits are bounded.

    Its driver connections are in autocommit mode: each statement outside
    :meth:`SQLAlchemyBackend.lock` stands alone, without BEGIN and COMMIT
    round trips, and ``lock()`` begins its transaction in SQL. On psycopg 3
    they never prepare statements on their own (``prepare_threshold=None``),
    unless the URL's ``prepare_threshold`` sets a number of runs. Connecting
    happens on first use, not here.

    :raises ValueError: The URL's ``prepare_threshold`` is not a number, or
        its driver is not psycopg 3.
    """
    parsed = sa.make_url(url)

    if parsed.get_backend_name() == "sqlite":
        engine = sa.create_engine(
            parsed,
            isolation_level="AUTOCOMMIT",
            # Under gevent SQLite must not wait for its write lock in C,
            # which would stop every greenlet: Connections polls instead.
            connect_args=_timeout(
                parsed, "timeout", 0 if gevent_patched() else schema.LOCK_TIMEOUT
            ),
        )
        sa.event.listen(engine, "do_connect", _create_sqlite_file)
        sa.event.listen(engine, "connect", _configure_sqlite)
        return engine

    parsed, connect_args = _connect_args(parsed)
    return sa.create_engine(parsed, isolation_level="AUTOCOMMIT", connect_args=connect_args)


def _connect_args(url: sa.URL) -> tuple[sa.URL, dict[str, t.Any]]:
    """The URL to connect to a server with, and the driver arguments the
    engine adds: a connect timeout and, on psycopg 3, ``prepare_threshold``
    (taken out of the URL, where it would be a string)."""
    driver = url.get_driver_name()

    if "prepare_threshold" in url.query and driver != "psycopg":
        raise ValueError(
            "prepare_threshold is an option of psycopg 3 (postgresql+psycopg://),"
            f" not of {driver}: remove it from the SQLAlchemy URL."
        )

    if driver not in {"psycopg2", "psycopg"}:
        return url, {}

    connect_args = _timeout(url, "connect_timeout", _CONNECT_TIMEOUT)

    if driver == "psycopg":
        # psycopg 3 prepares a statement on its 5th run, under names that
        # are the same in every connection (_pg3_0, ...): behind PgBouncer in
        # transaction mode, a later run lands on a server connection without
        # it, or where another client prepared that name. Unless the URL
        # allows it, the backend prepares the statements of every request
        # itself (see .driver).
        connect_args["prepare_threshold"] = _prepare_threshold(url)
        url = url.difference_update_query(["prepare_threshold"])

    return url, connect_args


def lock_isolation(dialect: sa.Dialect) -> str:
    """The isolation level of the transaction of :meth:`SQLAlchemyBackend.lock`
    on an engine passed in.

    A real transaction, whatever the engine's default (``"AUTOCOMMIT"``
    included), in which reads after the lock see the latest commits (under
    ``REPEATABLE READ`` the snapshot could predate the lock). For SQLite,
    ``"SERIALIZABLE"`` is its plain transaction mode.
    """
    return "SERIALIZABLE" if dialect.name == "sqlite" else "READ COMMITTED"


def _prepare_threshold(url: sa.URL) -> int | None:
    """psycopg 3's ``prepare_threshold`` as the URL gives it (a number of
    runs), or ``None`` (never prepare) if it gives none.

    :raises ValueError: The URL's value is not a number of runs.
    """
    value = url.query.get("prepare_threshold", "none")

    if value in ("", "none", "None"):
        return None

    if not isinstance(value, str) or not (value.isascii() and value.isdigit()):
        raise ValueError(
            f"prepare_threshold={value!r} in the SQLAlchemy URL: give the number"
            " of runs after which psycopg 3 prepares a statement (such as 5),"
            " or 'none' to never prepare (behind PgBouncer before 1.21 in"
            " transaction mode)."
        )

    return int(value)


def _timeout(url: sa.URL, name: str, seconds: int) -> dict[str, t.Any]:
    """Connect arguments setting a timeout, unless the URL sets its own."""
    return {} if name in url.query else {name: seconds}


def reject_memory_database(engine: sa.Engine) -> None:
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
    deadline = time.monotonic() + schema.LOCK_TIMEOUT

    while cursor.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
        try:
            return bool(cursor.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal")
        except locked_error:
            if time.monotonic() > deadline:
                raise

            time.sleep(0.01)

    return True
