"""Outages: stores stopped, restarted, frozen or full in the middle of traffic.

Private servers (started here, so they can be stopped) serve an app in this
process while client threads keep using it. During an outage a request that
loads the session gets 503, a failed save 503 too, a page that does not touch
the session 200; no request runs past a small multiple of the configured
socket timeout; nothing is half-written; after recovery every write
acknowledged with a 200 is still there. Memcached forgets everything when it
stops, so "nothing lost" is checked across a pause there.
"""

from __future__ import annotations

import logging
import os
import subprocess
import threading
import time
import typing as t
import uuid
from collections import Counter
from collections.abc import Callable
from collections.abc import Iterator
from dataclasses import dataclass
from dataclasses import field

import pytest
from flask import Flask
from flask import jsonify
from flask import session
from flask.testing import FlaskClient

from flask_serverside import cache_url
from tests.conftest import build_app
from tests.conftest import start_server
from tests.reliability.figures import fact_max
from tests.reliability.figures import record
from tests.reliability.helpers import session_set_cookie
from tests.servers import Server
from tests.wrappers import InterruptedWrites

#: The cache clients' socket timeout during these tests (seconds).
TIMEOUT = 0.5
#: No request may take longer: a load and a locked save, each retried once
#: by redis-py, each attempt bounded by the timeout, plus scheduling slack.
BOUND = 6 * TIMEOUT + 1.0
#: Seconds of traffic before, during and after an outage; a frozen server
#: holds each request for up to two timeouts, so its outage lasts longer.
BEFORE, DURING, AFTER = 0.5, 1.2, 1.0
FROZEN = 3.0
#: Requests starting this long after the repair must all succeed.
GRACE = 0.3


# Servers private to this module: stopping them disturbs no other test.


def _private(name: str) -> t.Any:
    @pytest.fixture(scope="module", name=f"private_{name}")
    def fixture(
        request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
    ) -> Iterator[Server]:
        server = start_server(request, tmp_path_factory.mktemp(f"private-{name}"), name)
        yield server
        server.resume() if server.proc.poll() is None else None
        server.stop()

    return fixture


private_redis = _private("redis")
private_memcached = _private("memcached")
private_postgres = _private("postgres")


@pytest.fixture
def fast_timeouts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cache_url, "SOCKET_TIMEOUT", TIMEOUT)


def wrapper(app: Flask) -> InterruptedWrites:
    return t.cast(InterruptedWrites, app.session_interface.store.backend)  # type: ignore[attr-defined]


def make_app(tmp_path: t.Any, config: dict[str, t.Any]) -> Flask:
    """The test app with real error statuses (not testing mode)."""
    app = build_app(tmp_path, {**config, "TESTING": False}, count=False)
    store = app.session_interface.store  # type: ignore[attr-defined]
    store.backend = InterruptedWrites(store.backend)
    app.config["BREAK"] = lambda: None

    @app.get("/incr/<key>")
    def incr(key: str) -> t.Any:
        value = session.get(key, 0) + 1
        session[key] = value
        return jsonify(value)

    @app.get("/load-break-set/<key>/<value>")
    def load_break_set(key: str, value: str) -> str:
        session.get(key)  # loaded while the store is up
        app.config["BREAK"]()  # then it goes away before the save
        session[key] = value
        return "ok"

    return app


def short_lock_ttl(app: Flask, ttl: float = 1.0) -> None:
    """A cache lock left behind by an outage expires after ``ttl`` instead of
    20 s (see ``test_outage_leaves_no_lock_behind`` for that bug), so that
    these traffic tests do not depend on where the outage catches a request."""
    wrapper(app).inner.lock_ttl = ttl  # type: ignore[attr-defined]


def config_for(name: str, server: Server | None) -> dict[str, t.Any]:
    unique = "o" + uuid.uuid4().hex[:10]
    if name == "postgres":
        assert server is not None
        return {
            "SESSION_BACKEND": "sqlalchemy",
            "SESSION_SQLALCHEMY_URL": server.url + "?connect_timeout=2",
            "SESSION_SQLALCHEMY_TABLE": unique,
        }
    assert server is not None
    return {
        "SESSION_BACKEND": "cachelib",
        "SESSION_CACHELIB": server.url,
        "SESSION_KEY_PREFIX": f"{unique}:",
    }


# Traffic


