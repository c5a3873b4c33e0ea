"""The apps under test and the stores they run on.

Six apps serve the same views with the same session content:

- ``bare``: no session machinery at all, a :class:`BareInterface` that hands
  out a dict with the content and saves nothing;
- ``floor``: bare plus the store's minimum work for the request, through the
  same client library as ours (:class:`FloorInterface`);
- ``least``: the least work any session layer with ours' guarantees must
  do on top of the floor, written inline (:mod:`benchmarks.least`);
- ``cookie``: Flask's own signed-cookie session (no store);
- ``ours``: flask_serverside, with its defaults (tagged JSON, lazy loading);
- ``flask-session``: Flask-Session 0.8 with its defaults (msgpack, a store
  read in ``open_session`` and a store write on every request because
  ``SESSION_REFRESH_EACH_REQUEST`` is on).

Every real session is permanent (``_permanent`` is part of the content for all
three), so all three refresh their cookie on requests that use the session.
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import json
import os
import pathlib
import sys
import typing as t
import warnings
from dataclasses import dataclass
from dataclasses import field
from urllib.parse import urlsplit

from flask import Flask
from flask import Request
from flask import request
from flask import Response
from flask import session
from flask.sessions import SessionInterface

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from flask_serverside import ServerSide  # noqa: E402
from tests.servers import Server  # noqa: E402
from tests.servers import ServerNotFound  # noqa: E402

SECRET_KEY = "benchmark-secret-key-not-for-production"
COOKIE_NAME = "session"

#: What a logged-in visitor's session holds, the same for every app.
CONTENT: dict[str, t.Any] = {"user": "ada", "user_id": 42, "cart": ["tea", "mug", "honey"]}

#: A 64 KB session: the content plus notes (for the read-one-scalar row).
NOTES = [f"note {i:05d}: " + "lorem ipsum dolor sit amet " * 2 for i in range(1000)]

KINDS = ("bare", "floor", "least", "ours", "cookie", "flask-session")
BACKENDS = ("filesystem", "sqlite", "postgres", "postgres3", "postgres3p", "redis", "memcached")
#: The stores on SQLAlchemy.
SQL_STORES = ("sqlite", "postgres", "postgres3", "postgres3p")
#: What ``postgres3p`` adds to the URL of ours: psycopg 3 prepares the
#: statements itself, at the protocol level (not behind PgBouncer < 1.21).
PREPARED = "?prepare_threshold=5"
LABELS = {
    "filesystem": "filesystem",
    "sqlite": "SQLite",
    "postgres": "PG/psycopg2",
    "postgres3": "PG/psycopg3",
    "postgres3p": "PG/pg3 prep",
    "redis": "Redis",
    "memcached": "Memcached",
}


def add_views(app: Flask, permanent: bool = True) -> None:
    """The request shapes: untouched, read, write; and a login to start."""
    counter = itertools.count()

    @app.get("/login")
    def login() -> str:
        session.update(CONTENT)
        session.permanent = permanent
        return "logged in"

    @app.get("/login-big")
    def login_big() -> str:
        session.update(CONTENT)
        session["notes"] = NOTES
        session.permanent = permanent
        return "logged in"

    @app.get("/scalar")
    def scalar() -> str:
        return str(session["user_id"])

    @app.get("/untouched")
    def untouched() -> str:
        return "ok"

    @app.get("/read")
    def read() -> str:
        return f"{session['user']}:{session['user_id']}:{len(session['cart'])}"

    @app.get("/write")
    def write() -> str:
        # The same key each time, so that the stored size stays constant.
        session["seen"] = next(counter)
        return "ok"


def _flask(instance: pathlib.Path) -> Flask:
    app = Flask(__name__, instance_path=str(instance))
    app.config["SECRET_KEY"] = SECRET_KEY
    return app


def cookie_app(instance: pathlib.Path, permanent: bool = True) -> Flask:
    """Flask's signed-cookie session."""
    app = _flask(instance)
    add_views(app, permanent)
    return app


def ours_app(instance: pathlib.Path, config: dict[str, t.Any]) -> Flask:
    app = _flask(instance)
    app.config.update(config)
    ServerSide(app)
    add_views(app)
    return app


