"""The ``SESSION_CACHELIB`` URL of the config layer, turned into the cache
it describes."""

from __future__ import annotations

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

#: Socket timeout, in seconds, of the clients :func:`cache_from_url` builds.
SOCKET_TIMEOUT = 5.0

_URL_FORMS = (
    "redis://[:password@]host[:port][/db], rediss://[:password@]host[:port][/db],"
    " memcached://host:port[,host:port...] or simple://"
)


def cache_from_url(url: str) -> BaseCache:
    """Build the cache that a ``SESSION_CACHELIB`` URL describes.

    ``redis://[:password@]host[:port][/db]`` (``rediss://`` for TLS) gives a
    :class:`~cachelib.RedisCache`, ``memcached://host:port[,host:port...]`` a
    :class:`~cachelib.MemcachedCache` on pymemcache, ``simple://`` a
    :class:`~cachelib.SimpleCache` that never evicts live sessions. Network
    clients time out after :data:`SOCKET_TIMEOUT` seconds and report a server
    that is down instead of answering "missing".

    :param url: The URL.
    :raises ValueError: The URL is not one of the forms above.

    .. versionadded:: 0.1
    """
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if sep and scheme in ("redis", "rediss"):
        return _redis_cache(url)
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
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        ssl=parts.scheme == "rediss",
        socket_timeout=SOCKET_TIMEOUT,
        socket_connect_timeout=SOCKET_TIMEOUT,
        # One retry reconnects a pooled connection that a restart closed;
        # more would only multiply the wait while the server hangs.
        retry=redis.retry.Retry(redis.backoff.NoBackoff(), 1),
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
