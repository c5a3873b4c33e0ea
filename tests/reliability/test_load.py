"""Concurrent load through real gunicorn workers: no update is lost.

Many HTTP clients share one session cookie and each increments its own key;
the change merge under ``backend.lock(key)`` must keep every increment, across
worker processes and threads, on every backend. One client also logs out
while the others write: the destroyed ID is never served again.
"""

from __future__ import annotations

import ctypes
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
import typing as t
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest

from tests.conftest import store_config
from tests.reliability.figures import record
from tests.reliability.helpers import ALL_BACKENDS
from tests.reliability.helpers import ROOT
from tests.reliability.helpers import session_set_cookie
from tests.reliability.helpers import SetCookie
from tests.servers import free_port

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

_LIBC = ctypes.CDLL(None) if sys.platform == "linux" else None


@dataclass
class Reply:
    path: str
    status: int
    body: bytes
    cookie: SetCookie | None
    t0: float
    t1: float

    @property
    def json(self) -> t.Any:
        return json.loads(self.body)


def get(
    port: int,
    path: str,
    sid: str | None = None,
    timeout: float = 60,
    headers: dict[str, str] | None = None,
) -> Reply:
    """One request on a fresh connection (no retry that could double a write)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = {**(headers or {}), **({"Cookie": f"session={sid}"} if sid else {})}
        t0 = time.monotonic()
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        body = response.read()
        t1 = time.monotonic()
        cookie = session_set_cookie(response.headers.get_all("Set-Cookie") or [])
        return Reply(path, response.status, body, cookie, t0, t1)
    finally:
        conn.close()


def _die_with_parent() -> None:
    if _LIBC is not None:
        _LIBC.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class Gunicorn:
    name: str
    port: int
    workers: int
    threads: int
    proc: subprocess.Popen[bytes]
    log: str


@contextmanager
def gunicorn(
    instance: str, config: dict[str, t.Any], workers: int, threads: int
) -> Iterator[Gunicorn]:
    """Serve ``wsgi_app`` with gunicorn until the block ends, then end the
    master and every worker (its own process group, which it leads)."""
    port = free_port()
    os.makedirs(instance, exist_ok=True)
    env = {
        **os.environ,
        "RELIABILITY_CONFIG": json.dumps(config),
        "RELIABILITY_INSTANCE": instance,
        "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
    }
    log = os.path.join(instance, "gunicorn.log")
    command = [
        sys.executable, "-m", "gunicorn",
        "--bind", f"127.0.0.1:{port}",
        "--workers", str(workers),
        "--worker-class", "gthread",
        "--threads", str(threads),
        "--backlog", "512",
        "--timeout", "60",
        "--graceful-timeout", "3",
        "--log-level", "info",
        "--chdir", ROOT,
        "tests.reliability.wsgi_app:create_app()",
    ]  # fmt: skip
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            command,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
    try:
        _wait_for_workers(proc, port, workers, log)
        yield Gunicorn("", port, workers, threads, proc, log)
    finally:
        _terminate(proc)


def _wait_for_workers(proc: subprocess.Popen[bytes], port: int, workers: int, log: str) -> None:
    """Block until every worker answers (each loads the app on its own)."""
    deadline = time.monotonic() + 60
    seen: set[int] = set()
    while len(seen) < workers:
        if proc.poll() is not None or time.monotonic() > deadline:
            with open(log, errors="replace") as f:
                raise RuntimeError(f"gunicorn did not start {workers} workers:\n{f.read()}")
        try:
            seen.add(get(port, "/set/ready/1", timeout=5).json["pid"])
        except (OSError, http.client.HTTPException, ValueError, KeyError):
            time.sleep(0.05)


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
    # Whatever is left of the group gunicorn leads (workers included) dies now.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait(timeout=15)


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


def _run(threads: list[threading.Thread], timeout: float = 120) -> None:
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    assert not any(thread.is_alive() for thread in threads), "a client hung"


def _max_overlap(replies: list[Reply]) -> int:
    events = sorted([(r.t0, 1) for r in replies] + [(r.t1, -1) for r in replies])
    level = peak = 0
    for _, step in events:
        level += step
        peak = max(peak, level)
    return peak


def test_concurrent_increments_lose_nothing(
    served: Gunicorn, request: pytest.FixtureRequest
) -> None:
    seed = get(served.port, "/set/seed/1")
    assert seed.status == 200 and seed.cookie is not None
    sid = seed.cookie.value
    barrier = threading.Barrier(CLIENTS)
    replies: list[list[Reply]] = [[] for _ in range(CLIENTS)]
    errors: list[BaseException] = []

    def client(i: int) -> None:
        try:
            barrier.wait(timeout=30)
            for _ in range(INCREMENTS):
                replies[i].append(get(served.port, f"/incr/k{i}", sid))
        except BaseException as exc:  # reported below
            errors.append(exc)

    started = time.monotonic()
    _run([threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)])
    elapsed = time.monotonic() - started
    final = get(served.port, "/dump", sid)
    flat = [r for rs in replies for r in rs]
    statuses = Counter(r.status for r in flat)
    pids = {r.json["pid"] for r in flat if r.status == 200}
    final_data = final.json if final.status == 200 else {}
    lost = sum(INCREMENTS - final_data.get(f"k{i}", 0) for i in range(CLIENTS))
    new_ids = {r.cookie.value for r in flat if r.cookie and r.cookie.value != sid}
    record(
        request,
        "load",
        f"{served.name}: {len(flat)} increments by {CLIENTS} clients in {elapsed:.2f}s"
        f" ({len(flat) / elapsed:.0f}/s, up to {_max_overlap(flat)} in flight) on"
        f" {served.workers} gunicorn workers x {served.threads} threads ({len(pids)} served);"
        f" statuses {dict(statuses)}; lost updates {lost}",
        requests=len(flat) + 2,
        lost_updates=lost,
        servers=1,
        clients=CLIENTS,
        workers_seen=len(pids),
    )
    assert not errors, errors
    assert statuses == {200: CLIENTS * INCREMENTS}
    assert not new_ids, "the shared session got a new ID"
    for i, rs in enumerate(replies):
        assert [r.json["value"] for r in rs] == list(range(1, INCREMENTS + 1)), f"client {i}"
    assert final.status == 200
    assert final_data == {
        "seed": "1",
        **{f"k{i}": INCREMENTS for i in range(CLIENTS)},
    }
    assert lost == 0
    if served.workers > 1:
        assert len(pids) > 1, "all requests went to one worker: no cross-process test"


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

    _run(
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
