"""Failover of a Redis Cluster primary and of a Sentinel-managed primary
under load.

Client threads, each with a session of its own, keep incrementing a counter
in their session and note every value acknowledged with a 200. Then a
primary goes: on the cluster, the one serving some of the sessions' slots is
killed (``SIGKILL``) until its replica takes over; under Sentinel,
``SENTINEL FAILOVER`` promotes the replica, then the old primary is killed.

What must hold: no 500, never a silent new session ("logged out"), only 503s
until the new primary serves, then 200s again. What is measured, and
printed: how many 503s, how long until every session was served again, and
how many acknowledged increments the new primary did not have
(asynchronous replication may lose the last writes before a failover).

Each test runs on servers of its own (the shared ones stay intact) and is
bounded: every wait has a limit.
"""

from __future__ import annotations

import threading
import time
import typing as t
import uuid
from collections import Counter
from dataclasses import dataclass
from dataclasses import field

import pytest
from flask import Flask
from flask import jsonify
from flask import session

from tests.conftest import build_app
from tests.conftest import start_server
from tests.reliability.figures import record
from tests.servers.redis_cluster import RedisCluster
from tests.servers.redis_sentinel import RedisSentinel

#: Client threads, each with its own session.
THREADS = 6
#: Acknowledged increments each thread makes before, and again after, the
#: failover.
STEADY = 20
#: Seconds any phase may take at most (the set-ups fail over within a few).
LIMIT = 45.0


def failover_app(tmp_path: t.Any, url: str) -> Flask:
    """An app on ``url`` with real error statuses (not testing mode), whose
    ``/incr`` adds one to the session's counter and answers it and the ID."""
    config = {
        "SESSION_BACKEND": "cachelib",
        "SESSION_CACHELIB": url,
        "SESSION_KEY_PREFIX": f"f{uuid.uuid4().hex[:10]}:",
        "TESTING": False,
    }
    app = build_app(tmp_path, config, count=False)

    @app.get("/incr")
    def incr() -> t.Any:
        value = session.get("n", 0) + 1
        session["n"] = value
        return jsonify(n=value, sid=session.sid)  # type: ignore[attr-defined]

    return app


@dataclass
class Client:
    """One thread's session and what it saw."""

    app: Flask
    sid: str = ""
    acked: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    #: Responses that carried another session than the thread's own.
    logged_out: int = 0
    #: Acknowledged increments a later response did not build on.
    lost: int = 0
    #: Acknowledged increments since :attr:`mark` was last set.
    since_mark: int = 0
    last_failure: float = 0.0

    def request(self, client: t.Any) -> None:
        response = client.get("/incr")
        self.statuses[response.status_code] += 1
        if response.status_code != 200:
            self.last_failure = time.monotonic()
            return
        body = response.get_json()
        if self.sid and body["sid"] != self.sid:
            self.logged_out += 1
        self.sid = body["sid"]
        if body["n"] <= self.acked:
            self.lost += self.acked - body["n"] + 1
        self.acked = body["n"]
        self.since_mark += 1


class Load:
    """Threads that each keep incrementing their own session's counter."""

    def __init__(self, app: Flask) -> None:
        self.app = app
        self.clients = [Client(app) for _ in range(THREADS)]
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.threads = [
            threading.Thread(target=self._run, args=(c,), daemon=True) for c in self.clients
        ]

    def _run(self, state: Client) -> None:
        client = self.app.test_client()
        try:
            while not self.stop.is_set():
                state.request(client)
        except BaseException as exc:  # a failing thread fails the test
            self.errors.append(exc)

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def wait_for_acks(self, count: int) -> None:
        """Block until every thread had ``count`` more acknowledged
        increments since the last call (bounded by :data:`LIMIT`)."""
        deadline = time.monotonic() + LIMIT
        while any(c.since_mark < count for c in self.clients):
            if time.monotonic() > deadline or self.errors:
                self.finish()
                raise AssertionError(
                    f"not every session got {count} acknowledged writes within {LIMIT}s:"
                    f" {[c.since_mark for c in self.clients]}, errors {self.errors}"
                )
            time.sleep(0.01)
        for c in self.clients:
            c.since_mark = 0

    def mark(self) -> None:
        """Start counting acknowledged increments afresh."""
        for c in self.clients:
            c.since_mark = 0

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=LIMIT)
        assert not self.errors, self.errors

    def total(self, name: str) -> int:
        return sum(getattr(c, name) for c in self.clients)

    def status(self, code: int) -> int:
        return sum(c.statuses[code] for c in self.clients)

    def stored_behind(self) -> int:
        """Acknowledged increments the store lacks now (the last answers
        against what each session holds)."""
        ext = self.app.extensions["serverside"]
        behind = 0
        with self.app.app_context():
            for c in self.clients:
                data = ext.get(c.sid)
                assert data is not None, f"session {c.sid} is gone"
                behind += max(0, c.acked - data["n"])
        return behind


