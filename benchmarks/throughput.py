"""Requests per second under gunicorn: cookie vs ours vs Flask-Session.

Each variant is the bench app (``benchmarks/wsgi.py``) under gunicorn, 4 sync
workers, on a free 127.0.0.1 port; all variants run at once and take turns
being loaded, in rounds, by a bounded load generator on loopback: ``wrk``
when it is installed (Debian: ``apt-get install wrk``), otherwise a small
asyncio client. Every request reads the session (``GET /read`` with the
cookie a first request set). The figure per variant is the median over the
rounds.

Run it from the repository root: ``python benchmarks/throughput.py`` (``make
bench`` runs it too).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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

VARIANTS = [
    ("cookie", None),
    ("ours", "filesystem"),
    ("flask-session", "filesystem"),
    ("ours", "redis"),
    ("flask-session", "redis"),
]
READ_BODY = b"ada:42:3"


@dataclass
class Variant:
    kind: str
    store: str | None
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    cookie: str = ""
    rps: list[float] = field(default_factory=list)
    errors: int = 0

    @property
    def label(self) -> str:
        return self.kind if self.store is None else f"{self.kind}, {apps.LABELS[self.store]}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def start(variant: Variant, tmp: pathlib.Path, redis_url: str | None, workers: int) -> None:
    variant.port = free_port()
    env = {
        **os.environ,
        "BENCH_KIND": variant.kind,
        "BENCH_STORE": variant.store or "filesystem",
        "BENCH_TMP": str(tmp / (variant.store or "none")),
        "BENCH_URL": redis_url or "",
        "PYTHONWARNINGS": "ignore::DeprecationWarning",
    }
    variant.proc = subprocess.Popen(
        [
            sys.executable, "-m", "gunicorn",
            "--workers", str(workers), "--worker-class", "sync",
            "--bind", f"127.0.0.1:{variant.port}",
            "--chdir", str(apps.ROOT), "--log-level", "warning",
            "benchmarks.wsgi:app",
        ],
        env=env,
    )  # fmt: skip
    wait_for_port(variant.port, variant.proc)
    with urllib.request.urlopen(variant.url + "/login", timeout=10) as response:
        cookie = response.headers["Set-Cookie"]
    variant.cookie = cookie.split(";", 1)[0].split("=", 1)[1]
    request = urllib.request.Request(
        variant.url + "/read", headers={"Cookie": f"{apps.COOKIE_NAME}={variant.cookie}"}
    )
    for _ in range(3):  # every worker must read it, not only the one that wrote it
        with urllib.request.urlopen(request, timeout=10) as response:
            body = response.read()
        if body != READ_BODY:
            raise RuntimeError(f"{variant.label}: /read answered {body!r}")


def stop(variant: Variant) -> None:
    if variant.proc is not None and variant.proc.poll() is None:
        variant.proc.terminate()
        try:
            variant.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            variant.proc.kill()
            variant.proc.wait()


def run_wrk(variant: Variant, seconds: float, connections: int) -> tuple[float, int]:
    result = subprocess.run(
        [
            "wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "10s",
            "-H", f"Cookie: {apps.COOKIE_NAME}={variant.cookie}",
            variant.url + "/read",
        ],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    out = result.stdout
    rps = float(re.search(r"Requests/sec:\s*([\d.]+)", out).group(1))  # type: ignore[union-attr]
    errors = 0
    if m := re.search(r"Non-2xx or 3xx responses:\s*(\d+)", out):
        errors += int(m.group(1))
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        errors += int(m.group(1)) + int(m.group(3)) + int(m.group(4))
    return rps, errors


async def _client(host: str, port: int, request: bytes, deadline: float, counts: list[int]) -> None:
    reader = writer = None
    while time.monotonic() < deadline:
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection(host, port)
            assert reader is not None
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(re.search(rb"(?i)content-length:\s*(\d+)", head).group(1))  # type: ignore[union-attr]
            body = await reader.readexactly(length)
            ok = head.startswith(b"HTTP/1.1 200") and body == READ_BODY
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


def run_python(variant: Variant, seconds: float, connections: int) -> tuple[float, int]:
    request = (
        f"GET /read HTTP/1.1\r\nHost: 127.0.0.1:{variant.port}\r\n"
        f"Cookie: {apps.COOKIE_NAME}={variant.cookie}\r\n\r\n"
    ).encode()
    counts = [0, 0]

    async def main() -> None:
        deadline = time.monotonic() + seconds
        await asyncio.gather(
            *(
                _client("127.0.0.1", variant.port, request, deadline, counts)
                for _ in range(connections)
            )
        )

    start = time.monotonic()
    asyncio.run(main())
    return counts[0] / (time.monotonic() - start), counts[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2, help="one variant's turn (2)")
    parser.add_argument("--rounds", type=int, default=6, help="turns per variant (6)")
    parser.add_argument("--connections", type=int, default=8, help="concurrent connections (8)")
    parser.add_argument("--workers", type=int, default=4, help="gunicorn sync workers (4)")
    parser.add_argument("--python-client", action="store_true", help="do not use wrk")
    args = parser.parse_args()
    apps.quiet()
    use_wrk = shutil.which("wrk") is not None and not args.python_client
    load = run_wrk if use_wrk else run_python
    variants = [Variant(kind, store) for kind, store in VARIANTS]
    notes = []
    with (
        tempfile.TemporaryDirectory(prefix="fss-throughput-") as name,
        contextlib.ExitStack() as stack,
    ):
        tmp = pathlib.Path(name)
        redis = stack.enter_context(apps.started_store("redis", tmp / "redis"))
        if isinstance(redis, str):
            notes.append(f"Redis {redis}")
            variants = [v for v in variants if v.store != "redis"]
            redis_url = None
        else:
            assert redis.server is not None
            redis_url = redis.server.url
        for variant in variants:
            stack.callback(stop, variant)
            start(variant, tmp, redis_url, args.workers)
        print(
            f"{len(variants)} gunicorn servers ({args.workers} sync workers each); load:"
            f" {'wrk -t1' if use_wrk else 'asyncio client'}, {args.connections} connections,"
            f" {args.rounds} rounds x {args.seconds:g} s per variant, GET /read",
            flush=True,
        )
        for variant in variants:  # warm up every worker
            load(variant, 1, args.connections)
        for round_ in range(args.rounds):
            shift = round_ % len(variants)
            for variant in variants[shift:] + variants[:shift]:
                rps, errors = load(variant, args.seconds, args.connections)
                variant.rps.append(rps)
                variant.errors += errors
            print(
                f"  round {round_ + 1}: "
                + ", ".join(f"{v.label} {v.rps[-1]:.0f}" for v in variants),
                flush=True,
            )

    by_label = {v.label: statistics.median(v.rps) for v in variants}
    cookie = by_label["cookie"]
    print("\n" + "=" * 78)
    print(f"{'variant':<30} {'req/s (median)':>15} {'min-max':>12} {'vs cookie':>10} {'errors':>7}")
    for variant in variants:
        rps = by_label[variant.label]
        spread = f"{min(variant.rps):.0f}-{max(variant.rps):.0f}"
        print(
            f"{variant.label:<30} {rps:>15.0f} {spread:>12} {rps / cookie:>10.2f}"
            f" {variant.errors:>7}"
        )
    for store in ("filesystem", "redis"):
        ours = by_label.get(f"ours, {apps.LABELS[store]}")
        theirs = by_label.get(f"flask-session, {apps.LABELS[store]}")
        if ours and theirs:
            print(f"{apps.LABELS[store]}: ours / flask-session throughput = {ours / theirs:.2f}x")
    for note in notes:
        print(note)


if __name__ == "__main__":
    main()
