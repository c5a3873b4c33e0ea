"""Hostile input, with Hypothesis: Cookie headers, session cookie values and
stored record bytes chosen by an attacker.

Whatever comes in: no 500; a cookie value that is not a well-formed ID never
reaches the backend; a planted pickle never runs; no file outside the session
directory is ever touched (an audit hook watches every file system call made
by the request's thread). ``CI=true`` selects the large Hypothesis profile
(``reliability-ci``, over 10^4 examples in all); ``RELIABILITY_PROFILE``
picks one by name.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import string
import struct
import sys
import threading
import time
import typing as t
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from flask import session
from hypothesis import given
from hypothesis import strategies as st
from werkzeug.http import dump_cookie
from werkzeug.sansio.http import parse_cookie  # what Request.cookies uses

from flask_serverside import ids
from flask_serverside.backends import filefmt
from flask_serverside.backends.filesystem import FileSystemBackend
from tests.conftest import build_app
from tests.conftest import CountingBackend
from tests.reliability.figures import examples
from tests.reliability.figures import FACTS
from tests.reliability.figures import PROFILE_NAME
from tests.reliability.figures import record
from tests.reliability.helpers import session_set_cookie

FACTS["fuzz"]["profile"] = PROFILE_NAME
SECRET = "fuzz secret"
ID_ALPHABET = string.ascii_letters + string.digits + "-_"
WELL_FORMED = re.compile(r"[A-Za-z0-9_-]{22,86}")


# Watching the file system: an audit hook, on for one thread at a time.


class Audit(threading.local):
    active = False

    def __init__(self) -> None:
        self.paths: list[str] = []


AUDIT = Audit()
_PATH_EVENTS = {
    "open": 1,
    "os.remove": 1,
    "os.rename": 2,
    "os.replace": 2,
    "os.mkdir": 1,
    "os.chmod": 1,
    "os.chown": 1,
    "os.listdir": 1,
    "os.scandir": 1,
    "os.utime": 1,
    "os.symlink": 2,
    "os.link": 2,
    "os.truncate": 1,
    "os.rmdir": 1,
    "shutil.rmtree": 1,
}
_IMPORTS = (".py", ".pyc", ".so", ".pth")


def _audit(event: str, args: tuple[t.Any, ...]) -> None:
    if not AUDIT.active:
        return
    count = _PATH_EVENTS.get(event)
    if count is None:
        return
    for path in args[:count]:
        if isinstance(path, (str, bytes, os.PathLike)):
            AUDIT.paths.append(os.path.abspath(os.fsdecode(path)))


sys.addaudithook(_audit)


@contextmanager
def audited() -> Iterator[list[str]]:
    """Paths the current thread touches inside the block."""
    AUDIT.paths = []
    AUDIT.active = True
    try:
        yield AUDIT.paths
    finally:
        AUDIT.active = False


def outside(paths: list[str], directory: str) -> list[str]:
    root = os.path.realpath(directory)
    return [
        p
        for p in paths
        if not (os.path.realpath(p) + os.sep).startswith(root + os.sep) and not p.endswith(_IMPORTS)
    ]


# The app under test: built once per test, shared by its examples.


class Fuzzed:
    def __init__(self, tmp_path: t.Any, backend_name: str, config: dict[str, t.Any]) -> None:
        self.name = backend_name
        self.app = build_app(tmp_path, {**config, "TESTING": False, "SECRET_KEY": SECRET})
        self.backend: CountingBackend = self.app.backend  # type: ignore[attr-defined]
        self.store = self.app.session_interface.store  # type: ignore[attr-defined]
        self.directory = os.path.join(tmp_path, "sessions")
        self.client = self.app.test_client(use_cookies=False)
        self.examples = self.errors = self.malformed_calls = self.outside = 0

        @self.app.get("/len")
        def length() -> str:
            return str(len(session))

        @self.app.get("/touch-set")
        def touch_set() -> str:
            session["x"] = "1"
            return "ok"

        warm = self.app.test_client()
        warm.get("/touch-set")
        warm.get("/len")

    def get(self, path: str, cookie_header: str | None) -> t.Any:
        """One request; counts a 5xx and files touched outside the directory."""
        headers = {"Cookie": cookie_header} if cookie_header is not None else {}
        if self.name == "filesystem":
            with audited() as paths:
                response = self.client.get(path, headers=headers)
            stray = outside(paths, self.directory)
            self.outside += len(stray)
            assert not stray, f"opened outside the session directory: {stray}"
        else:
            response = self.client.get(path, headers=headers)
        if response.status_code >= 500:
            self.errors += 1
        return response

    def report(self, request: pytest.FixtureRequest, what: str) -> None:
        record(
            request,
            "fuzz",
            f"{self.name}: {self.examples} examples of {what}; 5xx {self.errors}, backend"
            f" calls for malformed IDs {self.malformed_calls}, paths outside"
            f" {self.outside}",
            examples=self.examples,
            errors=self.errors,
            malformed_calls=self.malformed_calls,
            outside_paths=self.outside,
        )


@pytest.fixture
def fuzzed(tmp_path: t.Any, backend_name: str, backend_config: dict[str, t.Any]) -> Fuzzed:
    return Fuzzed(tmp_path, backend_name, backend_config)


def well_formed(value: str | None, signed: bool) -> bool:
    """The test's own idea of a cookie value the backend may see."""
    if value is None:
        return False
    if not signed:
        return WELL_FORMED.fullmatch(value) is not None
    sid, dot, _ = value.rpartition(".")
    return bool(dot) and WELL_FORMED.fullmatch(sid) is not None and ids.sign(sid, [SECRET]) == value


