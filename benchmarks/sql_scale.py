"""How the SQL backend scales with the number of stored sessions.

For SQLite, and PostgreSQL when its binaries are installed:

1.  ``load`` of an existing session in a table of 10^3 rows and in one of
    10^6 rows, timed in interleaved rounds; the ratio of the medians should
    stay at or below 1.2 (an index lookup does not grow with the table).
2.  ``cleanup`` of 10^6 expired rows: the total time, and the longest single
    batch (one statement and its commit), which should stay at or below
    about 100 ms so that requests never wait long on cleanup's locks.

Run it from the repository root: ``python benchmarks/sql_scale.py``.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import tempfile
import time
from datetime import datetime
from datetime import timezone

import sqlalchemy as sa

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from flask_serverside.backends.sqlalchemy import SQLAlchemyBackend  # noqa: E402
from tests.servers import postgres  # noqa: E402
from tests.servers import ServerNotFound  # noqa: E402

SMALL = 1_000
ROUNDS = 15
LOADS_PER_ROUND = 500
DATA_BYTES = 200

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


def fill(backend: SQLAlchemyBackend, rows: int) -> list[str]:
    """Insert ``rows`` live sessions in one statement; return some of their keys."""
    backend.count(time.time())  # creates the table
    template = SQLITE_FILL if backend.engine.dialect.name == "sqlite" else POSTGRES_FILL
    stmt = sa.text(template.format(table=backend.table.name)).bindparams(EXPIRES)
    expires = datetime.fromtimestamp(time.time() + 86400, timezone.utc)
    sample = sa.select(backend.table.c.id).order_by(sa.func.random()).limit(LOADS_PER_ROUND)

    with backend.engine.begin() as conn:
        conn.execute(stmt, {"rows": rows, "size": DATA_BYTES, "expires": expires})

    analyze(backend)

    with backend.engine.connect() as conn:
        return list(conn.execute(sample).scalars())


def analyze(backend: SQLAlchemyBackend) -> None:
    """Refresh the planner's statistics, as autovacuum would in time."""
    if backend.engine.dialect.name == "postgresql":
        with backend.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql(f"VACUUM ANALYZE {backend.table.name}")


def time_loads(backends: dict[int, tuple[SQLAlchemyBackend, list[str]]]) -> dict[int, float]:
    """Median seconds per ``load``, for each table size, in interleaved rounds."""
    samples: dict[int, list[float]] = {rows: [] for rows in backends}

    for round_ in range(ROUNDS + 1):
        order = list(backends) if round_ % 2 else list(reversed(backends))

        for rows in order:
            backend, keys = backends[rows]
            start = time.perf_counter()

            for key in keys:
                assert backend.load(key) is not None

            if round_:  # the first round warms up caches and pools
                samples[rows].append((time.perf_counter() - start) / len(keys))

    return {rows: statistics.median(values) for rows, values in samples.items()}


def time_cleanup(backend: SQLAlchemyBackend) -> tuple[float, float, int, int]:
    """Expire every row, then clean up: (total s, longest batch s, rows, batches)."""
    past = datetime.fromtimestamp(time.time() - 60, timezone.utc)

    with backend.engine.begin() as conn:
        conn.execute(sa.update(backend.table).values(expires=EXPIRES), {"expires": past})

    analyze(backend)
    batches = []
    start = last = time.perf_counter()

    for removed in backend.cleanup(time.time()):
        now = time.perf_counter()
        batches.append((now - last, removed))
        last = now

    total = time.perf_counter() - start
    return total, max(t for t, _ in batches), sum(n for _, n in batches), len(batches)


def run(name: str, url: str, large: int) -> None:
    print(f"\n{name}")
    backends = {}

    for rows in (SMALL, large):
        backend = SQLAlchemyBackend(url=url, table=f"bench_{rows}")
        start = time.perf_counter()
        backends[rows] = (backend, fill(backend, rows))
        print(f"  filled {rows:>9,} rows in {time.perf_counter() - start:6.1f} s")

    medians = time_loads(backends)

    for rows, median in medians.items():
        print(f"  load, {rows:>9,} rows: {median * 1e6:7.1f} µs (median of {ROUNDS} rounds)")

    print(f"  ratio {large:,} / {SMALL:,}: {medians[large] / medians[SMALL]:.2f}x (target <= 1.2x)")
    total, longest, removed, batches = time_cleanup(backends[large][0])
    print(
        f"  cleanup: {removed:,} rows in {batches} batches, {total:.1f} s;"
        f" longest batch {longest * 1e3:.0f} ms (target <= ~100 ms)"
    )

    for backend, _ in backends.values():
        backend.table.drop(backend.engine)
        backend.engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows of the large table")
    large = parser.parse_args().rows

    with tempfile.TemporaryDirectory() as tmp:
        run("SQLite", f"sqlite:///{tmp}/sessions.sqlite3", large)

        try:
            server = postgres.start(pathlib.Path(tmp))
        except ServerNotFound as exc:
            print(f"\nPostgreSQL skipped: {exc}")
            return

        try:
            run("PostgreSQL", server.url, large)
        finally:
            server.stop()


if __name__ == "__main__":
    main()