def flask_session_app(instance: pathlib.Path, config: dict[str, t.Any]) -> Flask:
    from flask_session import Session

    app = _flask(instance)
    config = dict(config)
    make_db = config.pop("_SQLALCHEMY_URI", None)
    app.config.update(config)
    if make_db is not None:
        from flask_sqlalchemy import SQLAlchemy

        app.config["SQLALCHEMY_DATABASE_URI"] = make_db
        app.config["SESSION_SQLALCHEMY"] = SQLAlchemy(app)
    with warnings.catch_warnings():
        # SESSION_TYPE="filesystem" is deprecated in 0.8, but still its own.
        warnings.simplefilter("ignore", DeprecationWarning)
        Session(app)
    add_views(app)
    return app


def bare_app(instance: pathlib.Path, interface: SessionInterface) -> Flask:
    app = _flask(instance)
    app.session_interface = interface
    add_views(app)
    return app


class BareSession(dict[str, t.Any]):
    """A dict with the attributes Flask sets or reads on a session."""

    accessed = False
    modified = False
    new = False
    permanent = True


class BareInterface(SessionInterface):
    """No session machinery: every request gets a fresh dict with the
    content, and nothing is saved or sent."""

    def open_session(self, app: Flask, request: Request) -> t.Any:
        return BareSession(CONTENT)

    def save_session(self, app: Flask, session: t.Any, response: Response) -> None:
        pass


#: The request paths that read the session, and those that write it.
READ_PATHS = frozenset({"/read", "/write", "/scalar"})
WRITE_PATHS = frozenset({"/write"})


class FloorInterface(BareInterface):
    """Bare, plus the store's minimum work for the request: one read of a
    record of its own for a request that reads the session, and that read
    and one write back of the same bytes for a request that writes it. No
    decoding, no encoding, no cookie, no ID hashing."""

    def __init__(self, floor: Floor, data: bytes) -> None:
        self.floor = floor
        self.key = f"floor-{len(data)}"
        floor.setup(self.key, data)

    def record_key(self, request: Request) -> str:
        """The record a request works on."""
        return self.key

    def open_session(self, app: Flask, request: Request) -> t.Any:
        content = BareSession(CONTENT)
        if request.path in READ_PATHS:
            key = self.record_key(request)
            raw = self.floor.read(key)
            if request.path in WRITE_PATHS and raw is not None:
                request.environ["bench.floor"] = (key, raw)
        return content

    def save_session(self, app: Flask, session: t.Any, response: Response) -> None:
        found = t.cast("tuple[str, bytes] | None", request.environ.get("bench.floor"))
        if found is not None:
            self.floor.write(*found)


class Floor:
    """A store's minimum work: :meth:`read` and :meth:`write` one record."""

    def setup(self, key: str, data: bytes) -> None:
        self.write(key, data)

    def read(self, key: str) -> bytes | None:
        """The record under ``key``, or ``None`` if there is none."""
        raise NotImplementedError

    def write(self, key: str, data: bytes) -> None:
        raise NotImplementedError


