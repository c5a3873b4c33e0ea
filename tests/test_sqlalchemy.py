"""What is peculiar to the SQL backend, on SQLite and a real PostgreSQL."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import pathlib
import stat
import subprocess
import sys
import threading
import time
import typing as t
import uuid
from collections.abc import Iterator
from datetime import datetime
from datetime import timezone

import pytest
import sqlalchemy as sa
from flask import Flask

from flask_serverside.backends import sqlalchemy as sql_module
from flask_serverside.backends.base import utc_datetime
from flask_serverside.backends.sqlalchemy import engine as sql_engine
from flask_serverside.backends.sqlalchemy import make_table
from flask_serverside.backends.sqlalchemy import schema as sql_schema
from flask_serverside.backends.sqlalchemy import sections as sql_sections
from flask_serverside.backends.sqlalchemy import SQLAlchemyBackend
from tests.conftest import start_server
from tests.servers import free_port
from tests.servers import Server

ROOT = pathlib.Path(__file__).resolve().parents[1]

#: Adds one to a counter under ``lock()``, ``argv[3]`` times, in a process
#: of its own; starts when it reads a line, so the processes overlap.
COUNTER_WORKER = """
import sys, time
from flask_serverside.backends.sqlalchemy import SQLAlchemyBackend

backend = SQLAlchemyBackend(url=sys.argv[1], table=sys.argv[2])
print("ready", flush=True)
sys.stdin.readline()

for _ in range(int(sys.argv[3])):
    with backend.lock("counter"):
        record = backend.load("counter")
        value = int(record.data) if record else 0
        time.sleep(0.001)
        backend.save("counter", str(value + 1).encode(), time.time() + 60)
"""


def storage_key(prefix: str, name: str) -> str:
    """A storage key as the layer above builds it."""
    return prefix + hashlib.sha256(name.encode()).hexdigest()


KEY_A = storage_key("session:", "a")
KEY_B = storage_key("session:", "b")


def unique_table() -> str:
    return f"sessions_{uuid.uuid4().hex[:12]}"


def sqlite_url(directory: pathlib.Path) -> str:
    return f"sqlite:///{directory}/sessions.sqlite3"


def later(seconds: float = 60) -> float:
    return time.time() + seconds


@pytest.fixture(scope="module")
def postgres_url(postgres_server: Server) -> str:
    return postgres_server.url


@pytest.fixture(params=["sqlite", "postgres"])
def url(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> str:
    if request.param == "sqlite":
        return sqlite_url(tmp_path)

    return t.cast(str, request.getfixturevalue("postgres_url"))


@pytest.fixture
def make_backend() -> Iterator[t.Callable[..., SQLAlchemyBackend]]:
    """Build backends (on a new table unless given one); drop their tables
    and close their connections after the test."""
    backends: list[SQLAlchemyBackend] = []

    def make(**kwargs: t.Any) -> SQLAlchemyBackend:
        backends.append(SQLAlchemyBackend(**{"table": unique_table(), **kwargs}))
        return backends[-1]

    yield make

    for backend in backends:
        if backend.create_table:
            backend.table.drop(backend.engine, checkfirst=True)

        backend.engine.dispose()


@pytest.fixture
def backend(url: str, make_backend: t.Callable[..., SQLAlchemyBackend]) -> SQLAlchemyBackend:
    return make_backend(url=url)


@pytest.fixture(scope="module")
def stoppable_postgres(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """A server of this module's own, which tests stop and start again."""
    server = start_server(request, tmp_path_factory.mktemp("postgres"), "postgres")
    yield server
    server.stop()


def test_expiry_is_a_utc_datetime_column(backend: SQLAlchemyBackend) -> None:
    backend.save("session:a", b"x", 2_000_000_000.25)

    with backend.engine.connect() as conn:
        stored = conn.execute(sa.select(backend.table.c.expires)).scalar_one()

    if backend.engine.dialect.name == "sqlite":  # no zone stored: UTC by convention
        stored = stored.replace(tzinfo=timezone.utc)

    assert stored == datetime(2033, 5, 18, 3, 33, 20, 250000, tzinfo=timezone.utc)


def test_expired_rows_stay_expired(backend: SQLAlchemyBackend) -> None:
    """An expired row is not counted, and a touch does not revive it. A
    read may return it with its past expiry (the fast path reads by key
    alone), which the store then skips: the contract's
    ``test_expired_session_is_never_served`` runs that on every store."""
    backend.save("session:old", b"x", time.time() - 1)
    backend.save(KEY_A, b"y", later())

    def expired() -> bool:
        old = backend.load("session:old")
        return old is None or old.expires < time.time()

    assert expired()
    assert backend.count(time.time()) == 1

    assert backend.touch("session:old", later()) is False
    assert expired()


def test_portable_save_without_upsert(
    backend: SQLAlchemyBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sql_schema, "UPSERTS", {})
    backend.save("session:a", b"one", later())
    backend.save("session:a", b"two", later())
    assert backend.load("session:a") == (b"two", pytest.approx(later(), abs=5))


