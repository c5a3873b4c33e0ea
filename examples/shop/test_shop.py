"""Tests of the example shop: ``pytest examples/shop/test_shop.py``."""

from __future__ import annotations

import importlib.util
import os
import re
import typing as t

import pytest
from flask import Flask
from flask.testing import FlaskClient

# Load app.py under a unique name, so other examples' app.py can't clash.
_spec = importlib.util.spec_from_file_location(
    "flask_serverside_example_shop", os.path.join(os.path.dirname(__file__), "app.py")
)
assert _spec is not None and _spec.loader is not None
shop = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(shop)

COOKIE = "session"


def make_app(instance: t.Any) -> Flask:
    app: Flask = shop.create_app({"TESTING": True}, instance_path=str(instance))
    return app


@pytest.fixture()
def app(tmp_path: t.Any) -> Flask:
    return make_app(tmp_path)


@pytest.fixture()
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def sid_of(client: FlaskClient) -> str | None:
    cookie = client.get_cookie(COOKIE)
    return None if cookie is None else cookie.value


def session_files(instance: t.Any) -> list[str]:
    """The record files under the instance folder (not locks or temp files)."""
    return [
        name
        for _, _, names in os.walk(os.path.join(str(instance), "sessions"))
        for name in names
        if not name.startswith(".")
    ]


def test_browsing_creates_no_session(client: FlaskClient, tmp_path: t.Any) -> None:
    for page in ("/", "/products", "/cart", "/session", "/login"):
        assert client.get(page).status_code == 200
    assert sid_of(client) is None
    assert session_files(tmp_path) == []


def test_login_regenerates_the_id_and_keeps_the_cart(app: Flask, client: FlaskClient) -> None:
    client.post("/cart/add", data={"product": "tea"})
    before = sid_of(client)
    assert before is not None

    response = client.post("/login", data={"username": "ada"})
    assert response.status_code == 302
    after = sid_of(client)
    assert after is not None and after != before

    with app.app_context():
        store = app.extensions["serverside"]
        assert store.get(before) is None
        assert store.get(after) == {"user": "ada", "cart": ["tea"]}
    assert "Hi, ada" in client.get("/").text


def test_login_rejects_an_empty_name(client: FlaskClient) -> None:
    response = client.post("/login", data={"username": "  "})
    assert response.status_code == 400
    assert sid_of(client) is None


def test_cart_survives_a_restart(tmp_path: t.Any) -> None:
    client = make_app(tmp_path).test_client()
    client.post("/login", data={"username": "ada"})
    # The second add changes only the nested list: saved all the same.
    client.post("/cart/add", data={"product": "tea"})
    client.post("/cart/add", data={"product": "mug"})

    # A new app on the same instance folder: the server was restarted.
    restarted = make_app(tmp_path).test_client()
    restarted.set_cookie(COOKIE, sid_of(client) or "")
    page = restarted.get("/cart").text
    assert "Green tea" in page and "Enamel mug" in page
    assert "€16.50" in page
    assert "Hi, ada" in page


def test_remove_from_cart(app: Flask, client: FlaskClient) -> None:
    client.post("/cart/add", data={"product": "tea"})
    client.post("/cart/add", data={"product": "mug"})
    client.post("/cart/remove", data={"index": "0"})
    with app.app_context():
        assert app.extensions["serverside"].get(sid_of(client)) == {"cart": ["mug"]}

    # The last item gone, the session is empty: record and cookie removed.
    client.post("/cart/remove", data={"index": "0"})
    assert sid_of(client) is None
    with app.app_context():
        assert app.extensions["serverside"].count() == 0


def test_bad_cart_requests(client: FlaskClient) -> None:
    assert client.post("/cart/add", data={"product": "caviar"}).status_code == 400
    assert client.post("/cart/remove", data={"index": "3"}).status_code == 400
    assert client.post("/cart/remove", data={"index": "x"}).status_code == 400


def test_logout_removes_the_session(app: Flask, client: FlaskClient, tmp_path: t.Any) -> None:
    client.post("/login", data={"username": "ada"})
    client.post("/cart/add", data={"product": "honey"})
    sid = sid_of(client)
    assert sid is not None
    assert len(session_files(tmp_path)) == 1

    response = client.post("/logout")
    assert response.status_code == 302
    assert COOKIE in response.headers["Set-Cookie"]
    assert sid_of(client) is None
    assert session_files(tmp_path) == []
    with app.app_context():
        assert app.extensions["serverside"].get(sid) is None
    assert "You are not logged in" in client.get("/").text


def test_logout_is_post_only(client: FlaskClient) -> None:
    assert client.get("/logout").status_code == 405


def test_session_page_shows_id_expiry_and_size(tmp_path: t.Any, client: FlaskClient) -> None:
    client.post("/login", data={"username": "ada"})
    sid = sid_of(client)
    assert sid is not None
    page = client.get("/session").text

    assert f"{sid[:8]}…{sid[-4:]}" in page
    assert sid not in page  # abbreviated, never in full
    assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", page)
    assert len(session_files(tmp_path)) == 1
    size = re.search(r"(\d+) bytes", page)
    assert size is not None and int(size.group(1)) > 0

    # Adding an item makes the stored record bigger.
    client.post("/cart/add", data={"product": "biscuits"})
    bigger = re.search(r"(\d+) bytes", client.get("/session").text)
    assert bigger is not None and int(bigger.group(1)) > int(size.group(1))
