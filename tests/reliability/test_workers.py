"""gunicorn's ``gthread`` and ``gevent`` worker classes, on every store.

- The lost-update probe of ``test_load.py`` loses nothing under either.
- A request waiting for a session lock does not hold up the other requests
  of its worker: under gevent, every request of a worker runs in one thread,
  so a lock wait that blocks in C (``flock``, libpq, SQLite's busy handler)
  would stop them all, and the lock's holder with them.

The gevent worker monkey-patches the standard library as it starts; the app
makes psycopg2 cooperate with psycogreen, as ``docs/concurrency.rst`` says.
"""

from __future__ import annotations

import os
import threading
import time
import typing as t
from collections.abc import Iterator

import pytest

from tests.conftest import store_config
from tests.reliability.figures import record
from tests.reliability.helpers import ALL_BACKENDS
from tests.reliability.helpers import get
from tests.reliability.helpers import Gunicorn
from tests.reliability.helpers import gunicorn
from tests.reliability.helpers import increments_lose_nothing
from tests.reliability.helpers import Reply

WORKER_CLASSES = ["gthread", "gevent"]
#: Seconds the first request holds the session lock.
HOLD = 1.0
#: Seconds any one request of the blocking test may take at most.
TIMEOUT = 20.0

#: SQLite's busy handler sleeps in C: under gevent a request waiting for the
#: database's write lock stops its whole worker, the holder included.


def _serve(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    name: str,
    worker_class: str,
    workers: int,
) -> t.ContextManager[Gunicorn]:
    config = store_config(request, name)
    instance = str(tmp_path_factory.mktemp(f"{worker_class}-{name}"))
    env = {"RELIABILITY_PSYCOGREEN": "1"} if worker_class == "gevent" else {}
    return gunicorn(instance, config, workers, 4, worker_class, env)


@pytest.fixture(
    scope="module",
    params=[(w, b) for w in WORKER_CLASSES for b in ALL_BACKENDS],
    ids=lambda p: "-".join(p),
)
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gunicorn]:
    """Two workers of a class serving the app on one store; SimpleCache
    lives in one process, so it gets one worker."""
    worker_class, name = request.param
    workers = 1 if name == "simple" else 2
    with _serve(request, tmp_path_factory, name, worker_class, workers) as server:
        server.name = f"{name} ({worker_class})"
        yield server


def test_increments_lose_nothing(served: Gunicorn, request: pytest.FixtureRequest) -> None:
    increments_lose_nothing(served, request, "workers")


def _wait_for_file(path: str, proc: t.Any, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert proc.poll() is None, "gunicorn died"
        assert time.monotonic() < deadline, f"{os.path.basename(path)} never appeared"
        time.sleep(0.01)


@pytest.mark.parametrize("worker_class", WORKER_CLASSES)
@pytest.mark.parametrize("name", ALL_BACKENDS)
def test_lock_wait_does_not_block_the_worker(
    name: str,
    worker_class: str,
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """A holds the lock of session S for HOLD seconds; B waits for it; C,
    on no session, is served meanwhile by the same (only) worker: it ends
    before A lets go, by the clock of the server."""
    with _serve(request, tmp_path_factory, name, worker_class, 1) as served:
        seed = get(served.port, "/set/seed/1", timeout=TIMEOUT)
        assert seed.cookie is not None
        sid = seed.cookie.value
        replies: dict[str, Reply] = {}
        errors: list[BaseException] = []

        def hold(who: str, seconds: float) -> None:
            try:
                path = f"/hold/{sid}/{seconds}?name={who}"
                replies[who] = get(served.port, path, timeout=TIMEOUT)
            except BaseException as exc:  # reported below
                errors.append(exc)

        a = threading.Thread(target=hold, args=("a", HOLD))
        b = threading.Thread(target=hold, args=("b", 0.0))
        a.start()
        _wait_for_file(os.path.join(served.instance, "held-a"), served.proc)
        b.start()
        _wait_for_file(os.path.join(served.instance, "waiting-b"), served.proc)
        # B has asked for the lock; let it get to waiting for it.
        time.sleep(0.2)
        try:
            c = get(served.port, "/clock", timeout=TIMEOUT)
        finally:
            a.join(TIMEOUT)
            b.join(TIMEOUT)
        assert not errors, errors
        assert not a.is_alive() and not b.is_alive(), "a client hung"

    assert [replies["a"].status, replies["b"].status, c.status] == [200, 200, 200]
    record(
        request,
        "workers",
        f"{name} ({worker_class}): while B waited for A's lock, C was served"
        f" {replies['a'].json['released'] - c.json['time']:.2f}s before A let go",
        requests=4,
    )
    pids = {replies["a"].json["pid"], replies["b"].json["pid"], c.json["pid"]}
    assert len(pids) == 1
    assert replies["b"].json["acquired"] >= replies["a"].json["released"], "B did not wait"
    assert c.json["time"] < replies["a"].json["released"], "C waited for A's lock"
