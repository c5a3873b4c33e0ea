"""Print the reliability figures: per test (with ``-s``), per suite, and in
pytest's terminal summary."""

from __future__ import annotations

import typing as t

import pytest

from tests.reliability.figures import FIGURES
from tests.reliability.figures import summary_line

_PRINTED: set[str] = set()


@pytest.fixture(scope="module", autouse=True)
def _suite_summary(request: pytest.FixtureRequest) -> t.Iterator[None]:
    yield
    suite = request.module.__name__.rsplit(".", 1)[-1].removeprefix("test_")
    if suite in FIGURES and suite not in _PRINTED:
        _PRINTED.add(suite)
        print(f"\n== {summary_line(suite)}", flush=True)


def pytest_terminal_summary(terminalreporter: t.Any) -> None:
    if not FIGURES:
        return
    terminalreporter.section("reliability figures")
    suites = ("load", "workers", "crash", "outages", "fuzz", "security", "users_load", "failover")
    for suite in suites:
        if suite in FIGURES:
            terminalreporter.write_line(summary_line(suite))
