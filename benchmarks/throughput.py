"""Requests per second under gunicorn: ours vs cookie vs Flask-Session, every store.

Each app is the bench app (``benchmarks/wsgi.py``) under gunicorn, 4 sync
workers, on a free 127.0.0.1 port. The cookie app runs for the whole script;
the stores are taken one after the other: the store's server is started
(``tests/servers/``), then ours and Flask-Session on it, and the three apps
take turns being loaded, in rounds, by a bounded load generator on
loopback: ``wrk`` when it is installed (Debian: ``apt-get install wrk``),
otherwise a small asyncio client. Two request shapes: ``read`` (``GET
/read``: three keys) and ``write`` (``GET /write``: one key set), each with
the cookie of one of several sessions a first request per connection
created. The figure per app is the median over the rounds; the ratios are
medians of the per-round ratios (the apps of a round ran back to back). A
second table gives each app's CPU time per request under that load, from
its gunicorn processes' ``/proc/PID/schedstat`` (the store server's left
out), and ours' excess over least's.

Run it from the repository root: ``python benchmarks/throughput.py`` (``make
bench`` runs it too).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import pathlib
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from dataclasses import field

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks import apps  # noqa: E402
from tests.servers import free_port  # noqa: E402
from tests.servers import wait_for_port  # noqa: E402

#: The request shapes: the path and the body every answer must have.
SHAPES = {"read": ("/read", b"ada:42:3"), "write": ("/write", b"ok")}
SOCKET_ERRORS = r"Socket errors: connect (\d+), read \d+, write (\d+), timeout (\d+)"

#: wrk's request function: one request after the other over the sessions'
#: cookies (wrk ... URL -- PATH COOKIE...).
WRK_SCRIPT = """\
local requests = {}
local n = 0
function init(args)
  for i = 2, #args do
    requests[#requests + 1] = wrk.format("GET", args[1], {Cookie = args[i]})
  end
end
function request()
  n = n % #requests + 1
  return requests[n]
end
"""


@dataclass
class App:
    """One gunicorn server, and its figures per shape (one per round)."""

    kind: str
    store: str | None
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    cookies: list[str] = field(default_factory=list)
    rps: dict[str, list[float]] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    #: Per shape and round: the workers' CPU time per request served, in µs
    #: (``None`` where the kernel does not tell, see :func:`cpu_ns`).
    cpu: dict[str, list[float | None]] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.kind if self.store is None else f"{self.kind}, {apps.LABELS[self.store]}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def record(self, shape: str, turn: Turn) -> None:
        self.rps.setdefault(shape, []).append(turn.rps)
        self.errors[shape] = self.errors.get(shape, 0) + turn.errors
        self.cpu.setdefault(shape, []).append(turn.cpu_per_request())


@dataclass
class Turn:
    """One app's turn under load: requests/s, errors, and the CPU time its
    workers used (ns) over the requests served."""

    rps: float
    errors: int
    requests: int = 0
    cpu_ns: int | None = None

    def cpu_per_request(self) -> float | None:
        if self.cpu_ns is None or not self.requests:
            return None
        return self.cpu_ns / self.requests / 1000


def cpu_ns(proc: subprocess.Popen[bytes] | None) -> int | None:
    """The CPU time gunicorn's master ``proc`` and its workers have used, in
    ns (``/proc/PID/schedstat``: nanoseconds, where ``/proc/PID/stat`` counts
    10 ms ticks); ``None`` where ``/proc`` does not have it."""
    if proc is None:
        return None
    try:
        children = pathlib.Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text()
        total = 0
        for pid in [proc.pid, *map(int, children.split())]:
            total += int(pathlib.Path(f"/proc/{pid}/schedstat").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return total


@dataclass
class Result:
    """One store and shape: the apps' figures in the same rounds."""

    store: str
    shape: str
    cookie: list[float]
    floor: list[float]
    least: list[float]
    ours: list[float]
    flask_session: list[float]
    errors: int
    #: Each app's workers' CPU µs per request, per round, by kind.
    cpu: dict[str, list[float | None]] = field(default_factory=dict)

    def cpu_median(self, kind: str) -> float | None:
        """The median over the rounds of ``kind``'s CPU µs per request."""
        values = [v for v in self.cpu.get(kind, []) if v is not None]
        return statistics.median(values) if values else None

    def cpu_excess(self) -> float | None:
        """Ours' CPU µs per request over least's: our own cost under load,
        the median of the per-round differences."""
        pairs = [
            (o, lt)
            for o, lt in zip(self.cpu.get("ours", []), self.cpu.get("least", []))
            if o is not None and lt is not None
        ]
        return statistics.median(o - lt for o, lt in pairs) if pairs else None

    def vs_cookie(self) -> float:
        return statistics.median(o / c for o, c in zip(self.ours, self.cookie))

    def floor_vs_cookie(self) -> float:
        """The bound of :meth:`vs_cookie`: what bare Flask plus the store's
        minimum work serves, per request the cookie session serves."""
        return statistics.median(f / c for f, c in zip(self.floor, self.cookie))

    def least_vs_cookie(self) -> float:
        """The tighter bound: what the least work of a session layer with
        ours' guarantees (``benchmarks/least.py``) serves, per request the
        cookie session serves."""
        return statistics.median(lt / c for lt, c in zip(self.least, self.cookie))

    def bounded(self) -> bool:
        """Whether a miss of ``ours/cookie >= 1.0`` is bounded: not even
        the floor or the least work served as much as the cookie session."""
        return min(self.floor_vs_cookie(), self.least_vs_cookie()) < 1.0

    def vs_floor(self) -> float:
        return statistics.median(o / f for o, f in zip(self.ours, self.floor))

    def vs_flask_session(self) -> float | None:
        if not self.flask_session:
            return None
        return statistics.median(o / f for o, f in zip(self.ours, self.flask_session))


def store_url(store: apps.Store) -> str:
    """The URL the bench app gets in ``BENCH_URL`` (none for files)."""
    return str(store.ours.get("SESSION_SQLALCHEMY_URL") or store.ours.get("SESSION_CACHELIB") or "")


def launch(app: App, tmp: pathlib.Path, url: str, workers: int) -> None:
    """Start gunicorn for ``app``; :func:`ready` waits for it."""
    app.port = free_port()
    env = {
        **os.environ,
        "BENCH_KIND": app.kind,
        "BENCH_STORE": app.store or "filesystem",
        "BENCH_TMP": str(tmp),
        "BENCH_URL": url,
        "PYTHONWARNINGS": "ignore::DeprecationWarning",
    }
    app.proc = subprocess.Popen(
        [
            sys.executable, "-m", "gunicorn",
            "--workers", str(workers), "--worker-class", "sync",
            "--bind", f"127.0.0.1:{app.port}",
            "--chdir", str(apps.ROOT), "--log-level", "warning",
            "benchmarks.wsgi:app",
        ],
        env=env,
    )  # fmt: skip


def ready(app: App, sessions: int) -> None:
    """Wait for ``app``, log ``sessions`` visitors in and check they read
    (the floor's visitors' cookies and records are set by :func:`prepare`)."""
    assert app.proc is not None
    wait_for_port(app.port, app.proc)
    for _ in range(sessions if app.kind != "floor" else 0):
        with urllib.request.urlopen(app.url + "/login", timeout=30) as response:
            cookie = response.headers["Set-Cookie"]
        app.cookies.append(cookie.split(";", 1)[0])
    check(app)


def check(app: App) -> None:
    """Every session of ``app`` still reads back."""
    path, body = SHAPES["read"]
    for cookie in app.cookies:  # several workers read what one of them wrote
        request = urllib.request.Request(app.url + path, headers={"Cookie": cookie})
        with urllib.request.urlopen(request, timeout=30) as response:
            answer = response.read()
        if answer != body:
            raise RuntimeError(f"{app.label}: {path} answered {answer!r}, not {body!r}")


def stop(app: App) -> None:
    if app.proc is not None and app.proc.poll() is None:
        app.proc.terminate()
        try:
            app.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            app.proc.kill()
            app.proc.wait()


def prepare(store: apps.Store, tmp: pathlib.Path, floor: App, sessions: int) -> None:
    """Write the floor's records, one per visitor, and give the floor app
    their cookies; create Flask-Session's table before its 4 workers start:
    each would create it at start-up, and on PostgreSQL two concurrent
    ``CREATE TABLE`` fail. (Ours creates its table on first use and allows
    for the race.)"""
    assert store.floor is not None
    records = store.floor()
    data = json.dumps({**apps.CONTENT, "_permanent": True}).encode()
    for i in range(sessions):
        records.setup(f"floor-v{i}", data)
        floor.cookies.append(f"{apps.COOKIE_NAME}=v{i}")
    if store.name not in apps.SQL_STORES:
        return
    app = apps.make_app("flask-session", store, tmp / "instance-prepare")
    with app.app_context():
        app.extensions["sqlalchemy"].engine.dispose()


class Load:
    """The load generator: ``wrk`` if installed, else an asyncio client."""

    def __init__(self, tmp: pathlib.Path, python: bool, seconds: float, connections: int) -> None:
        self.wrk = None if python else shutil.which("wrk")
        self.script = tmp / "sessions.lua"
        self.script.write_text(WRK_SCRIPT)
        self.seconds = seconds
        self.connections = connections

    @property
    def name(self) -> str:
        return "wrk -t1" if self.wrk else "asyncio client"

    def run(self, app: App, shape: str, seconds: float | None = None) -> Turn:
        """Load ``app`` with ``shape``; return what its turn measured."""
        seconds = self.seconds if seconds is None else seconds
        before = cpu_ns(app.proc)
        if self.wrk:
            turn = self._wrk(app, shape, seconds)
        else:
            turn = self._python(app, shape, seconds)
        after = cpu_ns(app.proc)
        # A worker that exited meanwhile took its CPU time with it: no figure.
        if before is not None and after is not None and after >= before:
            turn.cpu_ns = after - before
        return turn

    def _wrk(self, app: App, shape: str, seconds: float) -> Turn:
        path, _ = SHAPES[shape]
        result = subprocess.run(
            [
                str(self.wrk), "-t1", f"-c{self.connections}", f"-d{max(1, round(seconds))}s",
                "--timeout", "10s", "-s", str(self.script), app.url, "--", path, *app.cookies,
            ],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        out = result.stdout
        rps = float(re.search(r"Requests/sec:\s*([\d.]+)", out).group(1))  # type: ignore[union-attr]
        errors = 0
        if m := re.search(r"Non-2xx or 3xx responses:\s*(\d+)", out):
            errors += int(m.group(1))
        # Read errors left out: gunicorn's sync workers close every connection.
        if m := re.search(SOCKET_ERRORS, out):
            errors += int(m.group(1)) + int(m.group(2)) + int(m.group(3))
        served = re.search(r"(\d+) requests in", out)
        return Turn(rps, errors, int(served.group(1)) if served else 0)

    def _python(self, app: App, shape: str, seconds: float) -> Turn:
        path, body = SHAPES[shape]
        counts = [0, 0]

        async def main() -> None:
            deadline = time.monotonic() + seconds
            await asyncio.gather(
                *(
                    _client(app.port, _request(app, path, i), body, deadline, counts)
                    for i in range(self.connections)
                )
            )

        start = time.monotonic()
        asyncio.run(main())
        return Turn(counts[0] / (time.monotonic() - start), counts[1], sum(counts))


def _request(app: App, path: str, i: int) -> bytes:
    cookie = app.cookies[i % len(app.cookies)]
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{app.port}\r\nCookie: {cookie}\r\n\r\n".encode()


async def _client(
    port: int, request: bytes, expected: bytes, deadline: float, counts: list[int]
) -> None:
    reader = writer = None
    while time.monotonic() < deadline:
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            assert reader is not None
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(re.search(rb"(?i)content-length:\s*(\d+)", head).group(1))  # type: ignore[union-attr]
            body = await reader.readexactly(length)
            ok = head.startswith(b"HTTP/1.1 200") and body == expected
            counts[0 if ok else 1] += 1
            if re.search(rb"(?i)connection:\s*close", head):
                writer.close()
                reader = writer = None
        except (OSError, asyncio.IncompleteReadError):
            counts[1] += 1
            if writer is not None:
                writer.close()
            reader = writer = None
    if writer is not None:
        writer.close()


def bench_store(
    store: apps.Store, tmp: pathlib.Path, cookie: App, load: Load, args: argparse.Namespace
) -> list[Result]:
    """Start ours and Flask-Session on ``store`` and run the rounds, the
    cookie app taking its turn among them."""
    floor, least = App("floor", store.name), App("least", store.name)
    ours, theirs = App("ours", store.name), App("flask-session", store.name)
    prepare(store, tmp, floor, args.connections)
    started = [floor, least, ours, theirs]
    try:
        for app in started:
            launch(app, tmp, store_url(store), args.workers)
        for app in started:
            ready(app, args.connections)
        group = [cookie, floor, least, ours, theirs]
        for app in group[1:]:  # warm up every worker (the logins wrote)
            load.run(app, "read", 1)
        before = {shape: len(cookie.rps.get(shape, [])) for shape in SHAPES}
        for round_ in range(args.rounds):
            for shape in SHAPES:
                shift = round_ % len(group)
                for app in group[shift:] + group[:shift]:
                    app.record(shape, load.run(app, shape))
            print(
                f"  {store.label:<12} round {round_ + 1}: "
                + "; ".join(
                    f"{shape} " + " ".join(f"{a.rps[shape][-1]:.0f}" for a in group)
                    for shape in SHAPES
                ),
                flush=True,
            )
        for app in group:
            check(app)
    finally:
        for app in started:
            stop(app)
    return [
        Result(
            store.name,
            shape,
            cookie.rps[shape][before[shape] :],
            floor.rps[shape],
            least.rps[shape],
            ours.rps[shape],
            theirs.rps[shape],
            sum(app.errors[shape] for app in (floor, least, ours, theirs)),
            {
                "cookie": cookie.cpu[shape][before[shape] :],
                **{app.kind: app.cpu[shape] for app in (floor, least, ours, theirs)},
            },
        )
        for shape in SHAPES
    ]


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):>6.0f} {min(values):>5.0f}-{max(values):<5.0f}"


