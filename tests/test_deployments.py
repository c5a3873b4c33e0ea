"""The shared contract on deployments other than the default stores: each
contract class of ``test_contract.py`` again, on PostgreSQL through
PgBouncer in transaction mode (psycopg2 and psycopg 3) and on PostgreSQL
with psycopg 3 directly.

These are not in ``conftest.BACKENDS``, so every other test does not run
three more times; the names and their URLs are in
``conftest.POSTGRES_VARIANTS``.
"""

from __future__ import annotations

import typing as t
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from tests import test_contract as contract
from tests.test_contract import client  # noqa: F401 (fixtures of the classes)
from tests.test_contract import recorded  # noqa: F401

#: The store names this module runs the contract on.
DEPLOYMENTS = ["postgres-psycopg", "pgbouncer-psycopg2", "pgbouncer-psycopg"]


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


class TestReplaceDeployed(contract.TestReplace):
    pass


class TestConcurrencyDeployed(contract.TestConcurrency):
    pass