# Strategies

latin1 = st.characters(min_codepoint=0, max_codepoint=0xFF, blacklist_characters="\r\n")
id_like = st.text(ID_ALPHABET, max_size=100)
nasty = st.sampled_from(
    [
        "",
        "../../../../etc/passwd",
        "..%2F..%2Fetc%2Fpasswd" + "A" * 30,
        "/" + "A" * 43,
        "A" * 43 + "\x00",
        "A" * 21,
        "A" * 87,
        "A" * 257,
        "A" * 43 + ".sig",
        ".." + "A" * 41,
        "%2e%2e" + "A" * 40,
        "A" * 43 + "/../x",
        "\\..\\..\\" + "A" * 40,
        "$(touch /tmp/x)" + "A" * 30,
        "A" * 42 + "=",
        "A" * 43 + ";" + "B" * 43,
    ]
)
cookie_values = st.one_of(
    id_like,
    nasty,
    st.text(max_size=300),
    st.builds(lambda: ids.generate(32)),
    st.builds(lambda n: ids.generate(n), st.integers(16, 64)),
    st.builds(lambda a, b: f"{a}.{b}", id_like, st.text(ID_ALPHABET + ".", max_size=60)),
    st.builds(lambda: ids.sign(ids.generate(32), [SECRET])),
    st.builds(lambda: ids.sign(ids.generate(32), ["another key"])),
    st.builds(lambda v: v + ids.sign(ids.generate(32), [SECRET]), st.text(max_size=3)),
)
cookie_names = st.one_of(
    st.sampled_from(["session", "Session", "SESSION", "session ", " session", "sess", "x"]),
    st.text(latin1.filter(lambda c: c not in ";= "), max_size=12),
)


@st.composite
def cookie_headers(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["raw", "pairs", "quoted"]))
    if kind == "raw":
        return draw(st.text(latin1, max_size=400))
    pairs = draw(st.lists(st.tuples(cookie_names, cookie_values), max_size=5))
    if kind == "quoted":
        parts = [dump_cookie(name or "x", value).split("; ", 1)[0] for name, value in pairs]
    else:
        parts = [f"{name}={value}" for name, value in pairs]
    header = draw(st.sampled_from(["; ", ";", ", ", " ; "])).join(parts)
    return "".join(c for c in header if c not in "\r\n" and ord(c) < 256)


# Cookies


@given(header=cookie_headers())
@examples(0.8)
def _cookie_headers(fuzzed: Fuzzed, header: str) -> None:
    fuzzed.examples += 1
    fuzzed.backend.calls.clear()
    value = parse_cookie(header).get("session")
    response = fuzzed.get("/len", header)
    assert response.status_code == 200, response.status_code
    cookie = session_set_cookie(response.headers.getlist("Set-Cookie"))
    if not well_formed(value, signed=False):
        fuzzed.malformed_calls += fuzzed.backend.total
        assert fuzzed.backend.total == 0, f"{value!r} reached the backend"
        assert cookie is None, "a request with no usable cookie got one"
    else:
        # An unknown ID: looked up once, never adopted; its cookie is removed.
        assert fuzzed.backend.calls["load"] <= 1
        assert cookie is None or cookie.deleting


def test_cookie_headers(fuzzed: Fuzzed, request: pytest.FixtureRequest) -> None:
    try:
        _cookie_headers(fuzzed)
    finally:
        fuzzed.report(request, "raw Cookie headers")