def verdict(ratio: float | None, target: bool = True) -> str:
    if ratio is None:
        return f"{'-':>9}"
    shown = math.floor(ratio * 100) / 100  # 0.996 FAIL shows as 0.99, not 1.00
    if not target:
        return f"{shown:>4.2f}     "
    return f"{shown:>4.2f} {'PASS' if ratio >= 1.0 else 'FAIL'}"


HEADER = (
    f"{'store':<12} {'shape':<5}  {'cookie':^17}  {'floor':^17}  {'least':^17}  {'ours':^17}"
    f"  {'flask-session':^17}  {'ours/cookie':<11}  {'floor/cookie':<12}  {'least/cookie':<12}"
    f"  {'ours/floor':<10}  {'ours/f-s':<9}  {'errors':>6}"
)


def report(results: list[Result], cookie: App, notes: list[str], load: Load) -> None:
    print("\n" + "=" * len(HEADER))
    print(
        "req/s: median and min-max over the rounds; ratios: medians of the per-round"
        " ratios.\nTargets (issue 16): ours/cookie >= 1.0 for read and write on every"
        " store; ours/f-s >= 1.0 for read (write: no target).\nfloor: bare Flask plus"
        " the store's minimum I/O; floor/cookie below 1.0 bounds ours/cookie (no session"
        " layer on that store can serve more than its floor).\nleast: the floor plus the"
        " least work of a session layer with ours' guarantees (benchmarks/least.py);"
        " least/cookie below 1.0 bounds ours/cookie too."
    )
    print(HEADER)
    for r in results:
        print(
            f"{apps.LABELS[r.store]:<12} {r.shape:<5}  {spread(r.cookie)}  {spread(r.floor)}"
            f"  {spread(r.least)}  {spread(r.ours)}  {spread(r.flask_session)}"
            f"  {verdict(r.vs_cookie()):<11}  {verdict(r.floor_vs_cookie(), False):<12}"
            f"  {verdict(r.least_vs_cookie(), False):<12}  {verdict(r.vs_floor(), False):<10}"
            f"  {verdict(r.vs_flask_session(), r.shape == 'read'):<9}  {r.errors:>6}"
        )
    report_cpu(results)
    for shape in SHAPES:
        if cookie.rps.get(shape):
            print(
                f"cookie, {shape}, all rounds: {spread(cookie.rps[shape]).strip()} req/s,"
                f" {cookie.errors[shape]} errors"
            )
    for note in notes:
        print(note)
    targets = [r.vs_cookie() >= 1.0 for r in results]
    targets += [(r.vs_flask_session() or 0) >= 1.0 for r in results if r.shape == "read"]
    print(f"{sum(targets)} of {len(targets)} targets met (load: {load.name}).")
    bounded = [r for r in results if r.vs_cookie() < 1.0 and r.bounded()]
    if bounded:
        print(
            f"{len(bounded)} of the misses of ours/cookie are bounded (floor/cookie or"
            " least/cookie below 1.0): "
            + ", ".join(f"{apps.LABELS[r.store]} {r.shape}" for r in bounded)
            + "."
        )


