from __future__ import annotations

import importlib
import os
import typing as t
import uuid
from collections import Counter
from collections.abc import Iterator

import pytest
from flask import Flask
from flask import jsonify
from flask import session

from flask_serverside import ServerSide
from flask_serverside.backends import Backend
from flask_serverside.backends import Record
from flask_serverside.config import defaults
from flask_serverside.config import make_backend
from tests.servers import ServerNotFound
from tests.wrappers import DelegatingBackend

#: Every store the contract tests run on.
BACKENDS = ["filesystem", "sqlite", "postgres", "simple", "redis", "memcached"]
#: Store names that reach PostgreSQL another way than ``postgres`` (psycopg2
#: directly): the server fixture and URL attribute of each. They run in
#: ``test_deployments.py``, not on every contract test.
POSTGRES_VARIANTS = {
    "postgres-psycopg": ("postgres_server", "url_psycopg"),
    "postgres-psycopg-prepared": ("postgres_server", "url_psycopg_prepared"),
    "pgbouncer-psycopg2": ("pgbouncer_server", "url"),
    "pgbouncer-psycopg": ("pgbouncer_server", "url_psycopg"),
}

#: Redis deployments the contract runs on in ``test_redis_ha.py`` only (not
#: on every test): store name to its server fixture.
REDIS_DEPLOYMENTS = {
    "redis-cluster": "redis_cluster_server",
    "redis-sentinel": "redis_sentinel_server",
}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--require-servers",
        action="store_true",
        default=os.environ.get("CI") == "true",
        help="Fail, instead of skipping, tests whose server is not installed.",
    )


def start_server(
    request: pytest.FixtureRequest, tmp: os.PathLike[str], name: str, *needs: t.Any
) -> t.Any:
    """Start ``tests/servers/<name>.py``'s server (given the servers it
    ``needs``, such as PgBouncer's PostgreSQL), or skip when it is missing."""
    module = importlib.import_module(f"tests.servers.{name}")
    try:
        return module.start(tmp, *needs)
    except ServerNotFound as exc:
        if request.config.getoption("--require-servers"):
            pytest.fail(f"{name} is required (CI or --require-servers): {exc}")
        pytest.skip(str(exc))


def _server_fixture(name: str, *needs: str) -> t.Any:
    """A session fixture ``<name>_server`` started after the fixtures
    ``<need>_server`` of each of ``needs``, which it is given."""

    @pytest.fixture(scope="session", name=f"{name}_server")
    def fixture(
        request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
    ) -> Iterator[t.Any]:
        servers = [request.getfixturevalue(f"{need}_server") for need in needs]
        server = start_server(request, tmp_path_factory.mktemp(name), name, *servers)
        yield server
        server.stop()

    return fixture


postgres_server = _server_fixture("postgres")
redis_server = _server_fixture("redis")
memcached_server = _server_fixture("memcached")
#: :class:`tests.servers.redis_cluster.RedisCluster`: 3 primaries, 3 replicas.
redis_cluster_server = _server_fixture("redis_cluster")
#: :class:`tests.servers.redis_sentinel.RedisSentinel`: a primary, a
#: replica and 3 sentinels.
redis_sentinel_server = _server_fixture("redis_sentinel")
#: :class:`tests.servers.pgbouncer.PgBouncerServer`, in transaction mode in
#: front of ``postgres_server``.
pgbouncer_server = _server_fixture("pgbouncer", "postgres")


class CountingBackend(DelegatingBackend):
    """A real backend that records which of its methods were called, and
    with which keys, so tests can say what a request cost."""

    def __init__(self, inner: Backend) -> None:
        super().__init__(inner)
        self.calls: Counter[str] = Counter()
        self.keys: list[str] = []

    def _note(self, name: str, key: str | None = None) -> None:
        self.calls[name] += 1
        if key is not None:
            self.keys.append(key)

    def load(self, key: str) -> Record | None:
        self._note("load", key)
        return super().load(key)

    def save(self, key: str, data: bytes, expires: float) -> None:
        self._note("save", key)
        super().save(key, data, expires)

    def replace(self, key: str, expected: bytes, data: bytes, expires: float) -> bool:
        self._note("replace", key)
        return super().replace(key, expected, data, expires)

    def touch(self, key: str, expires: float) -> bool:
        self._note("touch", key)
        return super().touch(key, expires)

    def delete(self, key: str) -> bool:
        self._note("delete", key)
        return super().delete(key)

    def lock(self, key: str) -> t.Any:
        self._note("lock", key)
        return super().lock(key)

    def cleanup(self, now: float) -> Iterator[int]:
        self._note("cleanup")
        return super().cleanup(now)

    @property
    def total(self) -> int:
        return sum(self.calls.values())


