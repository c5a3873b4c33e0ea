"""A user's sessions: binding, listing, revoking, on every backend."""

from __future__ import annotations

import base64
import hashlib
import os
import threading
import time
import typing as t
from collections.abc import Iterator
from datetime import timezone

import pytest
from cachelib import SimpleCache
from flask import Flask
from flask import jsonify
from flask import session
from flask.testing import FlaskClient

from flask_serverside import SessionInfo
from flask_serverside import signals
from flask_serverside import users
from tests.conftest import build_app
from tests.conftest import store_config
from tests.test_contract import cookie_sid
from tests.test_contract import session_cookie
from tests.test_contract import stored


def add_user_routes(app: Flask) -> None:
    @app.get("/login/<user>")
    def login(user: str) -> str:
        session["user"] = user
        session.bind_user(user)  # type: ignore[attr-defined]
        return "ok"

    @app.get("/whoami")
    def whoami() -> t.Any:
        return jsonify(user=session.user_id, data=dict(session))  # type: ignore[attr-defined]

    @app.get("/mine")
    def mine() -> t.Any:
        ext = app.extensions["serverside"]
        infos = ext.sessions_of(session.user_id)  # type: ignore[attr-defined]
        return jsonify([[info.handle, info.current] for info in infos])

    @app.get("/logout-others")
    def logout_others() -> t.Any:
        ext = app.extensions["serverside"]
        user = session.user_id  # type: ignore[attr-defined]
        return jsonify(ext.revoke_user(user, except_current=True))


@pytest.fixture
def make_users_app(make_app: t.Callable[..., Flask]) -> t.Callable[..., Flask]:
    def make(**config: t.Any) -> Flask:
        app = make_app(**config)
        add_user_routes(app)
        return app

    return make


@pytest.fixture
def app(make_users_app: t.Callable[..., Flask]) -> Flask:
    return make_users_app()


@pytest.fixture
def revoked() -> Iterator[list[dict[str, t.Any]]]:
    events: list[dict[str, t.Any]] = []

    def receiver(sender: Flask, **kw: t.Any) -> None:
        events.append(kw)

    signals.session_revoked.connect(receiver)
    yield events
    signals.session_revoked.disconnect(receiver)


def login(app: Flask, user: str, agent: str = "test-agent") -> FlaskClient:
    client = app.test_client()
    client.environ_base["HTTP_USER_AGENT"] = agent
    client.get("/set/seed/1")
    client.get(f"/login/{user}")
    return client


def sessions_of(app: Flask, user: str) -> list[SessionInfo]:
    with app.app_context():
        return t.cast("list[SessionInfo]", app.extensions["serverside"].sessions_of(user))


def index_entries(app: Flask, user: str) -> dict[str, str]:
    store = app.session_interface.store  # type: ignore[attr-defined]
    index = users.Index(store.backend, users.index_key(store.prefix, user))
    return index.entries


def raw_index_records(app: Flask) -> int:
    """The index records the store still holds, expired or not, looked up
    by their keys as the store lists them."""
    store = app.session_interface.store  # type: ignore[attr-defined]
    keys = {users.index_key(store.prefix, user) for user in ("u", "v")}
    backend = store.backend.inner
    return sum(backend.load(key) is not None or _on_disk(app, key) for key in keys)


def _on_disk(app: Flask, key: str) -> bool:
    directory = app.config.get("SESSION_FILE_DIR")
    if app.config.get("SESSION_BACKEND") not in (None, "filesystem") or not directory:
        return False
    digest = key[-64:]
    return any(
        name.endswith(digest) for _, _, names in os.walk(directory) for name in names
    )