#: Prefixes of apps sharing one table; "_" and "%" must not act as wildcards,
#: and one prefix starting another must not make its rows ours.
SHARED_PREFIXES = ["app:", "app:admin:", "a_%:", "ab%:", "a_x:", "APP:"]


@pytest.mark.parametrize("prefix", SHARED_PREFIXES)
def test_count_clear_cleanup_keep_to_the_prefix(
    url: str, make_backend: t.Callable[..., SQLAlchemyBackend], prefix: str
) -> None:
    """Apps sharing a table each see, expire and clear only their own
    rows: exactly their prefix followed by 64 lowercase hex digits."""
    first = make_backend(url=url)
    apps: dict[str, SQLAlchemyBackend] = {}

    for other in SHARED_PREFIXES:
        app = make_backend(engine=first.engine, table=first.table.name)
        app.configure(other)
        apps[other] = app
        for name in ("live", "also live"):
            app.save(storage_key(other, f"{other}{name}"), b"x", later())
        app.save(storage_key(other, f"{other}expired"), b"x", time.time() - 1)

    ours = apps[prefix]
    # Not records of any app: no hex digest, upper case, too long or short.
    digest = hashlib.sha256(b"stray").hexdigest()
    strays = [f"{prefix}stray", prefix + digest.upper(), prefix + digest + "0", prefix + digest[1:]]
    for stray in strays:
        ours.save(stray, b"x", later())
    now = time.time()

    assert ours.count(now) == 2
    assert sum(ours.cleanup(now)) == 1
    assert ours.clear() == 2
    assert ours.count(now) == 0
    for other, app in apps.items():
        if other != prefix:
            assert app.count(now) == 2, other
            assert app.load(storage_key(other, f"{other}expired")) is None
            assert sum(app.cleanup(now)) == 1, other
    assert ours.load(f"{prefix}stray") is not None
    assert ours.load(prefix + digest.upper()) is not None


