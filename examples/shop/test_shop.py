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
    """The session record files under the instance folder (not locks, temp
    files or the users' indexes of their sessions).
    """
    return [
        name
        for _, _, names in os.walk(os.path.join(str(instance), "sessions"))
        for name in names
        if not name.startswith(".") and "user%3A" not in name
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
        if not name.startswith(".") and "user%3A" not in name
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


# -- Your devices -------------------------------------------------------------

FIREFOX = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"
CHROME = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36"
    " (KHTML, like Gecko) Chrome/126.0.0.0 Safari/537.36"
)
SAFARI = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15"
    " (KHTML, like Gecko) Version/17.5 Mobile/15E148 Safari/604.1"
)
ROW = re.compile(r'<tr class="device( current)?">(.*?)</tr>', re.S)


def logged_in(app: Flask, name: str, user_agent: str) -> FlaskClient:
    """A new browser, logged in as ``name``."""
    client = app.test_client()
    client.environ_base["HTTP_USER_AGENT"] = user_agent
    assert client.post("/login", data={"username": name}).status_code == 302
    return client


def devices(client: FlaskClient) -> list[tuple[bool, str]]:
    """The rows of the devices page: (this device?, row HTML)."""
    response = client.get("/devices")
    assert response.status_code == 200, response.text
    return [(bool(current), row) for current, row in ROW.findall(response.text)]


def form_field(row: str, name: str) -> str:
    match = re.search(rf'name="{name}" value="([^"]+)"', row)
    assert match is not None, row
    return match.group(1)


def csrf_of(client: FlaskClient) -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', client.get("/devices").text)
    assert match is not None
    return match.group(1)


def is_logged_in(client: FlaskClient, name: str) -> bool:
    return f"Hi, {name}" in client.get("/").text


def test_devices_page_lists_both_and_ends_the_other(app: Flask) -> None:
    first = logged_in(app, "ada", FIREFOX)
    second = logged_in(app, "ada", CHROME)
    logged_in(app, "bob", SAFARI)  # another user's session is not listed

    rows = devices(first)
    assert len(rows) == 2
    assert [current for current, _ in rows] == [True, False]
    current, other = rows[0][1], rows[1][1]
    assert "Firefox on Linux" in current and "this device" in current
    assert "Chrome on Windows" in other and "this device" not in other
    assert "127.0.0.1" in other
    assert "just now" in other
    assert re.search(r'title="\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC"', other)
    assert "Log out everywhere else" in first.get("/devices").text
    # The handle is never the session ID.
    assert sid_of(second) not in first.get("/devices").text

    response = first.post(
        "/devices/end",
        data={"handle": form_field(other, "handle"), "csrf": form_field(other, "csrf")},
        follow_redirects=True,
    )
    assert response.status_code == 200
    assert "Ended the session of Chrome on Windows." in response.text
    assert [current for current, _ in devices(first)] == [True]

    # The second browser is logged out on its next request, its cookie gone.
    page = second.get("/").text
    assert "You are not logged in" in page
    assert sid_of(second) is None
    assert second.get("/devices").status_code == 302
    assert is_logged_in(first, "ada")


def test_log_out_everywhere_else(app: Flask) -> None:
    first = logged_in(app, "ada", FIREFOX)
    others = [logged_in(app, "ada", CHROME), logged_in(app, "ada", SAFARI)]
    bob = logged_in(app, "bob", CHROME)
    assert len(devices(first)) == 3

    response = first.post(
        "/devices/end-others", data={"csrf": csrf_of(first)}, follow_redirects=True
    )
    assert "Logged out everywhere else: ended 2 sessions." in response.text
    assert "You are logged in on this device only." in response.text
    assert [current for current, _ in devices(first)] == [True]
    for other in others:
        assert not is_logged_in(other, "ada")
        assert sid_of(other) is None
    assert is_logged_in(first, "ada")
    assert is_logged_in(bob, "bob")


