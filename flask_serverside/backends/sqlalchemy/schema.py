"""The session table and the statements the backend runs on it, built once."""

from __future__ import annotations

import hashlib
import typing as t
from dataclasses import dataclass
from datetime import datetime
from datetime import timezone

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects import sqlite
from sqlalchemy.sql.compiler import SQLCompiler

from ..base import DIGEST_LENGTH
from ..base import Record
from ..base import utc_timestamp

#: Seconds :meth:`SQLAlchemyBackend.lock` waits for another holder of the
#: lock (and the SQLite busy timeout) before giving up.
LOCK_TIMEOUT = 10

#: The single-statement upsert of each database that has one; others update,
#: then insert if no row was updated.
UPSERTS: dict[str, t.Callable[[sa.Table], postgresql.Insert | sqlite.Insert]] = {
    "postgresql": postgresql.insert,
    "sqlite": sqlite.insert,
}

#: The PostgreSQL drivers of :mod:`.driver`'s fast path.
DRIVERS = {"psycopg2", "psycopg"}

#: How :meth:`SQLAlchemyBackend.lock` excludes others, per database; others
#: lock the key's row (``SELECT ... FOR UPDATE``).
LOCKS = {"postgresql": "advisory", "sqlite": "database"}


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



class Statements:
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
        # The fast path's lookup binds the key alone (the time was a quarter
        # of a SQLite read): the store skips an expired row it returns.
        select_key = sa.select(c.data, c.expires).where(c.id == key)
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

        if dialect.name in UPSERTS:
            insert = UPSERTS[dialect.name](table)
            self.upsert = insert.on_conflict_do_update(
                index_elements=[c.id],
                set_={"data": insert.excluded.data, "expires": insert.excluded.expires},
            )

        #: ``"advisory"``, ``"database"`` or ``"row"``: see
        #: :meth:`SQLAlchemyBackend.lock`.
        self.lock_kind = LOCKS.get(dialect.name, "row")
        self.lock_timeout = sa.text(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}s'")
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
        #: :attr:`select` (without its expiry test) and :attr:`replace` as
        #: driver SQL, to run on a pooled driver connection without
        #: SQLAlchemy's execution layer (``None``: run them through
        #: SQLAlchemy).
        self.driver_select: DriverStatement | SQLiteStatement | None = None
        self.driver_replace: DriverStatement | SQLiteStatement | None = None

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
                f" SET LOCAL lock_timeout = '{LOCK_TIMEOUT}s';"
                " SELECT pg_advisory_xact_lock(%(lock_id)s);"
                f" {self.select_locked.compile(dialect=dialect)}"
            )
            self.begin_reads = True

            if self.upsert is not None:
                self.upsert_commit = f"{self.upsert.compile(dialect=dialect)}; COMMIT"

        if own_engine and dialect.name == "postgresql" and dialect.driver in DRIVERS:
            # The driver converts the parameters (bytes, aware datetimes)
            # and the results itself; SQLAlchemy's layer would add about a
            # third to the statements every request runs.
            positional = postgresql.psycopg2.dialect(  # type: ignore[no-untyped-call]
                paramstyle="numeric_dollar"
            )
            self.driver_select = DriverStatement.build("select", select_key, dialect, positional)
            self.driver_replace = DriverStatement.build(
                "replace", self.replace, dialect, positional
            )
        elif own_engine and dialect.name == "sqlite":
            # On SQLite, SQLAlchemy's execution layer costs several times
            # the statement itself.
            self.driver_select = SQLiteStatement.build(select_key, dialect)
            self.driver_replace = SQLiteStatement.build(self.replace, dialect)


@dataclass(frozen=True)
class DriverStatement:
    """A statement every request runs, as psycopg2 SQL (which psycopg 3's
    client-side binding cursor takes too): prepared once per connection
    (``PREPARE``, sent with the first ``EXECUTE``), which spares the server
    parsing and planning it each time, or plain."""

    #: Determines the statement's text (see :func:`statement_name`).
    name: str
    prepare: str
    execute: str
    plain: str
    #: Whether it returns a row (else: its row count).
    query: bool
    #: The names of the parameters of ``execute``, in their order: it takes
    #: them as a tuple (psycopg 3 binds a tuple on the client in about 80%
    #: of the time it takes for a dict; ``plain`` takes the dict).
    order: tuple[str, ...]

    @classmethod
    def build(
        cls, what: str, stmt: sa.ClauseElement, dialect: sa.Dialect, positional: sa.Dialect
    ) -> DriverStatement:
        """:param positional: ``dialect`` with ``$1`` parameters."""
        compiled = t.cast(SQLCompiler, stmt.compile(dialect=positional))
        name = statement_name(what, str(compiled))
        body = str(compiled).replace("%", "%%")  # psycopg2 interpolates
        order = tuple(compiled.positiontup or ())
        return cls(
            name=name,
            prepare=f"PREPARE {name} AS {body}",
            execute=f"EXECUTE {name}({', '.join('%s' for _ in order)})",
            plain=str(stmt.compile(dialect=dialect)),
            query=isinstance(stmt, sa.Select),
            order=order,
        )


