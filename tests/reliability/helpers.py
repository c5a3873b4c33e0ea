"""Shared by the reliability suites."""

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
from werkzeug.http import parse_cookie

from tests.reliability.figures import record
from tests.servers import free_port

#: Every store, and those that live outside the test process.
ALL_BACKENDS = ["filesystem", "sqlite", "postgres", "simple", "redis", "memcached"]
SHARED_BACKENDS = ["filesystem", "sqlite", "postgres", "redis", "memcached"]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class SetCookie(t.NamedTuple):
    """One parsed ``Set-Cookie`` header."""

    name: str
    value: str
    attributes: dict[str, str]
    header: str

    @property
    def deleting(self) -> bool:
        return self.attributes.get("max-age") == "0" or "1970" in self.attributes.get("expires", "")


def parse_set_cookie(header: str) -> SetCookie:
    first, *rest = header.split(";")
    name, _, _ = first.partition("=")
    value = parse_cookie(first.strip()).get(name.strip(), "")
    attributes: dict[str, str] = {}
    for part in rest:
        key, _, val = part.strip().partition("=")
        attributes[key.lower()] = val
    return SetCookie(name.strip(), value, attributes, header)


def session_set_cookie(headers: t.Iterable[str], name: str = "session") -> SetCookie | None:
    """The ``Set-Cookie`` for the session cookie among ``headers``."""
    for header in headers:
        parsed = parse_set_cookie(header)
        if parsed.name == name:
            return parsed
    return None


# -- gunicorn, and HTTP clients of it (test_load.py, test_workers.py) --------

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
    worker_class: str = "gthread"
    instance: str = ""


@contextmanager
def gunicorn(
    instance: str,
    config: dict[str, t.Any],
    workers: int,
    threads: int,
    worker_class: str = "gthread",
    env: dict[str, str] | None = None,
) -> Iterator[Gunicorn]:
    """Serve ``wsgi_app`` with gunicorn until the block ends, then end the
    master and every worker (its own process group, which it leads).

    :param worker_class: gunicorn's ``--worker-class``: ``gthread`` (with
        ``threads`` threads a worker) or ``gevent``.
    :param env: More environment variables for the app.
    """
    port = free_port()
    os.makedirs(instance, exist_ok=True)
    env = {
        **os.environ,
        **(env or {}),
        "RELIABILITY_CONFIG": json.dumps(config),
        "RELIABILITY_INSTANCE": instance,
        "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
    }
    log = os.path.join(instance, "gunicorn.log")
    command = [
        sys.executable, "-m", "gunicorn",
        "--bind", f"127.0.0.1:{port}",
        "--workers", str(workers),
        "--worker-class", worker_class,
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
        yield Gunicorn("", port, workers, threads, proc, log, worker_class, instance)
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


def run_threads(threads: list[threading.Thread], timeout: float = 120) -> None:
    """Start ``threads`` and wait for all of them, at most ``timeout`` seconds."""
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    assert not any(thread.is_alive() for thread in threads), "a client hung"


def max_overlap(replies: list[Reply]) -> int:
    """The most requests in flight at once."""
    events = sorted([(r.t0, 1) for r in replies] + [(r.t1, -1) for r in replies])
    level = peak = 0
    for _, step in events:
        level += step
        peak = max(peak, level)
    return peak


def increments_lose_nothing(
    served: Gunicorn,
    request: pytest.FixtureRequest,
    suite: str,
    clients: int = 8,
    increments: int = 25,
) -> None:
    """The lost-update probe: ``clients`` HTTP clients share one session
    cookie and each increments its own key ``increments`` times; every
    increment must be kept, and each client must see 1, 2, 3 ... in turn."""
    seed = get(served.port, "/set/seed/1")
    assert seed.status == 200 and seed.cookie is not None
    sid = seed.cookie.value
    barrier = threading.Barrier(clients)
    replies: list[list[Reply]] = [[] for _ in range(clients)]
    errors: list[BaseException] = []

    def client(i: int) -> None:
        try:
            barrier.wait(timeout=30)
            for _ in range(increments):
                replies[i].append(get(served.port, f"/incr/k{i}", sid))
        except BaseException as exc:  # reported below
            errors.append(exc)

    started = time.monotonic()
    run_threads([threading.Thread(target=client, args=(i,)) for i in range(clients)])
    elapsed = time.monotonic() - started
    final = get(served.port, "/dump", sid)
    flat = [r for rs in replies for r in rs]
    statuses = Counter(r.status for r in flat)
    pids = {r.json["pid"] for r in flat if r.status == 200}
    final_data = final.json if final.status == 200 else {}
    lost = sum(increments - final_data.get(f"k{i}", 0) for i in range(clients))
    new_ids = {r.cookie.value for r in flat if r.cookie and r.cookie.value != sid}
    threads = f" x {served.threads} threads" if served.worker_class == "gthread" else ""
    record(
        request,
        suite,
        f"{served.name}: {len(flat)} increments by {clients} clients in {elapsed:.2f}s"
        f" ({len(flat) / elapsed:.0f}/s, up to {max_overlap(flat)} in flight) on"
        f" {served.workers} gunicorn {served.worker_class} workers{threads}"
        f" ({len(pids)} served); statuses {dict(statuses)}; lost updates {lost}",
        requests=len(flat) + 2,
        lost_updates=lost,
        servers=1,
        clients=clients,
        workers_seen=len(pids),
    )
    assert not errors, errors
    assert statuses == {200: clients * increments}
    assert not new_ids, "the shared session got a new ID"
    for i, rs in enumerate(replies):
        assert [r.json["value"] for r in rs] == list(range(1, increments + 1)), f"client {i}"
    assert final.status == 200
    assert final_data == {"seed": "1", **{f"k{i}": increments for i in range(clients)}}
    assert lost == 0
    if served.workers > 1:
        assert len(pids) > 1, "all requests went to one worker: no cross-process test"
