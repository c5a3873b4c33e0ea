"""Redis Cluster and Redis Sentinel: the ``redis+cluster://`` and
``redis+sentinel://`` URLs, hash slots on a cluster, listing every primary,
and every shared contract class on both deployments (real servers, see
``tests/servers/redis_cluster.py`` and ``redis_sentinel.py``).

These store names are not in ``conftest.BACKENDS``, so the other tests do
not run twice more; ``conftest.REDIS_DEPLOYMENTS`` names their servers.
"""

from __future__ import annotations

import copy
import time
import typing as t
import uuid

import pytest
import redis
from cachelib import RedisCache
from flask import Flask
from redis.cluster import RedisCluster
from redis.sentinel import SentinelConnectionPool

from flask_serverside import cache_url
from flask_serverside import ids
from flask_serverside.backends.caches import LOCK_SUFFIX
from flask_serverside.backends.redis import LazyCluster
from flask_serverside.backends.redis import RedisBackend
from flask_serverside.cache_url import cache_from_url
from tests import test_backends as seam
from tests import test_contract as contract
from tests.conftest import build_app
from tests.conftest import REDIS_DEPLOYMENTS
from tests.servers import find_binary
from tests.servers import redis_cluster as cluster_setup
from tests.servers.redis_cluster import RedisCluster as ClusterSetup
from tests.servers.redis_sentinel import RedisSentinel
from tests.test_contract import client  # noqa: F401 (fixtures of the classes)
from tests.test_contract import recorded  # noqa: F401
from tests.test_contract import start_session


@pytest.fixture(params=list(REDIS_DEPLOYMENTS))
def backend_name(request: pytest.FixtureRequest) -> str:
    return t.cast(str, request.param)


class TestContractRedisHA(contract.TestContract):
    pass


class TestConcurrencyRedisHA(contract.TestConcurrency):
    pass


class TestSeamRedisHA(seam.TestSeam):
    pass


# The URLs.


@pytest.mark.parametrize(
    "url",
    [
        "redis+cluster://",
        "redis+cluster://127.0.0.1:7000/0",
        "redis+cluster://127.0.0.1:7000,",
        "redis+cluster://127.0.0.1:99999",
        "redis+cluster://127.0.0.1:7000?x=1",
        "redis+sentinel://127.0.0.1:26379",
        "redis+sentinel://127.0.0.1:26379/",
        "redis+sentinel://127.0.0.1:26379/mymaster/x",
        "redis+sentinel://127.0.0.1:26379/mymaster/0/1",
        "redis+sentinel://:x@/mymaster",
        "redis+sentinel://127.0.0.1:port/mymaster",
    ],
)
def test_bad_url(url: str) -> None:
    with pytest.raises(ValueError, match="SESSION_CACHELIB") as info:
        cache_from_url(url)
    message = str(info.value)
    assert repr(url) in message
    assert "redis+cluster://host:port[,host:port...]" in message
    assert "redis+sentinel://host:port[,host:port...]/SERVICE[/db]" in message


def test_cluster_url(redis_cluster_server: ClusterSetup) -> None:
    """A RedisCache around a RedisCluster, seeded with every host, with the
    socket timeouts and the one retry of a ``redis://`` client, built by
    its first command."""
    cache = cache_from_url(redis_cluster_server.url)
    assert isinstance(cache, RedisCache)
    lazy = cache._write_client  # type: ignore[attr-defined]
    assert isinstance(lazy, LazyCluster)
    assert lazy._client is None
    assert lazy.startup_nodes == redis_cluster_server.url.removeprefix("redis+cluster://").split(",")
    cluster = lazy.built()
    assert isinstance(cluster, RedisCluster)
    assert cluster.retry.get_retries() == 1
    node = cluster.get_primaries()[0]
    options = node.redis_connection.connection_pool.connection_kwargs
    assert options["socket_timeout"] == cache_url.SOCKET_TIMEOUT
    assert options["socket_connect_timeout"] == cache_url.SOCKET_TIMEOUT
    assert options["password"] is None
    assert cache.set("k", "v") and cache.get("k") == "v"
    cluster.close()


