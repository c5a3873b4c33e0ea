"""How flask_serverside scales with the number of stored sessions.

1.  Request cost (read and write, through the WSGI app) with 10^2, 10^4 and
    10^5 sessions on the filesystem, and with 10^3 and 10^6 rows on SQLite
    and PostgreSQL; the requests rotate over 100 of the stored sessions. The
    sizes take turns in interleaved rounds; the flatness ratio (largest
    store / smallest, median of the per-round ratios) should stay within
    1.2x. For SQL, ``backend.load`` alone is timed the same way.
2.  Cleanup of 10^5 expired files and of 10^6 expired rows, each in a fresh
    subprocess: total time, the longest single step (a shard directory, or
    one SQL batch and its commit), and the peak memory (``ru_maxrss`` of the
    subprocess during cleanup, minus before). The same for 10^4 files and
    10^3 rows shows whether that memory depends on the number of sessions.

Stores are filled directly: files with the backend's ``save`` (in two
processes), rows with one bulk ``INSERT ... SELECT``; the 100 sessions the
requests use are written with ``save`` under the keys of real session IDs.

Run it from the repository root: ``python benchmarks/scale.py`` (``make
bench`` runs it too). ``--quick`` divides every size by 10.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import gc
import json
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time
import typing as t
from datetime import datetime
from datetime import timezone

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import sqlalchemy as sa  # noqa: E402

from benchmarks import apps  # noqa: E402
from benchmarks.harness import environ  # noqa: E402
from benchmarks.harness import measure  # noqa: E402
from benchmarks.harness import median  # noqa: E402
from benchmarks.harness import paired_ratio  # noqa: E402
from benchmarks.harness import Target  # noqa: E402
from flask_serverside import ids  # noqa: E402
from flask_serverside.backends.filesystem import FileSystemBackend  # noqa: E402
from flask_serverside.backends.sqlalchemy import make_table  # noqa: E402
from flask_serverside.backends.sqlalchemy import SQLAlchemyBackend  # noqa: E402
from flask_serverside.serializers import get_serializer  # noqa: E402

PREFIX = "session:"
SAMPLE = 100
FLAT = 1.2
#: Peak-memory growth, large store over small, still called "independent".
MEMORY_SLACK_MB = 4.0
READ_BODY = b"ada:42:3"
DATA = get_serializer("json").dumps({**apps.CONTENT, "_permanent": True})
DAY = 86400

EXPIRES = sa.bindparam("expires", type_=sa.DateTime(timezone=True))
SQLITE_FILL = """
WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < :rows)
INSERT INTO {table} (id, data, expires)
SELECT 'session:' || lower(hex(randomblob(32))), randomblob(:size), :expires FROM n
"""
POSTGRES_FILL = """
INSERT INTO {table} (id, data, expires)
SELECT 'session:' || encode(sha256(int8send(i)), 'hex'),
       decode(repeat('ab', :size), 'hex'), :expires
