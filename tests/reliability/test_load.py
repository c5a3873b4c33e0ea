"""Concurrent load through real gunicorn workers: no update is lost.

Many HTTP clients share one session cookie and each increments its own key;
the change merge under ``backend.lock(key)`` must keep every increment, across
worker processes and threads, on every backend. One client also logs out
while the others write: the destroyed ID is never served again.
"""

from __future__ import annotations

import threading
from collections import Counter
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
from tests.reliability.helpers import run_threads

#: Clients sharing one session, and the increments each makes.
CLIENTS = 8
INCREMENTS = 25
#: Writers racing a logout: their increments before it (in all, per writer),
#: after it (about a third of that, each), and at most.
WRITERS = 6
WRITER_INCREMENTS = 12
MAX_WRITER_INCREMENTS = 200

#: Makes each record write of a writer 20 ms slower (a slow disk or network),
#: and makes the logout wait until one of them is under way: it then lands
#: inside another request's locked merge, every time (see wsgi_app).
SLOW = {"X-Slow-Save": "0.02"}


@pytest.fixture(scope="module", params=ALL_BACKENDS)
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gunicorn]:
    """gunicorn serving the app on one store; SimpleCache lives in one
    process, so it gets one worker with many threads."""
    name = request.param
    config = store_config(request, name)
    workers, threads = (1, 8) if name == "simple" else (3, 4)
    instance = str(tmp_path_factory.mktemp(f"gunicorn-{name}"))
    with gunicorn(instance, config, workers, threads) as server:
        server.name = name
        yield server
    assert server.proc.returncode is not None


def test_concurrent_increments_lose_nothing(
    served: Gunicorn, request: pytest.FixtureRequest
) -> None:
    increments_lose_nothing(served, request, "load", CLIENTS, INCREMENTS)


def test_destroyed_session_never_comes_back(
    served: Gunicorn, request: pytest.FixtureRequest
) -> None:
    seed = get(served.port, "/set/user/alice")
    assert seed.cookie is not None
    sid = seed.cookie.value
    done = threading.Semaphore(0)
    replies: list[list[Reply]] = [[] for _ in range(WRITERS)]
    logout: list[Reply] = []
    errors: list[BaseException] = []

    def writer(i: int) -> None:
        # Writes go on until the logout is answered and a few more came after
        # it, however long the logout waits for the session lock.
        try:
            after = 0
            for _ in range(MAX_WRITER_INCREMENTS):
                replies[i].append(get(served.port, f"/incr/w{i}", sid, headers=SLOW))
                done.release()
                after += bool(logout)
                if after > WRITER_INCREMENTS // 3:
                    break
        except BaseException as exc:
            errors.append(exc)

    def destroyer() -> None:
        try:
            for _ in range(WRITERS * WRITER_INCREMENTS // 3):
                done.acquire(timeout=60)
            logout.append(get(served.port, "/destroy", sid, headers={"X-When-Saving": "1"}))
        except BaseException as exc:
            errors.append(exc)

    run_threads(
        [threading.Thread(target=writer, args=(i,)) for i in range(WRITERS)]
        + [threading.Thread(target=destroyer)]
    )
    assert not errors, errors
    (bye,) = logout
    flat = [r for rs in replies for r in rs]
    after = [r for r in flat if r.t0 >= bye.t1]
    # Served again: the old ID in a cookie, or the old data, after the logout.
    served_again = [
        r
        for r in after
        if (r.cookie and r.cookie.value == sid) or (r.status == 200 and r.json["value"] != 1)
    ]
    final = get(served.port, "/dump", sid)
    exists = get(served.port, f"/exists/{sid}")
    fresh = {r.cookie.value for r in after if r.cookie and not r.cookie.deleting}
    record(
        request,
        "load",
        f"{served.name}: logout amid {len(flat)} writes by {WRITERS} clients;"
        f" {len(after)} requests with the dead cookie afterwards, each got a fresh"
        f" session ({len(fresh)} IDs); destroyed ID served again {len(served_again)}",
        requests=len(flat) + 4,
        destroyed_served=len(served_again),
        clients=WRITERS + 1,
    )
    assert bye.status == 200 and bye.cookie is not None and bye.cookie.deleting
    assert Counter(r.status for r in flat) == {200: len(flat)}
    assert after, "the logout came after every write: no race tested"
    assert not served_again
    assert all(r.cookie and r.cookie.value != sid and not r.cookie.deleting for r in after)
    assert len(fresh) == len(after), "two requests were given the same new ID"
    assert final.status == 200 and final.json == {}
    assert final.cookie is None or final.cookie.value != sid
    assert exists.json is False