def test_cleanup_in_batches(backend: SQLAlchemyBackend) -> None:
    now = time.time()
    backend.save(storage_key("session:", "live"), b"x", later())
    past = utc_datetime(now - 10)
    rows = [{"id": f"session:{i:064x}", "data": b"x", "expires": past} for i in range(20_000)]

    with backend.engine.begin() as conn:
        conn.execute(backend.table.insert(), rows)

    batches = list(backend.cleanup(now))
    assert sum(batches) == 20_000
    assert batches == [sql_module.CLEANUP_BATCH] * (20_000 // sql_module.CLEANUP_BATCH)
    assert backend.count(now) == 1


def test_lock_commits_or_rolls_back_as_one_transaction(backend: SQLAlchemyBackend) -> None:
    backend.save("session:a", b"old", later())

    with pytest.raises(ZeroDivisionError), backend.lock("session:a"):
        backend.save("session:a", b"new", later())
        assert backend.load("session:a") == (b"new", pytest.approx(later(), abs=5))
        1 / 0  # noqa: B018

    assert backend.load("session:a") == (b"old", pytest.approx(later(), abs=5))

    with backend.lock("session:a"):
        with backend.lock("session:b"):  # re-entered: joins the transaction
            backend.save("session:b", b"b", later())
        assert backend.delete("session:a")

    assert backend.load("session:a") is None
    assert backend.load("session:b") is not None


def test_lock_wait_is_bounded(
    url: str, make_backend: t.Callable[..., SQLAlchemyBackend], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sql_schema, "LOCK_TIMEOUT", 1)
    backend = make_backend(url=url)
    held = threading.Event()
    release = threading.Event()

    def hold() -> None:
        with backend.lock("session:a"):
            held.set()
            release.wait(10)

    thread = threading.Thread(target=hold)
    thread.start()

    try:
        assert held.wait(10)
        start = time.monotonic()

        with pytest.raises(backend.unavailable_errors), backend.lock("session:a"):
            pass

        assert time.monotonic() - start < 5
    finally:
        release.set()
        thread.join()

    with backend.lock("session:a"):
        backend.save("session:a", b"x", later())


def test_postgres_locks_each_key_apart(
    postgres_url: str, make_backend: t.Callable[..., SQLAlchemyBackend]
) -> None:
    backend = make_backend(url=postgres_url)
    done = threading.Event()

    def lock_b() -> None:
        with backend.lock("session:b"):
            backend.save("session:b", b"b", later())
        done.set()

    with backend.lock("session:a"):
        other = threading.Thread(target=lock_b)
        other.start()
        assert done.wait(5)
        other.join()


def increment(backend: SQLAlchemyBackend, times: int) -> None:
    """Add one to a counter under ``lock()``, ``times`` times."""
    for _ in range(times):
        with backend.lock("counter"):
            record = backend.load("counter")
            value = int(record.data) if record else 0
            time.sleep(0.001)
            backend.save("counter", str(value + 1).encode(), later())


def test_postgres_row_lock_fallback(
    postgres_url: str,
    make_backend: t.Callable[..., SQLAlchemyBackend],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sql_schema, "LOCKS", {})
    monkeypatch.setattr(sql_schema, "UPSERTS", {})
    backend = make_backend(url=postgres_url)
    backend.save("counter", b"0", later())  # a row lock needs a row
    threads = [threading.Thread(target=increment, args=(backend, 25)) for _ in range(2)]

    for thread in threads:
        thread.start()

    for thread in threads:
        thread.join()

    assert backend.load("counter") == (b"50", pytest.approx(later(), abs=5))


def run_counter_workers(url: str, table: str, processes: int, times: int) -> None:
    """Run :data:`COUNTER_WORKER` in overlapping processes."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [sys.executable, "-c", COUNTER_WORKER, url, table, str(times)]
    workers = [
        subprocess.Popen(args, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for _ in range(processes)
    ]

    for worker in workers:
        assert worker.stdout is not None and worker.stdout.readline() == "ready\n"

    for worker in workers:
        assert worker.stdin is not None
        worker.stdin.write("go\n")
        worker.stdin.flush()

    for worker in workers:
        worker.communicate(timeout=60)
        assert worker.returncode == 0


def test_lock_excludes_other_processes(
    url: str, make_backend: t.Callable[..., SQLAlchemyBackend]
) -> None:
    backend = make_backend(url=url)
    run_counter_workers(url, backend.table.name, 2, 50)  # they race to create the table
    assert backend.load("counter") == (b"100", pytest.approx(later(), abs=5))


def test_create_table_false(
    tmp_path: pathlib.Path, make_backend: t.Callable[..., SQLAlchemyBackend]
) -> None:
    backend = make_backend(url=sqlite_url(tmp_path), table="sessions", create_table=False)

    with pytest.raises(RuntimeError, match="'sessions' does not exist") as info:
        backend.load("session:a")

    assert "make_table" in str(info.value)
    assert "SESSION_SQLALCHEMY_CREATE_TABLE" in str(info.value)
    assert not sa.inspect(backend.engine).has_table("sessions")

    metadata = sa.MetaData()
    make_table("sessions", metadata)
    metadata.create_all(backend.engine)  # as a migration would
    backend.save("session:a", b"x", later())
    assert backend.load("session:a") is not None


def test_create_table_creates_the_expiry_index(backend: SQLAlchemyBackend) -> None:
    backend.count(time.time())
    indexes = sa.inspect(backend.engine).get_indexes(backend.table.name)
    assert [index["column_names"] for index in indexes] == [["expires"]]


def test_two_backends_on_one_table(
    url: str, make_backend: t.Callable[..., SQLAlchemyBackend]
) -> None:
    first = make_backend(url=url)
    second = make_backend(engine=first.engine, table=first.table.name)
    first.save("session:a", b"x", later())
    assert second.load("session:a") is not None


def test_sqlite_file_is_private_and_in_wal_mode(
    tmp_path: pathlib.Path, make_backend: t.Callable[..., SQLAlchemyBackend]
) -> None:
    directory = tmp_path / "new" / "dir"
    backend = make_backend(url=sqlite_url(directory))
    assert not directory.exists()  # nothing happens before first use

    backend.save("session:a", b"x", later())

    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    for name in ("sessions.sqlite3", "sessions.sqlite3-wal"):
        assert stat.S_IMODE((directory / name).stat().st_mode) == 0o600

    with backend.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:"])
def test_in_memory_sqlite_is_refused(url: str) -> None:
    with pytest.raises(ValueError, match="in memory"):
        SQLAlchemyBackend(url=url)


def test_engine_or_url() -> None:
    with pytest.raises(TypeError, match="exactly one"):
        SQLAlchemyBackend()

    with pytest.raises(TypeError, match="exactly one"):
        SQLAlchemyBackend(engine=sa.create_engine("sqlite:///x"), url="sqlite:///x")


def pg_url(server: Server, **parts: t.Any) -> str:
    return sa.make_url(server.url).set(**parts).render_as_string(False)


def pg_url_with(url: str, **query: str) -> str:
    return sa.make_url(url).update_query_dict(query).render_as_string(False)


@pytest.mark.parametrize(
    "parts",
    [{"port": "free"}, {"password": "wrong"}, {"database": "missing"}],
    ids=["closed port", "wrong password", "missing database"],
)
def test_unreachable_database(
    stoppable_postgres: Server,
    parts: dict[str, t.Any],
    make_backend: t.Callable[..., SQLAlchemyBackend],
) -> None:
    if parts.get("port") == "free":
        parts["port"] = free_port()

    start = time.monotonic()
    backend = make_backend(url=pg_url(stoppable_postgres, **parts), create_table=False)

    with pytest.raises(backend.unavailable_errors):
        backend.load("session:a")

    with pytest.raises(backend.unavailable_errors), backend.lock("session:a"):
        pass

    assert time.monotonic() - start < 5


def test_outage_and_recovery(
    stoppable_postgres: Server, make_backend: t.Callable[..., SQLAlchemyBackend]
) -> None:
    backend = make_backend(url=stoppable_postgres.url)
    backend.save("session:a", b"kept", later())
    stoppable_postgres.stop()

    try:
        fresh = make_backend(url=stoppable_postgres.url)  # an app started while down

        for call in (
            lambda: backend.load("session:a"),
            lambda: backend.save("session:a", b"lost", later()),
            lambda: backend.count(time.time()),
            lambda: fresh.load("session:a"),
        ):
            with pytest.raises(backend.unavailable_errors):
                call()
    finally:
        stoppable_postgres.start_again()

    # The pool's connections died with the server: new ones replace them.
    assert backend.load("session:a") == (b"kept", pytest.approx(later(), abs=5))
    fresh.save("session:a", b"x", later())  # creates its table now
    assert fresh.load("session:a") is not None


def fill_pool(engine: sa.Engine, connections: int = 3) -> None:
    """Leave ``connections`` open connections in the engine's pool."""
    with contextlib.ExitStack() as stack:
        for _ in range(connections):
            stack.enter_context(engine.connect()).exec_driver_sql("SELECT 1")


@pytest.mark.parametrize("engine", ["ours", "passed in"])
def test_restart_between_requests_costs_no_failure(
    engine: str,
    stoppable_postgres: Server,
    make_backend: t.Callable[..., SQLAlchemyBackend],
) -> None:
    """Nothing uses the pool while the server restarts: its connections are
    dead, and the first statement after the restart, whichever it is, runs
    again on a new connection (no pre-ping, even on an engine passed in)."""
    url = stoppable_postgres.url

    if engine == "ours":
        backend = make_backend(url=url)
    else:
        backend = make_backend(engine=sa.create_engine(url))

    backend.save(KEY_A, b"kept", later())
    calls: list[t.Callable[[], object]] = [
        lambda: backend.load(KEY_A),
        lambda: backend.replace(KEY_A, b"kept", b"kept", later()),
        lambda: backend.save(KEY_B, b"b", later()),
        lambda: backend.touch(KEY_A, later(120)),
        lambda: backend.count(time.time()),
    ]

    def locked_write() -> None:
        with backend.lock(KEY_A):
            record = backend.load(KEY_A)
            assert record is not None and record.data == b"kept"
            backend.save(KEY_A, b"kept", later())

    calls.append(locked_write)

    for call in calls:
        fill_pool(backend.engine)
        stoppable_postgres.stop()
        stoppable_postgres.start_again()
        call()

    assert backend.load(KEY_A) == (b"kept", pytest.approx(later(), abs=5))
    assert backend.count(time.time()) == 2


def terminate_connections(engine: sa.Engine, application_name: str) -> None:
    """Terminate the server processes of ``application_name``'s connections."""
    with engine.connect() as conn:
        conn.execute(
            sa.text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = :name"
            ),
            {"name": application_name},
        )