@dataclass(frozen=True)
class SQLiteStatement:
    """A statement every request runs, as SQLite SQL with its parameters'
    and columns' conversions, which SQLAlchemy would apply: the same text
    for a datetime as the rows SQLAlchemy writes."""

    sql: str
    #: The parameters in their order, each with its conversion (or none).
    params: tuple[tuple[str, t.Callable[[t.Any], t.Any] | None], ...]
    #: The conversion of each column of a row (or none).
    columns: tuple[t.Callable[[t.Any], t.Any] | None, ...]

    @classmethod
    def build(cls, stmt: sa.Select[t.Any] | sa.Update, dialect: sa.Dialect) -> SQLiteStatement:
        compiled = stmt.compile(dialect=dialect)
        params = tuple(
            (name, sqlite_bind(compiled.binds[name].type, dialect))
            for name in compiled.positiontup or ()
        )
        selected = stmt.selected_columns if isinstance(stmt, sa.Select) else ()
        columns = tuple(
            column.type.dialect_impl(dialect).result_processor(dialect, None)
            for column in selected
        )
        return cls(sql=str(compiled), params=params, columns=columns)

    def args(self, values: dict[str, t.Any]) -> list[t.Any]:
        """The positional parameters, from their values by name."""
        return [
            values[name] if convert is None else convert(values[name])
            for name, convert in self.params
        ]

    def row(self, row: t.Any) -> t.Any:
        """A row as SQLAlchemy would return it (or ``None``)."""
        if row is None or not self.columns:
            return row

        return [
            value if convert is None else convert(value)
            for convert, value in zip(self.columns, row)
        ]


def sqlite_bind(
    type_: sa.types.TypeEngine[t.Any], dialect: sa.Dialect
) -> t.Callable[[t.Any], t.Any] | None:
    """SQLAlchemy's conversion of a parameter of ``type_`` for SQLite, or
    a cheaper one that gives the same: bytes bind as a BLOB as they are,
    and a datetime's text is its ISO form without the zone, which is
    SQLAlchemy's (checked here on a few datetimes)."""
    convert = type_.dialect_impl(dialect).bind_processor(dialect)

    if isinstance(type_, sa.LargeBinary):
        return None

    if convert is not None and isinstance(type_, sa.DateTime):
        samples = [
            datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc),
            datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=timezone.utc),
            datetime(1, 1, 1, 0, 0, 0, 1),
        ]
        if all(convert(sample) == _iso_text(sample) for sample in samples):
            return _iso_text

    return convert


def _iso_text(value: datetime) -> str:
    """``YYYY-MM-DD HH:MM:SS.ffffff``, the zone left out."""
    return value.isoformat(" ", "microseconds")[:26]


def statement_name(what: str, sql: str) -> str:
    """The name under which ``sql`` is prepared: ``flask_serverside_`` and
    ``what``, then 128 bits of the SHA-256 of the text.

    The name determines the text. Behind a pooler in transaction mode
    (PgBouncer), ``EXECUTE`` may run on a server connection where another
    client prepared the name: an app with another table, or another
    version of this one. Under a name of its own text, it runs the same
    statement there; under a fixed name, it would read another table's
    row without any error.
    """
    digest = hashlib.sha256(sql.encode()).hexdigest()[:32]
    return f"flask_serverside_{what}_{digest}"


def own_rows(table: sa.Table, prefix: str, dialect: str) -> sa.ColumnElement[bool]:
    """Select the rows of keys under ``prefix``: the key prefix followed by
    exactly 64 lowercase hex digits, as the extension builds keys.

    ``LIKE`` narrows the search (with ``%`` and ``_`` escaped), but it
    ignores case on SQLite, so the prefix is compared again exactly; a
    longer prefix that starts with this one (``app:admin:`` after
    ``app:``) gives longer keys. The digits are checked with ``GLOB`` on
    SQLite and a regular expression on PostgreSQL; on other dialects
    only their number is.
    """
    column = table.c.id
    start = len(prefix)
    tail = sa.func.substr(column, start + 1)
    conditions = [
        column.startswith(prefix, autoescape=True),
        sa.func.substr(column, 1, start) == prefix,
        sa.func.length(column) == start + DIGEST_LENGTH,
    ]
    if dialect == "sqlite":
        conditions.append(tail.op("GLOB")("[0-9a-f]" * DIGEST_LENGTH))
    elif dialect == "postgresql":
        conditions.append(tail.regexp_match(f"^[0-9a-f]{{{DIGEST_LENGTH}}}$"))
    return sa.and_(*conditions)


def write_row(conn: sa.Connection, sql: Statements, row: dict[str, t.Any]) -> None:
    """Insert or replace a row: ``id``, ``data`` and ``expires``."""
    if sql.upsert is not None:
        conn.execute(sql.upsert, row)
        return

    # Replace a row on databases without an upsert statement.
    values = {"key": row["id"], "new_data": row["data"], "new_expires": row["expires"]}

    if conn.execute(sql.update, values).rowcount == 0:
        conn.execute(sql.insert, row)


def record(row: t.Any) -> Record | None:
    """The record of a selected ``(data, expires)`` row."""
    if row is None:
        return None

    return Record(bytes(row[0]), utc_timestamp(row[1]))