@dataclass
class Call:
    kind: str
    client: int
    t0: float
    t1: float
    status: int
    value: t.Any = None
    cookie: str | None = None


@dataclass
class Traffic:
    """Clients that keep using the app from threads until stopped: each
    ``incr`` client increments its own key in its own session, one reader
    only loads, one client only requests a page without the session."""

    app: Flask
    writers: int = 3
    calls: list[Call] = field(default_factory=list)
    sids: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.clients = [self.app.test_client() for _ in range(self.writers)]
        for i, client in enumerate(self.clients):
            response = client.get(f"/incr/k{i}")
            assert response.status_code == 200, response.status_code
            self.calls.append(Call("incr", i, 0, 0, 200, 1))
            cookie = client.get_cookie("session")
            assert cookie is not None
            self.sids.append(cookie.value)

    def _loop(self, kind: str, i: int, client: FlaskClient, path: str) -> None:
        while not self.stop.is_set():
            t0 = time.monotonic()
            response = client.get(path)
            t1 = time.monotonic()
            cookie = session_set_cookie(response.headers.getlist("Set-Cookie"))
            value = response.json if response.status_code == 200 and kind != "nothing" else None
            self.calls.append(
                Call(kind, i, t0, t1, response.status_code, value, cookie and cookie.value)
            )
            time.sleep(0.01)

    def start(self) -> None:
        reader = self.app.test_client()
        reader.set_cookie("session", self.sids[0])
        jobs = [("incr", i, c, f"/incr/k{i}") for i, c in enumerate(self.clients)]
        jobs += [("read", 0, reader, "/get/k0"), ("nothing", 0, self.app.test_client(), "/nothing")]
        self.threads = [threading.Thread(target=self._loop, args=job) for job in jobs]
        for thread in self.threads:
            thread.start()

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(BOUND + 5)
        assert not any(thread.is_alive() for thread in self.threads), "a request hung"


@dataclass
class Outage:
    """What the traffic saw around one outage."""

    name: str
    calls: list[Call]
    broken: tuple[float, float]
    repaired: tuple[float, float]

    def phase(self, call: Call) -> str:
        if call.t1 < self.broken[0]:
            return "before"
        if call.t0 >= self.broken[1] and call.t1 <= self.repaired[0]:
            return "outage"
        if call.t0 >= self.repaired[1] + GRACE:
            return "after"
        return "edge"

    def by_phase(self, phase: str, kinds: tuple[str, ...] = ("incr", "read")) -> Counter[int]:
        return Counter(
            c.status for c in self.calls if c.kind in kinds and c.t1 and self.phase(c) == phase
        )

    @property
    def slowest(self) -> float:
        return max(c.t1 - c.t0 for c in self.calls)

    def check_statuses(self, request: pytest.FixtureRequest, min_inside: int = 3) -> None:
        """Statuses by phase; ``min_inside`` session requests at least must
        fall wholly inside the outage (a frozen server holds each for about
        two socket timeouts, so few do)."""
        outage = self.by_phase("outage")
        untouched = Counter(c.status for c in self.calls if c.kind == "nothing" and c.t1)
        untouched_out = self.by_phase("outage", ("nothing",))
        errors = sum(
            n for s, n in Counter(c.status for c in self.calls).items() if s >= 500 and s != 503
        )
        fact_max("outages", "slowest_s", self.slowest)
        record(
            request,
            "outages",
            f"{self.name}: session requests before {dict(self.by_phase('before'))}, during"
            f" {dict(outage)}, at the edges {dict(self.by_phase('edge'))}, after"
            f" {dict(self.by_phase('after'))}; untouched pages {dict(untouched)}; slowest"
            f" {self.slowest:.2f}s (socket timeout {TIMEOUT}s)",
            **{f"outage_{status}": n for status, n in outage.items()},
            untouched_200=untouched_out[200],
            untouched_bad=sum(n for s, n in untouched.items() if s != 200),
            status_500=errors,
        )
        assert errors == 0, "a request failed with a 5xx other than 503"
        assert set(untouched) == {200}, "a page that does not use the session failed"
        assert untouched_out[200] > 0
        assert set(self.by_phase("before")) == {200}
        assert set(outage) == {503} and outage[503] >= min_inside, outage
        assert set(self.by_phase("after")) == {200}
        assert self.slowest <= BOUND, f"a request took {self.slowest:.2f}s"

    def check_nothing_lost(
        self, app: Flask, sids: list[str], request: pytest.FixtureRequest
    ) -> None:
        """Every acknowledged increment is in the store, in the same session."""
        lost = []
        for i, sid in enumerate(sids):
            mine = sorted(
                (c for c in self.calls if c.kind == "incr" and c.client == i), key=lambda c: c.t0
            )
            acked, failed = 0, 0
            for call in mine:
                assert call.cookie in (None, sid), f"client {i} was given a new session"
                if call.status == 200:
                    # A failed request may have stored its value before failing.
                    if not acked + 1 <= call.value <= acked + 1 + failed:
                        lost.append(f"client {i}: {call.value} after {acked}")
                    acked, failed = call.value, 0
                else:
                    failed += 1
            with app.app_context():
                data = app.extensions["serverside"].get(sid)
            final = None if data is None else data.get(f"k{i}")
            if final is None or not acked <= final <= acked + failed:
                lost.append(f"client {i}: stored {final!r}, acknowledged {acked}")
        record(
            request, "outages", f"{self.name}: acknowledged writes lost {len(lost)}", lost=len(lost)
        )
        assert not lost, lost