def open_transactions(engine: sa.Engine) -> list[tuple[str, int]]:
    """Connections inside a transaction, and advisory locks held."""
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT state, 0 FROM pg_stat_activity WHERE state LIKE 'idle in%'"
                " UNION ALL SELECT locktype, objid::int FROM pg_locks"
                " WHERE locktype = 'advisory'"
            )
        )
        return [tuple(row) for row in rows]


def test_connection_lost_inside_a_lock(
    postgres_url: str, make_backend: t.Callable[..., SQLAlchemyBackend]
) -> None:
    """A statement inside the section is never run again on a new connection:
    the section fails, nothing of it is committed, the lock is free."""
    name = unique_table()
    backend = make_backend(url=pg_url_with(postgres_url, application_name=name))
    admin = sa.create_engine(postgres_url)
    backend.save("session:a", b"old", later())

    try:
        with pytest.raises(backend.unavailable_errors), backend.lock("session:a"):
            assert backend.load("session:a") is not None
            terminate_connections(admin, name)
            backend.save("session:a", b"new", later())
            backend.delete("session:b")

        assert backend.load("session:a") == (b"old", pytest.approx(later(), abs=5))
        assert open_transactions(admin) == []

        with backend.lock("session:a"):
            backend.save("session:a", b"new", later())

        assert backend.load("session:a") == (b"new", pytest.approx(later(), abs=5))
    finally:
        admin.dispose()


def test_failed_commit_leaves_no_transaction_behind(
    postgres_url: str, make_backend: t.Callable[..., SQLAlchemyBackend]
) -> None:
    """A save that the database refuses (here, a key longer than the column)
    fails the section, which rolls back; no pooled connection stays inside a
    transaction holding the lock."""
    backend = make_backend(url=postgres_url)
    admin = sa.create_engine(postgres_url)
    backend.save("session:a", b"old", later())

    try:
        with pytest.raises(sa.exc.DataError), backend.lock("session:a"):
            backend.save("session:a", b"new", later())
            backend.save("x" * 201, b"too long a key", later())

        assert backend.load("session:a") == (b"old", pytest.approx(later(), abs=5))
        assert open_transactions(admin) == []

        with backend.lock("session:a"):
            backend.save("session:a", b"new", later())

        assert backend.load("session:a") == (b"new", pytest.approx(later(), abs=5))
    finally:
        admin.dispose()


