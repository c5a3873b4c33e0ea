"""The ``SESSION_CACHELIB`` URL of the config layer, turned into the cache
it describes."""

from __future__ import annotations

import importlib
import re
import sys
import typing as t
import weakref
from urllib.parse import unquote
from urllib.parse import urlsplit

from cachelib import BaseCache
from cachelib import MemcachedCache
from cachelib import RedisCache
from cachelib import SimpleCache

from .backends.base import import_optional
from .backends.redis import LazyCluster

#: Socket timeout, in seconds, of the clients :func:`cache_from_url` builds.
SOCKET_TIMEOUT = 5.0

_URL_FORMS = (
    "redis://[:password@]host[:port][/db], rediss://[:password@]host[:port][/db],"
    " redis+cluster://host:port[,host:port...],"
    " redis+sentinel://host:port[,host:port...]/SERVICE[/db] (a password of the"
    " Redis servers goes before the first host, as in redis://),"
    " memcached://host:port[,host:port...] or simple://"
)
#: Default ports of the hosts of each distributed scheme.
_DEFAULT_PORTS = {"redis+cluster": 6379, "redis+sentinel": 26379}


def cache_from_url(url: str) -> BaseCache:
    """Build the cache that a ``SESSION_CACHELIB`` URL describes.

    ``redis://[:password@]host[:port][/db]`` (``rediss://`` for TLS) gives a
    :class:`~cachelib.RedisCache`;
    ``redis+cluster://[:password@]host:port[,host:port...]`` one around a
    :class:`redis.cluster.RedisCluster` that starts from those nodes;
    ``redis+sentinel://[:password@]host:port[,host:port...]/SERVICE[/db]``
    one around the primary that the Redis Sentinels at those addresses name
    for ``SERVICE`` (:meth:`redis.sentinel.Sentinel.master_for`).
    ``memcached://host:port[,host:port...]`` a
    :class:`~cachelib.MemcachedCache` on pymemcache, ``simple://`` a
    :class:`~cachelib.SimpleCache` that never evicts live sessions. Network
    clients time out after :data:`SOCKET_TIMEOUT` seconds and report a server
    that is down instead of answering "missing".

    :param url: The URL.
    :raises ValueError: The URL is not one of the forms above.

    .. versionadded:: 0.1

    .. versionchanged:: 0.2
        ``redis+cluster://`` and ``redis+sentinel://``.
    """
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if sep and scheme in ("redis", "rediss"):
        return _redis_cache(url)
    if sep and scheme == "redis+cluster":
        return _cluster_cache(url, rest)
    if sep and scheme == "redis+sentinel":
        return _sentinel_cache(url, rest)
    if sep and scheme == "memcached":
        return _memcached_cache(url, rest)
    if sep and scheme == "simple" and not rest:
        return SimpleCache(threshold=sys.maxsize)
    raise _bad_url(url, "its scheme is not supported")


def _bad_url(url: str, reason: str) -> ValueError:
    return ValueError(
        f"SESSION_CACHELIB {url!r} is not a valid cache URL: {reason}. Use"
        f" {_URL_FORMS}, or pass a cachelib.BaseCache instance."
    )


def _redis_cache(url: str) -> RedisCache:
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError as exc:
        raise _bad_url(url, "its port is not a number from 1 to 65535") from exc
    db = re.fullmatch(r"(?:/(\d*))?", parts.path)
    if not parts.hostname or db is None or parts.query or parts.fragment:
        raise _bad_url(url, "it needs a host, and nothing after the db number")
    redis = _import("redis", url)
    client = redis.Redis(
        host=parts.hostname,
        port=port or 6379,
        db=int(db.group(1) or 0),
        ssl=parts.scheme == "rediss",
        # One retry reconnects a pooled connection that a restart closed;
        # more would only multiply the wait while the server hangs.
        retry=_one_retry(redis),
        **_redis_options(parts.username, parts.password),
    )
    return RedisCache(client)


def _redis_options(username: str | None, password: str | None) -> dict[str, t.Any]:
    """The options of every client of a Redis server, as for ``redis://``."""
    return {
        "username": unquote(username) if username else None,
        "password": unquote(password) if password else None,
        "socket_timeout": SOCKET_TIMEOUT,
        "socket_connect_timeout": SOCKET_TIMEOUT,
    }