def test_sentinel_url_password() -> None:
    """A password (and user name) in the URL is the Redis servers' one;
    building the client contacts no sentinel."""
    cache = cache_from_url("redis+sentinel://me:s%40cret@127.0.0.1:1,127.0.0.1:2/svc")
    pool = cache._write_client.connection_pool  # type: ignore[attr-defined]
    assert pool.connection_kwargs["password"] == "s@cret"
    assert pool.connection_kwargs["username"] == "me"
    assert pool.connection_kwargs["db"] == 0


def test_sentinel_url(redis_sentinel_server: RedisSentinel) -> None:
    """The primary the sentinels name, as a ``redis://`` client would reach it."""
    cache = cache_from_url(redis_sentinel_server.url.removesuffix("/0") + "/3")
    primary_client = cache._write_client  # type: ignore[attr-defined]
    pool = primary_client.connection_pool
    assert isinstance(pool, SentinelConnectionPool)
    assert pool.service_name == redis_sentinel_server.service
    assert pool.connection_kwargs["db"] == 3
    assert pool.connection_kwargs["socket_timeout"] == cache_url.SOCKET_TIMEOUT
    assert pool.connection_kwargs["socket_connect_timeout"] == cache_url.SOCKET_TIMEOUT
    assert pool.connection_kwargs["retry"].get_retries() == 1
    key = f"k{uuid.uuid4().hex}"
    assert cache.set(key, "v")
    with redis.Redis(port=redis_sentinel_server.primary().port, db=3) as primary:
        assert primary.exists(key)
    backend = RedisBackend(cache)
    assert backend.describe() == f"redis sentinel {redis_sentinel_server.service}"
    primary_client.close()


# Hash slots and listing on a cluster.


@pytest.fixture
def cluster_app(
    redis_cluster_server: ClusterSetup, tmp_path: t.Any, request: pytest.FixtureRequest
) -> Flask:
    config = {
        "SESSION_BACKEND": "cachelib",
        "SESSION_CACHELIB": redis_cluster_server.url,
        "SESSION_KEY_PREFIX": f"t{uuid.uuid4().hex[:12]}:",
    }
    return build_app(tmp_path, config, count=False)


def _names(setup: ClusterSetup, prefix: str) -> list[bytes]:
    names: list[bytes] = []
    for node in setup.primaries():
        with node.client() as node_client:
            names += node_client.scan_iter(match=prefix + "*")
    return names


def test_cluster_record_and_lock_share_a_slot(
    cluster_app: Flask, redis_cluster_server: ClusterSetup
) -> None:
    """The digest is the hash tag: a record, its lock, and any key derived
    from the storage key (a user's index too) live in one slot, so the
    one-step replace runs as one script on the cluster."""
    backend: RedisBackend = cluster_app.session_interface.store.backend  # type: ignore[attr-defined]
    prefix = cluster_app.config["SESSION_KEY_PREFIX"]
    key = prefix + ids.storage_key("", ids.generate(32))
    index = prefix + "user:" + "ab" * 32
    backend.save(key, b"data", time.time() + 60)
    backend.save(index, b"index", time.time() + 60)
    with backend.lock(key), backend.lock(index):
        names = sorted(_names(redis_cluster_server, prefix))
        digest = key.removeprefix(prefix)
        assert names == sorted(
            n.encode()
            for n in [
                f"{prefix}{{{digest}}}",
                f"{prefix}{{{digest}}}{LOCK_SUFFIX}",
                f"{prefix}user:{{{'ab' * 32}}}",
                f"{prefix}user:{{{'ab' * 32}}}{LOCK_SUFFIX}",
            ]
        )
        slots = {name: redis_cluster_server.key_slot(name) for name in names}
        assert slots[names[0]] == slots[names[1]]
    assert backend.load(key) == (b"data", pytest.approx(time.time() + 60, abs=1))
    assert backend.replace(key, b"data", b"new", time.time() + 60) is True
    assert backend.load(key).data == b"new"  # type: ignore[union-attr]