def record_statements(engine: sa.Engine) -> list[str]:
    """The statements sent on ``engine`` from now on (one round trip each),
    seen by the driver: the backend runs some on driver connections
    directly. Closes the pool's connections, so that new ones record."""
    statements: list[str] = []

    if engine.dialect.name == "sqlite":

        @sa.event.listens_for(engine, "connect")
        def trace(dbapi_connection: t.Any, record: t.Any) -> None:
            dbapi_connection.set_trace_callback(statements.append)

    else:
        import psycopg2.extensions

        class Recording(psycopg2.extensions.cursor):  # type: ignore[misc]
            def execute(self, sql: str, params: t.Any = None) -> t.Any:
                statements.append(sql)
                return super().execute(sql, params)

        @sa.event.listens_for(engine, "connect")
        def connect(dbapi_connection: t.Any, record: t.Any) -> None:
            dbapi_connection.cursor_factory = Recording

    engine.dispose()
    return statements


def round_trips(statements: list[str]) -> list[str]:
    """What each statement sent does: ``SELECT``, or for a prepared one
    ``EXECUTE flask_serverside_select``, ``PREPARE flask_serverside_select``."""
    shapes = []
    for statement in statements:
        words = statement.replace("(", " ").split()
        prepared = words[0] in ("PREPARE", "EXECUTE")
        # The name ends with a hash of the statement's text.
        name = words[1].rpartition("_")[0] if prepared else ""
        shapes.append(f"{words[0]} {name}" if prepared else words[0])
    return shapes


def test_round_trips(url: str, make_backend: t.Callable[..., SQLAlchemyBackend]) -> None:
    """A read is one SELECT, a replace one UPDATE (on PostgreSQL prepared,
    in the round trip of its first use on a connection); a write under the
    lock (read, then lock, re-read and save, as the store does) is three
    round trips on PostgreSQL, and no isolation level switches."""
    backend = make_backend(url=url)
    backend.save("session:a", b"x", later())
    statements = record_statements(backend.engine)
    backend.count(time.time())  # a new connection's set-up statements
    statements.clear()
    postgres = backend.engine.dialect.name == "postgresql"

    for old, new in ((b"x", b"w"), (b"w", b"v")):
        assert backend.load("session:a") == (old, pytest.approx(later(), abs=5))
        assert backend.replace("session:a", old, new, later()) is True
        if not postgres:
            assert round_trips(statements) == ["SELECT", "UPDATE"]
        elif old == b"x":
            assert round_trips(statements) == [
                "PREPARE flask_serverside_select",
                "PREPARE flask_serverside_replace",
            ]
            assert all("; EXECUTE flask_serverside_" in s for s in statements)
        else:
            assert round_trips(statements) == [
                "EXECUTE flask_serverside_select",
                "EXECUTE flask_serverside_replace",
            ]
        statements.clear()

    statements.clear()
    backend.load("session:a")

    with backend.lock("session:a"):
        assert backend.load("session:a") is not None
        backend.save("session:a", b"y", later())

    if backend.engine.dialect.name == "postgresql":
        assert len(statements) == 3, statements
        assert statements[1].startswith("BEGIN ISOLATION LEVEL READ COMMITTED;")
        assert statements[2].endswith("; COMMIT")
    else:
        assert [s.split()[0] for s in statements] == [
            "SELECT",
            "BEGIN",
            "SELECT",
            "INSERT",
            "COMMIT",
        ]
        assert statements[1] == "BEGIN IMMEDIATE"

    assert backend.load("session:a") == (b"y", pytest.approx(later(), abs=5))


def test_sqlite_reads_and_replaces_on_the_driver_connection(
    tmp_path: pathlib.Path, make_backend: t.Callable[..., SQLAlchemyBackend]
) -> None:
    """On SQLite, as on PostgreSQL, a read and a replace run on a pooled
    driver connection, without SQLAlchemy's execution layer: one SELECT by
    key (an expired row comes back with its expiry, which the store checks)
    and one UPDATE, which checks the expiry and the expected data in SQL;
    both agree with the rows SQLAlchemy writes to the microsecond."""
    backend = make_backend(url=sqlite_url(tmp_path))
    expires = round(later(), 6)
    backend.save("session:a", b"x", expires)
    backend.save("session:old", b"x", time.time() - 1)
    sent = record_statements(backend.engine)
    executed: list[str] = []
    sa.event.listen(
        backend.engine, "before_cursor_execute", lambda *args: executed.append(args[2])
    )
    backend.count(time.time())  # a new connection's set-up statements
    sent.clear()
    executed.clear()

    assert backend.load("session:a") == (b"x", pytest.approx(expires, abs=1e-6))
    old = backend.load("session:old")
    assert old is not None and old.expires < time.time()
    assert backend.replace("session:a", b"x", b"y", expires + 1) is True
    assert backend.replace("session:a", b"x", b"z", expires + 2) is False
    assert backend.replace("session:old", b"x", b"z", expires + 2) is False
    assert backend.load("session:a") == (b"y", pytest.approx(expires + 1, abs=1e-6))
    assert executed == []

    # The text of the expiry written there is SQLAlchemy's.
    with backend.engine.connect() as conn:
        column = backend.table.c.expires
        written = conn.scalar(sa.select(column).where(backend.table.c.id == "session:a"))
        assert conn.scalar(sa.select(sa.func.count()).where(column > utc_datetime(expires))) == 1
    assert written == utc_datetime(expires + 1).replace(tzinfo=None)
    assert [s.split()[0] for s in sent[:6]] == ["SELECT"] * 2 + ["UPDATE"] * 3 + ["SELECT"]