def report(
    request: pytest.FixtureRequest, name: str, load: Load, started: float, served: float
) -> None:
    figures = {
        f"{name}_requests": sum(sum(c.statuses.values()) for c in load.clients),
        f"{name}_503": load.status(503),
        f"{name}_500": load.status(500),
        f"{name}_logged_out": load.total("logged_out"),
        f"{name}_lost_acked": load.total("lost"),
        f"{name}_recovery_ms": round((served - started) * 1000),
    }
    line = ", ".join(f"{k.removeprefix(name + '_')} {v}" for k, v in figures.items())
    record(request, "failover", line, **figures)


def assert_survived(load: Load) -> None:
    other = {
        code: n for c in load.clients for code, n in c.statuses.items() if code not in (200, 503)
    }
    assert other == {}, f"statuses other than 200 and 503: {other}"
    assert load.total("logged_out") == 0
    assert load.stored_behind() == 0


def test_cluster_primary_killed(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> None:
    setup: RedisCluster = start_server(
        request, tmp_path_factory.mktemp("failover-cluster"), "redis_cluster"
    )
    try:
        app = failover_app(tmp_path_factory.mktemp("app"), setup.url)
        load = Load(app)
        load.start()
        load.wait_for_acks(STEADY)
        backend = app.session_interface.store.backend  # type: ignore[attr-defined]
        store = app.session_interface.store  # type: ignore[attr-defined]
        names = [backend._name(store.key(c.sid)) for c in load.clients]
        victim = setup.primary_for_key(names[0])
        slots = [setup.key_slot(name) for name in names]
        affected = [c for c, s in zip(load.clients, slots) if setup.primary_for_slot(s) is victim]
        _wait_replicated(setup, victim)
        killed = time.monotonic()
        setup.kill(victim)
        load.mark()
        setup.wait_for_failover(slots[0], victim, timeout=LIMIT)
        load.wait_for_acks(STEADY)
        load.finish()
        served = max(c.last_failure for c in affected) if load.status(503) else killed
        report(request, "cluster", load, killed, served)
        assert_survived(load)
        # The sessions on the killed primary saw 503s, the others may not.
        assert all(c.statuses[503] > 0 for c in affected)
    finally:
        setup.stop()


def test_sentinel_failover_then_old_primary_killed(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> None:
    setup: RedisSentinel = start_server(
        request, tmp_path_factory.mktemp("failover-sentinel"), "redis_sentinel"
    )
    try:
        app = failover_app(tmp_path_factory.mktemp("app"), setup.url)
        load = Load(app)
        load.start()
        load.wait_for_acks(STEADY)
        old = setup.primary()
        started = time.monotonic()
        setup.failover(timeout=LIMIT)
        setup.kill(old)
        load.mark()
        load.wait_for_acks(STEADY)
        load.finish()
        served = max(c.last_failure for c in load.clients) if load.status(503) else started
        report(request, "sentinel", load, started, served)
        assert_survived(load)
    finally:
        setup.stop()


def _wait_replicated(setup: RedisCluster, primary: t.Any) -> None:
    """Block until the replicas of ``primary`` have its writes up to now,
    so the sessions themselves exist there (the increments keep going)."""
    with primary.client() as client:
        offset = int(client.info("replication")["master_repl_offset"])
    deadline = time.monotonic() + LIMIT
    for node in setup.nodes:
        info = node.info("INFO REPLICATION")
        if info.get("role") != "slave" or int(info.get("master_port", 0)) != primary.port:
            continue
        while int(node.info("INFO REPLICATION").get("slave_repl_offset", 0)) < offset:
            if time.monotonic() > deadline:
                raise AssertionError(f"replica {node.port} did not catch up in {LIMIT}s")
            time.sleep(0.01)