def test_cluster_operations_cover_every_primary(
    cluster_app: Flask, redis_cluster_server: ClusterSetup
) -> None:
    """``count`` and ``clear`` list every primary, and delete slot by slot
    (one ``DEL`` on keys of several slots would fail with CROSSSLOT)."""
    sids = [start_session(cluster_app.test_client(), n=str(n)) for n in range(40)]
    store = cluster_app.session_interface.store  # type: ignore[attr-defined]
    names = [store.backend._name(store.key(sid)) for sid in sids]
    owners = {redis_cluster_server.primary_for_key(name).port for name in names}
    assert len(owners) == 3  # 40 random digests land on every primary
    # A user's index goes with the sessions, but is not counted; other keys
    # under the prefix are not ours.
    backend: RedisBackend = store.backend
    backend.save(store.prefix + "user:" + "cd" * 32, b"index", time.time() + 60)
    backend.save(store.prefix + "other:" + "cd" * 32, b"other", time.time() + 60)
    ext = cluster_app.extensions["serverside"]
    with cluster_app.app_context():
        assert ext.count() == 40
        assert ext.cleanup() == 0
        assert ext.clear() == 40
        assert ext.count() == 0
        assert ext.get(sids[0]) is None
    assert len(_names(redis_cluster_server, store.prefix)) == 1


def test_plain_redis_keeps_its_names(redis_server: t.Any, tmp_path: t.Any) -> None:
    """Without a cluster, names stay as they were: no hash tag, so records
    stored by an earlier version are found."""
    config = {
        "SESSION_BACKEND": "cachelib",
        "SESSION_CACHELIB": redis_server.url,
        "SESSION_KEY_PREFIX": f"t{uuid.uuid4().hex[:12]}:",
    }
    app = build_app(tmp_path, config, count=False)
    sid = start_session(app.test_client(), a="1")
    store = app.session_interface.store  # type: ignore[attr-defined]
    with redis.Redis.from_url(redis_server.url) as plain:
        assert plain.exists(store.key(sid)) == 1


def test_app_starts_while_the_cluster_is_down(
    redis_cluster_server: ClusterSetup, tmp_path: t.Any
) -> None:
    """``init_app`` needs no running store, on a cluster too: redis-py's
    cluster client asks for the slot map when it is built, so the client is
    built by the first command. Until a node answers, requests get 503 with
    ``Retry-After`` (not a 500, not a crash at start-up); then they work
    without a restart. (``redis_cluster_server`` only says redis-server is
    installed: this test runs its own one-node cluster.)"""
    port = cluster_setup.cluster_ports(1)[0]
    url = f"redis+cluster://127.0.0.1:{port}"
    config = {"SESSION_BACKEND": "cachelib", "SESSION_CACHELIB": url}
    app = build_app(tmp_path, config, count=False)
    browser = app.test_client()
    for _ in range(2):  # a failed build is tried again by the next request
        response = browser.get("/set/a/1")
        assert response.status_code == 503
        assert response.headers["Retry-After"] == "5"
    binary = find_binary("redis-server", "/usr/sbin", "/usr/local/bin")
    node = cluster_setup.ClusterNode(cluster_setup.launch_node(binary, tmp_path / "node", port))
    try:
        with node.client() as plain:
            plain.execute_command("CLUSTER ADDSLOTSRANGE", 0, 16383)
        deadline = time.monotonic() + cluster_setup.TIMEOUT
        while node.info("CLUSTER INFO").get("cluster_state") != "ok":
            assert time.monotonic() < deadline, "the one-node cluster is not ok"
            time.sleep(0.05)
        assert browser.get("/set/a/1").status_code == 200
        assert browser.get("/get/a").json == "1"
        with app.app_context():
            assert app.extensions["serverside"].count() == 1
    finally:
        node.server.stop()


def test_lazy_cluster_private_names_never_connect() -> None:
    """Asking the stand-in for a private or special name (as ``copy`` does
    before ``__init__`` has run) answers AttributeError: it neither
    recurses nor tries to reach the cluster."""
    lazy = cache_from_url("redis+cluster://127.0.0.1:1")._write_client  # type: ignore[attr-defined]
    twin = copy.copy(lazy)
    assert twin.startup_nodes == ["127.0.0.1:1"]
    with pytest.raises(AttributeError):
        lazy._private  # noqa: B018
    assert lazy._client is None