def run_outage(
    name: str,
    app: Flask,
    break_: Callable[[], None],
    repair: Callable[[], None],
    writers: int = 3,
    during: float = DURING,
) -> tuple[Outage, list[str]]:
    traffic = Traffic(app, writers)
    traffic.start()
    try:
        time.sleep(BEFORE)
        w0 = time.monotonic()
        break_()
        w1 = time.monotonic()
        time.sleep(during)
        r0 = time.monotonic()
        repair()
        r1 = time.monotonic()
        time.sleep(AFTER)
    finally:
        traffic.finish()
    return Outage(name, traffic.calls, (w0, w1), (r0, r1)), traffic.sids


def check_failed_save_keeps_record(
    app: Flask,
    break_: Callable[[], None],
    repair: Callable[[], None],
    caplog: pytest.LogCaptureFixture,
    request: pytest.FixtureRequest,
    name: str,
    inside_save: bool = False,
) -> None:
    """The store goes away between the load and the save of one request
    (or, ``inside_save``, inside the save, under the session lock)."""
    client = app.test_client()
    assert client.get("/set/a/old").status_code == 200
    sid = client.get_cookie("session").value  # type: ignore[union-attr]
    if inside_save:
        wrapper(app).armed = break_
    else:
        app.config["BREAK"] = break_
    try:
        with caplog.at_level(logging.ERROR, "flask_serverside"):
            started = time.monotonic()
            response = client.get("/load-break-set/a/new")
            took = time.monotonic() - started
    finally:
        app.config["BREAK"] = lambda: None
        repair()
    record(
        request,
        "outages",
        f"{name}: store lost between load and save -> {response.status_code} in {took:.2f}s",
        **{f"outage_{response.status_code}": 1},
    )
    assert response.status_code == 503
    assert "Set-Cookie" not in response.headers
    assert response.headers["Retry-After"] == "5"
    assert any("while saving" in r.getMessage() for r in caplog.records), "cause not logged"
    deadline = time.monotonic() + 5
    while True:  # the store may need a moment after its restart
        with app.app_context():
            try:
                data = app.extensions["serverside"].get(sid)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
    assert data == {"a": "old"}, "the failed save changed the stored record"
    assert client.get("/get/a").json == "old"
    # The session is writable again at once (no lock left behind).
    started = time.monotonic()
    again = client.get("/set/a/again")
    took = time.monotonic() - started
    record(
        request,
        "outages",
        f"{name}: next save of that session after recovery -> {again.status_code} in {took:.2f}s",
    )
    assert again.status_code == 200 and took <= BOUND


def check_id_only_request(
    app: Flask,
    break_: Callable[[], None],
    repair: Callable[[], None],
    request: pytest.FixtureRequest,
) -> None:
    """A request that only reads ``session.sid`` never contacts the store: it
    keeps working during an outage, and refreshes the cookie it came with."""
    client = app.test_client()
    assert client.get("/set/a/1").status_code == 200
    sid = client.get_cookie("session")
    assert sid is not None
    break_()
    try:
        response = client.get("/sid")
    finally:
        repair()
    assert response.status_code == 200, response.status_code
    assert response.text == sid.value
    assert f"session={sid.value}" in response.headers["Set-Cookie"]


# Redis


