"""A store that cannot be reached: the 503, its Retry-After, and a log line
that says what failed and where."""

from __future__ import annotations

import logging
import typing as t

import pytest
from flask import Flask
from flask import session

from flask_serverside import ServerSide
from tests.servers import free_port


def closed_port_config(kind: str, port: int) -> dict[str, t.Any]:
    """Config for a store on a loopback port nothing listens on."""
    if kind == "redis":
        return {"SESSION_BACKEND": "cachelib", "SESSION_CACHELIB": f"redis://127.0.0.1:{port}/0"}
    if kind == "memcached":
        return {"SESSION_BACKEND": "cachelib", "SESSION_CACHELIB": f"memcached://127.0.0.1:{port}"}
    return {
        "SESSION_BACKEND": "sqlalchemy",
        "SESSION_SQLALCHEMY_URL": f"postgresql+psycopg2://user:s3cret@127.0.0.1:{port}/db",
    }


def make_app(tmp_path: t.Any, kind: str) -> tuple[Flask, int]:
    port = free_port()
    config = closed_port_config(kind, port)
    app = Flask(__name__, instance_path=str(tmp_path))
    app.config.update(SECRET_KEY="secret", TESTING=True, **config)
    ServerSide(app)

    @app.get("/read")
    def read() -> str:
        return str(session.get("a"))

    @app.get("/write")
    def write() -> str:
        session["a"] = "1"
        return "ok"

    return app, port


@pytest.mark.parametrize("kind", ["redis", "memcached", "postgres"])
def test_outage_log_names_cause_and_address(
    tmp_path: t.Any, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    app, port = make_app(tmp_path, kind)
    client = app.test_client()
    client.set_cookie("session", "a" * 43)
    with caplog.at_level(logging.ERROR, "flask_serverside"):
        response = client.get("/read")
    assert response.status_code == 503
    [message] = [r.getMessage() for r in caplog.records if "unavailable" in r.getMessage()]
    assert "while loading" in message
    assert f"127.0.0.1:{port}" in message
    assert "refused" in message.lower()
    assert "s3cret" not in message


@pytest.mark.parametrize("kind", ["redis", "postgres"])
def test_503_says_when_to_retry(tmp_path: t.Any, kind: str) -> None:
    app, _ = make_app(tmp_path, kind)
    client = app.test_client()
    client.set_cookie("session", "a" * 43)
    response = client.get("/read")
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "5"


@pytest.mark.parametrize("kind", ["redis", "postgres"])
def test_503_of_a_failed_save_says_when_to_retry(tmp_path: t.Any, kind: str) -> None:
    """No cookie: nothing is read, the store is first reached by the save."""
    app, _ = make_app(tmp_path, kind)
    response = app.test_client().get("/write")
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "5"
    assert "Set-Cookie" not in response.headers