CPU_KINDS = ("cookie", "floor", "least", "ours", "flask-session")


def report_cpu(results: list[Result]) -> None:
    """The apps' own CPU time per request under the same load, without the
    store server's share: ours-least is our own cost there."""
    if not any(r.cpu_median("ours") is not None for r in results):
        print("CPU per request: not measured (no /proc/PID/schedstat here).")
        return
    print(
        "\nCPU µs per request of the app's gunicorn processes (median over the rounds;"
        " the store server's CPU not included); ours-least: median of the per-round"
        " differences."
    )
    print(f"{'store':<12} {'shape':<5}  " + "".join(f"{k:>14}" for k in CPU_KINDS) + "  ours-least")
    for r in results:
        cells = "".join(_cpu_cell(r.cpu_median(kind)) for kind in CPU_KINDS)
        print(f"{apps.LABELS[r.store]:<12} {r.shape:<5}  {cells}  {_cpu_cell(r.cpu_excess())}")


def _cpu_cell(value: float | None) -> str:
    return f"{'-':>14}" if value is None else f"{value:>14.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--stores", default=",".join(apps.BACKENDS), help="comma-separated subset of stores"
    )
    parser.add_argument("--seconds", type=float, default=1, help="one app's turn (1; wrk: >= 1)")
    parser.add_argument("--rounds", type=int, default=4, help="turns per app and shape (4)")
    parser.add_argument(
        "--connections", type=int, default=8, help="concurrent connections, one session each (8)"
    )
    parser.add_argument("--workers", type=int, default=4, help="gunicorn sync workers (4)")
    parser.add_argument("--python-client", action="store_true", help="do not use wrk")
    args = parser.parse_args()
    stores = [name for name in args.stores.split(",") if name]
    for name in stores:
        if name not in apps.BACKENDS:
            parser.error(f"unknown store {name!r} in --stores: pick from {','.join(apps.BACKENDS)}")
    apps.quiet()
    began = time.monotonic()
    results: list[Result] = []
    notes: list[str] = []
    with (
        tempfile.TemporaryDirectory(prefix="fss-throughput-") as name,
        contextlib.ExitStack() as stack,
    ):
        tmp = pathlib.Path(name)
        load = Load(tmp, args.python_client, args.seconds, args.connections)
        cookie = App("cookie", None)
        stack.callback(stop, cookie)
        (tmp / "cookie").mkdir()
        launch(cookie, tmp / "cookie", "", args.workers)
        ready(cookie, args.connections)
        load.run(cookie, "read", 1)
        print(
            f"gunicorn, {args.workers} sync workers per app; load: {load.name},"
            f" {args.connections} connections (one session each), {args.rounds} rounds x"
            f" {max(1, round(args.seconds)) if load.wrk else args.seconds:g} s per app and shape;"
            " per round: req/s of cookie, floor, least, ours, flask-session",
            flush=True,
        )
        for store_name in stores:
            with apps.started_store(store_name, tmp / store_name) as store:
                if isinstance(store, str):
                    notes.append(f"{apps.LABELS[store_name]} {store}")
                    print(f"  {apps.LABELS[store_name]:<12} {store}", flush=True)
                    continue
                try:
                    results += bench_store(store, tmp / store_name, cookie, load, args)
                except (RuntimeError, OSError, subprocess.CalledProcessError) as exc:
                    notes.append(f"{apps.LABELS[store_name]} failed: {exc!r}")
                    print(f"  {apps.LABELS[store_name]:<12} failed: {exc!r}", flush=True)
    report(results, cookie, notes, load)
    print(f"{time.monotonic() - began:.0f} s.")


if __name__ == "__main__":
    main()
