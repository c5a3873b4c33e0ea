"""Per-request cost against the floor: bare, floor, ours, cookie, Flask-Session 0.8.

For each store (filesystem, SQLite, PostgreSQL with psycopg2 and with
psycopg 3, Redis, Memcached) and each request shape (a request that leaves
the session untouched, one that reads it, one that writes a key), six apps
are called directly as WSGI apps with a prebuilt environ carrying the
session cookie each got from a first request:

- bare: the same Flask request without session machinery (a session
  interface that hands out a dict and saves nothing);
- floor: bare plus the store's minimum work through the same client (one
  read for a read; one read and one write for a write);
- least: the floor plus the least work a session layer with ours'
  guarantees must do (``benchmarks/least.py``): what no implementation can
  go below;
- ours, Flask's cookie session (permanent) and Flask-Session 0.8.

They take turns in rounds; the table shows each one's median cost per
request, and ours - floor as a multiple of bare (our own cost), each the
median of the per-round figures, with a PASS/FAIL per target of issue 16.
A last row per store reads one scalar from a 64 KB session and from a
100-byte one. ``--profile`` writes cProfile output to ``benchmarks/results/``.

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
EXPECT = {"untouched": b"ok", "read": b"ada:42:3", "write": b"ok", "scalar": b"42"}

#: Targets of issue 16, as multiples of bare.
UNTOUCHED_MAX = 1.3  # ours / bare
READ_OWN_MAX = 1.0  # (ours - floor) / bare
WRITE_OWN_MAX = 2.0  # (ours - floor) / bare, + one round trip on Memcached
SCALAR_EXCESS_MAX = 0.25  # noise allowance for the 64 KB vs 100 B read
#: Stores whose write may take one more round trip than the floor's.
EXTRA_ROUND_TRIP = frozenset({"memcached"})


def per_round(samples: dict[str, list[float]], func: t.Callable[..., float]) -> float:
    """The median over the rounds of ``func(**one_round's_samples)``."""
    names = list(samples)
    rounds = zip(*(samples[name] for name in names))
    return median([func(**dict(zip((n.replace("-", "_") for n in names), r))) for r in rounds])


@dataclass
class Row:
    backend: str
    shape: str
    cost: dict[str, float]
    ours_bare: float  # ours / bare
    own: float  # (ours - floor) / bare
    least_own: float  # (least - floor) / bare: the least any session layer adds
    fs_ours: float | None  # flask-session / ours
    limit: float | None = None  # the highest allowed `own` (or ours/bare)
    fs_ok: bool | None = None

    @property
    def ok(self) -> bool:
        assert self.limit is not None
        value = self.ours_bare if self.shape == "untouched" else self.own
        return value <= self.limit


def verdict(ok: bool | None) -> str:
    return "" if ok is None else ("PASS" if ok else "FAIL")


HEADER = (
    f"{'store':<11} {'request':<9} {'bare':>6} {'floor':>6} {'least':>6} {'ours':>6}"
    f" {'cookie':>6} {'f-s':>6}  {'ours/bare':>9} {'(ours-floor)/bare':>17} {'least':>5}"
    f"  {'target':<16}"
    f" {'f-s/ours':>8} {'':4}"
)


def format_row(row: Row) -> str:
    us = {kind: format(value * 1e6, "6.0f") for kind, value in row.cost.items()}
    assert row.limit is not None
    what = "ours/bare" if row.shape == "untouched" else "own"
    target = f"{what} <= {row.limit:.2f} {verdict(row.ok)}"
    fs = "" if row.fs_ours is None else f"{row.fs_ours:8.2f} {verdict(row.fs_ok):4}"
    return (
        f"{apps.LABELS[row.backend]:<11} {row.shape:<9} {us['bare']} {us['floor']}"
        f" {us['least']} {us['ours']} {us['cookie']} {us.get('flask-session', '     -')}"
        f"  {row.ours_bare:9.2f} {row.own:17.2f} {row.least_own:5.2f}  {target:<16} {fs}"
    ).rstrip()


@dataclass
class ScalarRow:
    backend: str
    small: float  # ours, 100-byte session
    big: float  # ours, 64 KB session
    floor_diff: float  # floor big - floor small (reading the bigger record)
    decode_diff: float  # serializer.loads(big) - loads(small)
    excess: float  # ((big - small) - floor_diff - decode_diff) / bare
    big_size: int

    @property
    def ok(self) -> bool:
        return self.excess <= SCALAR_EXCESS_MAX

    def format(self) -> str:
        return (
            f"{apps.LABELS[self.backend]:<11} small {self.small * 1e6:6.0f} µs,"
            f" {self.big_size // 1024} KB {self.big * 1e6:6.0f} µs;"
            f" difference {(self.big - self.small) * 1e6:6.0f} µs"
            f" - store read {self.floor_diff * 1e6:5.0f} - decode {self.decode_diff * 1e6:5.0f}"
            f" = {self.excess:5.2f}x bare  (<= {SCALAR_EXCESS_MAX:.2f}) {verdict(self.ok)}"
        )


def make_targets(
    shape: str, made: dict[str, tuple[t.Any, str | None]], kinds: t.Iterable[str]
) -> dict[str, Target]:
    path = "/scalar" if shape == "scalar" else f"/{shape}"
    return {
        kind: Target(made[kind][0], [environ(path, made[kind][1])], EXPECT[shape])
        for kind in kinds
        if kind in made
    }


def make_apps(store: apps.Store, tmp: pathlib.Path, args: argparse.Namespace) -> dict[str, t.Any]:
    made: dict[str, tuple[t.Any, str | None]] = {}
    for kind in apps.KINDS:
        if kind == "flask-session" and store.name in args.no_flask_session:
            continue
        app = apps.make_app(kind, store, tmp / kind)
        made[kind] = (app, None if kind in ("bare", "floor") else login(app))
    return made


class DecodeTarget:
    """``loads(raw)`` alone, timed in the rounds among the apps (so that the
    machine's noise falls on it as on them), with :class:`Target`'s
    interface."""

    def __init__(self, loads: t.Callable[[bytes], t.Any], raw: bytes) -> None:
        self.loads = loads
        self.raw = raw

    def check(self) -> None:
        self.loads(self.raw)

    def run(self, n: int) -> float:
        """Seconds per ``loads(raw)``, over ``n`` calls."""
        loads, raw = self.loads, self.raw
        start = time.perf_counter()
        for _ in range(n):
            loads(raw)
        return (time.perf_counter() - start) / n


def bench_store(store: apps.Store, tmp: pathlib.Path, args: argparse.Namespace) -> list[Row]:
    made = make_apps(store, tmp, args)
    rows: list[Row] = []
    round_trip = 0.0
    for shape in SHAPES:
        targets = make_targets(shape, made, apps.KINDS)
        samples = measure(targets, args.rounds, args.batch_seconds)
        cost = {kind: median(values) for kind, values in samples.items()}
        row = Row(
            store.name,
            shape,
            cost,
            paired_ratio(samples["ours"], samples["bare"]),
            per_round(
                {k: samples[k] for k in ("ours", "floor", "bare")},
                lambda ours, floor, bare: (ours - floor) / bare,
            ),
            per_round(
                {k: samples[k] for k in ("least", "floor", "bare")},
                lambda least, floor, bare: (least - floor) / bare,
            ),
            (
                paired_ratio(samples["flask-session"], samples["ours"])
                if "flask-session" in samples
                else None
            ),
        )
        if shape == "untouched":
            row.limit = UNTOUCHED_MAX
        elif shape == "read":
            row.limit = READ_OWN_MAX
            # One store round trip through the client, as the floor does it.
            round_trip = median([f - b for f, b in zip(samples["floor"], samples["bare"])])
            if row.fs_ours is not None:
                row.fs_ok = row.fs_ours >= 1.0
        else:
            extra = round_trip / cost["bare"] if store.name in EXTRA_ROUND_TRIP else 0.0
            row.limit = WRITE_OWN_MAX + extra
        print(format_row(row), flush=True)
        rows.append(row)
        if wants_profile(args, row):
            write_profiles(row, targets, args)
    return rows


def bench_scalar(store: apps.Store, tmp: pathlib.Path, args: argparse.Namespace) -> ScalarRow:
    """Read one scalar from a 64 KB session and from a 100-byte one."""
    from flask_serverside.serializers import get_serializer

    ours = apps.make_app("ours", store, tmp / "ours-scalar")
    serializer = get_serializer(ours.config["SESSION_SERIALIZER"])
    small_raw = serializer.dumps({**apps.CONTENT, "_permanent": True})
    big_raw = serializer.dumps({**apps.CONTENT, "notes": apps.NOTES, "_permanent": True})
    made: dict[str, tuple[t.Any, str | None]] = {
        "bare": (apps.make_app("bare", store, tmp / "bare-scalar"), None),
        "ours-small": (ours, login(ours)),
        "ours-big": (ours, login(ours, "/login-big")),
        "floor-small": (apps.make_app("floor", store, tmp / "fs", small_raw), None),
        "floor-big": (apps.make_app("floor", store, tmp / "fb", big_raw), None),
    }
    targets: dict[str, t.Any] = make_targets("scalar", made, made)
    targets["decode-small"] = DecodeTarget(serializer.loads, small_raw)
    targets["decode-big"] = DecodeTarget(serializer.loads, big_raw)
    samples = measure(targets, args.rounds, args.batch_seconds)
    decode = median([b - s for b, s in zip(samples["decode-big"], samples["decode-small"])])
    floor_diff = median([b - s for b, s in zip(samples["floor-big"], samples["floor-small"])])
    excess = per_round(
        samples,
        lambda bare, ours_small, ours_big, floor_small, floor_big, decode_small, decode_big: (
            ((ours_big - ours_small) - (floor_big - floor_small) - (decode_big - decode_small))
            / bare
        ),
    )
    row = ScalarRow(
        store.name,
        median(samples["ours-small"]),
        median(samples["ours-big"]),
        floor_diff,
        decode,
        excess,
        len(big_raw),
    )
    print(row.format(), flush=True)
    if args.profile and (args.profile == "all" or f"{store.name}:scalar" in args.profile):
        RESULTS.mkdir(exist_ok=True)
        n = args.profile_requests
        stats = profile(targets["ours-big"], n)
        path = RESULTS / f"profile-{store.name}-scalar-64k.txt"
        path.write_text(
            f"## ours, 64 KB session, by tottime\n{format_stats(stats, 'tottime', 40)}\n"
        )
    return row


def wants_profile(args: argparse.Namespace, row: Row) -> bool:
    if not args.profile:
        return False
    if args.profile == "all":
        return True
    if args.profile == "misses":
        return not row.ok or row.fs_ok is False
    return f"{row.backend}:{row.shape}" in args.profile.split(",")


def write_profiles(row: Row, targets: dict[str, Target], args: argparse.Namespace) -> None:
    RESULTS.mkdir(exist_ok=True)
    n = args.profile_requests
    lines = args.profile_lines
    ours = profile(targets["ours"], n)
    bare = profile(targets["bare"], n)
    parts = [
        f"# {apps.LABELS[row.backend]}, {row.shape}: cProfile of {n} requests each",
        "## Store and kernel calls per request (built-ins, own time under cProfile)\n"
        f"ours:\n{io_calls(ours, n)}",
        f"## ours, by tottime\n{format_stats(ours, 'tottime', lines)}",
        f"## bare, by tottime\n{format_stats(bare, 'tottime', lines)}",
        "## ours, by cumulative time, flask_serverside's functions only\n"
        + format_stats(ours, "cumulative", "flask_serverside", lines),
    ]
    if "flask-session" in targets:
        theirs = profile(targets["flask-session"], n)
        parts.insert(2, f"flask-session:\n{io_calls(theirs, n)}")
    path = RESULTS / f"profile-{row.backend}-{row.shape}.txt"
    path.write_text("\n\n".join(parts) + "\n")
    print(f"  profile: {path.relative_to(apps.ROOT)}", flush=True)


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
        "--batch-seconds",
        type=float,
        default=0.05,
        help="time of one app's batch in a round (0.05)",
    )
    parser.add_argument(
        "--backends", default=",".join(apps.BACKENDS), help="comma-separated subset of stores"
    )
    parser.add_argument(
        "--no-scalar", action="store_true", help="skip the 64 KB vs 100-byte read row"
    )
    parser.add_argument(
        "--no-flask-session",
        default="",
        metavar="STORES",
        help="comma-separated stores to run without Flask-Session",
    )
    parser.add_argument(
        "--profile",
        default="",
        metavar="WHAT",
        help="cProfile cells: 'misses', 'all', or store:shape,... (e.g. filesystem:read,"
        "redis:scalar); written to benchmarks/results/",
    )
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
    args.no_flask_session = set(filter(None, args.no_flask_session.split(",")))
    apps.quiet()

    extra = dict(parse_setting(item) for item in args.set)
    started = time.perf_counter()
    print(describe(extra))
    print(
        f"Median µs per request over {args.rounds} interleaved rounds; ratios are medians"
        " of the per-round ratios. own = (ours - floor) / bare; least: the same for"
        " benchmarks/least.py, the least work a session layer with ours' guarantees"
        " does.\n"
    )
    print(HEADER)
    rows: list[Row] = []
    scalars: list[ScalarRow] = []
    skipped: list[str] = []
    with tempfile.TemporaryDirectory(prefix="fss-bench-", dir=args.tmpdir) as tmp:
        for name in args.backends.split(","):
            with apps.started_store(name, pathlib.Path(tmp) / name) as store:
                if isinstance(store, str):
                    skipped.append(f"{apps.LABELS[name]} {store}")
                    print(f"{apps.LABELS[name]:<11} {store}", flush=True)
                    continue
                store.ours = {**store.ours, **extra}
                rows += bench_store(store, pathlib.Path(tmp) / name, args)
                if not args.no_scalar:
                    scalars.append(bench_scalar(store, pathlib.Path(tmp) / name, args))

    print("\n" + "=" * len(HEADER))
    print(HEADER)
    for row in rows:
        print(format_row(row))
    for note in skipped:
        print(f"  {note}")
    if scalars:
        print(
            "\nRead one scalar from a 64 KB session vs a 100-byte one (ours): the difference"
            " minus the floor's (reading the bigger record) and the serializer's extra"
            " decode, as a multiple of bare:"
        )
        for scalar in scalars:
            print("  " + scalar.format())
    total = len(rows) + sum(r.fs_ok is not None for r in rows) + len(scalars)
    met = sum(r.ok for r in rows) + sum(bool(r.fs_ok) for r in rows) + sum(s.ok for s in scalars)
    print(f"\n{met} of {total} targets met; {time.perf_counter() - started:.0f} s.")


if __name__ == "__main__":
    main()