class FileFloor(Floor):
    """One ``open``/``fstat``/``read``/``close`` of the record file; a write
    is that and one ``open``/``pwrite``/``close`` in place."""

    def __init__(self, directory: pathlib.Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = str(directory)

    def setup(self, key: str, data: bytes) -> None:
        pathlib.Path(self.directory, key).write_bytes(data)

    def read(self, key: str) -> bytes | None:
        try:
            fd = os.open(os.path.join(self.directory, key), os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            return os.read(fd, os.fstat(fd).st_size)
        finally:
            os.close(fd)

    def write(self, key: str, data: bytes) -> None:
        fd = os.open(os.path.join(self.directory, key), os.O_WRONLY)
        try:
            os.pwrite(fd, data, 0)
        finally:
            os.close(fd)


class SQLFloor(Floor):
    """One ``SELECT`` by key (a write: and one ``UPDATE`` by key) on a
    pooled driver connection of an engine in autocommit mode, as ours."""

    def __init__(self, url: str) -> None:
        import sqlalchemy as sa

        self.engine = sa.create_engine(url, isolation_level="AUTOCOMMIT")
        sqlite = self.engine.dialect.name == "sqlite"
        if sqlite:
            sa.event.listen(self.engine, "connect", _sqlite_wal)
        blob, mark = ("BLOB", "?") if sqlite else ("BYTEA", "%s")
        with self.engine.connect() as conn:
            conn.exec_driver_sql(
                "CREATE TABLE IF NOT EXISTS floor_sessions"
                f" (id VARCHAR(255) PRIMARY KEY, data {blob} NOT NULL, expires FLOAT NOT NULL)"
            )
        self.select = f"SELECT data, expires FROM floor_sessions WHERE id = {mark}"
        self.update = f"UPDATE floor_sessions SET data = {mark}, expires = {mark} WHERE id = {mark}"
        self.delete = f"DELETE FROM floor_sessions WHERE id = {mark}"
        self.insert = (
            f"INSERT INTO floor_sessions (id, data, expires) VALUES ({mark}, {mark}, {mark})"
        )

    def setup(self, key: str, data: bytes) -> None:
        with self.engine.connect() as conn:
            conn.exec_driver_sql(self.delete, (key,))
            conn.exec_driver_sql(self.insert, (key, data, 1e10))

    def read(self, key: str) -> bytes | None:
        conn = self.engine.raw_connection()
        try:
            cursor = conn.cursor()
            cursor.execute(self.select, (key,))
            row = cursor.fetchone()
            cursor.close()
        finally:
            conn.close()
        return None if row is None else bytes(row[0])

    def write(self, key: str, data: bytes) -> None:
        conn = self.engine.raw_connection()
        try:
            cursor = conn.cursor()
            cursor.execute(self.update, (data, 1e10, key))
            cursor.close()
        finally:
            conn.close()


def _sqlite_wal(dbapi_connection: t.Any, record: t.Any) -> None:
    # What ours does on connect: WAL mode with synchronous=NORMAL.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


class RedisFloor(Floor):
    """One ``GET``; a write: and one ``SET`` with an expiry."""

    def __init__(self, client: t.Any) -> None:
        self.client = client

    def read(self, key: str) -> bytes | None:
        return t.cast("bytes | None", self.client.get(key))

    def write(self, key: str, data: bytes) -> None:
        self.client.set(key, data, ex=3600)


class MemcachedFloor(Floor):
    """One ``get``; a write: and one ``set`` that waits for its reply."""

    def __init__(self, client: t.Any) -> None:
        self.client = client

    def read(self, key: str) -> bytes | None:
        return t.cast("bytes | None", self.client.get(key))

    def write(self, key: str, data: bytes) -> None:
        self.client.set(key, data, expire=3600, noreply=False)


@dataclass
class Store:
    """A started store and how each app is configured to use it."""

    name: str
    ours: dict[str, t.Any]
    flask_session: t.Callable[[], dict[str, t.Any]]
    server: Server | None = None
    clients: list[t.Any] = field(default_factory=list)
    #: Makes the store's minimal client for the floor app (see :class:`Floor`).
    floor: t.Callable[[], Floor] | None = None

    @property
    def label(self) -> str:
        return LABELS[self.name]


def make_app(
    kind: str, store: Store, instance: pathlib.Path, floor_data: bytes | None = None
) -> Flask:
    """The app ``kind`` on ``store``; a ``floor`` app works on a record of
    its own holding ``floor_data`` (default: the serialized content)."""
    instance.mkdir(parents=True, exist_ok=True)
    if kind == "bare":
        return bare_app(instance, BareInterface())
    if kind == "floor":
        assert store.floor is not None
        if floor_data is None:
            floor_data = json.dumps({**CONTENT, "_permanent": True}).encode()
        return bare_app(instance, FloorInterface(store.floor(), floor_data))
    if kind == "least":
        from .least import LeastInterface

        assert store.floor is not None
        return bare_app(instance, LeastInterface(store.floor()))
    if kind == "cookie":
        return cookie_app(instance)
    if kind == "cookie-np":
        # Not permanent: Flask does not re-sign it on untouched requests.
        return cookie_app(instance, permanent=False)
    if kind == "ours":
        return ours_app(instance, store.ours)
    if kind == "flask-session":
        return flask_session_app(instance, store.flask_session())
    raise ValueError(kind)


def start_store(name: str, tmp: pathlib.Path) -> Store:
    """Start the store ``name`` in ``tmp``.

    :raises ServerNotFound: Its server binary is not installed.
    """
    tmp.mkdir(parents=True, exist_ok=True)
    if name in ("filesystem", "sqlite"):
        return configure_store(name, tmp)
    module = importlib.import_module(f"tests.servers.{name.rstrip('3p')}")
    server: Server = module.start(tmp)
    try:
        if name == "redis":
            import redis

            admin = redis.Redis(host="127.0.0.1", port=server.port)
            # The test server fsyncs its append-only file on every write (the
            # outage tests need that); Redis's default is no AOF at all.
            admin.config_set("appendonly", "no")
            admin.close()
        url = server.url
        if name in ("postgres3", "postgres3p"):
            import psycopg  # noqa: F401  (skip the store with a clear error)

            url = url.replace("+psycopg2://", "+psycopg://")
        store = configure_store(name, tmp, url)
    except BaseException:
        server.stop()
        raise
    store.server = server
    return store


def configure_store(name: str, tmp: pathlib.Path, url: str | None = None) -> Store:
    """How the apps use the store ``name``: files or SQLite in ``tmp``, or
    the server at ``url``."""
    if name == "filesystem":
        return Store(
            name,
            ours={"SESSION_FILE_DIR": str(tmp / "ours")},
            flask_session=lambda: {
                "SESSION_TYPE": "filesystem",
                "SESSION_FILE_DIR": str(tmp / "flask-session"),
            },
            floor=lambda: FileFloor(tmp / "floor"),
        )
    if name == "sqlite":
        # One database file for both: the same store.
        url = f"sqlite:///{tmp}/sessions.sqlite3"
    assert url is not None
    if name in SQL_STORES:
        # The others take the URL without ours' options.
        sql_url = url.partition("?")[0]
        ours_url = sql_url + PREPARED if name == "postgres3p" else url
        return Store(
            name,
            ours={"SESSION_BACKEND": "sqlalchemy", "SESSION_SQLALCHEMY_URL": ours_url},
            flask_session=lambda: {
                "SESSION_TYPE": "sqlalchemy",
                "SESSION_SQLALCHEMY_TABLE": "flask_sessions",
                "_SQLALCHEMY_URI": sql_url,
            },
            floor=lambda: SQLFloor(sql_url),
        )
    port = urlsplit(url).port
    clients: list[t.Any] = []
    ours = {"SESSION_BACKEND": "cachelib", "SESSION_CACHELIB": url}
    if name == "redis":
        import redis

        def redis_config() -> dict[str, t.Any]:
            client = redis.Redis(host="127.0.0.1", port=port)
            clients.append(client)
            return {"SESSION_TYPE": "redis", "SESSION_REDIS": client}

        def redis_floor() -> Floor:
            floor = RedisFloor(redis.Redis(host="127.0.0.1", port=port))
            clients.append(floor.client)
            return floor

        return Store(name, ours, redis_config, clients=clients, floor=redis_floor)
    if name == "memcached":
        import pymemcache

        def memcached_config() -> dict[str, t.Any]:
            # Flask-Session 0.8 takes any client with get/set/delete; its own
            # fallback picks pymemcache's base Client too. TCP_NODELAY: with
            # pymemcache's default, a get sent right after a noreply set
            # waits for a delayed ACK (Nagle), about 40 ms per request.
            client = pymemcache.Client(("127.0.0.1", port), no_delay=True)
            clients.append(client)
            return {"SESSION_TYPE": "memcached", "SESSION_MEMCACHED": client}

        def memcached_floor() -> Floor:
            # The client and options ours uses (cachelib's MemcachedCache
            # over a pymemcache.PooledClient that waits for every reply).
            client = pymemcache.PooledClient(
                ("127.0.0.1", port), ignore_exc=False, default_noreply=False
            )
            clients.append(client)
            return MemcachedFloor(client)

        return Store(name, ours, memcached_config, clients=clients, floor=memcached_floor)
    raise ValueError(name)


def stop_store(store: Store) -> None:
    for client in store.clients:
        with contextlib.suppress(Exception):
            client.close()
    if store.server is not None:
        store.server.stop()


@contextlib.contextmanager
def started_store(name: str, tmp: pathlib.Path) -> t.Iterator[Store | str]:
    """The started store, or the reason it was skipped (a ``str``)."""
    try:
        store = start_store(name, tmp)
    except ServerNotFound as exc:
        yield f"skipped: {exc}"
        return
    try:
        yield store
    finally:
        stop_store(store)


def quiet() -> None:
    """Silence the warnings the compared libraries raise by design."""
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")
