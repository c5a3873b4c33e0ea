"""Figures the reliability suites report, and the Hypothesis profiles.

Each test adds its counts with :func:`record`; ``conftest.py`` prints one
line per suite when the suite ends and in pytest's terminal summary.
"""

from __future__ import annotations

import os
import typing as t
from collections import Counter
from collections import defaultdict

import pytest
from hypothesis import HealthCheck
from hypothesis import settings

#: Suite name -> summed counters.
FIGURES: dict[str, Counter[str]] = defaultdict(Counter)
#: Suite name -> extra facts (maxima, seeds ...).
FACTS: dict[str, dict[str, t.Any]] = defaultdict(dict)

# Hypothesis: many examples in CI, few locally. Every test builds its app once
# (function-scoped fixtures are shared by its examples on purpose).
_COMMON = settings(
    deadline=None,
    database=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
    print_blob=True,
)
settings.register_profile("reliability-ci", _COMMON, max_examples=600)
settings.register_profile("reliability-dev", _COMMON, max_examples=60)
PROFILE_NAME = os.environ.get(
    "RELIABILITY_PROFILE",
    "reliability-ci" if os.environ.get("CI") == "true" else "reliability-dev",
)
PROFILE = settings.get_profile(PROFILE_NAME)


def examples(weight: float = 1.0) -> settings:
    """The profile's settings with ``weight`` times its example count."""
    return settings(PROFILE, max_examples=max(10, int(PROFILE.max_examples * weight)))


def record(request: pytest.FixtureRequest, suite: str, line: str | None, **counts: int) -> None:
    """Add ``counts`` to the suite's figures, attach them to the test's
    report (``user_properties``, shown in JUnit XML) and print ``line``."""
    FIGURES[suite].update(counts)
    for name, value in counts.items():
        request.node.user_properties.append((name, value))
    if line:
        print(f"\n[{suite}] {request.node.name}: {line}", flush=True)


def fact_max(suite: str, name: str, value: float) -> None:
    FACTS[suite][name] = max(FACTS[suite].get(name, value), value)


def _load_line(c: Counter[str]) -> str:
    return (
        f"{c['requests']} HTTP requests through gunicorn on {c['servers']} backends"
        f" ({c['clients']} client threads in all, {c['workers_seen']} worker processes"
        f" seen), lost updates {c['lost_updates']}, destroyed IDs served again"
        f" {c['destroyed_served']}"
    )


def _failover_line(c: Counter[str]) -> str:
    return "; ".join(
        f"{name}: {c[name + '_requests']} requests, 503s {c[name + '_503']}, 500s"
        f" {c[name + '_500']}, logged out {c[name + '_logged_out']}, acknowledged writes"
        f" lost {c[name + '_lost_acked']}, served again after {c[name + '_recovery_ms']} ms"
        for name in ("cluster", "sentinel")
        if name + "_requests" in c
    )


_FORMATS: dict[str, t.Callable[[Counter[str], dict[str, t.Any]], str]] = {
    "failover": lambda c, f: _failover_line(c),
    "load": lambda c, f: _load_line(c),
    "crash": lambda c, f: (
        f"{c['kills']} SIGKILLs of writers ({c['kills_fs']} filesystem, {c['kills_sqlite']}"
        f" SQLite, {c['kills_lock_holders']} cache lock holders), torn or unreadable records"
        f" {c['torn']}, lost acknowledged versions {c['regressed']}, stale temp files"
        f" left/removed {c['tmp_left']}/{c['tmp_removed']}, longest lock wait after a kill"
        f" {f.get('lock_wait_s', 0) * 1000:.1f} ms (cache locks, by TTL:"
        f" {f.get('ttl_wait_s', 0):.2f}s)"
    ),
    "outages": lambda c, f: (
        "session requests during outages: "
        + ", ".join(
            f"{k.removeprefix('outage_')}x{v}"
            for k, v in sorted(c.items())
            if k.startswith("outage_")
        )
        + f"; untouched pages during outages 200x{c['untouched_200']}"
        f" (non-200: {c['untouched_bad']}); 500s {c['status_500']};"
        f" acknowledged writes lost {c['lost']}; slowest request"
        f" {f.get('slowest_s', 0):.2f}s"
    ),
    "fuzz": lambda c, f: (
        f"{c['examples']} Hypothesis examples ({f.get('profile', PROFILE_NAME)}), server"
        f" errors {c['errors']}, backend calls for malformed IDs {c['malformed_calls']},"
        f" pickles executed {c['pickles_executed']}, paths opened outside the session"
        f" directory {c['outside_paths']}"
    ),
    "security": lambda c, f: (
        f"{c['checks']} checks on {c['backends']} backend runs, fixations adopted"
        f" {c['adopted']}, raw IDs found in storage {c['raw_ids']}, expired sessions"
        f" served {c['expired_served']}"
    ),
}


def summary_line(suite: str) -> str:
    fmt = _FORMATS.get(suite)
    counts, facts = FIGURES[suite], FACTS[suite]
    return f"{suite}: " + (fmt(counts, facts) if fmt else dict(counts).__repr__())