@pytest.fixture(params=BACKENDS)
def backend_name(request: pytest.FixtureRequest) -> str:
    return t.cast(str, request.param)


def store_config(request: pytest.FixtureRequest, name: str) -> dict[str, t.Any]:
    """The ``SESSION_*`` config that selects store ``name``, isolated by a
    unique table or key prefix on the shared servers."""
    unique = "t" + uuid.uuid4().hex[:12]
    if name == "filesystem":
        return {}
    if name == "sqlite":
        return {"SESSION_BACKEND": "sqlalchemy"}
    if name == "postgres" or name in POSTGRES_VARIANTS:
        fixture, attribute = POSTGRES_VARIANTS.get(name, ("postgres_server", "url"))
        return {
            "SESSION_BACKEND": "sqlalchemy",
            "SESSION_SQLALCHEMY_URL": getattr(request.getfixturevalue(fixture), attribute),
            "SESSION_SQLALCHEMY_TABLE": unique,
        }
    if name == "simple":
        return {"SESSION_BACKEND": "cachelib", "SESSION_CACHELIB": "simple://"}
    server = request.getfixturevalue(REDIS_DEPLOYMENTS.get(name, f"{name}_server"))
    return {
        "SESSION_BACKEND": "cachelib",
        "SESSION_CACHELIB": server.url,
        "SESSION_KEY_PREFIX": f"{unique}:",
    }


@pytest.fixture
def backend_config(backend_name: str, request: pytest.FixtureRequest) -> dict[str, t.Any]:
    """The config of the store under test, isolated per test."""
    return store_config(request, backend_name)


def add_routes(app: Flask) -> None:
    """The views the tests drive the session with."""

    @app.get("/nothing")
    def nothing() -> str:
        return "nothing"

    @app.get("/sid")
    def sid() -> str:
        return t.cast(str, session.sid)  # type: ignore[attr-defined]

    @app.get("/get/<key>")
    def get(key: str) -> t.Any:
        return jsonify(session.get(key))

    @app.get("/dump")
    def dump() -> t.Any:
        return jsonify(dict(session))

    @app.get("/set/<key>/<value>")
    def set_(key: str, value: str) -> str:
        session[key] = value
        return "ok"

    @app.get("/append/<key>/<value>")
    def append(key: str, value: str) -> str:
        session.setdefault(key, []).append(value)
        return "ok"

    @app.get("/delete/<key>")
    def delete(key: str) -> str:
        session.pop(key, None)
        return "ok"

    @app.get("/clear")
    def clear() -> str:
        session.clear()
        return "ok"

    @app.get("/regenerate")
    def regenerate() -> str:
        session.regenerate()  # type: ignore[attr-defined]
        return "ok"

    @app.get("/destroy")
    def destroy() -> str:
        session.destroy()  # type: ignore[attr-defined]
        return "ok"


def build_app(
    instance_path: os.PathLike[str] | str, config: dict[str, t.Any], count: bool = True
) -> Flask:
    """A test app on the configured store, with :class:`CountingBackend`
    around it when ``count`` is true (``app.backend``)."""
    app = Flask(__name__, instance_path=os.fspath(instance_path))
    app.config.update({"SECRET_KEY": "test secret", "TESTING": True, **config})
    if count:
        settings = {**defaults(app), **config}
        app.config["SESSION_BACKEND"] = CountingBackend(make_backend(settings))
    ServerSide(app)
    app.backend = app.config["SESSION_BACKEND"]  # type: ignore[attr-defined]
    add_routes(app)
    return app


@pytest.fixture
def make_app(
    tmp_path: os.PathLike[str], backend_config: dict[str, t.Any]
) -> t.Callable[..., Flask]:
    """Build a test app on the store under test, with extra config."""

    def make(**config: t.Any) -> Flask:
        return build_app(tmp_path, {**backend_config, **config})

    return make


@pytest.fixture
def app(make_app: t.Callable[..., Flask]) -> Flask:
    return make_app()
