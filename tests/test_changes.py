"""Finding a request's changes without re-encoding the session (issue 16).

Only values the request handed out can change in place, so only those are
compared at save time; a read-only request encodes nothing, whatever the
session's size. These tests run on every store.
"""

from __future__ import annotations

import datetime
import threading
import typing as t
import uuid

import pytest
from flask import Flask
from flask import g
from flask import session
from markupsafe import Markup
from werkzeug.http import dump_cookie
from werkzeug.http import http_date
from werkzeug.http import parse_date
from werkzeug.wrappers import Request

from flask_serverside.changes import copy_value
from flask_serverside.changes import same
from flask_serverside.interface import _request_cookie
from flask_serverside.interface import ServerSideSessionInterface
from flask_serverside.serializers import JSONSerializer
from tests.conftest import build_app
from tests.test_contract import start_session
from tests.test_contract import stored


class CountingSerializer:
    """Flask's tagged JSON, counting the calls of each method."""

    def __init__(self) -> None:
        self.inner = JSONSerializer()
        self.dumps_calls = 0
        self.loads_calls = 0

    def dumps(self, data: dict[str, t.Any]) -> bytes:
        self.dumps_calls += 1
        return self.inner.dumps(data)

    def loads(self, data: bytes) -> dict[str, t.Any]:
        self.loads_calls += 1
        return self.inner.loads(data)


NOTES = [f"note {i:04d} " + "x" * 60 for i in range(1000)]


def add_views(app: Flask) -> None:
    """Views that change nested values in each way a value can be reached."""

    @app.get("/fill")
    def fill() -> str:
        session.update(
            user="ada",
            user_id=42,
            cart=["tea"],
            prefs={"theme": "light", "tags": ["a"]},
            nums=[1, 2],
            names=["ada"],
            notes=NOTES,
        )
        return "ok"

    @app.get("/read-scalar")
    def read_scalar() -> str:
        return str(session["user_id"])

    @app.get("/read-everything")
    def read_everything() -> str:
        parts = [session["cart"], session.get("prefs"), session.setdefault("nums", [])]
        parts.extend(session.values())
        parts.extend(value for _, value in session.items())
        parts.extend(session[key] for key in session)
        return str(len(parts) + len(dict(session)))

    @app.get("/via-get")
    def via_get() -> str:
        session.get("cart").append("get")
        return "ok"

    @app.get("/via-values")
    def via_values() -> str:
        for value in session.values():
            if isinstance(value, dict):
                value["theme"] = "dark"
        return "ok"

    @app.get("/via-items")
    def via_items() -> str:
        for key, value in session.items():
            if key == "cart":
                value.append("items")
        return "ok"

    @app.get("/via-iteration")
    def via_iteration() -> str:
        for key in session:
            if key == "cart":
                session[key].append("iteration")
        return "ok"

    @app.get("/via-setdefault")
    def via_setdefault() -> str:
        session.setdefault("prefs", {})["tags"].append("setdefault")
        return "ok"

    @app.get("/deep")
    def deep() -> str:
        session["prefs"]["tags"].append("deep")
        return "ok"

    @app.get("/later")
    def later() -> str:
        g.cart = session["cart"]
        session.get("user")
        return "ok"

    @app.after_request
    def mutate_later(response: t.Any) -> t.Any:
        if "cart" in g:
            g.cart.append("later")
        return response

    @app.get("/retype")
    def retype() -> str:
        session["nums"][0] = True
        session["names"][0] = Markup("ada")
        return "ok"

    @app.get("/via-data")
    def via_data() -> str:
        session.data["cart"].append("data")  # type: ignore[attr-defined]
        return "ok"

    @app.get("/pop-nested")
    def pop_nested() -> str:
        del session.get("prefs")["theme"]
        return "ok"


@pytest.fixture
def counting() -> CountingSerializer:
    return CountingSerializer()


@pytest.fixture
def app(make_app: t.Callable[..., Flask], counting: CountingSerializer) -> Flask:
    app = make_app(SESSION_SERIALIZER=counting)
    add_views(app)
    return app


