"""The ``flask sessions`` commands, on every backend."""

from __future__ import annotations

import pathlib
import time
import typing as t

import pytest
from flask import Flask

from tests.conftest import build_app
from tests.test_contract import session_cookie
from tests.test_contract import start_session
from tests.test_contract import stored


def invoke(app: Flask, *args: str, input: str | None = None) -> t.Any:
    return app.test_cli_runner().invoke(args=["sessions", *args], input=input)


def test_count(app: Flask, backend_name: str) -> None:
    start_session(app.test_client(), a="1")
    result = invoke(app, "count")
    if backend_name == "memcached":
        assert result.exit_code == 1
        assert "Memcached" in result.output and len(result.output.strip().splitlines()) == 1
    else:
        assert result.exit_code == 0 and result.output == "1\n"


def test_delete(make_app: t.Callable[..., Flask]) -> None:
    app = make_app()
    sid = start_session(app.test_client(), a="1")
    result = invoke(app, "delete", "--", sid)
    assert result.exit_code == 0 and stored(app, sid) is None
    result = invoke(app, "delete", "--", sid)
    assert result.exit_code == 1 and "No such session" in result.output


def test_delete_signed_cookie_value(make_app: t.Callable[..., Flask]) -> None:
    app = make_app(SESSION_SIGN_ID=True)
    signed = session_cookie(app.test_client().get("/set/a/1"))
    assert signed and "." in signed
    assert invoke(app, "delete", "--", signed).exit_code == 0
    assert stored(app, signed.split(".")[0]) is None


def test_cleanup(app: Flask) -> None:
    start_session(app.test_client(), a="1")
    dead = start_session(app.test_client(), b="2")
    with app.app_context():
        store = app.session_interface.store  # type: ignore[attr-defined]
        store.backend.save(store.key(dead), b"{}", time.time() - 1)
    result = invoke(app, "cleanup")
    assert result.exit_code == 0
    expected = 0 if store.backend.native_expiry else 1
    assert f"Removed {expected} expired sessions." in result.output


def test_clear_asks_first(app: Flask, backend_name: str) -> None:
    sid = start_session(app.test_client(), a="1")
    result = invoke(app, "clear", input="n\n")
    assert result.exit_code == 1 and stored(app, sid) is not None
    result = invoke(app, "clear", "--yes")
    if backend_name == "memcached":
        assert result.exit_code == 1 and "Memcached" in result.output
        return
    assert result.exit_code == 0 and "Removed 1 sessions." in result.output
    assert stored(app, sid) is None


def assert_one_line_error(result: t.Any, *words: str) -> None:
    """The command failed with a one-line reason naming ``words``, and no
    traceback."""
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    for word in words:
        assert word in errors[0], result.output


@pytest.mark.parametrize(
    "args", [("count",), ("clear", "--yes"), ("cleanup",), ("delete", "--", "a" * 43)]
)
def test_missing_table_is_a_one_line_error(tmp_path: pathlib.Path, args: tuple[str, ...]) -> None:
    app = build_app(
        tmp_path,
        {"SESSION_BACKEND": "sqlalchemy", "SESSION_SQLALCHEMY_CREATE_TABLE": False},
        count=False,
    )
    result = invoke(app, *args)
    assert_one_line_error(result, "'sessions' does not exist", "SESSION_SQLALCHEMY_CREATE_TABLE")
    assert result.output.startswith("Error:")


def test_delete_signed_id_without_secret_key(tmp_path: pathlib.Path) -> None:
    app = build_app(tmp_path, {"SESSION_SIGN_ID": True}, count=False)
    app.secret_key = None
    assert_one_line_error(invoke(app, "delete", "--", "a" * 43), "SECRET_KEY")


@pytest.mark.parametrize("sid", ["", "a" * 20 + "\n" + "a" * 22, "../" * 20, "é" * 43])
def test_delete_malformed_sid(tmp_path: pathlib.Path, sid: str) -> None:
    app = build_app(tmp_path, {}, count=False)
    assert_one_line_error(invoke(app, "delete", "--", sid), "SID", "not a session ID")


def test_import_bad_format(tmp_path: pathlib.Path) -> None:
    app = build_app(tmp_path, {}, count=False)
    result = invoke(app, "import-flask-session", "--from", "x", "--format", "pickle")
    assert_one_line_error(result, "--format", "'pickle'")
