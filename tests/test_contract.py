"""The contract every backend keeps, run once per backend."""

from __future__ import annotations

import datetime
import logging
import multiprocessing
import threading
import time
import typing as t
import uuid
from collections.abc import Iterator

import pytest
from flask import flash
from flask import Flask
from flask import get_flashed_messages
from flask import session
from flask.testing import FlaskClient
from markupsafe import Markup
from werkzeug.http import parse_cookie

from flask_serverside import ids
from flask_serverside import saving
from flask_serverside import SessionTooLarge
from flask_serverside import signals
from flask_serverside.session import ServerSideSession
from tests.conftest import build_app

MALFORMED_COOKIES = [
    "",
    "short",
    "../../../../etc/passwd",
    "..%2F..%2Fetc%2Fpasswd" + "A" * 30,
    "A" * 21,
    "A" * 87,
    "A" * 4000,
    "ÄÖÜ" * 20,
    "abc def ghi jkl mno pqr stu",
    "A" * 40 + "$",
    "A" * 43 + ".fake-signature",
]


#: The stores whose :meth:`.Backend.replace` writes: a plain rewrite of a
#: session there is one atomic step, without a lock.
ONE_STEP_WRITES = {
    "filesystem",
    "sqlite",
    "postgres",
    "redis",
    "memcached",
    # PostgreSQL by other ways (tests/test_deployments.py)
    "postgres-psycopg",
    "postgres-psycopg-prepared",
    "pgbouncer-psycopg2",
    "pgbouncer-psycopg",
    # Redis deployments (tests/test_redis_ha.py)
    "redis-cluster",
    "redis-sentinel",
}


def set_cookies(response: t.Any) -> dict[str, str]:
    """The ``Set-Cookie`` headers of a response, name to full header."""
    return {
        header.split("=", 1)[0]: header for header in response.headers.getlist("Set-Cookie")
    }


def session_cookie(response: t.Any) -> str | None:
    """The session cookie's new value; ``""`` when it is being deleted."""
    header = set_cookies(response).get("session")
    if header is None:
        return None
    value = parse_cookie(header.split(";", 1)[0])["session"]
    return "" if "Max-Age=0" in header else value


def cookie_sid(client: FlaskClient) -> str:
    cookie = client.get_cookie("session")
    assert cookie is not None
    return cookie.value


def stored(app: Flask, sid: str) -> dict[str, t.Any] | None:
    with app.app_context():
        return t.cast("dict[str, t.Any] | None", app.extensions["serverside"].get(sid))


def start_session(client: FlaskClient, **data: str) -> str:
    for key, value in data.items():
        client.get(f"/set/{key}/{value}")
    return cookie_sid(client)


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def recorded() -> Iterator[list[tuple[str, dict[str, t.Any]]]]:
    events: list[tuple[str, dict[str, t.Any]]] = []

    def receiver(name: str) -> t.Callable[..., None]:
        return lambda sender, **kw: events.append((name, kw))

    handlers = {
        signal: receiver(name)
        for name, signal in [
            ("created", signals.session_created),
            ("regenerated", signals.session_regenerated),
            ("destroyed", signals.session_destroyed),
        ]
    }
    for signal, handler in handlers.items():
        signal.connect(handler)
    yield events
    for signal, handler in handlers.items():
        signal.disconnect(handler)


