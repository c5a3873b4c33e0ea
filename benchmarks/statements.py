"""The SQL store's read and one-step write alone, per driver, beside the
floor's ``SELECT`` and ``UPDATE`` on the same server: what each way of
running the statements costs, without Flask around them.

Each cell is the median of 9 rounds of 300 calls, the cells interleaved
round by round. PostgreSQL is started on a loopback port as for ``run.py``.
Run from the repository root: ``python benchmarks/statements.py``.
"""

from __future__ import annotations

import pathlib
import statistics
import sys
import tempfile
import time
import typing as t

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.apps import PREPARED  # noqa: E402
from benchmarks.apps import SQLFloor  # noqa: E402
from flask_serverside.backends.sqlalchemy import SQLAlchemyBackend  # noqa: E402
from tests.servers import postgres  # noqa: E402

ROUNDS = 9
CALLS = 300
DATA = b"x" * 100


def cells(server: postgres.PostgresServer) -> dict[str, t.Callable[[], t.Any]]:
    """The calls to time, by label."""
    drivers = {
        "psycopg2": server.url,
        "psycopg 3": server.url_psycopg,
        f"psycopg 3, {PREPARED}": server.url_psycopg + PREPARED,
    }
    found: dict[str, t.Callable[[], t.Any]] = {}
    for label, url in drivers.items():
        backend = SQLAlchemyBackend(url=url)
        backend.save("session:k", DATA, time.time() + 1e6)
        floor = SQLFloor(url.partition("?")[0])
        floor.setup("f", DATA)
        found[f"{label}: ours, load"] = lambda b=backend: b.load("session:k")
        found[f"{label}: floor, read"] = lambda f=floor: f.read("f")
        found[f"{label}: ours, replace"] = lambda b=backend: b.replace(
            "session:k", DATA, DATA, time.time() + 1e6
        )
        found[f"{label}: floor, write"] = lambda f=floor: f.write("f", DATA)
    return found


def measure(calls: dict[str, t.Callable[[], t.Any]]) -> dict[str, float]:
    """Median µs per call of each, over interleaved rounds."""
    samples: dict[str, list[float]] = {label: [] for label in calls}
    for _ in range(ROUNDS):
        for label, call in calls.items():
            start = time.perf_counter()
            for _ in range(CALLS):
                call()
            samples[label].append((time.perf_counter() - start) / CALLS * 1e6)
    return {label: statistics.median(values) for label, values in samples.items()}


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        server = postgres.start(pathlib.Path(tmp))
        try:
            for label, us in measure(cells(server)).items():
                print(f"{label:45s} {us:7.1f} µs")
        finally:
            server.stop()


if __name__ == "__main__":
    main()
