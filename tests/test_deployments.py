"""The shared contract on deployments other than the default stores: each
contract class of ``test_contract.py`` and the seam class of
``test_backends.py`` again, on PostgreSQL through
PgBouncer in transaction mode (psycopg2 and psycopg 3) and on PostgreSQL
with psycopg 3 directly (preparing statements itself, as the URL allows,
or not).

These are not in ``conftest.BACKENDS``, so every other test does not run
four more times; the names and their URLs are in
``conftest.POSTGRES_VARIANTS``.
"""

from __future__ import annotations

import contextlib
import pathlib
import typing as t
import uuid
from collections.abc import Iterator

import psycopg2
import pytest
import sqlalchemy as sa
from flask import Flask

from tests import test_contract as contract
from tests.conftest import build_app
from tests.servers import pgbouncer
from tests.servers.pgbouncer import PgBouncerServer
from tests.servers.postgres import PASSWORD
from tests.servers.postgres import PostgresServer
from tests.test_backends import TestSeam
from tests.test_contract import client  # noqa: F401 (fixtures of the classes)
from tests.test_contract import recorded  # noqa: F401

#: The store names this module runs the contract on.
DEPLOYMENTS = [
    "postgres-psycopg",
    "postgres-psycopg-prepared",
    "pgbouncer-psycopg2",
    "pgbouncer-psycopg",
]


@pytest.fixture(params=DEPLOYMENTS)
def backend_name(request: pytest.FixtureRequest) -> str:
    return t.cast(str, request.param)


@pytest.fixture(autouse=True)
def dispose_engines() -> Iterator[None]:
    """Close the pooled connections of every engine the test used.

    Each test builds its own apps, and with them engines, then drops them;
    psycopg 3 warns about a connection collected while open (an error here),
    and the GC does that during a later test. A real app keeps its engine.
    Only connections back in their pool are closed: one that the backend
    lost without closing it still warns.
    """
    engines: set[sa.Engine] = set()

    def note(conn: sa.Connection) -> None:
        engines.add(conn.engine)

    sa.event.listen(sa.Engine, "engine_connect", note)
    yield
    sa.event.remove(sa.Engine, "engine_connect", note)
    for engine in engines:
        engine.dispose()


class TestContractDeployed(contract.TestContract):
    pass


class TestSeamDeployed(TestSeam):
    pass


class TestConcurrencyDeployed(contract.TestConcurrency):
    pass


# The prepared-statement path through PgBouncer in transaction mode, where
# consecutive statements of one client connection can run on different
# server connections, each with the statements other clients prepared.


@pytest.fixture
def private_pgbouncer(
    postgres_server: PostgresServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PgBouncerServer]:
    """A PgBouncer of this test's own, so its server connections hold only
    the statements this test prepared."""
    server = pgbouncer.start(tmp_path_factory.mktemp("pgbouncer"), postgres_server)
    yield server
    server.stop()


def _sql_app(tmp_path: pathlib.Path, url: str) -> Flask:
    table = "t" + uuid.uuid4().hex[:12]
    config = {
        "SESSION_BACKEND": "sqlalchemy",
        "SESSION_SQLALCHEMY_URL": url,
        "SESSION_SQLALCHEMY_TABLE": table,
    }
    return build_app(tmp_path / table, config, count=False)


def _rows(server: PgBouncerServer, app: Flask) -> int:
    """The number of rows in ``app``'s table, read on PostgreSQL directly."""
    assert server.postgres is not None
    table = app.config["SESSION_SQLALCHEMY_TABLE"]
    conn = psycopg2.connect(
        host="127.0.0.1",
        port=server.postgres.port,
        user="postgres",
        password=PASSWORD,
        dbname="postgres",
    )
    try:
        with conn.cursor() as cursor:
            cursor.execute(f"SELECT count(*) FROM {table}")
            return int(cursor.fetchone()[0])
    finally:
        conn.close()


@contextlib.contextmanager
def _holding_a_server_connection(server: PgBouncerServer) -> Iterator[None]:
    """Hold a transaction open through ``server``: it keeps the server
    connection PgBouncer gives it, the one used last (PgBouncer reuses
    them last in, first out), so other clients get another one."""
    conn = psycopg2.connect(
        host="127.0.0.1", port=server.port, user="postgres", password=PASSWORD, dbname="postgres"
    )
    try:
        with conn.cursor() as cursor:
            cursor.execute("SELECT 1")  # psycopg2 began a transaction
        yield
        conn.rollback()
    finally:
        conn.close()


@pytest.mark.parametrize("driver", ["psycopg2", "psycopg"])
def test_prepared_statements_survive_a_server_connection_switch(
    private_pgbouncer: PgBouncerServer, tmp_path: pathlib.Path, driver: str
) -> None:
    url = private_pgbouncer.url if driver == "psycopg2" else private_pgbouncer.url_psycopg
    browser = _sql_app(tmp_path, url).test_client()
    for i in range(8):  # more runs than psycopg 3 needs to prepare
        browser.get(f"/set/n/{i}")
        assert browser.get("/get/n").json == str(i)
    with _holding_a_server_connection(private_pgbouncer):
        for i in range(8, 12):
            browser.get(f"/set/n/{i}")
            assert browser.get("/get/n").json == str(i)


def test_apps_sharing_a_database_never_run_each_others_statements(
    private_pgbouncer: PgBouncerServer, tmp_path: pathlib.Path
) -> None:
    """Two apps, each with its own table in one database behind PgBouncer
    (psycopg2): a statement one prepared on a server connection is not run
    for the other."""
    first_app = _sql_app(tmp_path, private_pgbouncer.url)
    second_app = _sql_app(tmp_path, private_pgbouncer.url)
    first, second = first_app.test_client(), second_app.test_client()
    for _ in range(3):
        first.get("/set/a/first")
    with _holding_a_server_connection(private_pgbouncer):
        # The second app prepares its statements on another server connection.
        for _ in range(3):
            second.get("/set/a/second")
    # Both records are there, each in its app's table.
    assert _rows(private_pgbouncer, first_app) == 1
    assert _rows(private_pgbouncer, second_app) == 1
    # Now the server connection with the first app's statements is the one
    # used last, and the second app's next statements run there.
    assert second.get("/get/a").json == "second"
    assert first.get("/get/a").json == "first"