class TestUsers:
    """The contract section "A user's sessions", on every backend."""

    def test_bind_user_sets_user_id_and_regenerates(self, app: Flask) -> None:
        client = app.test_client()
        client.get("/set/a/1")
        before = cookie_sid(client)
        assert client.get("/whoami").json["user"] is None
        client.get("/login/7")
        after = cookie_sid(client)
        assert after != before and stored(app, before) is None
        assert client.get("/whoami").json == {"user": "7", "data": {"a": "1", "user": "7"}}

    def test_binding_the_same_user_again_keeps_the_id(self, app: Flask) -> None:
        client = login(app, "u")
        sid = cookie_sid(client)
        handle = sessions_of(app, "u")[0].handle
        client.get("/login/u")
        assert cookie_sid(client) == sid
        assert [info.handle for info in sessions_of(app, "u")] == [handle]

    def test_binding_another_user_moves_the_session(self, app: Flask) -> None:
        client = login(app, "u")
        sid = cookie_sid(client)
        client.get("/login/v")
        assert cookie_sid(client) != sid
        assert sessions_of(app, "u") == [] and len(sessions_of(app, "v")) == 1

    def test_int_user_id_is_stored_as_str(self, app: Flask) -> None:
        @app.get("/login-int")
        def login_int() -> str:
            session.bind_user(42)  # type: ignore[attr-defined]
            return str(session.user_id)  # type: ignore[attr-defined]

        client = app.test_client()
        assert client.get("/login-int").text == "42"
        assert client.get("/whoami").json["user"] == "42"
        assert len(sessions_of(app, "42")) == 1 and len(sessions_of(app, 42)) == 1  # type: ignore[arg-type]

    def test_bind_user_rejects_other_types(self, app: Flask) -> None:
        @app.get("/login-bad")
        def login_bad() -> str:
            session.bind_user(None)  # type: ignore[attr-defined]
            return "ok"

        app.config["PROPAGATE_EXCEPTIONS"] = True
        with pytest.raises(TypeError, match="bind_user"):
            app.test_client().get("/login-bad")

    def test_handle_is_opaque_and_stable(self, app: Flask) -> None:
        client = login(app, "u")
        sid = cookie_sid(client)
        store = app.session_interface.store  # type: ignore[attr-defined]
        key = store.key(sid)
        handle = sessions_of(app, "u")[0].handle
        forms = {sid, key, key[len(store.prefix) :]}
        for value in list(forms):
            digest = hashlib.sha256(value.encode()).digest()
            forms |= {digest.hex(), base64.urlsafe_b64encode(digest).rstrip(b"=").decode()}
        for form in forms:
            assert form not in handle and handle not in form
        assert sid[:16] not in handle and key[-16:] not in handle
        client.get("/regenerate")
        assert cookie_sid(client) != sid
        assert [info.handle for info in sessions_of(app, "u")] == [handle]
        assert index_entries(app, "u") == {handle: store.key(cookie_sid(client))}

    def test_session_info_fields_and_order(self, make_users_app: t.Callable[..., Flask]) -> None:
        app = make_users_app(SESSION_TOUCH_INTERVAL=0)
        first = login(app, "u", agent="Browser A")
        time.sleep(0.01)
        second = login(app, "u", agent="Browser B" + "x" * 400)
        infos = sessions_of(app, "u")
        assert [info.user_agent[:9] for info in infos if info.user_agent] == [
            "Browser B",
            "Browser A",
        ]
        newest = infos[0]
        assert len(newest.user_agent or "") == 256
        for info in infos:
            assert info.ip == "127.0.0.1" and info.current is False
            assert info.created.tzinfo is timezone.utc
            assert info.created <= info.last_seen < info.expires
            assert info.expires - info.last_seen == app.permanent_session_lifetime
        time.sleep(0.01)
        first.get("/whoami")
        assert [info.user_agent for info in sessions_of(app, "u")][0] == "Browser A"
        assert second.get("/whoami").json["user"] == "u"

    def test_track_device_off_stores_no_device(
        self, make_users_app: t.Callable[..., Flask]
    ) -> None:
        app = make_users_app(SESSION_TRACK_DEVICE=False)
        login(app, "u", agent="Browser A")
        [info] = sessions_of(app, "u")
        assert info.ip is None and info.user_agent is None

    def test_current_flag(self, app: Flask) -> None:
        first = login(app, "u")
        second = login(app, "u")
        mine = first.get("/mine").json
        assert len(mine) == 2 and sum(current for _, current in mine) == 1
        theirs = second.get("/mine").json
        current_first = next(h for h, current in mine if current)
        current_second = next(h for h, current in theirs if current)
        assert current_first != current_second

    def test_revoke_one(self, app: Flask, revoked: list[dict[str, t.Any]]) -> None:
        first = login(app, "u")
        second = login(app, "u")
        handle = next(h for h, current in second.get("/mine").json if current)
        ext = app.extensions["serverside"]
        with app.app_context():
            assert ext.revoke(handle) is True
            assert ext.revoke(handle) is False
            assert ext.revoke("not-a-handle") is False
            assert ext.revoke(users.new_handle("u")) is False
        assert revoked == [{"handle": handle, "user_id": "u"}]
        response = second.get("/whoami")
        assert response.json == {"user": None, "data": {}}
        assert session_cookie(response) == ""
        assert first.get("/whoami").json["user"] == "u"
        assert [info.handle for info in sessions_of(app, "u")] != [handle]
        assert len(sessions_of(app, "u")) == 1

    def test_revoke_user(self, app: Flask, revoked: list[dict[str, t.Any]]) -> None:
        clients = [login(app, "u") for _ in range(3)]
        other = login(app, "v")
        with app.app_context():
            assert app.extensions["serverside"].revoke_user("u") == 3
            assert app.extensions["serverside"].revoke_user("u") == 0
        assert len(revoked) == 3 and {e["user_id"] for e in revoked} == {"u"}
        for client in clients:
            response = client.get("/whoami")
            assert response.json["data"] == {} and session_cookie(response) == ""
        assert other.get("/whoami").json["user"] == "v"
        assert sessions_of(app, "u") == []

    def test_revoke_user_except_current(self, app: Flask) -> None:
        clients = [login(app, "u") for _ in range(3)]
        assert clients[0].get("/logout-others").json == 2
        assert clients[0].get("/whoami").json["user"] == "u"
        for client in clients[1:]:
            assert client.get("/whoami").json["user"] is None
        assert [info.current for info in sessions_of(app, "u")] == [False]

    def test_request_in_flight_saves_nothing(self, app: Flask) -> None:
        loaded, release = threading.Event(), threading.Event()

        @app.get("/slow")
        def slow() -> str:
            session.get("user")
            loaded.set()
            release.wait(10)
            session["late"] = "write"
            return "ok"

        client = login(app, "u")
        sid = cookie_sid(client)
        replies: list[t.Any] = []
        thread = threading.Thread(target=lambda: replies.append(client.get("/slow")))
        thread.start()
        assert loaded.wait(10)
        with app.app_context():
            assert app.extensions["serverside"].revoke_user("u") == 1
        release.set()
        thread.join(10)
        assert replies[0].status_code == 200 and session_cookie(replies[0]) is None
        assert stored(app, sid) is None and sessions_of(app, "u") == []
        assert client.get("/whoami").json["data"] == {}

    def test_max_per_user_ends_least_recently_seen(
        self, make_users_app: t.Callable[..., Flask], revoked: list[dict[str, t.Any]]
    ) -> None:
        app = make_users_app(SESSION_MAX_PER_USER=2, SESSION_TOUCH_INTERVAL=0)
        first = login(app, "u")
        time.sleep(0.01)
        second = login(app, "u")
        second_handle = sessions_of(app, "u")[0].handle
        time.sleep(0.01)
        first.get("/whoami")  # now the second is the least recently seen
        third = login(app, "u")
        assert revoked == [{"handle": second_handle, "user_id": "u"}]
        assert second.get("/whoami").json["user"] is None
        assert first.get("/whoami").json["user"] == "u"
        assert third.get("/whoami").json["user"] == "u"
        assert len(sessions_of(app, "u")) == 2

    def test_unbound_requests_pay_nothing_new(self, app: Flask) -> None:
        client = app.test_client()
        client.get("/set/a/1")
        app.backend.calls.clear()  # type: ignore[attr-defined]
        app.backend.keys.clear()  # type: ignore[attr-defined]
        client.get("/get/a")
        assert dict(app.backend.calls) == {"load": 1}  # type: ignore[attr-defined]
        client.get("/set/a/2")
        client.get("/regenerate")
        client.get("/destroy")
        keys = app.backend.keys  # type: ignore[attr-defined]
        assert keys and not any(":user:" in key or "user:" in key for key in keys)

    def test_bound_read_costs_one_load(self, app: Flask, backend_name: str) -> None:
        client = login(app, "u")
        app.backend.calls.clear()  # type: ignore[attr-defined]
        client.get("/whoami")
        # Memcached checks the user's index too: it may evict records.
        expected = 2 if backend_name == "memcached" else 1
        assert dict(app.backend.calls) == {"load": expected}  # type: ignore[attr-defined]

    def test_index_lives_as_long_as_its_sessions(self, app: Flask) -> None:
        client = login(app, "u")
        store = app.session_interface.store  # type: ignore[attr-defined]
        index_key = users.index_key(store.prefix, "u")
        for value in range(3):
            time.sleep(0.01)
            client.get(f"/set/a/{value}")
            client.get("/whoami")
            member = store.backend.load(store.key(cookie_sid(client)))
            assert store.backend.load(index_key).expires >= member.expires

    def test_expired_entries_are_cleaned(self, app: Flask) -> None:
        first = login(app, "u")
        login(app, "u")
        store = app.session_interface.store  # type: ignore[attr-defined]
        key = store.key(cookie_sid(first))
        record = store.backend.load(key)
        store.backend.save(key, record.data, time.time() - 1)
        with app.app_context():
            app.extensions["serverside"].cleanup()
        assert len(index_entries(app, "u")) == 2
        assert len(sessions_of(app, "u")) == 1
        assert key not in index_entries(app, "u").values()
        assert len(index_entries(app, "u")) == 1

    def test_logout_of_the_last_session_removes_the_index(self, app: Flask) -> None:
        first, second = login(app, "u"), login(app, "u")
        first.get("/destroy")
        assert len(index_entries(app, "u")) == 1
        second.get("/destroy")
        store = app.session_interface.store  # type: ignore[attr-defined]
        assert store.backend.load(users.index_key(store.prefix, "u")) is None

    def test_expired_indexes_are_cleaned_up(self, app: Flask, backend_name: str) -> None:
        if app.session_interface.store.backend.native_expiry:  # type: ignore[attr-defined]
            pytest.skip("the store expires records itself")
        client = login(app, "u")
        store = app.session_interface.store  # type: ignore[attr-defined]
        index = users.index_key(store.prefix, "u")
        for key in (index, store.key(cookie_sid(client))):
            record = store.backend.inner.load(key)
            store.backend.inner.save(key, record.data, time.time() - 1)
        with app.app_context():
            assert app.extensions["serverside"].cleanup() == 1  # sessions only
        assert store.backend.inner.load(index) is None
        assert raw_index_records(app) == 0

    def test_clear_removes_the_indexes(self, app: Flask, backend_name: str) -> None:
        if backend_name == "memcached":
            pytest.skip("Memcached cannot list its keys")
        login(app, "u"), login(app, "v")
        with app.app_context():
            assert app.extensions["serverside"].clear() == 2
        assert raw_index_records(app) == 0
        assert not index_entries(app, "u") and not index_entries(app, "v")

    def test_revoke_cost_follows_the_users_sessions(self, app: Flask) -> None:
        for n in range(30):
            login(app, f"other{n}")
        for _ in range(2):
            login(app, "u")
        app.backend.calls.clear()  # type: ignore[attr-defined]
        app.backend.keys.clear()  # type: ignore[attr-defined]
        with app.app_context():
            assert app.extensions["serverside"].revoke_user("u") == 2
        # The index: lock, load, rewrite; each session: lock, load, delete.
        assert app.backend.total <= 3 + 3 * 2  # type: ignore[attr-defined]
        assert "cleanup" not in app.backend.calls  # type: ignore[attr-defined]
        prefix = app.config["SESSION_KEY_PREFIX"]
        other_keys = {users.index_key(prefix, f"other{n}") for n in range(30)}
        assert not other_keys & set(app.backend.keys)  # type: ignore[attr-defined]

    def test_flask_login_binds(self, app: Flask) -> None:
        flask_login = pytest.importorskip("flask_login")

        class User(flask_login.UserMixin):  # type: ignore[name-defined, misc]
            id = "alice"

        manager = flask_login.LoginManager(app)
        manager.user_loader(lambda user_id: User() if user_id == "alice" else None)

        @app.get("/flask-login")
        def flask_login_view() -> str:
            flask_login.login_user(User())
            return "ok"

        client = app.test_client()
        client.get("/set/a/1")
        before = cookie_sid(client)
        client.get("/flask-login")
        assert cookie_sid(client) != before
        assert client.get("/whoami").json["user"] == "alice"
        assert len(sessions_of(app, "alice")) == 1

    def test_cli(self, app: Flask) -> None:
        first = login(app, "u", agent="Browser A")
        login(app, "u", agent="Browser B")
        runner = app.test_cli_runner()
        listed = runner.invoke(args=["sessions", "list", "--user", "u"])
        assert listed.exit_code == 0
        lines = listed.output.splitlines()
        assert lines[0].split()[:2] == ["HANDLE", "CREATED"]
        assert "Browser B" in lines[1] and "Browser A" in lines[2] and "127.0.0.1" in lines[1]
        handle = lines[1].split()[0]
        result = runner.invoke(args=["sessions", "revoke", handle])
        assert result.exit_code == 0 and "Revoked 1 session" in result.output
        result = runner.invoke(args=["sessions", "revoke", handle])
        assert result.exit_code == 1 and "No such session" in result.output
        result = runner.invoke(args=["sessions", "revoke", "--user", "u"])
        assert result.exit_code == 0 and "Revoked 1 sessions" in result.output
        assert first.get("/whoami").json["user"] is None
        listed = runner.invoke(args=["sessions", "list", "--user", "u"])
        assert listed.exit_code == 0 and "No sessions" in listed.output

    @pytest.mark.parametrize(
        "args",
        [["revoke"], ["revoke", "x" * 65, "--user", "u"], ["revoke", "bad handle"]],
    )
    def test_cli_bad_input(self, app: Flask, args: list[str]) -> None:
        result = app.test_cli_runner().invoke(args=["sessions", *args])
        assert result.exit_code != 0
        assert "Traceback" not in result.output
        assert len([line for line in result.output.splitlines() if "Error" in line]) == 1