@given(value=cookie_values)
@examples(0.55)
def _cookie_values(fuzzed: Fuzzed, signed: bool, value: str) -> None:
    fuzzed.examples += 1
    fuzzed.backend.calls.clear()
    fuzzed.backend.keys.clear()
    header = dump_cookie("session", value).split("; ", 1)[0]
    seen = parse_cookie(header).get("session")
    response = fuzzed.get("/touch-set", header)
    assert response.status_code == 200, response.status_code
    cookie = session_set_cookie(response.headers.getlist("Set-Cookie"))
    assert cookie is not None and cookie.value != value, "a cookie value was adopted"
    sid = cookie.value.rpartition(".")[0] if signed else cookie.value
    if not well_formed(seen, signed):
        touched = [k for k in fuzzed.backend.keys if k != fuzzed.store.key(sid)]
        fuzzed.malformed_calls += len(touched) + fuzzed.backend.calls["load"]
        assert not touched and fuzzed.backend.calls["load"] == 0, f"{value!r} was looked up"


@pytest.mark.parametrize("signed", [False, True], ids=["plain", "signed"])
def test_session_cookie_values(
    tmp_path: t.Any,
    backend_name: str,
    backend_config: dict[str, t.Any],
    signed: bool,
    request: pytest.FixtureRequest,
) -> None:
    fuzzed = Fuzzed(tmp_path, backend_name, {**backend_config, "SESSION_SIGN_ID": signed})
    try:
        _cookie_values(fuzzed, signed)
    finally:
        fuzzed.report(request, f"{'signed ' if signed else ''}session cookie values")


# Stored records


class Planted:
    """Runs ``os.mkdir(marker)`` when unpickled."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[t.Any, ...]:
        return (os.mkdir, (self.marker,))


def evil_pickles(marker: str) -> list[bytes]:
    return [pickle.dumps(Planted(marker), protocol=p) for p in range(pickle.HIGHEST_PROTOCOL + 1)]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            st.sampled_from(["a", "x", " t", " b", " u", " d", " m", " di", "_permanent"]),
            inner,
            max_size=3,
        )
    ),
    max_leaves=8,
)
payloads = st.one_of(
    st.binary(max_size=400),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.dictionaries(st.text(max_size=5), json_values, max_size=4).map(
        lambda v: json.dumps(v).encode()
    ),
    st.sampled_from([b"", b"{}", b"[]", b"null", b'{"a":', b'{" t":[1,2]}', b'{"a":{" b":"!!"}}']),
)
expiries = st.one_of(
    st.just(None),  # an hour from now
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=0, max_value=4e9),
)


class Planter:
    """Writes raw bytes where a backend keeps a session's record."""

    def __init__(self, fuzzed: Fuzzed) -> None:
        self.fuzzed = fuzzed
        self.name = fuzzed.name
        self.inner = fuzzed.backend.inner

    def plant(
        self, sid: str, payload: bytes, framed: bool, expires: float | None, flags: int = 0
    ) -> None:
        key = self.fuzzed.store.key(sid)
        soon = time.time() + 3600
        if self.name in ("sqlite", "postgres"):
            self.inner.save(key, payload, soon)
            return
        stamp = soon if expires is None else expires
        raw = b"fss\x02" + struct.pack(">d", stamp) + payload if framed else payload
        if self.name == "filesystem":
            raw = filefmt.encode(payload, stamp) if framed else payload
            path = self.inner._path(key)  # type: ignore[attr-defined]
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(raw)
        elif self.name == "redis":
            inner = self.inner
            inner.client.set(inner._cache_prefix() + key, raw, px=3_600_000)  # type: ignore[attr-defined]
        elif self.name == "memcached":
            inner = self.inner
            with inner._client() as client:  # type: ignore[attr-defined]
                client.set(inner._name(key), raw, 3600, noreply=False, flags=flags)  # type: ignore[attr-defined]
        else:
            self.inner.cache.set(key, raw, timeout=3600)  # type: ignore[attr-defined]


@given(
    payload=payloads,
    framed=st.booleans(),
    expires=expiries,
    flags=st.sampled_from([0, 1, 2, 4, 16, 0xFFFF]),
)
@examples(0.75)
def _records(
    fuzzed: Fuzzed,
    planter: Planter,
    marker: str,
    payload: bytes,
    framed: bool,
    expires: float | None,
    flags: int,
) -> None:
    fuzzed.examples += 1
    sid = ids.generate(32)
    planter.plant(sid, payload, framed, expires, flags)
    header = f"session={sid}"
    first = fuzzed.get("/len", header)
    second = fuzzed.get("/touch-set", header)
    assert not os.path.exists(marker), "a planted pickle ran"
    assert first.status_code == 200 and second.status_code == 200, (
        first.status_code,
        second.status_code,
    )
    cookie = session_set_cookie(second.headers.getlist("Set-Cookie"))
    assert cookie is not None
    if cookie.value == sid:  # adopted: the record was a live, valid session
        with fuzzed.app.app_context():
            data = fuzzed.app.extensions["serverside"].get(sid)
        assert data is not None and data.get("x") == "1"


