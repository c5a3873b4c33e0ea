"""Per-request cost: Flask's cookie session vs flask_serverside vs Flask-Session 0.8.

For each store (filesystem, SQLite, PostgreSQL, Redis, Memcached) and each
request shape (a request that leaves the session untouched, one that reads
it, one that writes a key), the three apps are called directly as WSGI apps
with a prebuilt environ carrying the session cookie each got from a first
request. They take turns in rounds; the table shows each one's median cost
per request and the median of the per-round ratios, with a PASS/FAIL per
target. For every missed target, cProfile output of our request and of the
cookie one follows (sorted by tottime) and is written to
``benchmarks/results/``.

Run it from the repository root: ``python benchmarks/run.py`` (or
``make bench``). PostgreSQL, Redis and Memcached are started on loopback
ports from their system binaries, and skipped when those are missing.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time
import typing as t
from dataclasses import dataclass

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks import apps  # noqa: E402
from benchmarks.harness import environ  # noqa: E402
from benchmarks.harness import format_stats  # noqa: E402
from benchmarks.harness import io_calls  # noqa: E402
from benchmarks.harness import login  # noqa: E402
from benchmarks.harness import measure  # noqa: E402
from benchmarks.harness import median  # noqa: E402
from benchmarks.harness import paired_ratio  # noqa: E402
from benchmarks.harness import profile  # noqa: E402
from benchmarks.harness import Target  # noqa: E402

SHAPES = ("untouched", "read", "write")
RESULTS = pathlib.Path(__file__).resolve().parent / "results"
READ_BODY = b"ada:42:3"


def ours_cookie_target(shape: str, backend: str) -> float:
    """The highest allowed ours/cookie ratio."""
    if shape == "untouched":
        return 1.05
    if shape == "read":
        return {"filesystem": 1.25, "postgres": 2.0}.get(backend, 1.5)
    return {"filesystem": 1.6, "postgres": 3.0}.get(backend, 2.2)


def fs_ours_target(shape: str, backend: str) -> float | None:
    """The lowest allowed flask-session/ours ratio (read requests only)."""
    if shape != "read":
        return None
    return 5.0 if backend in ("sqlite", "postgres") else 2.0


@dataclass
class Row:
    backend: str
    shape: str
    cost: dict[str, float]
    ours_cookie: float
    fs_ours: float
    ours_cookie_np: float | None

    @property
    def ours_cookie_ok(self) -> bool:
        return self.ours_cookie <= ours_cookie_target(self.shape, self.backend)

    @property
    def fs_ours_ok(self) -> bool | None:
        low = fs_ours_target(self.shape, self.backend)
        return None if low is None else self.fs_ours >= low


def verdict(ok: bool | None) -> str:
    return "" if ok is None else ("PASS" if ok else "FAIL")


HEADER = (
    f"{'store':<11} {'request':<10} {'cookie µs':>10} {'ours µs':>9} {'f-s µs':>9}"
    f"  {'ours/cookie':>11} {'target':>7} {'':4}  {'f-s/ours':>8} {'target':>7} {'':4}"
)


def format_row(row: Row) -> str:
    low = fs_ours_target(row.shape, row.backend)
    high = ours_cookie_target(row.shape, row.backend)
    return (
        f"{apps.LABELS[row.backend]:<11} {row.shape:<10}"
        f" {row.cost['cookie'] * 1e6:>10.1f} {row.cost['ours'] * 1e6:>9.1f}"
        f" {row.cost['flask-session'] * 1e6:>9.1f}"
        f"  {row.ours_cookie:>11.2f} {'<= ' + format(high, '.2f'):>7}"
        f" {verdict(row.ours_cookie_ok):4}"
        f"  {row.fs_ours:>8.2f} {('>= ' + format(low, '.1f')) if low else '':>7}"
        f" {verdict(row.fs_ours_ok):4}"
    ).rstrip()


def targets_for(shape: str, made: dict[str, tuple[t.Any, str]]) -> dict[str, Target]:
    expect = {"untouched": b"ok", "read": READ_BODY, "write": b"ok"}[shape]
    kinds = [*apps.KINDS, "cookie-np"] if shape == "untouched" else list(apps.KINDS)
    return {
        kind: Target(made[kind][0], [environ(f"/{shape}", made[kind][1])], expect) for kind in kinds
    }


def bench_store(
    store: apps.Store,
    tmp: pathlib.Path,
    args: argparse.Namespace,
    fails: list[tuple[Row, dict[str, Target]]],
) -> list[Row]:
    made = {}
    for kind in [*apps.KINDS, "cookie-np"]:
        app = apps.make_app(kind, store, tmp / kind)
        made[kind] = (app, login(app))
    rows = []
    for shape in SHAPES:
        targets = targets_for(shape, made)
        samples = measure(targets, args.rounds, args.batch_seconds)
        cost = {kind: median(values) for kind, values in samples.items()}
        row = Row(
            store.name,
            shape,
            cost,
            paired_ratio(samples["ours"], samples["cookie"]),
            paired_ratio(samples["flask-session"], samples["ours"]),
            paired_ratio(samples["ours"], samples["cookie-np"]) if "cookie-np" in samples else None,
        )
        print(format_row(row), flush=True)
        rows.append(row)
        missed = not row.ours_cookie_ok or row.fs_ours_ok is False
        if not args.no_profile and (args.profile_all or missed):
            fails.append((row, targets))
            write_profiles(row, targets, args)
    return rows


def write_profiles(row: Row, targets: dict[str, Target], args: argparse.Namespace) -> None:
    RESULTS.mkdir(exist_ok=True)
    n = args.profile_requests
    lines = args.profile_lines
    ours = profile(targets["ours"], n)
    cookie = profile(targets["cookie"], n)
    theirs = profile(targets["flask-session"], n)
    text = "\n\n".join(
        [
            f"# {apps.LABELS[row.backend]}, {row.shape}: cProfile of {n} requests each",
            "## Store and kernel calls per request (built-ins, own time under cProfile)\n"
            f"ours:\n{io_calls(ours, n)}\nflask-session:\n{io_calls(theirs, n)}",
            f"## ours, by tottime\n{format_stats(ours, 'tottime', lines)}",
            f"## cookie, by tottime\n{format_stats(cookie, 'tottime', lines)}",
            "## ours, by cumulative time, flask_serverside's functions only\n"
            + format_stats(ours, "cumulative", "flask_serverside", lines),
        ]
    )
    path = RESULTS / f"profile-{row.backend}-{row.shape}.txt"
    path.write_text(text + "\n")
    row_profiles[(row.backend, row.shape)] = path


row_profiles: dict[tuple[str, str], pathlib.Path] = {}


def parse_setting(item: str) -> tuple[str, t.Any]:
    key, sep, value = item.partition("=")
    if not sep:
        raise SystemExit(f"--set {item!r}: use KEY=VALUE")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def describe(extra: dict[str, t.Any]) -> str:
    """What was measured: versions, the package's commit, extra config."""
    from importlib.metadata import version

    import flask_serverside

    def git(*args: str) -> str:
        try:
            result = subprocess.run(
                ["git", *args], cwd=apps.ROOT, capture_output=True, text=True, check=False
            )
        except OSError:
            return "?"
        return result.stdout.strip()

    dirty = (
        " (with uncommitted changes)" if git("status", "--porcelain", "flask_serverside") else ""
    )
    return (
        f"flask_serverside {flask_serverside.__version__} at {git('rev-parse', '--short', 'HEAD')}"
        f"{dirty}, Flask {version('flask')}, Flask-Session {version('flask-session')},"
        f" Python {platform.python_version()}, {os.cpu_count()} CPUs"
        + (f"; ours with {extra}" if extra else "")
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds (15)")
    parser.add_argument(
        "--batch-seconds", type=float, default=0.05, help="time of one app's batch in a round"
    )
    parser.add_argument(
        "--backends", default=",".join(apps.BACKENDS), help="comma-separated subset of stores"
    )
    parser.add_argument("--profile-all", action="store_true", help="profile every cell")
    parser.add_argument("--no-profile", action="store_true", help="profile no cell")
    parser.add_argument("--profile-requests", type=int, default=2000)
    parser.add_argument("--profile-lines", type=int, default=30)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra config for ours, e.g. SESSION_SERIALIZER=msgpack (VALUE as JSON if it parses)",
    )
    parser.add_argument(
        "--tmpdir", help="where files and SQLite live (default: the system's temp dir)"
    )
    args = parser.parse_args()
    apps.quiet()

    extra = dict(parse_setting(item) for item in args.set)
    started = time.perf_counter()
    print(describe(extra))
    print(
        f"Median cost per request over {args.rounds} interleaved rounds; ratios are"
        " medians of the per-round ratios.\n"
    )
    print(HEADER)
    rows: list[Row] = []
    skipped: list[str] = []
    fails: list[tuple[Row, dict[str, Target]]] = []
    with tempfile.TemporaryDirectory(prefix="fss-bench-", dir=args.tmpdir) as tmp:
        for name in args.backends.split(","):
            with apps.started_store(name, pathlib.Path(tmp) / name) as store:
                if isinstance(store, str):
                    skipped.append(f"{apps.LABELS[name]} {store}")
                    print(f"{apps.LABELS[name]:<11} {store}", flush=True)
                    continue
                store.ours = {**store.ours, **extra}
                rows += bench_store(store, pathlib.Path(tmp) / name, args, fails)

    print("\n" + "=" * len(HEADER))
    print(HEADER)
    for row in rows:
        print(format_row(row))
    for note in skipped:
        print(f"  {note}")
    strict = [r for r in rows if r.ours_cookie_np is not None]
    if strict:
        print(
            "\nUntouched, against a non-permanent cookie session (which Flask does not"
            " re-sign on untouched requests):"
        )
        for row in strict:
            cost = row.cost["cookie-np"] * 1e6
            assert row.ours_cookie_np is not None
            print(
                f"  {apps.LABELS[row.backend]:<11} cookie {cost:6.1f} µs, ours/cookie"
                f" {row.ours_cookie_np:.2f} {verdict(row.ours_cookie_np <= 1.05)}"
            )
    total = sum(1 + (r.fs_ours_ok is not None) for r in rows)
    met = sum(r.ours_cookie_ok + bool(r.fs_ours_ok) for r in rows)
    print(f"\n{met} of {total} targets met; {time.perf_counter() - started:.0f} s.")
    for row in fails:
        path = row_profiles[(row[0].backend, row[0].shape)]
        print(f"\n{'-' * 30} {path.relative_to(apps.ROOT)} {'-' * 30}")
        print(path.read_text())


if __name__ == "__main__":
    main()