@pytest.mark.parametrize("name", ["memcached", "simple-threshold"])
def test_evicted_index_ends_the_users_sessions(
    tmp_path: t.Any, request: pytest.FixtureRequest, name: str
) -> None:
    """Where a store may evict the index (Memcached), losing it must not let
    a revoked session live on: a bound session loads only while listed."""
    if name == "memcached":
        config = store_config(request, "memcached")
    else:
        config = {"SESSION_BACKEND": "cachelib", "SESSION_CACHELIB": SimpleCache(threshold=1000)}
    app = build_app(tmp_path, config, count=False)
    add_user_routes(app)
    client = login(app, "u")
    unbound = app.test_client()
    unbound.get("/set/a/1")
    store = app.session_interface.store  # type: ignore[attr-defined]
    assert store.check_index
    store.backend.delete(users.index_key(store.prefix, "u"))
    assert client.get("/whoami").json == {"user": None, "data": {}}
    assert unbound.get("/get/a").json == "1"


@pytest.mark.parametrize(
    ("key", "value"),
    [("SESSION_TRACK_DEVICE", "yes"), ("SESSION_MAX_PER_USER", 0), ("SESSION_MAX_PER_USER", "3")],
)
def test_bad_config(tmp_path: t.Any, key: str, value: t.Any) -> None:
    with pytest.raises(ValueError, match=key):
        build_app(tmp_path, {key: value}, count=False)


def test_a_handle_is_never_taken_for_a_command_line_option() -> None:
    # One random handle in 64 started with "-", which made
    # ``flask sessions revoke HANDLE`` fail as an unknown option.
    handles = [users.new_handle("u") for _ in range(2000)]
    assert not [h for h in handles if h.startswith("-")]
    assert all(users.handle_index_key("p:", h) is not None for h in handles)