def test_stored_record_bytes(
    fuzzed: Fuzzed, tmp_path: t.Any, request: pytest.FixtureRequest
) -> None:
    marker = str(tmp_path / "pickle-ran")
    planter = Planter(fuzzed)
    try:
        _records(fuzzed, planter, marker)
        # And every protocol of a pickle that would leave a marker, framed or not.
        for evil in evil_pickles(marker):
            for framed in (False, True):
                for flags in (0, 1):
                    _records.hypothesis.inner_test(  # type: ignore[attr-defined]
                        fuzzed, planter, marker, evil, framed, None, flags
                    )
    finally:
        record(request, "fuzz", None, pickles_executed=int(os.path.exists(marker)))
        fuzzed.report(request, "stored record bytes, planted pickles included")


@pytest.mark.parametrize("backend_name", ["memcached"])
def test_pymemcache_client_with_pickle_serde_runs_no_pickle(
    backend_name: str, tmp_path: t.Any, request: pytest.FixtureRequest
) -> None:
    """A user's own MemcachedCache, on a pymemcache client that pickles the
    values of the app's other keys (pymemcache's documented pickle_serde):
    an item planted with the pickle flag must not run (or init_app refuses
    such a client)."""
    import pymemcache  # type: ignore[import-untyped]
    from cachelib import MemcachedCache
    from pymemcache.serde import pickle_serde  # type: ignore[import-untyped]

    server = request.getfixturevalue("memcached_server")
    client = pymemcache.PooledClient(("127.0.0.1", server.port), serde=pickle_serde)
    config = {
        "SESSION_BACKEND": "cachelib",
        "SESSION_CACHELIB": MemcachedCache(client),
        "SESSION_KEY_PREFIX": f"serde{os.getpid()}:",
    }
    try:
        fuzzed = Fuzzed(tmp_path, "memcached", config)
    except ValueError as exc:  # refusing such a client in init_app is a fix too
        client.close()
        assert "SESSION_CACHELIB" in str(exc)
        return
    marker = str(tmp_path / "pickle-ran")
    sid = ids.generate(32)
    try:
        Planter(fuzzed).plant(sid, pickle.dumps(Planted(marker)), False, None, flags=1)
        response = fuzzed.get("/len", f"session={sid}")
    finally:
        client.close()
    assert response.status_code == 200
    assert not os.path.exists(marker), "a planted pickle ran"


# Paths


@given(
    prefix=st.from_regex(r"[!-~]{1,60}", fullmatch=True),
    sid=st.builds(ids.generate, st.integers(16, 64)),
)
@examples(1.0)
def _prefixes(directory: str, counter: list[int], prefix: str, sid: str) -> None:
    counter[0] += 1
    backend = FileSystemBackend(directory)
    backend.configure(prefix)  # as init_app does
    key = ids.storage_key(prefix, sid)
    with audited() as paths:
        with backend.lock(key):
            assert backend.load(key) is None
            backend.save(key, b"{}", time.time() + 60)
        backend.touch(key, time.time() + 120)
        assert backend.load(key) is not None
        assert backend.count(time.time()) >= 1
        assert backend.delete(key)
        sum(backend.cleanup(time.time()))
    stray = outside(paths, directory)
    counter[1] += len(stray)
    assert not stray, f"prefix {prefix!r} reached {stray}"


def test_filesystem_paths_stay_inside_for_any_prefix(
    tmp_path: t.Any, request: pytest.FixtureRequest
) -> None:
    """Every printable-ASCII key prefix (the values init_app accepts) keeps
    every file the backend touches inside its directory."""
    counter = [0, 0]
    try:
        _prefixes(str(tmp_path / "sessions"), counter)
    finally:
        record(
            request,
            "fuzz",
            f"filesystem: {counter[0]} key prefixes, paths outside {counter[1]}",
            examples=counter[0],
            outside_paths=counter[1],
        )


def test_filesystem_accepts_only_prefixes_it_can_store(
    tmp_path: t.Any, request: pytest.FixtureRequest
) -> None:
    """SESSION_KEY_PREFIX allows 100 printable characters; escaped for a
    file name, '%' takes three: init_app must refuse what the file system
    cannot name, or the backend must store it."""
    try:
        app = build_app(tmp_path, {"SESSION_KEY_PREFIX": "%" * 100, "TESTING": False}, count=False)
    except ValueError:
        return
    assert app.test_client().get("/set/a/1").status_code == 200