class TestContract:
    """What ``../shared/CONTRACT.md`` promises, on every backend."""

    # What a request costs and sends

    def test_untouched_session_contacts_nothing(self, app: Flask, client: FlaskClient) -> None:
        response = client.get("/nothing")
        assert response.status_code == 200
        assert "Set-Cookie" not in response.headers
        assert "Cookie" not in response.vary
        assert app.backend.total == 0  # type: ignore[attr-defined]

    def test_untouched_request_with_cookie_contacts_nothing(
        self, app: Flask, client: FlaskClient
    ) -> None:
        start_session(client, a="1")
        app.backend.calls.clear()  # type: ignore[attr-defined]
        response = client.get("/nothing")
        assert "Set-Cookie" not in response.headers
        assert app.backend.total == 0  # type: ignore[attr-defined]

    def test_empty_session_that_stays_empty_stores_nothing(
        self, app: Flask, client: FlaskClient
    ) -> None:
        response = client.get("/get/a")
        assert response.json is None
        assert "Set-Cookie" not in response.headers
        assert response.vary == {"Cookie"} or "Cookie" in response.vary
        assert app.backend.calls["save"] == 0  # type: ignore[attr-defined]

    def test_set_then_get(self, app: Flask, client: FlaskClient) -> None:
        response = client.get("/set/a/1")
        sid = session_cookie(response)
        assert sid and ids.is_valid(sid)
        assert "Cookie" in response.vary
        assert client.get("/get/a").json == "1"
        assert stored(app, sid) == {"a": "1"}

    def test_unmodified_session_is_not_rewritten(self, app: Flask, client: FlaskClient) -> None:
        start_session(client, a="1")
        app.backend.calls.clear()  # type: ignore[attr-defined]
        assert client.get("/get/a").json == "1"
        calls = app.backend.calls  # type: ignore[attr-defined]
        assert calls["save"] == 0 and calls["touch"] == 0 and calls["lock"] == 0
        assert calls["load"] == 1

    def test_read_only_request_skips_the_general_save(
        self, app: Flask, client: FlaskClient, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A request that only read (a nested value too) keeps its record
        without building the :class:`Changes` a write needs; one that
        changed a nested value still goes through it."""
        start_session(client, a="1")
        client.get("/append/items/x")
        built: list[bool] = []
        real = ServerSideSession.changes

        def counting(session: ServerSideSession) -> t.Any:
            built.append(True)
            return real(session)

        monkeypatch.setattr(ServerSideSession, "changes", counting)
        response = client.get("/get/items")
        assert response.json == ["x"] and session_cookie(response) is not None
        assert built == []
        client.get("/append/items/y")
        assert built == [True]
        assert client.get("/dump").json == {"a": "1", "items": ["x", "y"]}

    def test_plain_write_is_one_step_where_the_store_can(
        self, app: Flask, client: FlaskClient, backend_name: str
    ) -> None:
        start_session(client, a="1")
        app.backend.calls.clear()  # type: ignore[attr-defined]
        client.get("/set/b/2")
        calls = app.backend.calls  # type: ignore[attr-defined]
        if backend_name in ONE_STEP_WRITES:
            assert (calls["load"], calls["replace"], calls["lock"], calls["save"]) == (1, 1, 0, 0)
        else:
            assert (calls["replace"], calls["lock"], calls["save"]) == (1, 1, 1)
        assert client.get("/dump").json == {"a": "1", "b": "2"}

    def test_unmodified_session_is_touched_after_interval(
        self, make_app: t.Callable[..., Flask]
    ) -> None:
        app = make_app(SESSION_TOUCH_INTERVAL=0)
        client = app.test_client()
        sid = start_session(client, a="1")
        with app.app_context():
            backend = app.backend  # type: ignore[attr-defined]
            key = app.session_interface.store.key(sid)  # type: ignore[attr-defined]
            before = backend.inner.load(key).expires
        time.sleep(0.05)
        backend.calls.clear()
        client.get("/get/a")
        assert backend.calls["touch"] == 1 and backend.calls["save"] == 0
        assert backend.inner.load(key).expires > before
        assert stored(app, sid) == {"a": "1"}

    def test_refresh_each_request_resends_cookie(self, make_app: t.Callable[..., Flask]) -> None:
        client = make_app().test_client()
        sid = start_session(client, a="1")
        assert session_cookie(client.get("/get/a")) == sid
        client = make_app(SESSION_REFRESH_EACH_REQUEST=False).test_client()
        start_session(client, a="1")
        assert session_cookie(client.get("/get/a")) is None

    def test_reading_only_sid_still_refreshes_cookie(
        self, make_app: t.Callable[..., Flask]
    ) -> None:
        client = make_app().test_client()
        sid = start_session(client, a="1")
        response = client.get("/sid")
        assert response.text == sid and session_cookie(response) == sid
        assert "Expires" in set_cookies(response)["session"]
        client = make_app(SESSION_REFRESH_EACH_REQUEST=False).test_client()
        start_session(client, a="1")
        assert session_cookie(client.get("/sid")) is None

    def test_reading_sid_does_not_load(self, app: Flask, client: FlaskClient) -> None:
        sid = start_session(client, a="1")
        app.backend.calls.clear()  # type: ignore[attr-defined]
        response = client.get("/sid")
        assert response.text == sid
        assert "Cookie" in response.vary
        assert app.backend.total == 0  # type: ignore[attr-defined]

    def test_sid_of_missing_record_is_replaced_on_load(self, app: Flask) -> None:
        stale = ids.generate(32)

        @app.get("/sid-then-load")
        def sid_then_load() -> str:
            before = session.sid  # type: ignore[attr-defined]
            session["x"] = "1"
            return f"{before} {session.sid}"  # type: ignore[attr-defined]

        client = app.test_client()
        client.set_cookie("session", stale)
        before, after = client.get("/sid-then-load").text.split()
        assert before == stale and after != stale
        assert cookie_sid(client) == after

    # The session object

    def test_nested_mutation_is_saved(self, app: Flask, client: FlaskClient) -> None:
        client.get("/append/cart/apple")
        client.get("/append/cart/pear")
        assert client.get("/get/cart").json == ["apple", "pear"]

    @pytest.mark.parametrize("serializer", ["json", "msgpack"])
    def test_types_round_trip(self, make_app: t.Callable[..., Flask], serializer: str) -> None:
        app = make_app(SESSION_SERIALIZER=serializer)
        value = {
            "bytes": b"\x00\xff",
            "when": datetime.datetime(2024, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc),
            "uuid": uuid.UUID(int=7),
            "list": [1, 2.5, None, True],
            "nested": {"a": {"b": ["c"]}},
            "tuple": (1, (2, "x")),
            "markup": Markup("<b>x</b>"),
            "text": "<b>x</b>",
        }

        @app.get("/types")
        def types() -> str:
            if "value" in session:
                got = session["value"]
                same = got == value and all(type(got[k]) is type(v) for k, v in value.items())
                return "same" if same else repr(got)
            session["value"] = value
            return "stored"

        client = app.test_client()
        assert client.get("/types").text == "stored"
        assert client.get("/types").text == "same"

    @pytest.mark.parametrize("serializer", ["json", "msgpack"])
    def test_flashed_markup(self, make_app: t.Callable[..., Flask], serializer: str) -> None:
        app = make_app(SESSION_SERIALIZER=serializer)

        @app.get("/flash")
        def flash_() -> str:
            flash(Markup("<b>x</b>"))
            return "flashed"

        @app.get("/show")
        def show() -> str:
            [message] = get_flashed_messages()
            return f"{type(message).__name__} {message}"

        client = app.test_client()
        assert client.get("/flash").text == "flashed"
        assert client.get("/show").text == "Markup <b>x</b>"

    def test_permanent_flag(self, make_app: t.Callable[..., Flask]) -> None:
        app = make_app(SESSION_PERMANENT=False)
        client = app.test_client()
        header = set_cookies(client.get("/set/a/1"))["session"]
        assert "Expires" not in header
        app = make_app()
        header = set_cookies(app.test_client().get("/set/a/1"))["session"]
        assert "Expires" in header

    def test_regenerate(self, app: Flask, client: FlaskClient, recorded: list[t.Any]) -> None:
        old = start_session(client, a="1")
        response = client.get("/regenerate")
        new = session_cookie(response)
        assert new and new != old
        assert stored(app, old) is None
        assert stored(app, new) == {"a": "1"}
        assert ("regenerated", {"old_sid": old, "sid": new}) in recorded

    def test_destroy(self, make_app: t.Callable[..., Flask], recorded: list[t.Any]) -> None:
        app = make_app(
            SESSION_COOKIE_SECURE=True,
            SESSION_COOKIE_SAMESITE="Lax",
            SESSION_COOKIE_PARTITIONED=True,
            SESSION_COOKIE_DOMAIN="example.test",
            SESSION_COOKIE_PATH="/app",
        )
        client = app.test_client()
        # The cookie's Domain keeps the test client from sending it back.
        sid = session_cookie(client.get("/set/a/1"))
        assert sid
        client.set_cookie("session", sid)
        response = client.get("/destroy")
        header = set_cookies(response)["session"]
        assert session_cookie(response) == ""
        expected = ("Secure", "SameSite=Lax", "Partitioned", "Domain=example.test", "Path=/app")
        assert all(attribute in header for attribute in expected)
        assert stored(app, sid) is None
        assert ("destroyed", {"sid": sid}) in recorded

    def test_destroying_an_unknown_id_sends_no_signal(
        self, app: Flask, client: FlaskClient, recorded: list[t.Any]
    ) -> None:
        made_up = ids.generate(32)
        client.set_cookie("session", made_up)
        response = client.get("/destroy")
        assert session_cookie(response) == ""
        assert recorded == []
        sid = start_session(client, a="1")
        client.get("/destroy")
        assert recorded[-1] == ("destroyed", {"sid": sid})

    def test_emptied_session_removes_record_and_cookie(
        self, app: Flask, client: FlaskClient
    ) -> None:
        sid = start_session(client, a="1")
        response = client.get("/delete/a")
        assert session_cookie(response) == ""
        assert stored(app, sid) is None

    def test_clear_then_set_replaces(self, app: Flask, client: FlaskClient) -> None:
        @app.get("/clear-set")
        def clear_set() -> str:
            session.clear()
            session["c"] = "3"
            return "ok"

        sid = start_session(client, a="1", b="2")
        client.get("/clear-set")
        assert stored(app, sid) == {"c": "3"}

    def test_created_signal(self, client: FlaskClient, recorded: list[t.Any]) -> None:
        sid = start_session(client, a="1")
        assert recorded == [("created", {"sid": sid})]

    def test_cookie_attributes(self, make_app: t.Callable[..., Flask]) -> None:
        app = make_app(
            SESSION_COOKIE_SECURE=True,
            SESSION_COOKIE_SAMESITE="Strict",
            SESSION_COOKIE_PARTITIONED=True,
            SESSION_COOKIE_NAME="sess",
        )
        header = set_cookies(app.test_client().get("/set/a/1"))["sess"]
        for attribute in ("Secure", "HttpOnly", "SameSite=Strict", "Partitioned", "Path=/"):
            assert attribute in header

    # Security

    @pytest.mark.parametrize("value", MALFORMED_COOKIES)
    def test_malformed_cookie_never_reaches_backend(self, app: Flask, value: str) -> None:
        client = app.test_client()
        client.set_cookie("session", value)
        response = client.get("/get/a")
        assert response.status_code == 200 and response.json is None
        assert app.backend.total == 0  # type: ignore[attr-defined]

    def test_unknown_id_is_not_adopted(self, app: Flask, client: FlaskClient) -> None:
        chosen = ids.generate(32)
        client.set_cookie("session", chosen)
        new = session_cookie(client.get("/set/a/1"))
        assert new and new != chosen
        assert stored(app, chosen) is None

    def test_expired_session_is_never_served(self, app: Flask, client: FlaskClient) -> None:
        sid = start_session(client, a="1")
        with app.app_context():
            store = app.session_interface.store  # type: ignore[attr-defined]
            store.backend.save(store.key(sid), store.serializer.dumps({"a": "1"}), time.time() - 1)
        assert client.get("/get/a").json is None
        assert stored(app, sid) is None
        assert session_cookie(client.get("/set/b/2")) != sid

    @pytest.mark.parametrize("write", [False, True], ids=["touch", "write"])
    def test_expired_record_is_not_brought_back(
        self, make_app: t.Callable[..., Flask], write: bool
    ) -> None:
        """A request that loaded the session just before it expired neither
        extends nor rewrites it afterwards."""
        app = make_app(PERMANENT_SESSION_LIFETIME=datetime.timedelta(seconds=0.5))
        loaded: list[float] = []

        @app.get("/outlive")
        def outlive() -> str:
            session.get("a")
            expires = session.stored.expires  # type: ignore[attr-defined]
            loaded.append(expires)
            while time.time() <= expires:  # hold the request until it expired
                time.sleep(0.02)
            if write:
                session["b"] = "2"
            return "ok"

        client = app.test_client()
        sid = start_session(client, a="1")
        response = client.get("/outlive")
        assert response.status_code == 200
        assert session_cookie(response) != sid
        with app.app_context():
            store = app.session_interface.store  # type: ignore[attr-defined]
            record = app.backend.inner.load(store.key(sid))  # type: ignore[attr-defined]
        assert record is None or record.expires <= loaded[0]
        assert stored(app, sid) is None

    def test_lifetime_applies_to_non_permanent_sessions(
        self, make_app: t.Callable[..., Flask]
    ) -> None:
        app = make_app(
            SESSION_PERMANENT=False,
            PERMANENT_SESSION_LIFETIME=datetime.timedelta(seconds=100),
        )
        client = app.test_client()
        sid = start_session(client, a="1")
        with app.app_context():
            store = app.session_interface.store  # type: ignore[attr-defined]
            record = store.backend.load(store.key(sid))
        assert 90 < record.expires - time.time() <= 100

    def test_raw_id_never_in_storage(self, app: Flask, client: FlaskClient) -> None:
        sid = start_session(client, a="1")
        keys = app.backend.keys  # type: ignore[attr-defined]
        assert keys and all(sid not in key for key in keys)
        with app.app_context():
            store = app.session_interface.store  # type: ignore[attr-defined]
            record = app.backend.inner.load(store.key(sid))  # type: ignore[attr-defined]
        assert sid.encode() not in record.data

    def test_signed_ids_and_key_rotation(self, make_app: t.Callable[..., Flask]) -> None:
        app = make_app(SESSION_SIGN_ID=True, SECRET_KEY="old")
        client = app.test_client()
        signed = session_cookie(client.get("/set/a/1"))
        assert signed and "." in signed
        sid = signed.split(".")[0]

        rotated = make_app(
            SESSION_BACKEND=app.backend.inner,  # type: ignore[attr-defined]
            SESSION_SIGN_ID=True,
            SECRET_KEY="new",
            SECRET_KEY_FALLBACKS=["old"],
        )
        rotated_client = rotated.test_client()
        rotated_client.set_cookie("session", signed)
        response = rotated_client.get("/get/a")
        assert response.json == "1"
        resigned = session_cookie(response)
        assert resigned and resigned != signed and resigned.startswith(sid + ".")
        forged = rotated.test_client()
        forged.set_cookie("session", sid)
        assert forged.get("/get/a").json is None
        assert rotated.backend.calls["load"] == 1  # type: ignore[attr-defined]

    def test_corrupt_record_is_a_missing_session(
        self, app: Flask, client: FlaskClient, caplog: pytest.LogCaptureFixture
    ) -> None:
        sid = start_session(client, a="1")
        with app.app_context():
            store = app.session_interface.store  # type: ignore[attr-defined]
            store.backend.save(store.key(sid), b"\x80\x04not json", time.time() + 60)
        with caplog.at_level(logging.WARNING, "flask_serverside"):
            response = client.get("/get/a")
        assert response.status_code == 200 and response.json is None
        assert any("fails to decode" in r.getMessage() for r in caplog.records)

    # Failures

    def test_too_large_session_keeps_old_record(self, make_app: t.Callable[..., Flask]) -> None:
        app = make_app(SESSION_MAX_BYTES=200)
        client = app.test_client()
        sid = start_session(client, a="1")
        with pytest.raises(SessionTooLarge, match="SESSION_MAX_BYTES=200"):
            client.get("/set/a/" + "x" * 300)
        assert stored(app, sid) == {"a": "1"}
        app.testing = False
        assert client.get("/set/b/" + "x" * 300).status_code == 500

    # Operations

    def test_operations(self, app: Flask, backend_name: str) -> None:
        first = start_session(app.test_client(), a="1")
        second = start_session(app.test_client(), b="2")
        ext = app.extensions["serverside"]
        with app.app_context():
            assert ext.get(first) == {"a": "1"}
            assert ext.get("not an id") is None
            assert ext.delete(first) is True
            assert ext.delete(first) is False
            assert ext.get(first) is None
            assert ext.cleanup() == 0
            if backend_name == "memcached":
                with pytest.raises(NotImplementedError, match="Memcached"):
                    ext.count()
                return
            assert ext.count() == 1
            assert ext.clear() == 1
            assert ext.get(second) is None and ext.count() == 0

    def test_cleanup_removes_expired(self, app: Flask, backend_name: str) -> None:
        live = start_session(app.test_client(), a="1")
        dead = start_session(app.test_client(), b="2")
        with app.app_context():
            store = app.session_interface.store  # type: ignore[attr-defined]
            store.backend.save(store.key(dead), store.serializer.dumps({"b": "2"}), time.time() - 1)
            removed = app.extensions["serverside"].cleanup()
            assert stored(app, live) is not None
        if app.backend.native_expiry:  # type: ignore[attr-defined]
            assert removed == 0
        else:
            assert removed == 1
            assert store.backend.load(store.key(dead)) is None


class TestConcurrency:
    """Overlapping requests on one session, really coinciding."""

    def _slow_view(self, app: Flask, barrier: threading.Barrier, gate: threading.Event) -> None:
        @app.get("/slow-set/<key>/<value>")
        def slow_set(key: str, value: str) -> str:
            session.get(key)
            barrier.wait(timeout=10)
            gate.wait(timeout=10)
            session[key] = value
            return "ok"

    def _client(self, app: Flask, sid: str) -> FlaskClient:
        client = app.test_client()
        client.set_cookie("session", sid)
        return client

    def test_different_keys_both_kept(self, app: Flask) -> None:
        barrier, gate = threading.Barrier(2), threading.Event()
        gate.set()
        self._slow_view(app, barrier, gate)
        sid = start_session(app.test_client(), a="0")
        results: list[int] = []
        threads = [
            threading.Thread(
                target=lambda k=k: results.append(
                    self._client(app, sid).get(f"/slow-set/{k}/v").status_code
                )
            )
            for k in ("x", "y")
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(20)
        assert results == [200, 200]
        assert stored(app, sid) == {"a": "0", "x": "v", "y": "v"}

    def test_same_key_later_save_wins(self, app: Flask) -> None:
        barrier, gate = threading.Barrier(2), threading.Event()
        gate.set()
        self._slow_view(app, barrier, gate)
        sid = start_session(app.test_client(), a="0")
        threads = [
            threading.Thread(target=self._client(app, sid).get, args=(f"/slow-set/a/{v}",))
            for v in ("1", "2")
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(20)
        assert stored(app, sid) in ({"a": "1"}, {"a": "2"})

    @pytest.mark.parametrize("action", ["destroy", "regenerate"])
    def test_slower_request_does_not_bring_back(self, app: Flask, action: str) -> None:
        barrier, gate = threading.Barrier(2), threading.Event()
        self._slow_view(app, barrier, gate)
        sid = start_session(app.test_client(), a="0")
        responses: list[t.Any] = []
        slow = threading.Thread(
            target=lambda: responses.append(self._client(app, sid).get("/slow-set/x/1"))
        )
        slow.start()
        barrier.wait(timeout=10)
        fast = self._client(app, sid).get(f"/{action}")
        gate.set()
        slow.join(20)
        assert stored(app, sid) is None
        assert session_cookie(responses[0]) is None
        if action == "regenerate":
            new = session_cookie(fast)
            assert new and stored(app, new) == {"a": "0"}

    @pytest.mark.parametrize("action", ["regenerate", "destroy"])
    def test_slow_reader_keeps_the_other_tabs_cookie(
        self, app: Flask, action: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A read-only request that loaded the session before another one
        regenerated or destroyed it sends no ``Set-Cookie`` once it has held
        its copy longer than the confirmation bound."""
        bound = 0.05
        monkeypatch.setattr(saving, "CONFIRM_AFTER", bound)
        barrier, gate = threading.Barrier(2), threading.Event()

        @app.get("/slow-get")
        def slow_get() -> str:
            value = session.get("a")
            barrier.wait(timeout=10)
            gate.wait(timeout=10)
            time.sleep(bound * 2)  # past the bound, however fast the rest ran
            return str(value)

        client = app.test_client()
        sid = start_session(client, a="0")
        responses: list[t.Any] = []
        slow = threading.Thread(target=lambda: responses.append(client.get("/slow-get")))
        slow.start()
        barrier.wait(timeout=10)
        fast = client.get(f"/{action}")
        gate.set()
        slow.join(20)
        assert responses[0].text == "0"
        assert "Set-Cookie" not in responses[0].headers
        assert stored(app, sid) is None
        if action == "regenerate":
            new = session_cookie(fast)
            assert new and new != sid and cookie_sid(client) == new
            assert stored(app, new) == {"a": "0"}
        else:
            assert client.get_cookie("session") is None

    def test_separate_processes_keep_both(
        self, backend_name: str, backend_config: dict[str, t.Any], tmp_path: t.Any
    ) -> None:
        if backend_name == "simple":
            pytest.skip("SimpleCache lives inside one process")
        app = build_app(tmp_path, backend_config, count=False)
        sid = start_session(app.test_client(), a="0")
        ctx = multiprocessing.get_context("fork")
        barrier = ctx.Barrier(2)
        procs = [
            ctx.Process(target=_increment, args=(tmp_path, backend_config, sid, key, barrier))
            for key in ("p", "q")
        ]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join(60)
        assert [proc.exitcode for proc in procs] == [0, 0]
        assert stored(app, sid) == {"a": "0", "p": 10, "q": 10}


def _increment(
    tmp_path: t.Any, config: dict[str, t.Any], sid: str, key: str, barrier: t.Any
) -> None:
    """In a child process: increment ``key`` ten times, each save coinciding
    with the other process's."""
    app = build_app(tmp_path, config, count=False)

    @app.get("/incr")
    def incr() -> str:
        value = session.get(key, 0)
        barrier.wait(timeout=20)
        session[key] = value + 1
        return "ok"

    client = app.test_client()
    client.set_cookie("session", sid)
    for _ in range(10):
        assert client.get("/incr").status_code == 200