def test_ending_an_unknown_or_foreign_session_ends_nothing(app: Flask) -> None:
    first = logged_in(app, "ada", FIREFOX)
    second = logged_in(app, "ada", CHROME)
    bob = logged_in(app, "bob", SAFARI)
    csrf = csrf_of(first)
    (bobs,) = _sessions_of(app, "bob")
    ada_handle = _sessions_of(app, "ada")[0].handle

    forged = [
        "forged",
        "",
        bobs.handle,  # real, but another user's
        ada_handle[:-1] + ("A" if ada_handle[-1] != "A" else "B"),  # tampered
        "x" * 22 + ada_handle[22:],  # right user, made-up token
    ]
    for handle in forged:
        response = first.post("/devices/end", data={"handle": handle, "csrf": csrf})
        assert response.status_code == 404, handle
        assert "That session is not one of yours, or it has already ended." in response.text

    assert len(devices(first)) == 2
    assert is_logged_in(second, "ada")
    assert is_logged_in(bob, "bob")


def _sessions_of(app: Flask, user: str) -> list[t.Any]:
    with app.app_context():
        return list(app.extensions["serverside"].sessions_of(user))


def test_devices_forms_need_the_sessions_csrf_token(app: Flask) -> None:
    first = logged_in(app, "ada", FIREFOX)
    second = logged_in(app, "ada", CHROME)
    _, (_, other) = devices(first)
    handle = form_field(other, "handle")
    second_csrf = csrf_of(second)  # a real token, of another session

    for data in ({"handle": handle}, {"handle": handle, "csrf": second_csrf}):
        response = first.post("/devices/end", data=data)
        assert response.status_code == 400
        assert "reload the page and try again" in response.text
    for data in ({}, {"csrf": "x"}, {"csrf": second_csrf}):
        assert first.post("/devices/end-others", data=data).status_code == 400
    assert is_logged_in(second, "ada")
    assert len(devices(first)) == 2


def test_devices_page_requires_login(client: FlaskClient, tmp_path: t.Any) -> None:
    response = client.get("/devices")
    assert response.status_code == 302
    assert response.headers["Location"] == "/login"
    for url in ("/devices/end", "/devices/end-others"):
        response = client.post(url, data={"handle": "x", "csrf": "x"})
        assert response.status_code == 302
        assert response.headers["Location"] == "/login"
    assert "Devices" not in client.get("/").text
    assert sid_of(client) is None
    assert session_files(tmp_path) == []


def test_nav_links_the_devices_page_when_logged_in(app: Flask) -> None:
    client = logged_in(app, "ada", FIREFOX)
    assert '<a href="/devices">Devices</a>' in client.get("/").text


def test_login_binds_the_session_to_the_user(app: Flask) -> None:
    client = logged_in(app, "ada", FIREFOX)
    (info,) = _sessions_of(app, "ada")
    assert info.user_agent == FIREFOX
    assert info.ip == "127.0.0.1"
    assert sid_of(client) not in info.handle


@pytest.mark.parametrize(
    ("user_agent", "name"),
    [
        (FIREFOX, "Firefox on Linux"),
        (CHROME, "Chrome on Windows"),
        (SAFARI, "Safari on iOS"),
        (
            "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML,"
            " like Gecko) Chrome/126.0.0.0 Safari/537.36 Edg/126.0.2592.87",
            "Edge on macOS",
        ),
        (
            "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like"
            " Gecko) Chrome/126.0.0.0 Mobile Safari/537.36",
            "Chrome on Android",
        ),
        (
            "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko)"
            " HeadlessChrome/126.0.0.0 Safari/537.36",
            "Headless Chrome on Linux",
        ),
        ("curl/8.5.0", "curl"),
        ("python-requests/2.32.3", "python-requests"),
        (None, "Unknown browser"),
        ("", "Unknown browser"),
    ],
)
def test_browser_name(user_agent: str | None, name: str) -> None:
    assert shop.browser_name(user_agent) == name


@pytest.mark.parametrize(
    ("seconds", "words"),
    [
        (0, "just now"),
        (59, "just now"),
        (60, "1 minute ago"),
        (150, "2 minutes ago"),
        (3600, "1 hour ago"),
        (7199, "1 hour ago"),
        (86400 * 3 + 5, "3 days ago"),
    ],
)
def test_time_ago(seconds: int, words: str) -> None:
    from datetime import datetime
    from datetime import timedelta
    from datetime import timezone

    now = datetime(2026, 5, 3, 17, 40, 11, tzinfo=timezone.utc)
    assert shop.time_ago(now - timedelta(seconds=seconds), now) == words
