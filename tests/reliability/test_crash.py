"""Crash consistency: writers killed with SIGKILL at random points.

A child process saves ever-growing self-validating records (a counter, a
SHA-256 of the payload, an expiry tied to the counter) the way the store's
merge does; the test kills it after a random short delay, hundreds of times.
After every kill the record must be one whole version, never older than the
last one seen; the lock must be free at once; temp files a killed writer
left behind must be removed by ``cleanup()`` once stale, and not before.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import queue
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import typing as t
import uuid

import pytest

from flask_serverside.backends import Backend
from flask_serverside.backends import filefmt
from flask_serverside.backends.filesystem import FileSystemBackend
from flask_serverside.backends.filesystem import STALE_TMP_SECONDS
from tests.reliability.crash_writer import decode
from tests.reliability.crash_writer import encode
from tests.reliability.crash_writer import make_backend
from tests.reliability.crash_writer import Torn
from tests.reliability.figures import fact_max
from tests.reliability.figures import record
from tests.reliability.helpers import ROOT

#: SIGKILLs per backend: hundreds in all in CI, fewer locally.
KILLS = 200 if os.environ.get("CI") == "true" else 50
#: The longest random delay between starting a writer and killing it.
MAX_DELAY = 0.03
#: A lock left by a killed process must be free again within this.
LOCK_BOUND = 2.0
KEY = "session:" + hashlib.sha256(b"crash test").hexdigest()
SEED = int(os.environ.get("RELIABILITY_SEED", time.time_ns() % 10**9))

_LIBC = ctypes.CDLL(None) if sys.platform == "linux" else None


def _die_with_parent() -> None:
    if _LIBC is not None:
        _LIBC.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Zygote:
    """The fork server of :mod:`tests.reliability.crash_writer`."""

    def __init__(self, spec: dict[str, t.Any]) -> None:
        env = {**os.environ, "PYTHONPATH": ROOT}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.reliability.crash_writer", json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=ROOT,
            env=env,
            preexec_fn=_die_with_parent,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.held: set[int] = set()
        self.errors: list[str] = []
        self.children: set[int] = set()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self._expect("ready", timeout=60)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.put(raw.decode().strip())
        self.lines.put("eof")

    def _expect(self, word: str, timeout: float = 10) -> str:
        deadline = time.monotonic() + timeout
        while True:
            line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            head, _, rest = line.partition(" ")
            if head == "held":
                self.held.add(int(rest))
            elif head == "error":
                self.errors.append(rest)
            if head == word:
                return rest
            if head == "eof":
                raise RuntimeError(f"the fork server died; errors: {self.errors}")

    def _send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def fork(self, mode: str, key: str) -> int:
        self._send(f"{mode} {key}")
        pid = int(self._expect("pid"))
        self.children.add(pid)
        return pid

    def wait_held(self, pid: int, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while pid not in self.held:
            self._expect("held", timeout=max(0.01, deadline - time.monotonic()))

    def kill(self, pid: int) -> int:
        """SIGKILL the child; return its wait status."""
        os.kill(pid, signal.SIGKILL)
        self._send(f"wait {pid}")
        status = int(self._expect("status"))
        self.children.discard(pid)
        return status

    def close(self) -> None:
        for pid in list(self.children):
            self.kill(pid)
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.reader.join(10)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


def lock_wait(backend: Backend, key: str, bound: float) -> float:
    """Seconds a fresh ``lock(key)`` took; fails past ``bound``."""
    done = threading.Event()

    def take() -> None:
        with backend.lock(key):
            done.set()

    started = time.monotonic()
    thread = threading.Thread(target=take, daemon=True)
    thread.start()
    assert done.wait(bound), f"the lock was still held {bound}s after its holder died"
    thread.join(bound)
    return time.monotonic() - started


def _spec(kind: str, tmp_path: t.Any) -> dict[str, t.Any]:
    if kind == "filesystem":
        return {"kind": "filesystem", "directory": str(tmp_path / "sessions")}
    return {"kind": "sqlalchemy", "url": f"sqlite:///{tmp_path}/sessions.sqlite3"}


@pytest.mark.parametrize("kind", ["filesystem", "sqlite"])
def test_sigkill_while_saving_never_tears_a_record(
    kind: str, tmp_path: t.Any, request: pytest.FixtureRequest
) -> None:
    spec = _spec(kind, tmp_path)
    backend = make_backend(spec)
    rng = random.Random(SEED)
    last = 0
    torn: list[str] = []
    regressed = advanced = 0
    waits: list[float] = []
    started = time.monotonic()
    server = Zygote(spec)
    max_delay, quiet = MAX_DELAY, 0
    try:
        for _ in range(KILLS):
            pid = server.fork("writer", KEY)
            time.sleep(rng.uniform(0, max_delay))
            status = server.kill(pid)
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (
                f"the writer died on its own: {server.errors}"
            )
            stored = backend.load(KEY)
            if stored is None:
                if last:
                    torn.append(f"record {last} became unreadable")
            else:
                try:
                    counter = decode(stored)
                except Torn as exc:
                    torn.append(str(exc))
                else:
                    regressed += counter < last
                    advanced += counter > last
                    quiet = -1 if counter > last else quiet
                    last = max(last, counter)
            # On a loaded machine a writer may not run within MAX_DELAY:
            # wait longer until kills land among its saves again.
            quiet += 1
            if quiet >= 10:
                max_delay, quiet = min(max_delay * 2, 1.0), 0
            waits.append(lock_wait(backend, KEY, LOCK_BOUND))
    finally:
        server.close()
    elapsed = time.monotonic() - started
    extra: dict[str, int] = {}
    if kind == "filesystem":
        extra = _check_stale_temp_files(backend)  # type: ignore[arg-type]
    else:
        with sqlite3.connect(tmp_path / "sessions.sqlite3") as db:
            assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    fact_max("crash", "lock_wait_s", max(waits))
    record(
        request,
        "crash",
        f"{kind}: {KILLS} SIGKILLs in {elapsed:.1f}s (seed {SEED}), {advanced} after new"
        f" saves, reaching version {last}; torn/unreadable {len(torn)}, went back"
        f" {regressed}; longest lock wait after a kill {max(waits) * 1000:.1f} ms"
        + (
            f"; temp files left {extra['tmp_left']}, removed {extra['tmp_removed']}"
            if extra
            else ""
        ),
        kills=KILLS,
        **{f"kills_{'fs' if kind == 'filesystem' else 'sqlite'}": KILLS},
        torn=len(torn),
        regressed=regressed,
        **extra,
    )
    assert not torn, torn[:5]
    assert regressed == 0
    assert advanced >= KILLS // 10, "the writer was mostly killed before saving anything"
    assert not server.errors


def _check_stale_temp_files(backend: FileSystemBackend) -> dict[str, int]:
    """Temp files of killed writers: kept while fresh, removed once stale."""
    shard = backend._shard(KEY)
    temps = [e.path for e in os.scandir(shard) if e.name.startswith(".tmp-")]
    planted = not temps
    if planted:  # no kill landed between open and rename: leave one like it
        path = os.path.join(shard, ".tmp-" + uuid.uuid4().hex[:16])
        with open(path, "wb") as f:
            f.write(b"FSSESS1\n\x00\x00")
        temps = [path]
    now = time.time()
    assert sum(backend.cleanup(now)) == 0  # the record itself is live
    assert all(os.path.exists(p) for p in temps), "cleanup removed a fresh temp file"
    stale = now - STALE_TMP_SECONDS - 60
    for path in temps:
        os.utime(path, (stale, stale))
    assert sum(backend.cleanup(time.time())) == 0
    left = [e.name for e in os.scandir(shard) if e.name.startswith(".tmp-")]
    assert not left, f"stale temp files survived cleanup: {left}"
    stored = backend.load(KEY)
    assert stored is not None
    decode(stored)
    return {"tmp_left": 0 if planted else len(temps), "tmp_removed": len(temps)}


@pytest.mark.parametrize("name", ["redis", "memcached"])
def test_lock_of_a_killed_holder_expires(name: str, request: pytest.FixtureRequest) -> None:
    """A cache lock has no process to die with: it must expire by its TTL."""
    server = request.getfixturevalue(f"{name}_server")
    ttl = 1.0
    spec = {
        "kind": "cachelib",
        "url": server.url,
        "prefix": f"crash{uuid.uuid4().hex[:8]}:",
        "lock_ttl": ttl,
    }
    backend = make_backend(spec)
    backend.lock_ttl = ttl  # type: ignore[attr-defined]
    key = spec["prefix"] + hashlib.sha256(uuid.uuid4().bytes).hexdigest()
    waits = []
    forks = Zygote(spec)
    try:
        for _ in range(3):
            pid = forks.fork("holder", key)
            forks.wait_held(pid)
            held_at = time.monotonic()
            forks.kill(pid)
            with backend.lock(key):
                waits.append(time.monotonic() - held_at)
            # The lock is usable again: save under it, as a merge would.
            with backend.lock(key):
                backend.save(key, *encode(1))
            # Redis keeps the expiry as a TTL: it comes back approximately.
            assert decode(backend.load(key), exact_expiry=False) == 1  # type: ignore[arg-type]
    finally:
        forks.close()
    fact_max("crash", "ttl_wait_s", max(waits))
    record(
        request,
        "crash",
        f"{name}: 3 lock holders killed; lock free again after"
        f" {', '.join(f'{w:.2f}s' for w in waits)} (lock_ttl {ttl}s)",
        kills=3,
        kills_lock_holders=3,
    )
    # Memcached counts TTLs in whole seconds: up to a second more.
    assert max(waits) <= ttl + 1.5
    assert not forks.errors


def test_cleanup_survives_a_save_renaming_its_temp_file(
    tmp_path: t.Any, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    """A save in flight renames its temp file over its record between the
    moment cleanup lists the shard and the moment it looks at the file (the
    race of a busy server, replayed deterministically)."""
    backend = FileSystemBackend(tmp_path / "sessions")
    expired = KEY[:-2] + "00"
    backend.save(expired, b"old", time.time() - 10)
    shard = backend._shard(expired)
    in_flight = os.path.join(shard, ".tmp-inflight0000000")
    saved = "session:" + "f" * 62 + "00"  # the in-flight save's record
    with open(in_flight, "wb") as f:
        f.write(filefmt.encode(b"new", time.time() + 60))
    real_scandir = os.scandir

    class ListedThenSaved:
        """``os.scandir`` of the shard; the save completes right after."""

        def __init__(self, path: str) -> None:
            with real_scandir(path) as it:
                self.entries = list(it)
            if os.fspath(path) == shard and os.path.exists(in_flight):
                os.replace(in_flight, backend._path(saved))

        def __enter__(self) -> list[os.DirEntry[str]]:
            return self.entries

        def __exit__(self, *exc: object) -> None:
            return None

    monkeypatch.setattr(os, "scandir", ListedThenSaved)
    removed = sum(backend.cleanup(time.time()))
    assert removed == 1
    assert backend.load(expired) is None
    assert backend.load(saved) is not None
