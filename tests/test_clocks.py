"""The three clocks (idle, absolute, renewal), run once per backend."""

from __future__ import annotations

import threading
import time
import typing as t
from collections import Counter
from datetime import datetime
from datetime import timedelta
from datetime import timezone

import pytest
from flask import Flask
from flask import session
from flask.testing import FlaskClient
from werkzeug.http import parse_date

from flask_serverside import clocks
from flask_serverside import ids
from flask_serverside import record as records
from tests.test_contract import cookie_sid
from tests.test_contract import ONE_STEP_WRITES
from tests.test_contract import recorded  # noqa: F401 - a fixture
from tests.test_contract import session_cookie
from tests.test_contract import set_cookies
from tests.test_contract import start_session
from tests.test_contract import stored


def raw_record(app: Flask, sid: str) -> t.Any:
    """The record under ``sid``'s key, read past every check."""
    store = app.session_interface.store  # type: ignore[attr-defined]
    return app.backend.inner.load(store.key(sid))  # type: ignore[attr-defined]


def client_with(app: Flask, sid: str) -> FlaskClient:
    client = app.test_client()
    client.set_cookie("session", sid)
    return client


def add_clock_routes(app: Flask) -> None:
    @app.get("/created")
    def created() -> t.Any:
        value = session.created  # type: ignore[attr-defined]
        return "none" if value is None else value.isoformat()

    @app.get("/bind/<user>")
    def bind(user: str) -> str:
        session.bind_user(user)  # type: ignore[attr-defined]
        return "ok"


@pytest.fixture
def clock_app(make_app: t.Callable[..., Flask]) -> t.Callable[..., Flask]:
    def make(**config: t.Any) -> Flask:
        app = make_app(**config)
        add_clock_routes(app)
        return app

    return make


def test_seal_round_trip() -> None:
    old, new = ids.generate(32), ids.generate(48)
    sealed = clocks.seal(new, old)
    assert new not in sealed and old not in sealed
    assert clocks.unseal(sealed, old) == new
    assert clocks.unseal(sealed, ids.generate(32)) is None


