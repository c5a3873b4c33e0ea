"""PostgreSQL restarted behind PgBouncer (transaction mode) in the middle of
traffic, on psycopg2 and psycopg 3.

Client threads each increment a counter in their own session, another one
reads, another requests a page without the session, while PostgreSQL stops
and starts again behind a PgBouncer of this module's own, whose queries
wait at most :data:`QUERY_WAIT_TIMEOUT` for a server connection. No request fails
with anything but 503, every session request during the outage gets one,
the app recovers within :data:`RECOVERY_BOUND` seconds of PostgreSQL
accepting connections again, and every increment acknowledged with a 200 is
still stored afterwards, in the same session.
"""

from __future__ import annotations

import time
import typing as t
import uuid
from collections import Counter
from collections.abc import Iterator

import pytest
from flask import Flask

from tests.conftest import start_server
from tests.reliability.figures import fact_max
from tests.reliability.figures import record
from tests.reliability.test_outages import Call
from tests.reliability.test_outages import make_app
from tests.reliability.test_outages import Outage
from tests.reliability.test_outages import Traffic
from tests.servers import pgbouncer
from tests.servers.pgbouncer import PgBouncerServer
from tests.servers.postgres import PostgresServer
from tests.test_deployments import dispose_engines  # noqa: F401 (closes psycopg 3's connections)

#: PgBouncer's ``query_wait_timeout``: how long a query waits for a server
#: connection (PgBouncer's default, 120 s, would hold every request through
#: the outage: that is what ``docs/sqlalchemy.rst`` advises against).
QUERY_WAIT_TIMEOUT = 1
#: Seconds of traffic before the stop, and with PostgreSQL stopped.
BEFORE, DURING = 0.5, 3.0
#: Seconds after PostgreSQL accepts connections again by which every
#: session request succeeds again (PgBouncer retries a failed server login
#: after ``server_login_retry``, one second in the test set-up).
RECOVERY_BOUND = 15.0
#: Successful requests per writer that show the recovery.
SUCCESSES_AFTER = 5


@pytest.fixture(scope="module")
def bounced(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PgBouncerServer]:
    """PgBouncer in front of a PostgreSQL of this module's own, so that
    stopping it disturbs no other test."""
    postgres = start_server(request, tmp_path_factory.mktemp("restart-postgres"), "postgres")
    try:
        server = pgbouncer.start(
            tmp_path_factory.mktemp("restart-pgbouncer"),
            postgres,
            query_wait_timeout=QUERY_WAIT_TIMEOUT,
        )
        yield server
        server.stop()
    finally:
        postgres.stop()


def _app(tmp_path: t.Any, url: str) -> Flask:
    return make_app(
        tmp_path,
        {
            "SESSION_BACKEND": "sqlalchemy",
            "SESSION_SQLALCHEMY_URL": url + "?connect_timeout=2",
            "SESSION_SQLALCHEMY_TABLE": "r" + uuid.uuid4().hex[:12],
        },
    )


def _recovered(traffic: Traffic, since: float) -> bool:
    """Whether every writer's last :data:`SUCCESSES_AFTER` requests, all
    begun after ``since``, succeeded."""
    for i in range(traffic.writers):
        mine = [c for c in list(traffic.calls) if c.kind == "incr" and c.client == i and c.t1]
        last = mine[-SUCCESSES_AFTER:]
        if len(last) < SUCCESSES_AFTER or any(c.t0 < since or c.status != 200 for c in last):
            return False
    return True


def _recovery_time(calls: list[Call], repaired: float) -> float:
    """Seconds from ``repaired`` to the start of the first session request
    after which no session request failed (infinite if one failed last)."""
    session_calls = sorted(
        (c for c in calls if c.kind in ("incr", "read") and c.t1), key=lambda c: c.t0
    )
    last_failure = max((c.t0 for c in session_calls if c.status != 200), default=repaired)
    first_good = min((c.t0 for c in session_calls if c.t0 > last_failure), default=None)
    return float("inf") if first_good is None else max(0.0, first_good - repaired)


@pytest.mark.parametrize("driver", ["psycopg2", "psycopg"])
def test_postgres_restart_behind_pgbouncer(
    bounced: PgBouncerServer, tmp_path: t.Any, request: pytest.FixtureRequest, driver: str
) -> None:
    postgres = t.cast(PostgresServer, bounced.postgres)
    app = _app(tmp_path, bounced.url if driver == "psycopg2" else bounced.url_psycopg)
    traffic = Traffic(app, writers=4)
    traffic.start()
    try:
        time.sleep(BEFORE)
        w0 = time.monotonic()
        postgres.stop()
        w1 = time.monotonic()
        time.sleep(DURING)
        r0 = time.monotonic()
        postgres.start_again()
        r1 = time.monotonic()
        deadline = r1 + RECOVERY_BOUND
        while not _recovered(traffic, r1) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        traffic.finish()

    name = f"postgres restart behind PgBouncer ({driver})"
    outage = Outage(name, traffic.calls, (w0, w1), (r0, r1))
    statuses = Counter(c.status for c in traffic.calls)
    during = outage.by_phase("outage")
    recovery = _recovery_time(traffic.calls, r1)
    fact_max("outages", "slowest_s", outage.slowest)
    record(
        request,
        "outages",
        f"{outage.name}: statuses {dict(statuses)}; session requests during the outage"
        f" {dict(during)}; recovered {recovery:.2f}s after PostgreSQL was back"
        f" (restart took {r1 - r0:.2f}s); slowest request {outage.slowest:.2f}s",
        **{f"outage_{status}": n for status, n in during.items()},
        untouched_200=outage.by_phase("outage", ("nothing",))[200],
        status_500=sum(n for s, n in statuses.items() if s >= 500 and s != 503),
    )
    assert set(statuses) <= {200, 503}, statuses
    assert set(outage.by_phase("before")) == {200}
    assert set(during) == {503}, during
    assert _recovered(traffic, r1), f"not recovered {RECOVERY_BOUND}s after the restart"
    untouched = Counter(c.status for c in traffic.calls if c.kind == "nothing")
    assert set(untouched) == {200}, "a page that does not use the session failed"
    outage.check_nothing_lost(app, traffic.sids, request)
