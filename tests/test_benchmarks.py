"""The benchmarks' ``least`` app does the work it stands for: a bound is
only as good as the session it measures."""

from __future__ import annotations

import pathlib
import struct
import time

import pytest
from flask import Flask
from flask import session

from benchmarks import apps
from benchmarks.least import LeastInterface


@pytest.fixture
def least(tmp_path: pathlib.Path) -> tuple[Flask, apps.FileFloor]:
    floor = apps.FileFloor(tmp_path / "records")
    paths = {*apps.READ_PATHS, "/add", "/size"}
    app = apps.bare_app(tmp_path / "instance", LeastInterface(floor, paths))

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
