"""The apps under test and the stores they run on.

Three session implementations serve the same views with the same session
content:

- ``cookie``: Flask's own signed-cookie session (no store);
- ``ours``: flask_serverside, with its defaults (tagged JSON, lazy loading);
- ``flask-session``: Flask-Session 0.8 with its defaults (msgpack, a store
  read in ``open_session`` and a store write on every request because
  ``SESSION_REFRESH_EACH_REQUEST`` is on).

Every session is permanent (``_permanent`` is part of the content for all
three), so all three refresh their cookie on requests that use the session.
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import os
import pathlib
import sys
import typing as t
import warnings
from dataclasses import dataclass
from dataclasses import field
from urllib.parse import urlsplit

from flask import Flask
from flask import session

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

KINDS = ("cookie", "ours", "flask-session")
BACKENDS = ("filesystem", "sqlite", "postgres", "redis", "memcached")
LABELS = {
    "filesystem": "filesystem",
    "sqlite": "SQLite",
    "postgres": "PostgreSQL",
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


@dataclass
class Store:
    """A started store and how each app is configured to use it."""

    name: str
    ours: dict[str, t.Any]
    flask_session: t.Callable[[], dict[str, t.Any]]
    server: Server | None = None
    clients: list[t.Any] = field(default_factory=list)

    @property
    def label(self) -> str:
        return LABELS[self.name]


def make_app(kind: str, store: Store, instance: pathlib.Path) -> Flask:
    instance.mkdir(parents=True, exist_ok=True)
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
    module = importlib.import_module(f"tests.servers.{name}")
    server: Server = module.start(tmp)
    try:
        if name == "redis":
            import redis

            admin = redis.Redis(host="127.0.0.1", port=server.port)
            # The test server fsyncs its append-only file on every write (the
            # outage tests need that); Redis's default is no AOF at all.
            admin.config_set("appendonly", "no")
            admin.close()
        store = configure_store(name, tmp, server.url)
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
        )
    if name == "sqlite":
        # One database file for both: the same store.
        url = f"sqlite:///{tmp}/sessions.sqlite3"
    assert url is not None
    if name in ("sqlite", "postgres"):
        return Store(
            name,
            ours={"SESSION_BACKEND": "sqlalchemy", "SESSION_SQLALCHEMY_URL": url},
            flask_session=lambda: {
                "SESSION_TYPE": "sqlalchemy",
                "SESSION_SQLALCHEMY_TABLE": "flask_sessions",
                "_SQLALCHEMY_URI": url,
            },
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

        return Store(name, ours, redis_config, clients=clients)
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

        return Store(name, ours, memcached_config, clients=clients)
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