class TestReadOnlyRequestsEncodeNothing:
    def test_reading_a_scalar_from_a_64_kb_session(
        self, app: Flask, counting: CountingSerializer
    ) -> None:
        client = app.test_client()
        client.get("/fill")
        assert len(counting.inner.dumps(stored(app, start_session(client)) or {})) > 64_000
        counting.dumps_calls = 0
        assert client.get("/read-scalar").text == "42"
        assert counting.dumps_calls == 0

    def test_reading_every_value_without_changing_one(
        self, app: Flask, counting: CountingSerializer
    ) -> None:
        client = app.test_client()
        client.get("/fill")
        before = app.backend.total  # type: ignore[attr-defined]
        counting.dumps_calls = 0
        assert client.get("/read-everything").status_code == 200
        assert counting.dumps_calls == 0
        assert app.backend.total - before == 1  # type: ignore[attr-defined]


class TestNestedChangesAreSaved:
    @pytest.mark.parametrize(
        ("view", "key", "expected"),
        [
            ("/via-get", "cart", ["tea", "get"]),
            ("/via-values", "prefs", {"theme": "dark", "tags": ["a"]}),
            ("/via-items", "cart", ["tea", "items"]),
            ("/via-iteration", "cart", ["tea", "iteration"]),
            ("/via-setdefault", "prefs", {"theme": "light", "tags": ["a", "setdefault"]}),
            ("/deep", "prefs", {"theme": "light", "tags": ["a", "deep"]}),
            ("/later", "cart", ["tea", "later"]),
            ("/via-data", "cart", ["tea", "data"]),
            ("/pop-nested", "prefs", {"tags": ["a"]}),
        ],
    )
    def test_mutation_is_saved(self, app: Flask, view: str, key: str, expected: t.Any) -> None:
        client = app.test_client()
        client.get("/fill")
        client.get(view)
        data = stored(app, start_session(client))
        assert data is not None
        assert data[key] == expected

    def test_a_change_of_type_alone_is_saved(self, app: Flask) -> None:
        client = app.test_client()
        client.get("/fill")
        client.get("/retype")
        data = stored(app, start_session(client))
        assert data is not None
        assert data["nums"] == [True, 2] and data["nums"][0] is True
        assert type(data["names"][0]) is Markup

    def test_merged_with_a_concurrent_write(self, app: Flask) -> None:
        """The nested change of one request and another's write to another
        key are both kept: the merge finds the nested change too."""
        barrier = threading.Barrier(2)

        @app.get("/slow-nested")
        def slow_nested() -> str:
            cart = session.get("cart")
            barrier.wait(timeout=10)
            barrier.wait(timeout=10)
            cart.append("slow")
            return "ok"

        client = app.test_client()
        client.get("/fill")
        sid = start_session(client)
        slow = threading.Thread(target=client.get, args=("/slow-nested",))
        slow.start()
        barrier.wait(timeout=10)
        other = app.test_client()
        other.set_cookie("session", sid)
        other.get("/set/other/1")
        barrier.wait(timeout=10)
        slow.join(20)
        data = stored(app, sid)
        assert data is not None
        assert data["cart"] == ["tea", "slow"]
        assert data["other"] == "1"


