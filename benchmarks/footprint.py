"""What a live session costs in storage, per store, and what cleanup costs.

For each store (filesystem, SQLite, PostgreSQL, Redis, Memcached) and two
session sizes (a typical small one, about 150 bytes serialized, and one of
4 KB), sessions are written through the extension's own save path
(``app.session_interface.store.save`` on a new
:class:`~flask_serverside.session.ServerSideSession`, exactly what the end
of a request that creates a session does), up to 10^4 and then 10^5 live
sessions, and the store's own accounting is read before and after:

- filesystem: the record files' allocated blocks (``st_blocks * 512``) plus
  the growth of the directories themselves, and the apparent size
  (``st_size``), and the inodes used;
- SQLite: ``page_count * page_size`` after a WAL checkpoint;
- PostgreSQL: ``pg_total_relation_size`` of the table (heap, index and
  TOAST), and each part;
- Redis: ``used_memory`` of ``INFO memory`` and ``DBSIZE``;
- Memcached: ``stats`` ``bytes`` and ``curr_items``, and ``stats slabs``:
  the slab class(es) used, their chunk size and the memory they took.

Then cleanup: 10^4 expired records are written through the same path (with
a lifetime in the past) and ``cleanup()`` is timed, once in a store that
holds only them and once next to the 10^5 live small sessions (which a
filesystem cleanup has to read as well), for the filesystem, SQLite and
PostgreSQL (Redis and Memcached expire records themselves).

Run it from the repository root: ``python benchmarks/footprint.py`` (it
writes 4 x 10^5 sessions: 17 minutes on a loaded 2-CPU machine);
``--sizes 1000,10000`` for a quick look, ``--stores redis,memcached`` for
a subset.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import platform
import random
import sqlite3
import string
import subprocess
import sys
import tempfile
import time
import typing as t
from collections.abc import Callable
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from dataclasses import field

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import sqlalchemy as sa  # noqa: E402
from flask import Flask  # noqa: E402

from benchmarks import apps  # noqa: E402
from flask_serverside.serializers import get_serializer  # noqa: E402
from flask_serverside.session import ServerSideSession  # noqa: E402

STORES = ("filesystem", "sqlite", "postgres", "redis", "memcached")
DAY = 86400.0
LIFETIME = 14 * DAY

#: A typical logged-in session: a user, a small cart, a CSRF token.
SMALL: dict[str, t.Any] = {
    "user_id": 12345,
    "cart": [
        {"sku": "TEA-001", "qty": 2},
        {"sku": "MUG-017", "qty": 1},
        {"sku": "HNY-250", "qty": 1},
    ],
    "csrf": "Jx3Vq9sLw0bZ4tUe7yHn2kAa5cRf8pMd1gTi6oEv-Ws",
}


def big_session(target: int) -> dict[str, t.Any]:
    """:data:`SMALL` plus a browsing history, about ``target`` bytes
    serialized. Each entry carries a random token, so the record compresses
    about as badly as real data does (PostgreSQL compresses values over
    about 2 KB; a history of repeated text would measure its compressor)."""
    rng = random.Random(4096)
    alphabet = string.ascii_letters + string.digits + "-_"
    history: list[str] = []
    data = dict(SMALL, history=history)
    serializer = get_serializer("json")
    with Flask(__name__).app_context():
        while len(serializer.dumps({**data, "_permanent": True})) < target - 100:
            token = "".join(rng.choice(alphabet) for _ in range(48))
            history.append(f"/catalog/item/{rng.randrange(10**6)}?ref={token}")
    return data


@dataclass
class Result:
    """One store at one session size."""

    store: str
    label: str
    record: int
    #: N -> (measured bytes per session, a second figure or None, a note)
    points: dict[int, tuple[float, float | None, str]] = field(default_factory=dict)


# -- writing through the extension -----------------------------------------------


def write_sessions(app: Flask, data: dict[str, t.Any], n: int, lifetime: float) -> list[str]:
    """Create ``n`` sessions holding ``data`` with the extension's save path;
    return their IDs."""
    store = app.session_interface.store  # type: ignore[attr-defined]
    sids = []
    with app.app_context():
        for _ in range(n):
            session = ServerSideSession(store, None, True)
            session.update(data)
            session.permanent = True
            outcome = store.save(session, lifetime)
            assert outcome.value == "created", outcome
            sids.append(session.sid)
        if lifetime > 0:
            assert store.get(sids[-1]) == {**data, "_permanent": True}
    return sids


def record_size(app: Flask, data: dict[str, t.Any]) -> int:
    """The bytes a backend is given for a session holding ``data``: the
    record header and the serialized data."""
    from flask_serverside import record

    store = app.session_interface.store  # type: ignore[attr-defined]
    with app.app_context():
        raw = store.serializer.dumps({**data, "_permanent": True})
    return len(record.pack(record.Meta(created=1.0, issued=1.0), raw))


def make_app(tmp: pathlib.Path, config: dict[str, t.Any]) -> Flask:
    return apps.ours_app(tmp, {"SESSION_CLEANUP_INTERVAL": 0, **config})


# -- measuring each store -----------------------------------------------------------


def files_usage(directory: pathlib.Path) -> tuple[int, int, int]:
    """Allocated bytes (records and directories), apparent bytes of the
    records, and inodes, under ``directory``."""
    allocated = apparent = inodes = 0
    for root, _dirs, files in os.walk(directory):
        st = os.stat(root)
        allocated += st.st_blocks * 512
        inodes += 1
        for name in files:
            st = os.lstat(os.path.join(root, name))
            allocated += st.st_blocks * 512
            apparent += st.st_size
            inodes += 1
    return allocated, apparent, inodes


def sqlite_bytes(path: pathlib.Path) -> int:
    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        size = conn.execute("PRAGMA page_size").fetchone()[0]
        return int(pages * size)
    finally:
        conn.close()


def pg_sizes(url: str, table: str) -> tuple[int, int, int, int]:
    """Total, heap, indexes and TOAST of ``table``, in bytes."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            row = conn.execute(
                sa.text(
                    "SELECT pg_total_relation_size(c.oid), pg_relation_size(c.oid),"
                    " pg_indexes_size(c.oid),"
                    " COALESCE(pg_total_relation_size(NULLIF(c.reltoastrelid, 0)), 0)"
                    " FROM pg_class c WHERE c.relname = :t"
                ),
                {"t": table},
            ).one()
        return int(row[0]), int(row[1]), int(row[2]), int(row[3])
    finally:
        engine.dispose()