def test_redis_stop_and_restart(
    private_redis: Server,
    fast_timeouts: None,
    tmp_path: t.Any,
    caplog: pytest.LogCaptureFixture,
    request: pytest.FixtureRequest,
) -> None:
    server = private_redis
    app = make_app(tmp_path, config_for("redis", server))
    short_lock_ttl(app)
    outage, sids = run_outage("redis stop/start", app, server.stop, server.start_again)
    outage.check_statuses(request)
    outage.check_nothing_lost(app, sids, request)
    check_failed_save_keeps_record(
        app, server.stop, server.start_again, caplog, request, "redis stop"
    )


@pytest.mark.parametrize("name", ["redis", "memcached"])
def test_cache_hangs(
    name: str,
    fast_timeouts: None,
    tmp_path: t.Any,
    caplog: pytest.LogCaptureFixture,
    request: pytest.FixtureRequest,
) -> None:
    server: Server = request.getfixturevalue(f"private_{name}")
    app = make_app(tmp_path, config_for(name, server))
    short_lock_ttl(app)
    outage, sids = run_outage(
        f"{name} SIGSTOP/SIGCONT", app, server.pause, server.resume, during=FROZEN
    )
    outage.check_statuses(request, min_inside=1)
    outage.check_nothing_lost(app, sids, request)
    check_failed_save_keeps_record(
        app, server.pause, server.resume, caplog, request, f"{name} pause"
    )


# Memcached


def test_memcached_stop_and_restart(
    private_memcached: Server,
    fast_timeouts: None,
    tmp_path: t.Any,
    request: pytest.FixtureRequest,
) -> None:
    """Memcached keeps nothing across a restart: only the statuses count."""
    server = private_memcached
    app = make_app(tmp_path, config_for("memcached", server))
    short_lock_ttl(app)
    outage, _ = run_outage("memcached stop/start", app, server.stop, server.start_again)
    outage.check_statuses(request)


@pytest.mark.parametrize("path", ["one-step", "locked"])
@pytest.mark.parametrize(
    ("name", "how"),
    [("redis", "hang before save"), ("memcached", "hang before save"), ("redis", "stop in save")],
)
def test_outage_leaves_no_lock_behind(
    name: str,
    how: str,
    path: str,
    fast_timeouts: None,
    tmp_path: t.Any,
    caplog: pytest.LogCaptureFixture,
    request: pytest.FixtureRequest,
) -> None:
    """The store freezes after a request's load (its compare-and-set or lock
    request times out, and the server runs it when it wakes up), or stops
    inside the save (on the locked path, while the request holds the lock:
    the release fails, and Redis's append-only file keeps the lock across
    the restart). Either way the request gets a 503 and the record is as it
    was; once the store is back, the session must be writable again at
    once."""
    server = request.getfixturevalue(f"private_{name}")
    app = make_app(tmp_path, config_for(name, server))
    backend = wrapper(app).inner
    backend.lock_ttl, backend.lock_wait = 4.0, 2.0  # type: ignore[attr-defined]
    wrapper(app).one_step = path == "one-step"
    if how == "hang before save":
        break_, repair, inside = server.pause, server.resume, False
    else:
        break_, repair, inside = server.stop, server.start_again, True
    check_failed_save_keeps_record(
        app, break_, repair, caplog, request, f"{name} {how}, {path} (lock_ttl 4s)", inside
    )


# PostgreSQL


def test_postgres_stop_and_restart(
    private_postgres: Server,
    tmp_path: t.Any,
    caplog: pytest.LogCaptureFixture,
    request: pytest.FixtureRequest,
) -> None:
    server = private_postgres
    app = make_app(tmp_path, config_for("postgres", server))
    outage, sids = run_outage("postgres stop/start", app, server.stop, server.start_again)
    outage.check_statuses(request)
    outage.check_nothing_lost(app, sids, request)
    check_failed_save_keeps_record(
        app, server.stop, server.start_again, caplog, request, "postgres stop"
    )


# Filesystem


class Detour:
    """``SESSION_FILE_DIR`` reached through a symlink that an outage points
    at a regular file: every access then fails with ENOTDIR."""

    def __init__(self, base: t.Any) -> None:
        self.real = os.path.join(base, "real")
        self.file = os.path.join(base, "a-file")
        self.link = os.path.join(base, "link")
        os.makedirs(self.real)
        open(self.file, "w").close()
        os.symlink(self.real, self.link)
        self.directory = os.path.join(self.link, "sessions")

    def _point(self, target: str) -> None:
        tmp = self.link + ".new"
        os.symlink(target, tmp)
        os.replace(tmp, self.link)

    def break_(self) -> None:
        self._point(self.file)

    def repair(self) -> None:
        self._point(self.real)


