"""What is peculiar to the cachelib backend, against a real Redis and Memcached.

The behaviour every backend shares is in ``test_contract.py``; here: URL
parsing, the bytes in the store (never a pickle), native expiry, the lock,
listing keys, and outages of a server that is stopped or frozen.
"""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing
import os
import pathlib
import pickle
import time
import typing as t
import uuid
from collections.abc import Iterator

import pytest
import redis
from cachelib import BaseCache
from cachelib import MemcachedCache
from cachelib import RedisCache
from cachelib import SimpleCache
from flask import Flask
from pymemcache import HashClient  # type: ignore[import-untyped]
from pymemcache import PooledClient
from pymemcache.client.base import Client as MemcacheClient  # type: ignore[import-untyped]

from flask_serverside import cache_url
from flask_serverside import ServerSide
from flask_serverside.backends import caches
from flask_serverside.backends.cachelib import CacheLibBackend
from flask_serverside.cache_url import cache_from_url
from tests.servers import free_port
from tests.servers import memcached as memcached_servers
from tests.servers import redis as redis_servers
from tests.servers import Server
from tests.servers import ServerNotFound

KINDS = ["simple", "redis", "memcached"]

Make = t.Callable[..., CacheLibBackend]


def _start(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, module: t.Any
) -> Iterator[Server]:
    name = module.__name__.rpartition(".")[2]
    try:
        server: Server = module.start(tmp_path_factory.mktemp(name))
    except ServerNotFound as exc:
        if request.config.getoption("--require-servers", os.environ.get("CI") == "true"):
            pytest.fail(f"{name} is required (CI or --require-servers): {exc}")
        pytest.skip(str(exc))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def redis_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    yield from _start(request, tmp_path_factory, redis_servers)


@pytest.fixture(scope="module")
def memcached_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    yield from _start(request, tmp_path_factory, memcached_servers)


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:12]}:"


def key(prefix: str, name: str = "sid") -> str:
    """A storage key as the layer above builds it."""
    return prefix + hashlib.sha256(name.encode()).hexdigest()


def close(cache: BaseCache) -> None:
    if isinstance(cache, RedisCache):
        cache._write_client.close()
    elif isinstance(cache, MemcachedCache):
        cache._client.close()


@pytest.fixture
def make(request: pytest.FixtureRequest, prefix: str) -> Iterator[Make]:
    """Build a configured backend from the URL of a kind of store, or
    around an existing cache."""
    caches: list[BaseCache] = []

    def make(kind: str, cache: BaseCache | None = None) -> CacheLibBackend:
        if cache is None:
            url = "simple://" if kind == "simple" else request.getfixturevalue(f"{kind}_server").url
            cache = cache_from_url(url)
            caches.append(cache)
        backend = CacheLibBackend(cache)
        backend.configure(prefix)
        return backend

    yield make
    for cache in caches:
        close(cache)


@pytest.fixture
def plain_redis(redis_server: Server) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


@pytest.fixture
def plain_memcached(memcached_server: Server) -> Iterator[MemcacheClient]:
    client = MemcacheClient(("127.0.0.1", memcached_server.port), default_noreply=False)
    yield client
    client.close()