def redis_usage(client: t.Any) -> tuple[int, int]:
    return int(client.info("memory")["used_memory"]), int(client.dbsize())


def memcached_stats(port: int) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
    """``stats`` and ``stats slabs`` (per class) of the Memcached on ``port``."""
    import socket

    def ask(command: bytes) -> list[list[str]]:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(command + b"\r\n")
            buf = b""
            while not buf.endswith(b"END\r\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                buf += chunk
        return [line.split() for line in buf.decode().splitlines() if line.startswith("STAT")]

    stats = {}
    for _, name, value, *_ in ask(b"stats"):
        with contextlib.suppress(ValueError):
            stats[name] = int(value)
    slabs: dict[str, dict[str, int]] = {}
    for _, name, value, *_ in ask(b"stats slabs"):
        if ":" in name:
            cls, key = name.split(":", 1)
            slabs.setdefault(cls, {})[key] = int(value)
    return stats, slabs


# -- the runs ----------------------------------------------------------------------

Measure = Callable[[], tuple[float, "float | None", str]]
#: One app per config in each writer process.
_APPS: dict[str, Flask] = {}


def _write_chunk(config: dict[str, t.Any], data: dict[str, t.Any], n: int, lifetime: float) -> int:
    """In a writer process: write ``n`` sessions to the store of ``config``."""
    key = repr(sorted(config.items()))
    if key not in _APPS:
        apps.quiet()
        _APPS[key] = make_app(pathlib.Path(tempfile.mkdtemp(prefix="fss-writer-")), config)
    write_sessions(_APPS[key], data, n, lifetime)
    return n


class Writer:
    """Writes sessions in ``workers`` processes, each through its own app
    (the extension's save path, as in a multi-process server)."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.pool = ProcessPoolExecutor(workers)

    def write(
        self, config: dict[str, t.Any], data: dict[str, t.Any], n: int, lifetime: float
    ) -> None:
        chunks = [n // self.workers + (i < n % self.workers) for i in range(self.workers)]
        jobs = [c for c in chunks if c]
        done = sum(
            self.pool.map(
                _write_chunk, [config] * len(jobs), [data] * len(jobs), jobs, [lifetime] * len(jobs)
            )
        )
        assert done == n

    def close(self) -> None:
        self.pool.shutdown()


@contextlib.contextmanager
def timed(what: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    print(f"    {what}: {time.perf_counter() - start:.1f} s", flush=True)


def grow(
    writer: Writer,
    config: dict[str, t.Any],
    data: dict[str, t.Any],
    sizes: list[int],
    measure: Measure,
    label: str,
) -> dict[int, tuple[float, float | None, str]]:
    """Write sessions up to each of ``sizes``; ``measure`` returns the
    store's figures (primary, secondary, note) as totals; return them per
    session, as the difference from the empty store."""
    base = measure()
    points = {}
    written = 0
    for n in sizes:
        with timed(f"{label}: {n - written:,} sessions written"):
            writer.write(config, data, n - written, LIFETIME)
        written = n
        now = measure()
        second = None if base[1] is None or now[1] is None else (now[1] - base[1]) / n
        points[n] = ((now[0] - base[0]) / n, second, now[2])
    return points


def cleanup_seconds(
    writer: Writer, app: Flask, config: dict[str, t.Any], data: dict[str, t.Any], n: int
) -> tuple[float, int]:
    """Write ``n`` expired sessions, then time a full ``cleanup()``."""
    writer.write(config, data, n, -60.0)
    store = app.session_interface.store  # type: ignore[attr-defined]
    os.sync()
    with app.app_context():
        start = time.perf_counter()
        removed = sum(store.cleanup())
        return time.perf_counter() - start, removed


def run_store(
    name: str,
    tmp: pathlib.Path,
    sizes: list[int],
    datas: dict[str, dict[str, t.Any]],
    writer: Writer,
) -> tuple[list[Result], list[str]]:
    """Every size of session on the store ``name``; return the results and
    the cleanup lines."""
    results: list[Result] = []
    cleanups: list[str] = []
    with apps.started_store(name, tmp / name) as started:
        if isinstance(started, str):
            return [], [f"{name}: {started}"]
        for label, data in datas.items():
            where = tmp / name / label
            config, measure, after = _configure(name, started, where, label)
            app = make_app(where, config)
            result = Result(name, label, record_size(app, data))
            result.points = grow(writer, config, data, sizes, measure, f"{name} {label}")
            results.append(result)
            if name in ("filesystem", "sqlite", "postgres") and label == "small":
                cleanups += _cleanups(name, started, tmp, app, config, data, sizes, writer)
            _dispose(app)
            after()
    return results, cleanups


def _cleanups(
    name: str,
    started: apps.Store,
    tmp: pathlib.Path,
    app: Flask,
    config: dict[str, t.Any],
    data: dict[str, t.Any],
    sizes: list[int],
    writer: Writer,
) -> list[str]:
    """Cleanup of expired records next to the live ones, then alone."""
    n = min(sizes[0], 10**4)
    lines = []
    seconds, removed = cleanup_seconds(writer, app, config, data, n)
    lines.append(
        f"{name:<10} {removed:>7,} expired among {sizes[-1]:>8,} live:"
        f" {seconds:6.2f} s, {seconds / max(removed, 1) * 1e6:6.0f} µs per record removed"
    )
    print("    " + lines[-1], flush=True)
    where = tmp / name / "expired-only"
    config, _, after = _configure(name, started, where, "expired")
    fresh = make_app(where, config)
    seconds, removed = cleanup_seconds(writer, fresh, config, data, n)
    lines.append(
        f"{name:<10} {removed:>7,} expired, nothing else:       "
        f" {seconds:6.2f} s, {seconds / max(removed, 1) * 1e6:6.0f} µs per record removed"
    )
    print("    " + lines[-1], flush=True)
    _dispose(fresh)
    after()
    return lines


def _configure(
    name: str, started: apps.Store, where: pathlib.Path, label: str
) -> tuple[dict[str, t.Any], Measure, Callable[[], None]]:
    """The config of a fresh part of the store, how to measure that part,
    and how to release it. The part is created (directory, table) before
    it is first measured."""
    where.mkdir(parents=True, exist_ok=True)
    config: dict[str, t.Any]
    measure: Measure
    after: Callable[[], None] = lambda: None  # noqa: E731
    if name == "filesystem":
        directory = where / "sessions"
        config = {"SESSION_FILE_DIR": str(directory)}

        def measure_files() -> tuple[float, float | None, str]:
            allocated, apparent, inodes = files_usage(directory)
            return allocated, apparent, f"{inodes:,} inodes"

        measure = measure_files
    elif name == "sqlite":
        path = where / "sessions.sqlite3"
        config = {"SESSION_BACKEND": "sqlalchemy", "SESSION_SQLALCHEMY_URL": f"sqlite:///{path}"}

        def measure_sqlite() -> tuple[float, float | None, str]:
            return sqlite_bytes(path), None, ""

        measure = measure_sqlite
    elif name == "postgres":
        assert started.server is not None
        url = started.server.url
        table = f"sessions_{label}"
        config = {
            "SESSION_BACKEND": "sqlalchemy",
            "SESSION_SQLALCHEMY_URL": url,
            "SESSION_SQLALCHEMY_TABLE": table,
        }

        def measure_pg() -> tuple[float, float | None, str]:
            total, heap, index, toast = pg_sizes(url, table)
            return total, None, f"heap {heap:,}, indexes {index:,}, TOAST {toast:,}"

        measure = measure_pg
    elif name == "redis":
        import redis

        assert started.server is not None
        client = redis.Redis(host="127.0.0.1", port=started.server.port)
        client.flushall()
        config = dict(started.ours)

        def measure_redis() -> tuple[float, float | None, str]:
            used, keys = redis_usage(client)
            return used, keys, f"{keys:,} keys"

        def release_redis() -> None:
            client.flushall()
            client.close()

        measure, after = measure_redis, release_redis
    elif name == "memcached":
        assert started.server is not None
        # A fresh server: flush_all leaves the old items counted until
        # they are reclaimed, and their slabs allocated.
        started.server.stop()
        started.server.start_again()
        config = dict(started.ours)
        measure = _memcached_measure(started.server.port)
    else:
        raise ValueError(name)
    # Unused by the extension: one app per part in each writer process.
    config["FOOTPRINT_PART"] = str(where)
    if name in ("filesystem", "sqlite", "postgres"):
        # Create the directory and its shards, or the table and its indexes.
        app = make_app(where, config)
        write_sessions(app, {"warm": 1}, 64, -60.0)
        with app.app_context():
            sum(app.session_interface.store.cleanup())  # type: ignore[attr-defined]
        _dispose(app)
    return config, measure, after


def _dispose(app: Flask) -> None:
    engine = getattr(app.session_interface.store.backend, "engine", None)  # type: ignore[attr-defined]
    if engine is not None:
        engine.dispose()


def _memcached_measure(port: int) -> Measure:
    """Memcached's ``bytes`` (item headers, keys and values), and the memory
    of the slab classes its items live in (whole chunks, as allocated)."""

    def measure() -> tuple[float, float | None, str]:
        stats, slabs = memcached_stats(port)
        used = {cls: s for cls, s in slabs.items() if s.get("used_chunks", 0) > 0}
        chunks = sum(s["chunk_size"] * s["used_chunks"] for s in used.values())
        note = ", ".join(
            f"class {cls}: chunk {s['chunk_size']} B x {s['used_chunks']:,}"
            for cls, s in sorted(used.items(), key=lambda kv: int(kv[0]))
        )
        note = f"{note or 'no slab in use'}; {stats.get('evictions', 0):,} evicted"
        return stats["bytes"], chunks, note

    return measure


# -- the report ----------------------------------------------------------------------


UNITS = {
    "filesystem": ("disk B", "apparent B"),
    "sqlite": ("file B", None),
    "postgres": ("relation B", None),
    "redis": ("used_memory B", "keys"),
    "memcached": ("bytes B", "chunk B"),
}


def report(results: list[Result], cleanups: list[str], started: float) -> None:
    from flask_serverside import __version__ as version

    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    print("\n" + "=" * 110)
    print(
        f"flask_serverside {version} at {commit or '?'}, Python {platform.python_version()},"
        f" {platform.machine()}, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}"
    )
    print("Storage per live session (the store's own accounting, difference from empty / N):")
    print(
        f"{'store':<11}{'session':<8}{'record B':>9}{'N':>9}  {'per session':>24}"
        f"  {'second figure':>24}  note"
    )
    for r in results:
        first, second = UNITS[r.store]
        for n, (value, other, note) in sorted(r.points.items()):
            other_text = "" if other is None or second is None else f"{other:10,.1f} {second}"
            print(
                f"{r.store:<11}{r.label:<8}{r.record:>9,}{n:>9,}  {value:10,.1f} {first:<13}"
                f"  {other_text:>24}  {note}"
            )
    if cleanups:
        print("\nCleanup (cleanup() to the end, small sessions):")
        for line in cleanups:
            print("  " + line)
    print(f"\n{time.perf_counter() - started:.0f} s.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stores", default=",".join(STORES))
    parser.add_argument("--sizes", default="10000,100000", help="numbers of live sessions")
    parser.add_argument("--big", type=int, default=4096, help="bytes of the big session")
    parser.add_argument("--workers", type=int, default=2, help="writer processes")
    parser.add_argument("--tmpdir", help="where files and SQLite live (default: system temp)")
    args = parser.parse_args()
    apps.quiet()
    started = time.perf_counter()
    sizes = sorted(int(s) for s in args.sizes.split(","))
    datas = {"small": SMALL, "4KB": big_session(args.big)}
    results: list[Result] = []
    cleanups: list[str] = []
    writer = Writer(args.workers)
    try:
        with tempfile.TemporaryDirectory(prefix="fss-footprint-", dir=args.tmpdir) as name:
            tmp = pathlib.Path(name)
            for store in args.stores.split(","):
                print(store, flush=True)
                found, lines = run_store(store, tmp, sizes, datas, writer)
                results += found
                cleanups += lines
            # Before the temporary directory goes: removing 10^5 files takes a while.
            report(results, cleanups, started)
    finally:
        writer.close()


if __name__ == "__main__":
    main()
