"""Calling WSGI apps directly, in interleaved rounds, and profiling them."""

from __future__ import annotations

import cProfile
import gc
import io
import pstats
import site
import statistics
import sys
import time
import typing as t
from dataclasses import dataclass

from werkzeug.test import EnvironBuilder

from .apps import COOKIE_NAME
from .apps import ROOT

Environ = dict[str, t.Any]
WSGIApp = t.Callable[..., t.Iterable[bytes]]


def environ(path: str, cookie: str | None = None) -> Environ:
    """A GET request's environ, with the session cookie if given."""
    headers = {"Cookie": f"{COOKIE_NAME}={cookie}"} if cookie else {}
    builder = EnvironBuilder(path=path, base_url="http://localhost/", headers=headers)
    try:
        return builder.get_environ()
    finally:
        builder.close()


def _start_response(status: str, headers: list[tuple[str, str]], exc_info: t.Any = None) -> t.Any:
    return None


def call(app: WSGIApp, env: Environ) -> tuple[str, list[tuple[str, str]], bytes]:
    """One request: (status, headers, body). The iterable is closed."""
    seen: list[t.Any] = []

    def start_response(
        status: str, headers: list[tuple[str, str]], exc_info: t.Any = None
    ) -> t.Any:
        seen[:] = [status, headers]

    env = env.copy()
    env["wsgi.input"] = io.BytesIO(b"")
    result = app(env, start_response)
    try:
        body = b"".join(result)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    return seen[0], seen[1], body


def login(app: WSGIApp, path: str = "/login") -> str:
    """Make the first request and return the session cookie it set."""
    status, headers, body = call(app, environ(path))
    if not status.startswith("200"):
        raise RuntimeError(f"{path} answered {status}: {body[:200]!r}")
    for name, value in headers:
        if name.lower() == "set-cookie" and value.startswith(COOKIE_NAME + "="):
            return value.split(";", 1)[0].split("=", 1)[1]
    raise RuntimeError(f"{path} set no session cookie: {headers}")


@dataclass
class Target:
    """An app and the requests it is timed with (used in turn)."""

    app: WSGIApp
    environs: list[Environ]
    expect: bytes | None = None

    def check(self) -> None:
        """Fail loudly unless every request succeeds (and says ``expect``)."""
        for env in self.environs[:3]:
            status, _, body = call(self.app, env)
            if not status.startswith("200") or (self.expect is not None and body != self.expect):
                raise RuntimeError(f"{env['PATH_INFO']} answered {status}: {body[:300]!r}")

    def run(self, n: int) -> float:
        """Seconds per request, over ``n`` requests."""
        app = self.app
        envs = self.environs
        count = len(envs)
        start_response = _start_response
        new_input = io.BytesIO
        start = time.perf_counter()
        for i in range(n):
            env = envs[i % count].copy()
            env["wsgi.input"] = new_input(b"")
            result = app(env, start_response)
            try:
                for _ in result:
                    pass
            finally:
                close = getattr(result, "close", None)
                if close is not None:
                    close()
        return (time.perf_counter() - start) / n


#: Parts each target's batch is cut into within a round.
SLICES = 10


def measure(
    targets: dict[str, Target], rounds: int = 15, batch_seconds: float = 0.05
) -> dict[str, list[float]]:
    """Seconds per request of each target, one sample per round.

    Each target gets a number of requests per round that takes about
    ``batch_seconds``, run in :data:`SLICES` parts that alternate with the
    other targets' parts (in a rotating order): a burst of load on a shared
    machine, which lasts milliseconds, then falls on all targets alike
    instead of on one target's whole batch. As in :mod:`timeit`, the
    garbage collector runs between rounds, not during them.
    """
    sizes = {}
    for name, target in targets.items():
        target.check()
        target.run(10)  # warm up
        per_call = min(target.run(5) for _ in range(3))
        sizes[name] = max(SLICES, min(5000, round(batch_seconds / per_call)))
    samples: dict[str, list[float]] = {name: [] for name in targets}
    names = list(targets)
    for round_ in range(rounds):
        gc.collect()
        gc.disable()
        try:
            spent = dict.fromkeys(names, 0.0)
            for part in range(SLICES):
                shift = (round_ + part) % len(names)
                for name in names[shift:] + names[:shift]:
                    spent[name] += targets[name].run(sizes[name] // SLICES)
        finally:
            gc.enable()
        for name in names:
            samples[name].append(spent[name] / SLICES)
    return samples


def median(values: t.Sequence[float]) -> float:
    return statistics.median(values)


def paired_ratio(top: t.Sequence[float], bottom: t.Sequence[float]) -> float:
    """The median of the per-round ratios (each round's two samples were
    taken moments apart, so drift cancels out)."""
    return statistics.median(a / b for a, b in zip(top, bottom))


_PREFIXES = sorted(
    {*site.getsitepackages(), site.getusersitepackages(), sys.prefix, sys.base_prefix, str(ROOT)},
    key=len,
    reverse=True,
)


def profile(target: Target, n: int) -> pstats.Stats:
    """cProfile ``n`` requests."""
    target.run(10)
    profiler = cProfile.Profile()
    profiler.enable()
    target.run(n)
    profiler.disable()
    return pstats.Stats(profiler)


_IO = (
    "socket",
    "psycopg2",
    "sqlite3",
    "posix.",
    "io.open",
    "fcntl",
    "_io.",
    "select",
)


def io_calls(stats: pstats.Stats, n: int) -> str:
    """The built-in functions that talk to the store or the kernel: calls
    and microseconds per request (their own time, from the profile)."""
    rows = []
    for (filename, _, name), (_, ncalls, tottime, _, _) in stats.stats.items():  # type: ignore[attr-defined]
        if filename == "~" and any(word in name for word in _IO):
            rows.append((tottime, ncalls, name))
    rows.sort(reverse=True)
    lines = [
        f"  {ncalls / n:5.1f} calls {tottime / n * 1e6:8.1f} µs  {name}"
        for tottime, ncalls, name in rows
    ]
    return "\n".join(lines[:15]) or "  (none)"


def format_stats(stats: pstats.Stats, sort: str, *restrictions: t.Any) -> str:
    """The profile as text, sorted by ``sort``, with shorter file names."""
    out = io.StringIO()
    stats.stream = out  # type: ignore[attr-defined]
    stats.sort_stats(sort).print_stats(*restrictions)
    text = out.getvalue()
    for prefix in _PREFIXES:
        text = text.replace(prefix.rstrip("/") + "/", "")
    lines = [line for line in text.splitlines() if line.strip()]
    start = next(i for i, line in enumerate(lines) if "function calls" in line)
    return "\n".join(lines[start:])