class TestRefreshedCookie:
    """The refreshed cookie of a read is built from a cached header; it must
    be the header werkzeug builds, for the current settings and time."""

    @pytest.mark.parametrize("sign", [False, True])
    def test_same_header_as_werkzeug(self, tmp_path: t.Any, sign: bool) -> None:
        app = build_app(tmp_path, {"SESSION_SIGN_ID": sign})
        client = app.test_client()
        client.get("/set/a/1")
        value = cookie(client)
        fresh = app.test_client(use_cookies=False)
        settings = [
            {},
            {"SESSION_COOKIE_SECURE": True, "SESSION_COOKIE_SAMESITE": "Strict"},
            {"SESSION_COOKIE_DOMAIN": "example.org", "SESSION_COOKIE_PATH": "/app"},
            {"SESSION_COOKIE_HTTPONLY": False, "SESSION_COOKIE_PARTITIONED": True},
            {"SESSION_COOKIE_NAME": "other"},
            {"APPLICATION_ROOT": "/root"},
            {"PERMANENT_SESSION_LIFETIME": 60},
            {},
        ]
        for config in settings:
            app.config.update(config)
            name = app.config["SESSION_COOKIE_NAME"]
            response = fresh.get("/get/a", headers={"Cookie": f"{name}={value}"})
            assert response.json == "1"
            header = response.headers["Set-Cookie"]
            with app.test_request_context():
                interface = app.session_interface
                expected = dump_cookie(
                    name,
                    value,
                    expires=http_date(parse_date(header.split("Expires=")[1].split(";")[0])),
                    domain=interface.get_cookie_domain(app),
                    path=interface.get_cookie_path(app),
                    secure=interface.get_cookie_secure(app),
                    httponly=interface.get_cookie_httponly(app),
                    samesite=interface.get_cookie_samesite(app),
                    partitioned=interface.get_cookie_partitioned(app),
                )
            assert header == expected
            app.config.update(_defaults_of(config))

    @pytest.mark.parametrize("hook", ["get_cookie_domain", "get_expiration_time"])
    def test_a_subclass_hook_makes_the_cookie(self, tmp_path: t.Any, hook: str) -> None:
        app = build_app(tmp_path, {})
        base = app.session_interface
        assert isinstance(base, ServerSideSessionInterface)
        later = datetime.datetime(2100, 1, 1, tzinfo=datetime.timezone.utc)

        class Custom(ServerSideSessionInterface):
            def get_cookie_domain(self, app: Flask) -> str | None:
                return "custom.example" if hook == "get_cookie_domain" else None

            def get_expiration_time(self, app: Flask, session: t.Any) -> t.Any:
                if hook == "get_expiration_time":
                    return later
                return super().get_expiration_time(app, session)

        app.session_interface = Custom(
            base.store, permanent=True, sign_id=False, cleanup_interval=None
        )
        client = app.test_client(use_cookies=False)
        written = client.get("/set/a/1").headers["Set-Cookie"]
        sent = {"Cookie": written.split(";")[0]}
        read = client.get("/get/a", headers=sent)
        assert read.json == "1"
        for header in (written, read.headers["Set-Cookie"]):
            if hook == "get_cookie_domain":
                assert "Domain=custom.example" in header
            else:
                assert f"Expires={http_date(later)}" in header

    def test_a_hook_set_on_the_instance_makes_the_cookie(self, tmp_path: t.Any) -> None:
        app = build_app(tmp_path, {})
        client = app.test_client(use_cookies=False)
        written = client.get("/set/a/1").headers["Set-Cookie"]
        interface = app.session_interface
        interface.get_cookie_domain = lambda app: "patched.example"  # type: ignore[method-assign]
        read = client.get("/get/a", headers={"Cookie": written.split(";")[0]})
        assert read.json == "1"
        assert "Domain=patched.example" in read.headers["Set-Cookie"]

    def test_expiry_follows_the_clock(self, tmp_path: t.Any) -> None:
        app = build_app(tmp_path, {"PERMANENT_SESSION_LIFETIME": 3600})
        client = app.test_client()
        client.get("/set/a/1")
        first = expiry(client.get("/get/a"))
        app.config["PERMANENT_SESSION_LIFETIME"] = datetime.timedelta(seconds=7200)
        second = expiry(client.get("/get/a"))
        assert second - first >= datetime.timedelta(seconds=3600)


def cookie(client: t.Any) -> str:
    found = client.get_cookie("session")
    assert found is not None
    return t.cast(str, found.value)


def expiry(response: t.Any) -> datetime.datetime:
    header = response.headers["Set-Cookie"]
    found = parse_date(header.split("Expires=")[1].split(";")[0])
    assert found is not None
    return found


def _defaults_of(config: dict[str, t.Any]) -> dict[str, t.Any]:
    """Flask's defaults for the keys of ``config``."""
    return {key: Flask.default_config[key] for key in config}