FROM generate_series(1, :rows) AS i
"""


def ours_config(extra: dict[str, t.Any]) -> dict[str, t.Any]:
    # No automatic cleanup: the first request would scan the whole store.
    return {"SESSION_CLEANUP_INTERVAL": 0, **extra}


# -- filling ------------------------------------------------------------------


def _fill_files(directory: str, count: int, expires: float) -> int:
    backend = FileSystemBackend(directory)
    for _ in range(count):
        backend.save(PREFIX + os.urandom(32).hex(), DATA, expires)
    return count


def fill_files(directory: pathlib.Path, n: int, expires: float) -> list[str]:
    """``n`` records, the first ``SAMPLE`` of real session IDs; return those IDs."""
    backend = FileSystemBackend(directory)
    sids = [ids.generate(32) for _ in range(min(SAMPLE, n))]
    for sid in sids:
        backend.save(ids.storage_key(PREFIX, sid), DATA, expires)
    rest = n - len(sids)
    with concurrent.futures.ProcessPoolExecutor(2) as pool:
        chunks = [rest // 2, rest - rest // 2]
        list(pool.map(_fill_files, [str(directory)] * 2, chunks, [expires] * 2))
    return sids


def fill_rows(url: str, table: str, n: int, expires: float) -> list[str]:
    """``n`` rows, ``SAMPLE`` of them real sessions; return their IDs."""
    backend = SQLAlchemyBackend(url=url, table=table)
    engine = backend.engine
    make_table(table, sa.MetaData()).create(engine, checkfirst=True)
    template = SQLITE_FILL if engine.dialect.name == "sqlite" else POSTGRES_FILL
    stmt = sa.text(template.format(table=table)).bindparams(EXPIRES)
    sids = [ids.generate(32) for _ in range(min(SAMPLE, n))]
    with engine.begin() as conn:
        if engine.dialect.name == "sqlite":
            conn.exec_driver_sql(f"DELETE FROM {table}")
        else:
            conn.exec_driver_sql(f"TRUNCATE {table}")
        if n > len(sids):
            conn.execute(
                stmt,
                {"rows": n - len(sids), "size": len(DATA), "expires": _datetime(expires)},
            )
    for sid in sids:
        backend.save(ids.storage_key(PREFIX, sid), DATA, expires)
    analyze(engine, table)
    engine.dispose()
    return sids


def analyze(engine: sa.Engine, table: str) -> None:
    """Refresh the planner's statistics, as autovacuum would in time."""
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql(f"VACUUM ANALYZE {table}")
    else:
        with engine.begin() as conn:
            conn.exec_driver_sql(f"ANALYZE {table}")


def _datetime(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, timezone.utc)


# -- request cost ---------------------------------------------------------------


class Loads:
    """``backend.load`` over the sample keys, timed like a :class:`Target`."""

    def __init__(self, backend: t.Any, sids: list[str]) -> None:
        self.backend = backend
        self.keys = [ids.storage_key(PREFIX, sid) for sid in sids]

    def check(self) -> None:
        assert all(self.backend.load(key) is not None for key in self.keys)

    def run(self, n: int) -> float:
        keys, load = self.keys, self.backend.load
        start = time.perf_counter()
        for i in range(n):
            load(keys[i % len(keys)])
        return (time.perf_counter() - start) / n


def flatness(
    label: str, sized_apps: dict[int, tuple[t.Any, list[str]]], args: argparse.Namespace
) -> list[str]:
    """Time read and write requests for every store size; return report lines."""
    sizes = sorted(sized_apps)
    small, large = sizes[0], sizes[-1]
    lines = []
    for shape, expect in (("read", READ_BODY), ("write", b"ok")):
        targets = {
            size: Target(app, [environ(f"/{shape}", sid) for sid in sids], expect)
            for size, (app, sids) in sized_apps.items()
        }
        samples = measure(targets, args.rounds, args.batch_seconds)  # type: ignore[arg-type]
        ratio = paired_ratio(samples[large], samples[small])
        costs = ", ".join(f"{size:>9,}: {median(samples[size]) * 1e6:7.1f} µs" for size in sizes)
        lines.append(
            f"  {label:<10} {shape:<5} {costs}   {large:,}/{small:,} = {ratio:.2f}x"
            f" {'PASS' if ratio <= FLAT else 'FAIL'} (<= {FLAT}x)"
        )
        print(lines[-1], flush=True)
    return lines


# -- cleanup in a subprocess ------------------------------------------------------


def cleanup_worker(config: dict[str, t.Any]) -> None:
    """Run in the subprocess: clean up the store, print a JSON report."""
    apps.quiet()
    app = apps.ours_app(pathlib.Path(tempfile.mkdtemp()), ours_config(config))
    ext = app.extensions["serverside"]
    store = app.session_interface.store  # type: ignore[attr-defined]
    with app.app_context():
        ext.get(ids.generate(32))  # connect, import, create what is lazy
        gc.collect()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        steps = []
        start = last = time.perf_counter()
        removed = 0
        for count in store.cleanup():
            now = time.perf_counter()
            steps.append(now - last)
            removed += count
            last = now
        total = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        left = ext.count()
    print(
        json.dumps(
            {
                "removed": removed,
                "left": left,
                "seconds": total,
                "steps": len(steps),
                "longest": max(steps, default=0.0),
                "rss_before_kb": before,
                "rss_peak_kb": after,
            }
        )
    )