class TestURL:
    def test_redis(self) -> None:
        cache = cache_from_url("redis://:s%40cret@127.0.0.1:6380/2")
        assert isinstance(cache, RedisCache)
        kwargs = cache._write_client.connection_pool.connection_kwargs
        assert (kwargs["host"], kwargs["port"], kwargs["db"]) == ("127.0.0.1", 6380, 2)
        assert kwargs["password"] == "s@cret"
        assert kwargs["socket_timeout"] == kwargs["socket_connect_timeout"] == 5
        close(cache)

    def test_rediss_defaults(self) -> None:
        cache = cache_from_url("rediss://cache.example")
        pool = cache._write_client.connection_pool  # type: ignore[attr-defined]
        assert pool.connection_class is redis.SSLConnection
        kwargs = pool.connection_kwargs
        assert (kwargs["host"], kwargs["port"], kwargs["db"]) == ("cache.example", 6379, 0)
        close(cache)

    def test_memcached(self) -> None:
        cache = cache_from_url("memcached://mc.example")
        assert isinstance(cache, MemcachedCache)
        client = cache._client
        assert isinstance(client, PooledClient)
        assert client.server == ("mc.example", 11211)
        assert client.timeout == client.connect_timeout == 5
        assert client.ignore_exc is False
        close(cache)

    def test_memcached_servers(self) -> None:
        cache = cache_from_url("memcached://10.0.0.1:11311,[::1]:11212,mc/")
        client = cache._client  # type: ignore[attr-defined]
        assert isinstance(client, HashClient)
        assert sorted(client.clients) == ["10.0.0.1:11311", "::1:11212", "mc:11211"]
        assert client.ignore_exc is False
        assert client.default_kwargs["timeout"] == client.default_kwargs["connect_timeout"] == 5
        close(cache)

    def test_simple_never_evicts(self) -> None:
        cache = cache_from_url("simple://")
        assert isinstance(cache, SimpleCache)
        assert cache._threshold > 10**9

    @pytest.mark.parametrize(
        "url",
        [
            "",
            "redis",
            "localhost:6379",
            "http://localhost",
            "redis://",
            "redis://localhost:port",
            "redis://localhost:99999",
            "redis://localhost/zero",
            "redis://localhost/0?ssl=1",
            "memcached://",
            "memcached://a:1,",
            "memcached://a:x",
            "memcached://user@a:1",
            "simple://elsewhere",
        ],
    )
    def test_bad(self, url: str) -> None:
        with pytest.raises(ValueError, match="SESSION_CACHELIB") as info:
            cache_from_url(url)
        assert repr(url) in str(info.value)
        assert "memcached://host:port" in str(info.value)

    def test_not_a_cache(self) -> None:
        with pytest.raises(TypeError, match="SESSION_CACHELIB"):
            CacheLibBackend("redis://localhost")  # type: ignore[arg-type]


@pytest.mark.parametrize(("kind", "wait"), [("simple", 1.1), ("redis", 0.1), ("memcached", 2.1)])
def test_store_drops_expired_records(make: Make, kind: str, wait: float, prefix: str) -> None:
    backend = make(kind)
    assert backend.native_expiry is (kind != "simple")
    backend.save(key(prefix), b"old", time.time() - 5)
    time.sleep(wait)
    assert backend.load(key(prefix)) is None


def test_redis_holds_header_and_payload_with_ttl(
    make: Make, plain_redis: redis.Redis, prefix: str
) -> None:
    backend = make("redis")
    expires = time.time() + 100
    backend.save(key(prefix), b"payload", expires)
    raw = plain_redis.get(key(prefix))
    assert raw == caches.HEADER.pack(caches.MARK, expires) + b"payload"
    assert not raw.startswith(b"\x80")
    assert 99_000 < plain_redis.pttl(key(prefix)) <= 100_000
    backend.touch(key(prefix), expires + 100)
    assert plain_redis.get(key(prefix)) == (
        caches.HEADER.pack(caches.MARK, expires + 100) + b"payload"
    )
    assert 199_000 < plain_redis.pttl(key(prefix)) <= 200_000


def test_memcached_holds_header_and_payload(
    make: Make, plain_memcached: MemcacheClient, prefix: str
) -> None:
    expires = time.time() + 100
    make("memcached").save(key(prefix), b"payload", expires)
    raw = plain_memcached.get(key(prefix))
    assert raw == caches.HEADER.pack(caches.MARK, expires) + b"payload"
    assert not raw.startswith(b"\x80")


class _Plant:
    """Unpickling it creates a file: proof that a pickle was executed."""

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[t.Any, ...]:
        return (pathlib.Path.touch, (self.path,))