def test_filesystem_directory_unreachable(
    tmp_path: t.Any, caplog: pytest.LogCaptureFixture, request: pytest.FixtureRequest
) -> None:
    detour = Detour(tmp_path)
    app = make_app(tmp_path, {"SESSION_FILE_DIR": detour.directory})
    with caplog.at_level(logging.ERROR, "flask_serverside"):
        outage, sids = run_outage("filesystem ENOTDIR", app, detour.break_, detour.repair)
    assert any("NotADirectoryError" in r.getMessage() for r in caplog.records)
    outage.check_statuses(request)
    outage.check_nothing_lost(app, sids, request)
    check_failed_save_keeps_record(
        app, detour.break_, detour.repair, caplog, request, "filesystem ENOTDIR"
    )


@pytest.fixture
def small_tmpfs(tmp_path: t.Any) -> Iterator[str]:
    """A 256 KiB tmpfs, or a skip where mounting is not permitted."""
    mount = str(tmp_path / "tmpfs")
    os.mkdir(mount)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", mount],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", mount], check=False)


@pytest.mark.parametrize("store", ["filesystem", "sqlite"])
def test_disk_full(
    store: str,
    small_tmpfs: str,
    tmp_path: t.Any,
    caplog: pytest.LogCaptureFixture,
    request: pytest.FixtureRequest,
) -> None:
    """A full disk: writes fail with a clear error, reads go on, the old
    record stays, and saving works again once there is room."""
    if store == "filesystem":
        config = {"SESSION_FILE_DIR": os.path.join(small_tmpfs, "sessions")}
        cause = "No space left on device"
    else:
        config = {
            "SESSION_BACKEND": "sqlalchemy",
            "SESSION_SQLALCHEMY_URL": f"sqlite:///{small_tmpfs}/sessions.sqlite3",
        }
        cause = "full"
    app = make_app(tmp_path, config)
    client = app.test_client()
    assert client.get("/set/a/old").status_code == 200
    sid = client.get_cookie("session").value  # type: ignore[union-attr]
    filler = os.path.join(small_tmpfs, "filler")
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)
    statuses: Counter[int] = Counter()
    with caplog.at_level(logging.ERROR, "flask_serverside"):
        big = "x" * 20000  # more than any slack left in the last page
        for path in (f"/set/a/{big}", f"/set/b/{big}"):
            statuses[client.get(path).status_code] += 1
        statuses[app.test_client().get(f"/set/c/{big}").status_code] += 1
        read = client.get("/get/a")
    record(
        request,
        "outages",
        f"{store} on a full disk: saves {dict(statuses)}, read {read.status_code}",
        **{f"outage_{s}": n for s, n in statuses.items()},
    )
    assert statuses == {503: 3}
    assert any(cause in r.getMessage() for r in caplog.records), [
        r.getMessage() for r in caplog.records
    ]
    assert read.status_code == 200 and read.json == "old"
    with app.app_context():
        assert app.extensions["serverside"].get(sid) == {"a": "old"}
    if store == "filesystem":
        shard = os.path.join(small_tmpfs, "sessions")
        temps = [n for _, _, files in os.walk(shard) for n in files if n.startswith(".tmp-")]
        assert not temps, "a failed save left its temp file"
    os.unlink(filler)
    assert client.get("/set/a/new").status_code == 200
    with app.app_context():
        assert app.extensions["serverside"].get(sid) == {"a": "new"}


# A request that only reads the session ID


@pytest.mark.parametrize("name", ["redis", "memcached", "postgres", "filesystem"])
def test_id_only_request_works_during_outage(
    name: str,
    fast_timeouts: None,
    tmp_path: t.Any,
    request: pytest.FixtureRequest,
) -> None:
    if name == "filesystem":
        detour = Detour(tmp_path)
        app = make_app(tmp_path, {"SESSION_FILE_DIR": detour.directory})
        check_id_only_request(app, detour.break_, detour.repair, request)
        return
    server = request.getfixturevalue(f"private_{name}")
    app = make_app(tmp_path, config_for(name, server))
    check_id_only_request(app, server.stop, server.start_again, request)