def run_cleanup(config: dict[str, t.Any]) -> dict[str, t.Any]:
    result = subprocess.run(
        [sys.executable, __file__, "--cleanup-worker", json.dumps(config)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"cleanup worker failed:\n{result.stderr}")
    return t.cast(dict[str, t.Any], json.loads(result.stdout.strip().splitlines()[-1]))


def cleanup_report(label: str, unit: str, results: dict[int, dict[str, t.Any]]) -> list[str]:
    lines = []
    for size, r in sorted(results.items()):
        delta = (r["rss_peak_kb"] - r["rss_before_kb"]) / 1024
        lines.append(
            f"  {label:<10} {size:>9,} expired {unit}: removed {r['removed']:,} in"
            f" {r['seconds']:6.1f} s ({r['seconds'] / max(r['removed'], 1) * 1e6:.0f} µs each),"
            f" {r['steps']} steps, longest {r['longest'] * 1e3:.0f} ms;"
            f" peak memory +{delta:.1f} MB (ru_maxrss {r['rss_peak_kb'] / 1024:.0f} MB),"
            f" {r['left']} left"
        )
        print(lines[-1], flush=True)
    if unit == "rows":
        longest = max(r["longest"] for r in results.values())
        lines.append(
            f"  {label:<10} longest cleanup batch {longest * 1e3:.0f} ms"
            f" {'PASS' if longest <= 0.1 else 'FAIL'} (<= ~100 ms, so requests never"
            " wait long on its locks)"
        )
        print(lines[-1], flush=True)
    small, large = min(results), max(results)
    grow = (results[large]["rss_peak_kb"] - results[large]["rss_before_kb"]) - (
        results[small]["rss_peak_kb"] - results[small]["rss_before_kb"]
    )
    ok = grow / 1024 <= MEMORY_SLACK_MB
    lines.append(
        f"  {label:<10} cleanup memory independent of the number of {unit}:"
        f" {'yes' if ok else 'NO'} ({large:,} vs {small:,}: {grow / 1024:+.1f} MB;"
        f" allowed {MEMORY_SLACK_MB:+.0f} MB)"
    )
    print(lines[-1], flush=True)
    return lines


# -- the stores -------------------------------------------------------------------


def bench_files(tmp: pathlib.Path, args: argparse.Namespace) -> list[str]:
    live = time.time() + DAY
    sized = {}
    for size in (10**2 // args.div or 10, 10**4 // args.div, 10**5 // args.div):
        directory = tmp / f"live-{size}"
        start = time.perf_counter()
        sids = fill_files(directory, size, live)
        print(f"  filesystem: wrote {size:,} sessions in {time.perf_counter() - start:.1f} s")
        app = apps.ours_app(
            tmp / f"instance-{size}", ours_config({"SESSION_FILE_DIR": str(directory)})
        )
        sized[size] = (app, sids)
    lines = flatness("filesystem", sized, args)
    results = {}
    for size in (10**4 // args.div, 10**5 // args.div):
        directory = tmp / f"expired-{size}"
        start = time.perf_counter()
        fill_files(directory, size, time.time() - 60)
        print(
            f"  filesystem: wrote {size:,} expired sessions in {time.perf_counter() - start:.1f} s"
        )
        os.sync()
        results[size] = run_cleanup({"SESSION_FILE_DIR": str(directory)})
    return lines + cleanup_report("filesystem", "files", results)


def bench_sql(label: str, url: str, tmp: pathlib.Path, args: argparse.Namespace) -> list[str]:
    live = time.time() + DAY
    sized = {}
    backends = {}
    for size in (10**3 // args.div, 10**6 // args.div):
        table = f"bench_{size}"
        start = time.perf_counter()
        sids = fill_rows(url, table, size, live)
        print(f"  {label}: filled {size:,} rows in {time.perf_counter() - start:.1f} s", flush=True)
        config = {
            "SESSION_BACKEND": "sqlalchemy",
            "SESSION_SQLALCHEMY_URL": url,
            "SESSION_SQLALCHEMY_TABLE": table,
        }
        app = apps.ours_app(tmp / f"instance-{table}", ours_config(config))
        sized[size] = (app, sids)
        backends[size] = Loads(app.session_interface.store.backend, sids)  # type: ignore[attr-defined]
    lines = flatness(label, sized, args)
    samples = measure(backends, args.rounds, args.batch_seconds)  # type: ignore[arg-type]
    small, large = min(samples), max(samples)
    ratio = paired_ratio(samples[large], samples[small])
    costs = ", ".join(
        f"{size:>9,}: {median(samples[size]) * 1e6:7.1f} µs" for size in sorted(samples)
    )
    lines.append(
        f"  {label:<10} load  {costs}   {large:,}/{small:,} = {ratio:.2f}x"
        f" {'PASS' if ratio <= FLAT else 'FAIL'} (<= {FLAT}x; backend.load alone)"
    )
    print(lines[-1], flush=True)
    for app, _ in sized.values():
        app.session_interface.store.backend.engine.dispose()  # type: ignore[attr-defined]
    results = {}
    for size in sorted(sized):
        table = f"bench_{size}"
        start = time.perf_counter()
        fill_rows(url, table, size, time.time() - 60)
        print(
            f"  {label}: filled {size:,} expired rows in {time.perf_counter() - start:.1f} s",
            flush=True,
        )
        results[size] = run_cleanup(
            {
                "SESSION_BACKEND": "sqlalchemy",
                "SESSION_SQLALCHEMY_URL": url,
                "SESSION_SQLALCHEMY_TABLE": table,
            }
        )
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        for size in sized:
            conn.exec_driver_sql(f"DROP TABLE bench_{size}")
    engine.dispose()
    return lines + cleanup_report(label, "rows", results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--batch-seconds", type=float, default=0.05)
    parser.add_argument("--stores", default="filesystem,sqlite,postgres")
    parser.add_argument(
        "--quick",
        dest="div",
        action="store_const",
        const=10,
        default=1,
        help="every size divided by 10",
    )
    parser.add_argument("--cleanup-worker", help=argparse.SUPPRESS)
    parser.add_argument(
        "--tmpdir", help="where files and SQLite live (default: the system's temp dir)"
    )
    args = parser.parse_args()
    if args.cleanup_worker:
        cleanup_worker(json.loads(args.cleanup_worker))
        return
    apps.quiet()
    started = time.perf_counter()
    stores = args.stores.split(",")
    report: list[str] = []
    with tempfile.TemporaryDirectory(prefix="fss-scale-", dir=args.tmpdir) as name:
        tmp = pathlib.Path(name)
        if "filesystem" in stores:
            print("Filesystem", flush=True)
            report += ["Filesystem"] + bench_files(tmp / "fs", args)
        if "sqlite" in stores:
            print("SQLite", flush=True)
            url = f"sqlite:///{tmp}/scale.sqlite3"
            report += ["SQLite"] + bench_sql("SQLite", url, tmp, args)
        if "postgres" in stores:
            print("PostgreSQL", flush=True)
            with apps.started_store("postgres", tmp / "pg") as store:
                if isinstance(store, str):
                    report.append(f"PostgreSQL {store}")
                else:
                    assert store.server is not None
                    report += ["PostgreSQL"] + bench_sql("PostgreSQL", store.server.url, tmp, args)
    print("\n" + "=" * 100)
    print(
        f"Median cost per request ({args.rounds} interleaved rounds, requests rotating over"
        f" {SAMPLE} stored sessions) and flatness ratios:"
    )
    print("\n".join(report))
    print(f"\n{time.perf_counter() - started:.0f} s.")


if __name__ == "__main__":
    main()
