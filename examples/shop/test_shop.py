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
        assert store.get(after) == {"user": "ada", "cart": {"tea": 1}}
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


def test_cart_counts_quantities(app: Flask, client: FlaskClient) -> None:
    for product in ("tea", "mug", "tea"):
        client.post("/cart/add", data={"product": product})
    with app.app_context():
        assert app.extensions["serverside"].get(sid_of(client)) == {
            "cart": {"tea": 2, "mug": 1}
        }

    page = client.get("/cart").text
    assert page.count("<td>Green tea, 100 g</td>") == 1  # one line, quantity 2
    assert re.search(r'class="count">2<', page)
    assert "€9.00" in page  # 2 x €4.50
    assert "€21.00" in page  # the total
    assert "Cart (3)" in page
    assert "2 in your cart" in client.get("/products").text


def test_add_from_the_cart_page_returns_there(client: FlaskClient) -> None:
    response = client.post("/cart/add", data={"product": "tea", "next": "cart"})
    assert response.headers["Location"] == "/cart"
    response = client.post("/cart/add", data={"product": "tea"})
    assert response.headers["Location"] == "/products"


def test_remove_from_cart(app: Flask, client: FlaskClient) -> None:
    client.post("/cart/add", data={"product": "tea"})
    client.post("/cart/add", data={"product": "tea"})
    client.post("/cart/add", data={"product": "mug"})
    client.post("/cart/remove", data={"product": "tea"})
    with app.app_context():
        assert app.extensions["serverside"].get(sid_of(client)) == {
            "cart": {"tea": 1, "mug": 1}
        }
    client.post("/cart/remove", data={"product": "tea"})
    with app.app_context():
        assert app.extensions["serverside"].get(sid_of(client)) == {"cart": {"mug": 1}}

    # The last item gone, the session is empty: record and cookie removed.
    client.post("/cart/remove", data={"product": "mug"})
    assert sid_of(client) is None
    with app.app_context():
        assert app.extensions["serverside"].count() == 0


def test_a_cart_from_the_older_shop_is_counted(app: Flask, client: FlaskClient) -> None:
    # Sessions saved before quantities held a list, one entry per unit.
    with client.session_transaction() as session:
        session["cart"] = ["tea", "mug", "tea"]
    page = client.get("/cart").text
    assert "€21.00" in page and "Cart (3)" in page
    with app.app_context():
        assert app.extensions["serverside"].get(sid_of(client)) == {
            "cart": {"tea": 2, "mug": 1}
        }


def test_bad_cart_requests(client: FlaskClient) -> None:
    assert client.post("/cart/add", data={"product": "caviar"}).status_code == 400
    assert client.post("/cart/remove", data={"product": "tea"}).status_code == 400
    assert client.post("/cart/remove", data={}).status_code == 400
    assert sid_of(client) is None  # nothing stored by a refused request


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


@pytest.mark.parametrize("method", ["get", "post"])
def test_login_when_logged_in_says_so(app: Flask, client: FlaskClient, method: str) -> None:
    client.post("/login", data={"username": "ada"})
    sid = sid_of(client)

    response = getattr(client, method)("/login", data={"username": "grace"})
    assert response.status_code == 200
    assert "You are already logged in as <strong>ada</strong>" in response.text
    assert 'action="/logout"' in response.text
    assert 'name="username"' not in response.text  # no login form
    assert sid_of(client) == sid  # neither a new ID nor a new user
    with app.app_context():
        assert app.extensions["serverside"].get(sid or "") == {"user": "ada"}


def test_cookie_is_samesite_lax(client: FlaskClient) -> None:
    response = client.post("/login", data={"username": "ada"})
    cookie = response.headers["Set-Cookie"]
    assert "SameSite=Lax" in cookie and "HttpOnly" in cookie


def test_testing_docs_session_transaction_and_file_dir(tmp_path: t.Any) -> None:
    # docs/testing.rst: SESSION_FILE_DIR in the test config, and a session
    # set up with session_transaction() before the request.
    app = shop.create_app({"TESTING": True, "SESSION_FILE_DIR": str(tmp_path / "s")})
    client = app.test_client()
    with client.session_transaction() as session:
        session["cart"] = {"tea": 1}
    assert "Green tea" in client.get("/cart").text
    assert os.listdir(tmp_path / "s")


def side(page: str, name: str) -> str:
    """The HTML of one side of the session page: "browser" or "server"."""
    match = re.search(rf'<section class="side" id="{name}">(.*?)</section>', page, re.S)
    assert match is not None, page
    return match.group(1)


def test_session_page_shows_both_sides(tmp_path: t.Any, client: FlaskClient) -> None:
    client.post("/login", data={"username": "ada"})
    client.post("/cart/add", data={"product": "tea"})
    sid = sid_of(client)
    assert sid is not None
    page = client.get("/session").text
    assert sid not in page  # abbreviated, never in full

    browser = side(page, "browser")
    assert "<code>session</code>" in browser
    assert f"{sid[:8]}…{sid[-4:]}" in browser
    assert f"{len(sid)} characters" in browser
    assert "Lax" in browser and "scripts cannot read it" in browser
    assert "ada" not in browser and "tea" not in browser  # no data in the cookie

    server = side(page, "server")
    [path] = [
        os.path.join(root, name)
        for root, _, names in os.walk(tmp_path / "sessions")
        for name in names
        if not name.startswith(".")
    ]
    digest = os.path.basename(path)[-64:]
    assert f"session:{digest[:12]}…{digest[-4:]}" in server  # the storage key
    assert f"{digest[-4:]}</code>" in server  # the file, abbreviated alike
    assert "mode 0o600" in server
    assert f"{os.stat(path).st_size} bytes" in server  # the real file size
    assert re.search(r"Expires</dt><dd>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", server)
    assert "&#34;user&#34;: &#34;ada&#34;" in server or '"user": "ada"' in server
    data = re.search(r"(\d+) bytes serialized", server)
    assert data is not None and 0 < int(data.group(1)) < os.stat(path).st_size

    # Another item makes the stored data bigger.
    client.post("/cart/add", data={"product": "biscuits"})
    bigger = re.search(r"(\d+) bytes serialized", client.get("/session").text)
    assert bigger is not None and int(bigger.group(1)) > int(data.group(1))


def test_session_page_with_a_store_that_is_not_files(tmp_path: t.Any) -> None:
    app = shop.create_app(
        {"TESTING": True, "SESSION_BACKEND": "cachelib", "SESSION_CACHELIB": "simple://"},
        instance_path=str(tmp_path),
    )
    client = app.test_client()
    client.post("/login", data={"username": "ada"})
    response = client.get("/session")
    assert response.status_code == 200
    server = side(response.text, "server")
    assert "<code>CacheLibBackend</code>" in server
    assert "session:" in server and "bytes serialized" in server
    assert "File</dt>" not in server and "on disk" not in server