def _one_retry(redis: t.Any) -> t.Any:
    """One immediate retry, as the ``redis://`` client makes."""
    return redis.retry.Retry(redis.backoff.NoBackoff(), 1)


def _hosts(url: str, scheme: str, netloc: str) -> tuple[list[tuple[str, int]], dict[str, str]]:
    """The ``host:port`` pairs of a distributed URL, and its credentials."""
    userinfo, _, hosts = netloc.rpartition("@")
    username, _, password = userinfo.partition(":")
    pairs = []
    for item in hosts.split(","):
        parts = urlsplit(f"//{item}")
        try:
            port = parts.port
        except ValueError as exc:
            raise _bad_url(url, f"the port of {item!r} is not a number from 1 to 65535") from exc
        if not parts.hostname or parts.username or parts.password:
            raise _bad_url(url, f"{item!r} is not a host:port pair")
        pairs.append((parts.hostname, port or _DEFAULT_PORTS[scheme]))
    return pairs, {"username": username, "password": password}


def _cluster_cache(url: str, rest: str) -> RedisCache:
    netloc, slash, path = rest.partition("/")
    if path or slash or "?" in netloc or "#" in netloc:
        raise _bad_url(url, "a cluster has no db number, nothing may follow its hosts")
    hosts, credentials = _hosts(url, "redis+cluster", netloc)
    redis = _import("redis", url)
    cluster = importlib.import_module("redis.cluster")
    options = _redis_options(**credentials)

    def build() -> t.Any:
        return cluster.RedisCluster(
            startup_nodes=[cluster.ClusterNode(host, port) for host, port in hosts],
            retry=_one_retry(redis),
            **options,
        )

    # Built by its first command: init_app needs no running store.
    nodes = [f"{host}:{port}" for host, port in hosts]
    return RedisCache(LazyCluster(build, nodes, options))


def _sentinel_cache(url: str, rest: str) -> RedisCache:
    match = re.fullmatch(r"([^/?#]*)/([^/?#]+)(?:/(\d+))?", rest)
    if match is None:
        raise _bad_url(url, "it needs the sentinels' host:port pairs, /SERVICE, and maybe /db")
    hosts, credentials = _hosts(url, "redis+sentinel", match.group(1))
    redis = _import("redis", url)
    sentinel = importlib.import_module("redis.sentinel")
    timeouts = {"socket_timeout": SOCKET_TIMEOUT, "socket_connect_timeout": SOCKET_TIMEOUT}
    sentinels = sentinel.Sentinel(hosts, sentinel_kwargs=timeouts)
    client = sentinels.master_for(
        unquote(match.group(2)),
        db=int(match.group(3) or 0),
        retry=_one_retry(redis),
        **_redis_options(**credentials),
    )
    return RedisCache(client)


def _memcached_cache(url: str, rest: str) -> MemcachedCache:
    servers = []
    for item in rest.rstrip("/").split(","):
        parts = urlsplit(f"//{item}")
        try:
            port = parts.port
        except ValueError as exc:
            raise _bad_url(url, f"the port of {item!r} is not a number") from exc
        if not parts.hostname or parts.username or parts.path or parts.query:
            raise _bad_url(url, f"{item!r} is not a host:port pair")
        servers.append((parts.hostname, port or 11211))
    pymemcache = _import("pymemcache", url)
    # Errors raise (ignore_exc=False); every command waits for its reply.
    options = {
        "connect_timeout": SOCKET_TIMEOUT,
        "timeout": SOCKET_TIMEOUT,
        "ignore_exc": False,
        "default_noreply": False,
    }
    if len(servers) == 1:
        client = pymemcache.PooledClient(servers[0], **options)
    else:
        # A server that failed is tried again on every call and raises while
        # it is down; HashClient's defaults would answer "missing" between
        # retries, then move the server's keys to the others.
        client = pymemcache.HashClient(
            servers, use_pooling=True, retry_attempts=sys.maxsize, retry_timeout=0, **options
        )
    cache = MemcachedCache(client)
    # Nobody else holds this client: close its sockets with the cache, as
    # redis-py does for its own, instead of leaving them to the collector.
    weakref.finalize(cache, client.close)
    return cache


def _import(module: str, url: str) -> t.Any:
    return import_optional(module, f"SESSION_CACHELIB {url!r}", module)