class TestVary:
    def test_vary_cookie_added_to_the_views_own(self, tmp_path: t.Any) -> None:
        app = build_app(tmp_path, {})

        @app.get("/negotiated")
        def negotiated() -> t.Any:
            session.get("a")
            return "ok", {"Vary": "Accept-Encoding"}

        client = app.test_client()
        assert client.get("/get/a").headers["Vary"] == "Cookie"
        assert client.get("/negotiated").headers["Vary"] == "Accept-Encoding, Cookie"
        assert "Vary" not in client.get("/nothing").headers


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "session=abc",
        "a=1; session=abc",
        "a=b;session=abc;c=d",
        "session=abc; session=def",
        'a="x;session=evil"; session=good',
        "session =abc",
        "session= abc",
        "xsession=1; session=abc",
        "sessionx=1",
        "session",
        "session=",
        'session="abc"',
        "session=a b",
        "session=abc.def-_",
        "\tsession=abc\t; other=session",
    ],
)
def test_session_cookie_read_as_werkzeug_reads_it(header: str | None) -> None:
    environ = {} if header is None else {"HTTP_COOKIE": header}
    request = Request(environ)
    expected = Request(environ).cookies.get("session")
    assert _request_cookie(request, "session") == expected


class Cart(list):  # type: ignore[type-arg]
    """A type only a custom serializer knows."""


class CartSerializer(CountingSerializer):
    def loads(self, data: bytes) -> dict[str, t.Any]:
        value = super().loads(data)
        if isinstance(value.get("cart"), list):
            value["cart"] = Cart(value["cart"])
        return value


def test_nested_change_in_a_custom_type_is_saved(make_app: t.Callable[..., Flask]) -> None:
    """A value of a type the session cannot copy is compared by its
    serialized form."""
    serializer = CartSerializer()
    app = make_app(SESSION_SERIALIZER=serializer)
    add_views(app)
    client = app.test_client()
    client.get("/fill")
    client.get("/read-everything")
    client.get("/via-get")
    data = stored(app, start_session(client))
    assert data is not None
    assert type(data["cart"]) is Cart
    assert data["cart"] == ["tea", "get"]


_NAN = float("nan")
_WHEN = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ([1, 2], [1, 2], True),
        ([1, 2], [1, 3], False),
        ([1], [1, 1], False),
        ([1], [True], False),
        ([True], [1], False),
        ([1.0], [1], False),
        ([0.0], [-0.0], False),
        ([_NAN], [float("nan")], True),
        (["a"], [Markup("a")], False),
        ([Markup("a")], [Markup("a")], True),
        ((1, "a"), (1, "a"), True),
        ((1, "a"), [1, "a"], False),
        ([b"x", None], [b"x", None], True),
        ([uuid.UUID(int=1)], [uuid.UUID(int=1)], True),
        ([_WHEN], [_WHEN.astimezone(datetime.timezone(datetime.timedelta(0), "Z"))], False),
        ([[1], "a"], [[1], "a"], True),
        ([[1], "a"], [[True], "a"], False),
        ([{"a": 1}], [{"a": 1.0}], False),
    ],
)
def test_same_is_type_strict_in_lists(old: t.Any, new: t.Any, expected: bool) -> None:
    """A value handed out compares equal only if it serializes alike:
    flat lists of strings, ints and the like too (their fast path)."""
    assert same(old, new) is expected


def test_a_copied_flat_list_is_its_own() -> None:
    value = ["tea", 1, None]
    copied = copy_value(value)
    assert copied == value and copied is not value
    value.append("more")
    assert copied == ["tea", 1, None]
    assert not same(copied, value)


@pytest.mark.parametrize("replacement", [1, True, -0.0, "1.0", Markup("0.0")])
def test_a_copied_list_tells_an_item_replaced_in_place(replacement: t.Any) -> None:
    """The copy of a flat list holds the same objects, so an unchanged list
    is found unchanged by identity alone; an item replaced in place by one
    that compares equal but serializes otherwise is still a change."""
    value = [0.0, "a"] if replacement == 0 else [1.0, "a"]
    copied = copy_value(value)
    assert same(copied, value)
    value[0] = replacement
    assert not same(copied, value)