class TestClocks:
    """``../shared/CONTRACT.md``, "Three clocks", on every backend."""

    def _calls(self, app: Flask) -> dict[str, Counter[str]]:
        client = app.test_client()
        start_session(client, a="1")
        backend = app.backend  # type: ignore[attr-defined]
        costs = {}
        for name, path in [("read", "/get/a"), ("write", "/set/b/2")]:
            backend.calls.clear()
            client.get(path)
            costs[name] = Counter(backend.calls)
        return costs

    def test_unset_clocks_cost_nothing(
        self, clock_app: t.Callable[..., Flask], backend_name: str
    ) -> None:
        app = clock_app()
        assert app.session_interface.store.clocks is None  # type: ignore[attr-defined]
        write = (
            Counter(load=1, replace=1)
            if backend_name in ONE_STEP_WRITES
            else Counter(load=2, replace=1, lock=1, save=1)
        )
        assert self._calls(app) == {"read": Counter(load=1), "write": write}
        # Set but not due, the clocks cost no store call either.
        timed = clock_app(SESSION_ABSOLUTE_LIFETIME=3600, SESSION_RENEWAL_INTERVAL=600)
        assert self._calls(timed) == {"read": Counter(load=1), "write": write}

    def test_created(self, clock_app: t.Callable[..., Flask]) -> None:
        client = clock_app().test_client()
        assert client.get("/created").text == "none"
        before = datetime.now(timezone.utc)
        start_session(client, a="1")
        created = datetime.fromisoformat(client.get("/created").text)
        assert created.tzinfo is not None and created.utcoffset() == timedelta(0)
        assert before - timedelta(seconds=1) <= created <= datetime.now(timezone.utc)

    def test_regenerate_keeps_created_and_rebinding_restarts_it(
        self, clock_app: t.Callable[..., Flask]
    ) -> None:
        client = clock_app().test_client()
        start_session(client, a="1")
        created = client.get("/created").text
        time.sleep(0.05)
        client.get("/regenerate")
        assert client.get("/created").text == created
        client.get("/bind/alice")
        bound = client.get("/created").text
        assert bound > created
        assert client.get("/get/a").json == "1"
        time.sleep(0.05)
        client.get("/bind/bob")
        assert client.get("/created").text > bound

    def test_absolute_lifetime_ends_an_active_session(
        self, clock_app: t.Callable[..., Flask]
    ) -> None:
        app = clock_app(
            SESSION_ABSOLUTE_LIFETIME=timedelta(seconds=1), SESSION_TOUCH_INTERVAL=0
        )
        client = app.test_client()
        response = client.get("/set/a/1")
        created_by = time.time()
        sid = cookie_sid(client)
        expires = parse_date(set_cookies(response)["session"].split("Expires=")[1].split(";")[0])
        assert expires is not None and expires.timestamp() <= created_by + 1
        results = []
        # Activity every half of the absolute lifetime never extends it.
        while time.time() < created_by + 1.6:
            started = time.time()
            results.append((started, client.get("/get/a").json))
            time.sleep(0.25)
        assert all(value is None for started, value in results if started >= created_by + 1)
        assert results[-1][1] is None
        assert raw_record(app, sid) is None
        assert stored(app, sid) is None

    def test_record_without_header_starts_its_clock_when_next_written(
        self, clock_app: t.Callable[..., Flask]
    ) -> None:
        app = clock_app(SESSION_ABSOLUTE_LIFETIME=60)
        client = app.test_client()
        sid = start_session(client, a="1")
        store = app.session_interface.store  # type: ignore[attr-defined]
        old_format = store.serializer.dumps({"a": "1"})
        store.backend.save(store.key(sid), old_format, time.time() + 60)
        assert client.get("/get/a").json == "1"
        client.get("/set/b/2")
        meta, _ = records.unpack(raw_record(app, sid).data)
        assert meta.created is not None and time.time() - 5 < meta.created <= time.time()
        assert client.get("/dump").json == {"a": "1", "b": "2"}

    def test_absolute_lifetime_caps_refreshed_cookie(
        self, clock_app: t.Callable[..., Flask]
    ) -> None:
        app = clock_app(SESSION_ABSOLUTE_LIFETIME=60)
        client = app.test_client()
        start_session(client, a="1")
        created = datetime.fromisoformat(client.get("/created").text)
        for path in ("/get/a", "/sid"):
            header = set_cookies(client.get(path)).get("session")
            if header is not None:
                expires = parse_date(header.split("Expires=")[1].split(";")[0])
                assert expires is not None
                assert expires <= created + timedelta(seconds=61)

    def test_renewal_moves_the_session_to_a_new_id(
        self, clock_app: t.Callable[..., Flask], recorded: list[t.Any]  # noqa: F811
    ) -> None:
        app = clock_app(SESSION_RENEWAL_INTERVAL=0.5, SESSION_RENEWAL_GRACE=1)
        client = app.test_client()
        old = start_session(client, a="1")
        created = client.get("/created").text
        assert session_cookie(client.get("/get/a")) == old
        time.sleep(0.6)
        response = client.get("/get/a")
        new = session_cookie(response)
        assert response.json == "1" and new and new != old
        assert ("regenerated", {"old_sid": old, "sid": new}) in recorded
        assert client.get("/created").text == created
        pointer = raw_record(app, old)
        assert pointer is not None and new.encode() not in pointer.data
        # Within the grace, the old ID loads the session and gets the new cookie.
        straggler = client_with(app, old)
        response = straggler.get("/set/b/2")
        assert session_cookie(response) == new
        assert stored(app, new) == {"a": "1", "b": "2"}
        assert sum(1 for event in recorded if event[0] == "regenerated") == 1
        time.sleep(1.1)
        assert client_with(app, old).get("/get/a").json is None
        assert stored(app, old) is None
        assert client.get("/dump").json == {"a": "1", "b": "2"}

    def test_renewal_keeps_the_binding_and_the_users_list(
        self, clock_app: t.Callable[..., Flask]
    ) -> None:
        app = clock_app(SESSION_RENEWAL_INTERVAL=0.3, SESSION_RENEWAL_GRACE=30)
        client = app.test_client()
        start_session(client, a="1")
        client.get("/bind/alice")
        with app.app_context():
            [before] = app.extensions["serverside"].sessions_of("alice")
        old = cookie_sid(client)
        time.sleep(0.4)
        assert client.get("/get/a").json == "1"
        new = cookie_sid(client)
        assert new != old
        with app.app_context():
            ext = app.extensions["serverside"]
            [after] = ext.sessions_of("alice")
            assert after.handle == before.handle and after.created == before.created
            assert ext.revoke(after.handle) is True
        assert client.get("/get/a").json is None
        assert client_with(app, old).get("/get/a").json is None

    def test_deleting_a_renewed_id_ends_the_session(
        self, clock_app: t.Callable[..., Flask]
    ) -> None:
        app = clock_app(SESSION_RENEWAL_INTERVAL=0.3, SESSION_RENEWAL_GRACE=30)
        client = app.test_client()
        old = start_session(client, a="1")
        time.sleep(0.4)
        client.get("/get/a")
        new = cookie_sid(client)
        assert new != old
        with app.app_context():
            assert app.extensions["serverside"].get(old) == {"a": "1"}
            assert app.extensions["serverside"].delete(old) is True
        assert stored(app, new) is None and stored(app, old) is None
        assert client.get("/get/a").json is None

    def test_renewal_race_keeps_every_update_and_one_id(
        self, clock_app: t.Callable[..., Flask], backend_name: str
    ) -> None:
        app = clock_app(SESSION_RENEWAL_INTERVAL=0.3, SESSION_RENEWAL_GRACE=1)
        barrier = threading.Barrier(8)

        @app.get("/tab/<key>")
        def tab(key: str) -> str:
            barrier.wait(timeout=10)
            session[key] = "v"
            return "ok"

        old = start_session(app.test_client(), a="0")
        time.sleep(0.4)
        responses: list[t.Any] = []
        threads = [
            threading.Thread(
                target=lambda i=i: responses.append(client_with(app, old).get(f"/tab/k{i}"))
            )
            for i in range(8)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert [r.status_code for r in responses] == [200] * 8
        cookies = {session_cookie(r) for r in responses}
        assert len(cookies) == 1
        new = cookies.pop()
        assert new and new != old
        assert stored(app, new) == {"a": "0", **{f"k{i}": "v" for i in range(8)}}
        time.sleep(1.1)
        assert stored(app, old) is None
        if backend_name != "memcached":
            with app.app_context():
                assert app.extensions["serverside"].count() == 1

    @pytest.mark.parametrize("clock", ["idle", "absolute"])
    @pytest.mark.parametrize("write", [True, False])
    def test_in_flight_request_does_not_revive(
        self, clock_app: t.Callable[..., Flask], clock: str, write: bool
    ) -> None:
        config: dict[str, t.Any] = {"SESSION_TOUCH_INTERVAL": 0}
        if clock == "idle":
            config["PERMANENT_SESSION_LIFETIME"] = timedelta(seconds=1)
        else:
            config["SESSION_ABSOLUTE_LIFETIME"] = 1
        app = clock_app(**config)
        loaded, release = threading.Event(), threading.Event()

        @app.get("/held")
        def held() -> str:
            session.get("a")
            loaded.set()
            release.wait(10)
            if write:
                session["late"] = "1"
            return "ok"

        sid = start_session(app.test_client(), a="1")
        responses: list[t.Any] = []
        thread = threading.Thread(
            target=lambda: responses.append(client_with(app, sid).get("/held"))
        )
        thread.start()
        assert loaded.wait(10)
        time.sleep(1.2)
        release.set()
        thread.join(10)
        assert session_cookie(responses[0]) in (None, "")
        record = raw_record(app, sid)
        assert record is None or record.expires <= time.time() or clock == "absolute"
        if record is not None:
            meta, _ = records.unpack(record.data)
            assert clock == "idle" or (meta.created or 0) + 1 <= time.time()
        assert stored(app, sid) is None


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("SESSION_ABSOLUTE_LIFETIME", 0),
        ("SESSION_ABSOLUTE_LIFETIME", "1 day"),
        ("SESSION_RENEWAL_INTERVAL", timedelta(seconds=-1)),
        ("SESSION_RENEWAL_INTERVAL", True),
        ("SESSION_RENEWAL_GRACE", -1),
        ("SESSION_RENEWAL_GRACE", None),
    ],
)
def test_bad_clock_config(tmp_path: t.Any, key: str, value: t.Any) -> None:
    from tests.conftest import build_app

    with pytest.raises(ValueError, match=key):
        build_app(tmp_path, {key: value}, count=False)
