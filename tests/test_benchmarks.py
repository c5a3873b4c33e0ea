"""The benchmarks' ``least`` app does the work it stands for: a bound is
only as good as the session it measures."""

from __future__ import annotations

import pathlib
import struct
import subprocess
import sys
import time

import pytest
from flask import Flask
from flask import session

from benchmarks import apps
from benchmarks.least import LeastInterface
from benchmarks.least import record_key as least_key
from benchmarks.throughput import cpu_ns
from benchmarks.throughput import Turn


@pytest.fixture
def least(tmp_path: pathlib.Path) -> tuple[Flask, apps.FileFloor]:
    floor = apps.FileFloor(tmp_path / "records")
    app = apps.bare_app(tmp_path / "instance", LeastInterface(floor))

    @app.get("/add")
    def add() -> str:
        session["cart"].append("jam")
        return "ok"

    @app.get("/size")
    def size() -> str:
        return str(len(session))

    return app, floor


def _records(floor: apps.FileFloor) -> list[pathlib.Path]:
    return sorted(pathlib.Path(floor.directory).iterdir())


def test_least_session_is_stored_read_and_written(
    least: tuple[Flask, apps.FileFloor],
) -> None:
    app, floor = least
    client = app.test_client()
    login = client.get("/login")
    cookie = login.headers["Set-Cookie"]
    assert "Expires=" in cookie and "HttpOnly" in cookie
    (record,) = _records(floor)
    # The record is keyed by the ID's hash, never the ID.
    sid = cookie.split(";")[0].partition("=")[2]
    assert sid not in record.name

    read = client.get("/read")
    assert read.data == b"ada:42:3"
    assert read.headers["Vary"] == "Cookie"
    assert "Set-Cookie" in read.headers

    client.get("/write")
    assert b'"seen":' in record.read_bytes()
    client.get("/add")
    assert b'"jam"' in record.read_bytes()  # a nested change is written
    assert client.get("/read").data == b"ada:42:4"


def test_least_session_sends_nothing_when_untouched(
    least: tuple[Flask, apps.FileFloor],
) -> None:
    app, floor = least
    client = app.test_client()
    assert "Set-Cookie" not in client.get("/untouched").headers
    assert _records(floor) == []
    client.get("/login")
    assert "Set-Cookie" not in client.get("/untouched").headers


def test_least_session_reads_no_expired_record(least: tuple[Flask, apps.FileFloor]) -> None:
    app, floor = least
    client = app.test_client()
    client.get("/login")
    (record,) = _records(floor)
    data = record.read_bytes()
    assert client.get("/size").data == b"3"
    record.write_bytes(struct.pack(">d", time.time() - 1) + data[8:])
    assert client.get("/size").data == b"0"


def test_least_session_ignores_a_malformed_cookie(
    least: tuple[Flask, apps.FileFloor],
) -> None:
    app, floor = least
    client = app.test_client()
    client.set_cookie(apps.COOKIE_NAME, "../../etc/passwd")
    response = client.get("/login")
    assert "../" not in response.headers["Set-Cookie"]
    assert len(_records(floor)) == 1


def test_least_session_starts_anew_on_an_unknown_id(
    least: tuple[Flask, apps.FileFloor],
) -> None:
    app, floor = least
    client = app.test_client()
    unknown = "A" * 43
    client.set_cookie(apps.COOKIE_NAME, unknown)
    assert client.get("/size").data == b"0"
    written = client.get("/login").headers["Set-Cookie"]
    assert unknown not in written
    assert len(_records(floor)) == 1


@pytest.mark.parametrize("name", ["filesystem", "sqlite", "postgres", "redis", "memcached"])
def test_least_write_is_a_compare_and_set(
    name: str, tmp_path: pathlib.Path, request: pytest.FixtureRequest
) -> None:
    url = None
    if name in ("postgres", "redis", "memcached"):
        url = request.getfixturevalue(f"{name}_server").url
    store = apps.configure_store(name, tmp_path, url)
    app = apps.make_app("least", store, tmp_path / "least")
    try:
        client = app.test_client()
        client.get("/login")
        client.get("/write")
        interface = app.session_interface
        assert isinstance(interface, LeastInterface)
        cookie = client.get_cookie(apps.COOKIE_NAME)
        assert cookie is not None
        key = least_key(cookie.value)
        raw, token = interface.records.read(key)
        assert b'"seen":0' in raw  # the view's write went through
        assert interface.records.replace(key, token, raw[:8] + b'{"a":1}')
        # Another request wrote since: this write is not applied.
        assert not interface.records.replace(key, token, raw[:8] + b'{"a":2}')
        assert interface.records.read(key)[0].startswith(raw[:8] + b'{"a":1}')
    finally:
        apps.stop_store(store)


BURN = """
import os, sys, time
if os.fork() == 0:  # a worker, as gunicorn's master forks them
    end = time.process_time() + float(sys.argv[1])
    while time.process_time() < end:
        pass
    time.sleep(30)
    os._exit(0)
time.sleep(30)
"""


@pytest.mark.skipif(not pathlib.Path("/proc/self/schedstat").exists(), reason="needs /proc")
def test_throughput_counts_the_cpu_time_of_the_workers() -> None:
    """The CPU column of ``throughput.py`` adds up the master and the
    workers it forked, in ns."""
    proc = subprocess.Popen([sys.executable, "-c", BURN, "0.3"])
    try:
        time.sleep(1.5)
        used = cpu_ns(proc)
        assert used is not None
        assert 0.3e9 <= used < 1.5e9
    finally:
        proc.kill()
        proc.wait()
    assert cpu_ns(proc) is None  # gone: no figure rather than a wrong one
    assert Turn(1000.0, 0, 500, 250_000_000).cpu_per_request() == 500.0
    assert Turn(1000.0, 0, 0, 250_000_000).cpu_per_request() is None
