"""Security regressions, on every backend.

Session fixation, signed IDs across a key rotation, expiry without cleanup,
raw IDs in storage, the logout cookie's attributes, and a logout or revoke
that an overlapping request must not undo.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import os
import socket
import sqlite3
import threading
import time
import typing as t
from urllib.parse import unquote

import pytest
import sqlalchemy as sa
from flask import Flask
from flask import session
from itsdangerous import BadSignature
from itsdangerous import Signer

from flask_serverside import ids
from tests.conftest import build_app
from tests.reliability.figures import record
from tests.reliability.helpers import session_set_cookie
from tests.reliability.helpers import SetCookie
from tests.wrappers import InterruptedWrites


def make(tmp_path: t.Any, backend_config: dict[str, t.Any], **config: t.Any) -> Flask:
    app = build_app(tmp_path, {**backend_config, "TESTING": False, **config}, count=False)

    @app.get("/login/<user>")
    def login(user: str) -> str:
        session.regenerate()  # type: ignore[attr-defined]
        session["user"] = user
        return "ok"

    return app


def stored(app: Flask, sid: str) -> dict[str, t.Any] | None:
    with app.app_context():
        return t.cast("dict[str, t.Any] | None", app.extensions["serverside"].get(sid))


def get(
    app: Flask, path: str, cookie: str | None, name: str = "session"
) -> tuple[t.Any, SetCookie | None]:
    """A request with exactly this cookie (no cookie jar)."""
    headers = {"Cookie": f"{name}={cookie}"} if cookie is not None else {}
    response = app.test_client(use_cookies=False).get(path, headers=headers)
    return response, session_set_cookie(response.headers.getlist("Set-Cookie"), name)


def new_session(app: Flask, **data: str) -> str:
    cookie: str | None = None
    for key, value in data.items():
        response, set_cookie = get(app, f"/set/{key}/{value}", cookie)
        assert response.status_code == 200 and set_cookie is not None
        cookie = set_cookie.value
    assert cookie is not None
    return cookie


# Fixation


def test_attacker_chosen_ids_are_never_adopted(
    tmp_path: t.Any, backend_config: dict[str, t.Any], request: pytest.FixtureRequest
) -> None:
    app = make(tmp_path, backend_config)
    chosen = [ids.generate(32), ids.generate(16), ids.generate(64), "A" * 43, "a-_" * 15]
    adopted = 0
    for sid in chosen:
        response, cookie = get(app, "/set/a/1", sid)
        assert response.status_code == 200 and cookie is not None and not cookie.deleting
        adopted += cookie.value == sid or stored(app, sid) is not None
        assert stored(app, cookie.value) == {"a": "1"}
    record(
        request,
        "security",
        f"{len(chosen)} attacker-chosen IDs offered, {adopted} adopted",
        checks=len(chosen),
        adopted=adopted,
        backends=1,
    )
    assert adopted == 0


def test_login_regenerates_and_kills_the_old_id(
    tmp_path: t.Any, backend_config: dict[str, t.Any], request: pytest.FixtureRequest
) -> None:
    """The attacker plants a real session of theirs in the victim's browser;
    the victim logs in: the attacker's ID must not become the victim's."""
    app = make(tmp_path, backend_config)
    planted = new_session(app, cart="pear")
    response, cookie = get(app, "/login/victim", planted)
    assert response.status_code == 200 and cookie is not None
    victim = cookie.value
    assert victim != planted
    assert stored(app, victim) == {"cart": "pear", "user": "victim"}
    assert stored(app, planted) is None
    response, cookie = get(app, "/dump", planted)
    assert response.json == {}, "the old ID still reaches the logged-in session"
    assert cookie is None or cookie.value != victim
    record(request, "security", None, checks=4)


def test_flask_login_regenerates_on_login_and_destroys_on_logout(
    tmp_path: t.Any, backend_config: dict[str, t.Any], request: pytest.FixtureRequest
) -> None:
    flask_login = pytest.importorskip("flask_login")
    app = make(tmp_path, backend_config)
    manager = flask_login.LoginManager(app)

    class User(flask_login.UserMixin):  # type: ignore[name-defined,misc]
        def __init__(self, uid: str) -> None:
            self.id = uid

    manager.user_loader(User)

    @app.get("/fl/login")
    def fl_login() -> str:
        flask_login.login_user(User("victim"))
        return "in"

    @app.get("/fl/me")
    def fl_me() -> str:
        user = flask_login.current_user
        return str(user.id) if user.is_authenticated else "anonymous"

    @app.get("/fl/logout")
    def fl_logout() -> str:
        flask_login.logout_user()
        return "out"

    planted = new_session(app, cart="pear")
    response, cookie = get(app, "/fl/login", planted)
    assert response.status_code == 200 and cookie is not None
    victim = cookie.value
    assert victim != planted and stored(app, planted) is None
    assert get(app, "/fl/me", victim)[0].text == "victim"
    assert get(app, "/fl/me", planted)[0].text == "anonymous"
    response, cookie = get(app, "/fl/logout", victim)
    assert cookie is not None and cookie.deleting
    assert stored(app, victim) is None
    assert get(app, "/fl/me", victim)[0].text == "anonymous"
    record(request, "security", None, checks=6)


# Signed IDs and key rotation


def test_signed_ids_survive_a_key_rotation(
    tmp_path: t.Any, backend_config: dict[str, t.Any], request: pytest.FixtureRequest
) -> None:
    old = make(tmp_path, backend_config, SESSION_SIGN_ID=True, SECRET_KEY="old key")
    signed = new_session(old, a="1")
    sid, _, _ = signed.rpartition(".")
    backend = old.session_interface.store.backend  # type: ignore[attr-defined]
    rotated = make(
        tmp_path,
        {**backend_config, "SESSION_BACKEND": backend},
        SESSION_SIGN_ID=True,
        SECRET_KEY="new key",
        SECRET_KEY_FALLBACKS=["old key"],
    )
    response, cookie = get(rotated, "/get/a", signed)
    assert response.json == "1", "the cookie signed with the fallback key no longer works"
    assert cookie is not None and cookie.value != signed
    resigned = cookie.value
    assert resigned.rpartition(".")[0] == sid
    salt = "flask_serverside.sid"
    Signer("new key", salt=salt, digest_method=hashlib.sha256).unsign(resigned)
    with pytest.raises(BadSignature):
        Signer("old key", salt=salt, digest_method=hashlib.sha256).unsign(resigned)
    # Forged or foreign signatures and bare IDs are no cookies at all.
    foreign = ids.sign(sid, ["somebody else's key"])
    for value in (sid, foreign, sid + ".", signed + "x"):
        assert get(rotated, "/get/a", value)[0].json is None
    # Once the old key is retired, its cookies stop working.
    retired = make(
        tmp_path,
        {**backend_config, "SESSION_BACKEND": backend},
        SESSION_SIGN_ID=True,
        SECRET_KEY="new key",
    )
    assert get(retired, "/get/a", signed)[0].json is None
    assert get(retired, "/get/a", resigned)[0].json == "1"
    record(request, "security", None, checks=9)


# Expiry


def test_expired_sessions_are_never_served_without_cleanup(
    tmp_path: t.Any, backend_config: dict[str, t.Any], request: pytest.FixtureRequest
) -> None:
    app = make(
        tmp_path,
        backend_config,
        PERMANENT_SESSION_LIFETIME=datetime.timedelta(seconds=1),
        SESSION_CLEANUP_INTERVAL=0,
        SESSION_TOUCH_INTERVAL=0,
    )
    sid = new_session(app, a="1")
    assert get(app, "/get/a", sid)[0].json == "1"  # read: touched, not rewritten
    time.sleep(1.15)
    response, cookie = get(app, "/get/a", sid)
    served = [response.json is not None, stored(app, sid) is not None]
    response, cookie = get(app, "/set/b/2", sid)
    served.append(cookie is not None and cookie.value == sid)
    served.append(stored(app, sid) is not None)
    record(
        request,
        "security",
        f"expired session served {sum(served)} times in 4 tries",
        checks=4,
        expired_served=sum(served),
    )
    assert not any(served)


# Raw IDs in storage


def dump_storage(app: Flask, backend_name: str, tmp_path: t.Any) -> list[bytes]:
    """Every key and value the store holds for this app."""
    backend = app.session_interface.store.backend  # type: ignore[attr-defined]
    prefix = app.session_interface.store.prefix  # type: ignore[attr-defined]
    items: list[bytes] = []
    if backend_name == "filesystem":
        for root, _, files in os.walk(os.path.join(tmp_path, "sessions")):
            for name in files:
                items.append(name.encode())
                with open(os.path.join(root, name), "rb") as f:
                    items.append(f.read())
    elif backend_name == "sqlite":
        with sqlite3.connect(os.path.join(tmp_path, "sessions.sqlite3")) as db:
            for key, data, expires in db.execute("SELECT id, data, expires FROM sessions"):
                items += [key.encode(), bytes(data), str(expires).encode()]
    elif backend_name == "postgres":
        with backend.engine.connect() as conn:
            for row in conn.execute(sa.select(backend.table)):
                items += [row.id.encode(), bytes(row.data)]
    elif backend_name == "redis":
        client = backend.client
        for name in client.scan_iter(match=f"{prefix}*"):
            items += [name, client.get(name) or b""]
    elif backend_name == "memcached":
        items += _memcached_items(backend, prefix)
    else:
        with backend.cache._lock:
            for key, (_expires, value) in backend.cache._cache.items():
                items += [key.encode(), value]
    return items


def _memcached_items(backend: t.Any, prefix: str) -> list[bytes]:
    """Memcached cannot list keys through the client: its LRU crawler can."""
    with backend._client() as client:
        host, port = client.server
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.sendall(b"lru_crawler metadump all\r\n")
        data = b""
        while not data.endswith(b"END\r\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    items = []
    for line in data.decode().splitlines():
        if not line.startswith("key="):
            continue
        name = unquote(line.split()[0][4:])
        if name.startswith(prefix):
            with backend._client() as client:
                items += [name.encode(), client.get(name) or b""]
    return items


def needles(sid: str) -> list[bytes]:
    raw = base64.urlsafe_b64decode(sid + "=" * (-len(sid) % 4))
    return [sid.encode(), raw, sid[:16].encode()]


def test_raw_ids_never_in_storage(
    tmp_path: t.Any,
    backend_name: str,
    backend_config: dict[str, t.Any],
    request: pytest.FixtureRequest,
) -> None:
    app = make(tmp_path, backend_config)
    sids = [new_session(app, a="1", b=ids.generate(16)) for _ in range(3)]
    response, cookie = get(app, "/login/alice", sids[0])  # regenerated: old and new
    assert cookie is not None
    sids.append(cookie.value)
    signed_app = make(
        tmp_path,
        {**backend_config, "SESSION_BACKEND": app.session_interface.store.backend},  # type: ignore[attr-defined]
        SESSION_SIGN_ID=True,
    )
    signed = new_session(signed_app, c="3")
    sids.append(signed.rpartition(".")[0])
    items = dump_storage(app, backend_name, tmp_path)
    store = app.session_interface.store  # type: ignore[attr-defined]
    live = [sid for sid in sids if stored(app, sid) is not None]
    hashed = [store.key(sid)[-64:].encode() for sid in live]
    found_hashed = sum(any(h in item for item in items) for h in hashed)
    leaks = [
        (sid, needle)
        for sid in sids
        for needle in needles(sid) + [signed.encode()]
        if any(needle in item for item in items)
    ]
    record(
        request,
        "security",
        f"{backend_name}: {len(items)} stored keys/values scanned for {len(sids)} IDs"
        f" ({len(live)} live, all found by hash: {found_hashed == len(live)}); raw IDs"
        f" found {len(leaks)}",
        checks=len(sids),
        raw_ids=len(leaks),
    )
    assert len(live) == 4 and found_hashed == len(live), "the scan did not see the records"
    assert not leaks


# The logout cookie


@pytest.mark.parametrize(
    "cookie_config",
    [
        {
            "SESSION_COOKIE_NAME": "sid",
            "SESSION_COOKIE_SECURE": True,
            "SESSION_COOKIE_SAMESITE": "Strict",
            "SESSION_COOKIE_PARTITIONED": True,
            "SESSION_COOKIE_HTTPONLY": True,
            "SESSION_COOKIE_DOMAIN": "example.test",
            "SESSION_COOKIE_PATH": "/app",
        },
        {
            "SESSION_COOKIE_SECURE": False,
            "SESSION_COOKIE_SAMESITE": "Lax",
            "SESSION_COOKIE_HTTPONLY": False,
        },
    ],
    ids=["strict", "lax"],
)
def test_logout_cookie_carries_the_configured_attributes(
    tmp_path: t.Any,
    backend_config: dict[str, t.Any],
    cookie_config: dict[str, t.Any],
    request: pytest.FixtureRequest,
) -> None:
    app = make(tmp_path, backend_config, **cookie_config)
    name = cookie_config.get("SESSION_COOKIE_NAME", "session")
    _, created = get(app, "/set/a/1", None, name)
    assert created is not None
    sid = created.value
    for attempt in ("live", "already gone"):
        response, deleting = get(app, "/destroy", sid, name)
        assert response.status_code == 200, attempt
        assert deleting is not None and deleting.deleting, attempt
        expected = {
            "secure": cookie_config.get("SESSION_COOKIE_SECURE", False),
            "httponly": cookie_config.get("SESSION_COOKIE_HTTPONLY", True),
            "partitioned": cookie_config.get("SESSION_COOKIE_PARTITIONED", False),
        }
        for flag, wanted in expected.items():
            assert (flag in deleting.attributes) == wanted, (attempt, flag, deleting.header)
        assert deleting.attributes.get("samesite") == cookie_config["SESSION_COOKIE_SAMESITE"]
        assert deleting.attributes.get("path") == cookie_config.get("SESSION_COOKIE_PATH", "/")
        assert deleting.attributes.get("domain") == cookie_config.get("SESSION_COOKIE_DOMAIN")
        # The deletion matches the cookie it deletes, attribute for attribute.
        same = {k: v for k, v in created.attributes.items() if k not in ("expires", "max-age")}
        assert {
            k: v for k, v in deleting.attributes.items() if k not in ("expires", "max-age")
        } == same
        assert stored(app, sid) is None
    record(request, "security", None, checks=12)


# A logout or revoke that an overlapping request must not undo


@pytest.mark.parametrize("path", ["one-step", "locked"])
@pytest.mark.parametrize("action", ["logout", "revoke"])
def test_logout_is_not_undone_by_an_overlapping_save(
    tmp_path: t.Any,
    backend_name: str,
    backend_config: dict[str, t.Any],
    action: str,
    path: str,
    request: pytest.FixtureRequest,
) -> None:
    """A request writing the session is about to send its compare-and-set,
    or is inside its locked section (record read, not yet written), when the
    user logs out (``session.destroy()``) or an admin revokes the session
    (``ext.delete``, ``flask sessions delete``). The session must stay
    dead."""
    app = make(tmp_path, backend_config)
    store = app.session_interface.store  # type: ignore[attr-defined]
    gate = InterruptedWrites(store.backend, one_step=path == "one-step")
    store.backend = gate
    sid = new_session(app, a="1")
    reached, release = threading.Event(), threading.Event()

    def pause() -> None:
        reached.set()
        release.wait(10)

    gate.armed = pause
    writer = threading.Thread(target=get, args=(app, "/set/b/2", sid))
    writer.start()
    assert reached.wait(10)

    def kill() -> None:
        if action == "logout":
            get(app, "/destroy", sid)
        else:
            with app.app_context():
                app.extensions["serverside"].delete(sid)

    killer = threading.Thread(target=kill)
    killer.start()
    killer.join(0.5)  # done at once if it does not wait for the writer's lock
    release.set()
    writer.join(10)
    killer.join(15)
    assert not writer.is_alive() and not killer.is_alive()
    back = stored(app, sid)
    record(
        request,
        "security",
        f"{backend_name}: {action} during a {path} write; session afterwards {back}",
        checks=1,
    )
    assert back is None, f"the {action} was undone"