def test_planted_pickle_in_redis_is_not_executed(
    make: Make,
    plain_redis: redis.Redis,
    prefix: str,
    tmp_path: pathlib.Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    backend = make("redis")
    marker = tmp_path / "executed"
    planted = pickle.dumps(_Plant(marker))
    # Raw, and in cachelib's own format ("!" + pickle), which RedisCache.get unpickles.
    plain_redis.set(key(prefix, "raw"), planted, ex=100)
    plain_redis.set(key(prefix, "cachelib"), b"!" + planted, ex=100)
    assert backend.load(key(prefix, "raw")) is None
    assert backend.load(key(prefix, "cachelib")) is None
    assert not marker.exists()
    assert "not a session record" in caplog.text


def test_planted_pickle_in_memcached_is_not_executed(
    make: Make, plain_memcached: MemcacheClient, prefix: str, tmp_path: pathlib.Path
) -> None:
    backend = make("memcached")
    marker = tmp_path / "executed"
    # Flag 1 is what pickling Memcached clients mark pickles with.
    plain_memcached.set(key(prefix), pickle.dumps(_Plant(marker)), 100, flags=1)
    assert backend.load(key(prefix)) is None
    assert not marker.exists()


@pytest.mark.parametrize("kind", KINDS)
def test_corrupt_values_are_missing_records(make: Make, kind: str, prefix: str) -> None:
    backend = make(kind)
    if kind == "simple":
        backend.cache.set(key(prefix, "a"), {"not": "bytes"})
        backend.cache.set(key(prefix, "b"), caches.MARK + b"\x00")
    elif kind == "redis":
        client = backend.cache._write_client  # type: ignore[attr-defined]
        client.set(key(prefix, "a"), b"garbage", ex=100)
        client.set(key(prefix, "b"), caches.MARK + b"\x00", ex=100)
    else:
        client = backend.cache._client  # type: ignore[attr-defined]
        client.set(key(prefix, "a"), b"garbage", 100)
        client.set(key(prefix, "b"), caches.MARK + b"\x00", 100)
    assert backend.load(key(prefix, "a")) is None
    assert backend.load(key(prefix, "b")) is None


def test_own_redis_client_prefix_and_other_keys(
    redis_server: Server, plain_redis: redis.Redis, prefix: str
) -> None:
    """A RedisCache around the user's client, with its own key prefix and
    other keys, works for both the user and the sessions."""
    cache = RedisCache(plain_redis, key_prefix="app:")
    backend = CacheLibBackend(cache)
    backend.configure(prefix)
    cache.set("other", {"x": [1, 2]}, timeout=100)
    backend.save(key(prefix), b"payload", time.time() + 100)
    assert plain_redis.exists("app:" + key(prefix))
    assert not plain_redis.exists(key(prefix))
    record = backend.load(key(prefix))
    assert record is not None
    assert record.data == b"payload"
    with backend.lock(key(prefix)):
        assert plain_redis.exists(f"app:{key(prefix)}:lock")
    assert backend.clear() == 1
    assert cache.get("other") == {"x": [1, 2]}
    cache.set("other", "changed")
    assert cache.get("other") == "changed"


def test_redis_count_and_clear_are_exact(make: Make, plain_redis: redis.Redis, prefix: str) -> None:
    backend = make("redis")
    neighbour = make("redis")
    neighbour.configure("neighbour" + prefix)
    now = time.time()
    for i in range(1200):
        backend.save(key(prefix, str(i)), b"x", now + 100)
    neighbour.save(key("neighbour" + prefix), b"x", now + 100)
    plain_redis.set(prefix + "flask-session-style-id", b"x")
    RedisCache(plain_redis).set("unrelated", 1)
    with backend.lock(key(prefix, "0")):
        assert backend.count(now) == 1200
    assert backend.clear() == 1200
    assert backend.count(now) == 0
    assert neighbour.count(now) == 1
    assert plain_redis.exists(prefix + "flask-session-style-id")
    assert RedisCache(plain_redis).get("unrelated") == 1


def test_simple_holds_many_sessions(make: Make, prefix: str) -> None:
    backend = make("simple")
    now = time.time()
    for i in range(2000):
        backend.save(key(prefix, str(i)), b"x", now + 100)
    assert backend.load(key(prefix, "0")) is not None
    assert backend.count(now) == 2000


def test_simple_count_clear_cleanup(make: Make, prefix: str) -> None:
    backend = make("simple")
    now = time.time()
    for i in range(5):
        backend.save(key(prefix, str(i)), b"x", now + 100)
    backend.save(key(prefix, "expired"), b"x", now - 1)
    backend.cache.set("other", 1)
    assert backend.count(now) == 5
    assert sum(backend.cleanup(now)) == 1
    assert backend.clear() == 5
    assert backend.count(now) == 0
    assert backend.cache.get("other") == 1


def test_memcached_cannot_count_or_clear(make: Make) -> None:
    backend = make("memcached")
    with pytest.raises(NotImplementedError, match="Memcached cannot list its keys"):
        backend.count(time.time())
    with pytest.raises(NotImplementedError, match="Memcached cannot list its keys"):
        backend.clear()
    assert list(backend.cleanup(time.time())) == []


def _count_up(url: str, prefix: str, k: str, barrier: t.Any) -> None:
    """Add one to the number stored under ``k``, 50 times, under the lock."""
    backend = CacheLibBackend(cache_from_url(url))
    backend.configure(prefix)
    barrier.wait(30)  # both processes count at the same time
    for _ in range(50):
        with backend.lock(k):
            record = backend.load(k)
            number = int(record.data) if record else 0
            time.sleep(0.001)  # widen the window in which an update gets lost
            backend.save(k, str(number + 1).encode(), time.time() + 100)
    close(backend.cache)


@pytest.mark.parametrize("kind", ["redis", "memcached"])
def test_lock_excludes_other_processes(
    request: pytest.FixtureRequest, make: Make, kind: str, prefix: str
) -> None:
    url = request.getfixturevalue(f"{kind}_server").url
    context = multiprocessing.get_context("spawn")
    args = (url, prefix, key(prefix), context.Barrier(2))
    workers = [context.Process(target=_count_up, args=args, daemon=True) for _ in "ab"]
    for worker in workers:
        worker.start()
    try:
        for worker in workers:
            worker.join(60)
            assert worker.exitcode == 0
    finally:
        for worker in workers:
            worker.kill()
    record = make(kind).load(key(prefix))
    assert record is not None
    assert record.data == b"100"


@pytest.mark.parametrize("kind", KINDS)
def test_lock_expires_and_only_its_owner_releases_it(make: Make, kind: str, prefix: str) -> None:
    crashing = make(kind)
    crashing.lock_ttl = 2
    waiting = make(kind, crashing.cache)
    waiting.lock_wait = 5
    other = make(kind, crashing.cache)
    other.lock_wait = 0.2
    k = key(prefix)

    lock = crashing.lock(k)
    lock.__enter__()  # and never released, as if its process had died
    with pytest.raises(TimeoutError, match="still held"):
        with other.lock(k):
            pass
    with waiting.lock(k):  # once the dead holder's lock expired
        # The late first holder's release leaves the new holder's lock alone.
        lock.__exit__(None, None, None)
        with pytest.raises(TimeoutError):
            with other.lock(k):
                pass
    with other.lock(k):
        pass


def test_redis_replace_run_late_writes_nothing(make: Make, prefix: str) -> None:
    """A replace carries a deadline of half the socket timeout: a server
    that froze and runs it after the request gave up leaves the record."""
    backend = make("redis")
    store = backend
    assert store._replace_window == cache_url.SOCKET_TIMEOUT / 2  # type: ignore[attr-defined]
    k = key(prefix)
    backend.save(k, b"old", time.time() + 60)
    store._replace_window = -1.0  # type: ignore[attr-defined]
    assert backend.replace(k, b"old", b"late", time.time() + 60) is False
    store._replace_window = 1.0  # type: ignore[attr-defined]
    assert backend.load(k).data == b"old"  # type: ignore[union-attr]
    assert backend.replace(k, b"old", b"new", time.time() + 60) is True


class _LockAfterCheck:
    """A pymemcache client that lets another backend take a lock right
    after this one checked that the lock was free."""

    def __init__(self, client: t.Any, take_lock: t.Callable[[], None]) -> None:
        self.client = client
        self.take_lock = take_lock

    def __getattr__(self, name: str) -> t.Any:
        return getattr(self.client, name)

    def get(self, name: str, *args: t.Any, **kwargs: t.Any) -> t.Any:
        result = self.client.get(name, *args, **kwargs)
        if name.endswith(":lock"):
            self.take_lock()
        return result

    def gets_many(self, names: list[str]) -> t.Any:
        result = self.client.gets_many(names)
        if any(name.endswith(":lock") for name in names):
            self.take_lock()
        return result


@pytest.mark.parametrize("client", ["pooled", "hash"])
def test_memcached_replace_fails_once_a_lock_is_taken(
    make: Make,
    prefix: str,
    monkeypatch: pytest.MonkeyPatch,
    memcached_server: Server,
    client: str,
    request: pytest.FixtureRequest,
) -> None:
    """A replace that found the lock free still fails if another request
    takes the lock before its ``cas``: taking the lock renews the record's
    cas unique, so the section's write can never be lost to it. (A client
    of several servers reads the record and the lock one by one.)"""
    holder = make("memcached")
    if client == "pooled":
        fast = make("memcached")
    else:
        hash_client = HashClient([("127.0.0.1", memcached_server.port)], default_noreply=False)
        request.addfinalizer(hash_client.close)
        fast = make("memcached", MemcachedCache(hash_client))
    k = key(prefix)
    fast.save(k, b"old", time.time() + 60)
    section = holder.lock(k)
    spy = _LockAfterCheck(fast.cache._client, section.__enter__)
    with monkeypatch.context() as patch:
        patch.setattr(fast, "_client", lambda: contextlib.nullcontext(spy))
        assert fast.replace(k, b"old", b"fast", time.time() + 60) is False
    holder.save(k, b"section", time.time() + 60)
    section.__exit__(None, None, None)
    record = fast.load(k)
    assert record is not None and record.data == b"section"
    assert fast.replace(k, b"section", b"fast", time.time() + 60) is True


def test_lock_with_a_noreply_pymemcache_client(memcached_server: Server, prefix: str) -> None:
    """pymemcache clients default to noreply, where every add "succeeds";
    the backend asks for replies."""
    clients = [MemcacheClient(("127.0.0.1", memcached_server.port)) for _ in "ab"]
    first, second = (CacheLibBackend(MemcachedCache(client)) for client in clients)
    second.lock_wait = 0.2
    try:
        with first.lock(key(prefix)):
            with pytest.raises(TimeoutError):
                with second.lock(key(prefix)):
                    pass
    finally:
        for client in clients:
            client.close()


def _unpickling_client(library: str, server: Server) -> t.Any:
    """A python-memcached or pylibmc client of ``server``."""
    module = pytest.importorskip(library)
    return module.Client([f"127.0.0.1:{server.port}"])


@pytest.mark.parametrize("library", ["memcache", "pylibmc"])
def test_unpickling_memcached_clients_are_refused_at_init_app(
    memcached_server: Server,
    plain_memcached: MemcacheClient,
    prefix: str,
    tmp_path: pathlib.Path,
    library: str,
) -> None:
    """python-memcached and pylibmc unpickle any value stored with the
    pickle flag; init_app refuses a MemcachedCache on them, and says what
    to use instead."""
    client = _unpickling_client(library, memcached_server)
    try:
        _check_refused(client, plain_memcached, prefix, tmp_path)
    finally:
        # Its socket would otherwise be closed by the garbage collector,
        # with a ResourceWarning in whichever test runs then.
        client.disconnect_all()


def _check_refused(
    client: t.Any, plain_memcached: MemcacheClient, prefix: str, tmp_path: pathlib.Path
) -> None:
    marker = tmp_path / "executed"
    # Why: anyone who can write to Memcached runs code in the app.
    plain_memcached.set(key(prefix, "probe"), pickle.dumps(_Plant(marker)), 100, flags=1)
    client.get(key(prefix, "probe"))
    assert marker.exists()
    marker.unlink()
    plain_memcached.set(key(prefix), pickle.dumps(_Plant(marker)), 100, flags=1)
    app = Flask(__name__)
    app.config.update(
        SESSION_BACKEND="cachelib",
        SESSION_CACHELIB=MemcachedCache(client),
        SESSION_KEY_PREFIX=prefix,
    )
    with pytest.raises(ValueError) as info:
        ServerSide(app)
    message = str(info.value)
    assert f"{type(client).__module__}.{type(client).__qualname__}" in message
    assert "unpickles" in message
    assert "memcached://host:port" in message
    assert "pymemcache" in message
    assert not marker.exists()


def test_memcached_cache_picking_its_own_client_is_refused(memcached_server: Server) -> None:
    """``MemcachedCache(["host:port"])`` picks pylibmc or python-memcached."""
    pytest.importorskip("memcache")
    cache = MemcachedCache([f"127.0.0.1:{memcached_server.port}"])
    with pytest.raises(ValueError, match="unpickles"):
        CacheLibBackend(cache)


class _OtherMemcacheClient:
    """Any client but pymemcache, python-memcached or pylibmc."""


def test_other_memcached_clients_are_refused() -> None:
    cache = cache_from_url("memcached://127.0.0.1:11211")
    CacheLibBackend(cache)
    with pytest.raises(ValueError, match=r"_OtherMemcacheClient.*memcached://host:port"):
        CacheLibBackend(MemcachedCache(_OtherMemcacheClient()))
    close(cache)


def test_memcached_key_length_is_checked() -> None:
    cache = cache_from_url("memcached://127.0.0.1:11211")
    cache.key_prefix = "x" * 100  # type: ignore[attr-defined]
    backend = CacheLibBackend(cache)
    backend.configure("p" * 80)
    with pytest.raises(ValueError, match="SESSION_KEY_PREFIX 'p+' makes Memcached keys 254"):
        backend.configure("p" * 85)
    close(cache)


@pytest.mark.parametrize("kind", ["redis", "memcached"])
def test_stopped_server_is_an_error_not_a_miss(
    request: pytest.FixtureRequest, make: Make, kind: str, prefix: str
) -> None:
    server: Server = request.getfixturevalue(f"{kind}_server")
    backend = make(kind)
    backend.save(key(prefix), b"before", time.time() + 100)
    server.stop()
    try:
        start = time.monotonic()
        for _ in range(3):  # not only the first call after the failure
            with pytest.raises(backend.unavailable_errors):
                backend.load(key(prefix))
        with pytest.raises(backend.unavailable_errors):
            backend.save(key(prefix), b"during", time.time() + 100)
        with pytest.raises(backend.unavailable_errors):
            with backend.lock(key(prefix)):
                pass
        assert time.monotonic() - start < 5
    finally:
        server.start_again()
    record = backend.load(key(prefix))
    if kind == "redis":  # Memcached keeps nothing across a restart.
        assert record is not None
        assert record.data == b"before"


def test_one_dead_memcached_server_among_several_is_an_error(
    memcached_server: Server, prefix: str
) -> None:
    """Keys of a dead server raise, every time; they do not move elsewhere."""
    dead = free_port()
    backend = CacheLibBackend(cache_from_url(f"{memcached_server.url},127.0.0.1:{dead}"))
    backend.configure(prefix)
    failing = 0
    try:
        for i in range(20):
            try:
                backend.save(key(prefix, str(i)), b"x", time.time() + 100)
            except backend.unavailable_errors:
                failing += 1
                for _ in range(3):
                    with pytest.raises(backend.unavailable_errors):
                        backend.load(key(prefix, str(i)))
            else:
                assert backend.load(key(prefix, str(i))) is not None
    finally:
        close(backend.cache)
    assert 0 < failing < 20


@pytest.mark.parametrize("kind", ["redis", "memcached"])
def test_frozen_server_times_out(
    request: pytest.FixtureRequest,
    make: Make,
    kind: str,
    prefix: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server: Server = request.getfixturevalue(f"{kind}_server")
    monkeypatch.setattr(cache_url, "SOCKET_TIMEOUT", 0.3)
    backend = make(kind)
    backend.save(key(prefix), b"x", time.time() + 100)
    server.pause()
    try:
        start = time.monotonic()
        with pytest.raises(backend.unavailable_errors):
            backend.load(key(prefix))
        assert time.monotonic() - start < 3
    finally:
        server.resume()
    record = backend.load(key(prefix))
    assert record is not None
    assert record.data == b"x"