@pytest.mark.parametrize("gevent", [False, True], ids=["busy handler", "polled"])
def test_sqlite_replace_waits_for_the_write_lock(
    gevent: bool,
    tmp_path: pathlib.Path,
    make_backend: t.Callable[..., SQLAlchemyBackend],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A replace waits while a section holds SQLite's write lock, in
    SQLite's busy handler or (under gevent) in Python, then runs; after the
    lock's timeout it fails with one of the backend's unavailable errors,
    which the extension answers with a 503."""
    monkeypatch.setattr(sql_engine, "gevent_patched", lambda: gevent)
    monkeypatch.setattr(sql_sections, "gevent_patched", lambda: gevent)
    backend = make_backend(url=sqlite_url(tmp_path))
    backend.save(KEY_A, b"x", later())
    held = threading.Event()
    release = threading.Event()

    def hold(seconds: float) -> None:
        with backend.lock(KEY_B):
            backend.save(KEY_B, b"b", later())
            held.set()
            if seconds:
                time.sleep(seconds)
            else:
                release.wait(20)

    thread = threading.Thread(target=hold, args=(0.3,))
    thread.start()
    try:
        assert held.wait(10)
        assert backend.replace(KEY_A, b"x", b"y", later()) is True
    finally:
        thread.join()

    monkeypatch.setattr(sql_sections, "LOCK_TIMEOUT", 0.2)
    impatient = make_backend(url=sqlite_url(tmp_path) + ("" if gevent else "?timeout=0.2"))
    impatient.table = backend.table
    held.clear()
    thread = threading.Thread(target=hold, args=(0,))
    thread.start()
    try:
        assert held.wait(10)
        with pytest.raises(backend.unavailable_errors, match="database is locked"):
            impatient.replace(KEY_A, b"y", b"z", later())
    finally:
        release.set()
        thread.join()

    assert backend.load(KEY_A) == (b"y", pytest.approx(later(), abs=5))


def test_prepared_statements_lost_by_a_pooler(
    postgres_url: str, make_backend: t.Callable[..., SQLAlchemyBackend]
) -> None:
    """Behind a pooler in transaction mode, a statement prepared on one
    server connection is missing on the next: the read still answers, and
    the backend stops preparing."""
    backend = make_backend(url=postgres_url)
    backend.save("session:a", b"x", later())
    assert backend.load("session:a") is not None  # prepared on the connection
    conn = backend.engine.raw_connection()
    conn.cursor().execute("DEALLOCATE ALL")
    conn.close()
    assert backend.load("session:a") == (b"x", pytest.approx(later(), abs=5))
    statements = record_statements(backend.engine)
    backend.count(time.time())
    statements.clear()
    assert backend.replace("session:a", b"x", b"y", later()) is True
    assert backend.load("session:a") == (b"y", pytest.approx(later(), abs=5))
    assert round_trips(statements) == ["UPDATE", "SELECT"]


def test_driver_error_is_raised_once(
    postgres_url: str, make_backend: t.Callable[..., SQLAlchemyBackend]
) -> None:
    """An error that is not a dead connection (here the server's statement
    timeout, while another transaction holds the row) is raised as
    SQLAlchemy's error, without running the statement again."""
    backend = make_backend(url=postgres_url + "?options=-c%20statement_timeout%3D200")
    backend.save("session:a", b"x", later())
    statements = record_statements(backend.engine)
    backend.count(time.time())
    statements.clear()
    other = sa.create_engine(postgres_url)
    try:
        with other.begin() as conn:
            conn.execute(backend.table.select().with_for_update())
            with pytest.raises(sa.exc.OperationalError, match="statement timeout"):
                backend.replace("session:a", b"x", b"y", later())
    finally:
        other.dispose()
    assert round_trips(statements) == ["PREPARE flask_serverside_replace"]
    assert backend.load("session:a") == (b"x", pytest.approx(later(), abs=5))


def test_locked_load_sees_the_previous_holders_commit(
    url: str, make_backend: t.Callable[..., SQLAlchemyBackend]
) -> None:
    """The row read with the lock is read after the lock is taken; it only
    answers a load of that key that comes first in the section."""
    backend = make_backend(url=url)
    backend.save("session:a", b"old", later())
    held = threading.Event()

    def write_late() -> None:
        with backend.lock("session:a"):
            held.set()
            time.sleep(0.3)
            backend.save("session:a", b"new", later())

    thread = threading.Thread(target=write_late)
    thread.start()

    try:
        assert held.wait(10)

        with backend.lock("session:a"):  # waits for write_late to commit
            assert backend.load("session:b") is None
            assert backend.load("session:a") == (b"new", pytest.approx(later(), abs=5))
            backend.save("session:a", b"mine", later())
            assert backend.load("session:a") == (b"mine", pytest.approx(later(), abs=5))
            backend.delete("session:a")
            assert backend.load("session:a") is None
    finally:
        thread.join()

    assert backend.load("session:a") is None


def test_flask_sqlalchemy_session_is_left_alone(
    postgres_url: str, make_backend: t.Callable[..., SQLAlchemyBackend]
) -> None:
    from flask_sqlalchemy import SQLAlchemy

    app = Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = postgres_url
    db = SQLAlchemy(app)
    notes = unique_table()

    class Note(db.Model):  # type: ignore[name-defined,misc]
        __tablename__ = notes
        id = sa.Column(sa.Integer, primary_key=True)

    with app.app_context():
        db.create_all()
        backend = make_backend(engine=db.engine)
        db.session.add(Note(id=1))
        db.session.flush()  # the ORM transaction is open, with a write

        with backend.lock("session:a"):
            backend.save("session:a", b"x", later())

        assert db.session().in_transaction()
        db.session.rollback()

        assert db.session.scalar(sa.select(sa.func.count()).select_from(Note)) == 0
        assert backend.load("session:a") is not None
        db.session.remove()
        db.drop_all()


@pytest.mark.parametrize("url", ["postgresql+psycopg2://", "postgresql+psycopg://", "sqlite://"])
def test_fast_path_read_binds_the_key_alone(url: str) -> None:
    """The read every request runs binds no time: an expired row is left to
    the store to skip, as the filesystem's records are (on SQLite, binding
    the time cost about a quarter of the read)."""
    dialect = sa.create_engine(url).dialect
    sql = sql_schema.Statements(make_table("sessions", sa.MetaData()), dialect, own_engine=True)
    select = sql.driver_select
    if isinstance(select, sql_schema.DriverStatement):
        assert select.order == ("key",) and "expires >" not in select.plain
    else:
        assert select is not None and [name for name, _ in select.params] == ["key"]
    assert "expires >" in str(sql.select) and "expires >" in str(sql.replace)


def test_prepared_statement_names_determine_their_text() -> None:
    """Two tables never share a prepared statement's name: behind a pooler,
    a name another client prepared must stand for the same text."""
    dialect = sa.create_engine("postgresql+psycopg2://").dialect

    def names(table: str) -> tuple[str, str]:
        sql = sql_schema.Statements(make_table(table, sa.MetaData()), dialect, own_engine=True)
        assert sql.driver_select is not None and sql.driver_replace is not None
        return sql.driver_select.name, sql.driver_replace.name

    assert names("sessions") == names("sessions")
    assert set(names("sessions")).isdisjoint(names("other_sessions"))
    assert all(len(name) < 64 for name in names("sessions"))  # PostgreSQL's limit


def prepared_statements(backend: SQLAlchemyBackend) -> list[str]:
    """The names of the statements prepared on the pool's connection (the
    one a single thread gets back), without their hash."""
    conn = backend.engine.raw_connection()
    try:
        cursor = conn.cursor()
        cursor.execute("SELECT name FROM pg_prepared_statements ORDER BY name")
        names = [str(row[0]) for row in cursor.fetchall()]
        cursor.close()
    finally:
        conn.close()
    return [name.rpartition("_")[0] if name.startswith("flask_") else name for name in names]


@pytest.fixture
def psycopg_url(postgres_url: str) -> str:
    return postgres_url.replace("+psycopg2://", "+psycopg://", 1)


def test_psycopg3_reads_and_replaces_prepared(
    psycopg_url: str, make_backend: t.Callable[..., SQLAlchemyBackend]
) -> None:
    """On psycopg 3, a read and a replace run as statements prepared under
    the names of their text, as on psycopg2; nothing else is prepared:
    psycopg 3's automatic ones (``_pg3_0``, ...) break behind PgBouncer."""
    backend = make_backend(url=psycopg_url)
    backend.save("session:a", b"x", later())
    for _ in range(6):  # more runs than psycopg 3 waits for to prepare
        assert backend.touch("session:a", later()) is True
        assert backend.load("session:a") == (b"x", pytest.approx(later(), abs=5))
    assert backend.replace("session:a", b"x", b"y", later()) is True
    assert backend.replace("session:a", b"x", b"z", later()) is False
    assert backend.load("session:a") == (b"y", pytest.approx(later(), abs=5))
    assert prepared_statements(backend) == [
        "flask_serverside_replace",
        "flask_serverside_select",
    ]


def test_psycopg3_prepared_statements_lost_by_a_pooler(
    psycopg_url: str, make_backend: t.Callable[..., SQLAlchemyBackend]
) -> None:
    """As on psycopg2: a lost prepared statement costs no failed request,
    and the backend stops preparing."""
    backend = make_backend(url=psycopg_url)
    backend.save("session:a", b"x", later())
    assert backend.load("session:a") is not None
    conn = backend.engine.raw_connection()
    conn.cursor().execute("DEALLOCATE ALL")
    conn.close()
    assert backend.load("session:a") == (b"x", pytest.approx(later(), abs=5))
    assert backend.replace("session:a", b"x", b"y", later()) is True
    assert backend.load("session:a") == (b"y", pytest.approx(later(), abs=5))
    assert prepared_statements(backend) == []


@pytest.mark.parametrize(("query", "threshold"), [("5", 5), ("0", 0), ("none", None), ("", None)])
def test_psycopg3_url_sets_prepare_threshold(
    psycopg_url: str, query: str, threshold: int | None
) -> None:
    """``prepare_threshold`` in the URL reaches psycopg 3 as the number (or
    ``None``) it stands for, not as the string libpq would reject."""
    backend = SQLAlchemyBackend(url=pg_url_with(psycopg_url, prepare_threshold=query))
    conn = backend.engine.raw_connection()
    try:
        assert conn.driver_connection.prepare_threshold == threshold
    finally:
        conn.close()
        backend.engine.dispose()


@pytest.mark.parametrize("query", ["-1", "five", "1.5", "\u00b2", "NONE"])
def test_psycopg3_url_rejects_a_bad_prepare_threshold(psycopg_url: str, query: str) -> None:
    with pytest.raises(ValueError, match="prepare_threshold=.* number of runs"):
        SQLAlchemyBackend(url=pg_url_with(psycopg_url, prepare_threshold=query))


def test_psycopg3_url_rejects_a_repeated_prepare_threshold(psycopg_url: str) -> None:
    url = sa.make_url(psycopg_url).update_query_dict({"prepare_threshold": ["5", "6"]})
    with pytest.raises(ValueError, match=r"prepare_threshold=\('5', '6'\)"):
        SQLAlchemyBackend(url=url.render_as_string(False))


def test_prepare_threshold_is_refused_on_other_drivers(postgres_url: str) -> None:
    """psycopg2 would refuse the option on every connection (an invalid DSN,
    a 500 per request): it is refused when the app starts instead."""
    with pytest.raises(ValueError, match="prepare_threshold is an option of psycopg 3"):
        SQLAlchemyBackend(url=pg_url_with(postgres_url, prepare_threshold="5"))


def test_psycopg3_prepares_at_the_protocol_level_when_the_url_allows(
    psycopg_url: str, make_backend: t.Callable[..., SQLAlchemyBackend]
) -> None:
    """With ``prepare_threshold`` set in the URL (no pooler that loses
    protocol-level prepared statements), the read and the replace are
    prepared by psycopg 3 itself, which binds their parameters on the server:
    no ``PREPARE`` of the backend's own."""
    backend = make_backend(url=pg_url_with(psycopg_url, prepare_threshold="5"))
    backend.save("session:a", b"x", later())
    assert backend.load("session:a") == (b"x", pytest.approx(later(), abs=5))
    assert backend.load("session:missing") is None
    assert backend.replace("session:a", b"x", b"y", later()) is True
    assert backend.replace("session:a", b"x", b"z", later()) is False
    assert backend.replace("session:missing", b"x", b"z", later()) is False
    assert backend.load("session:a") == (b"y", pytest.approx(later(), abs=5))
    names = prepared_statements(backend)
    assert names and all(name.startswith("_pg3_") for name in names)


@pytest.mark.parametrize("expires", ["garbage", "0000-garbage", "2099-13-45 99:99:99"])
def test_sqlite_row_with_an_unreadable_expiry_is_no_record(
    tmp_path: pathlib.Path,
    make_backend: t.Callable[..., SQLAlchemyBackend],
    caplog: pytest.LogCaptureFixture,
    expires: str,
) -> None:
    """SQLite keeps any text in the expiry column; a row written there by
    hand with text that is no time reads as no record (the store's session
    is then missing, as with a corrupt record), with a warning, not a 500."""
    backend = make_backend(url=sqlite_url(tmp_path))
    backend.save("session:a", b"x", later())
    with backend.engine.begin() as conn:
        conn.execute(
            sa.update(backend.table).values(expires=sa.literal_column(f"'{expires}'"))
        )
    with caplog.at_level(logging.WARNING, "flask_serverside"):
        assert backend.load("session:a") is None
        with backend.lock("session:a"):
            assert backend.load("session:a") is None
    assert any("cannot be read" in r.getMessage() for r in caplog.records)
