"""Sessions in a cachelib cache: Redis, Memcached or an in-process cache.

Nothing here is ever pickled. cachelib's own serializers pickle every value,
so for Redis and Memcached this module talks to the cache's underlying client
with raw bytes, under the same keys (cachelib's ``key_prefix`` included). The
user's other keys in the same cache keep working through cachelib as before.
Other caches (:class:`~cachelib.SimpleCache`, :class:`~cachelib.FileSystemCache`,
subclasses) are used through the :class:`~cachelib.BaseCache` API; they keep
their values in the process or on the local disk, where nobody but the
application can plant one.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import math
import re
import secrets
import struct
import sys
import threading
import time
import typing as t
import weakref
from abc import ABC
from abc import abstractmethod
from contextlib import contextmanager
from contextlib import nullcontext
from urllib.parse import unquote
from urllib.parse import urlsplit

from cachelib import BaseCache
from cachelib import MemcachedCache
from cachelib import RedisCache
from cachelib import SimpleCache

from .base import Backend
from .base import Record

__all__ = ["CacheLibBackend", "cache_from_url"]

log = logging.getLogger(__name__)

#: Socket timeout, in seconds, of the clients :func:`cache_from_url` builds.
SOCKET_TIMEOUT = 5.0

#: Starts every value, followed by the expiry as a big-endian double, then
#: the payload. Native TTLs outlive the expiry a little (see _ttl_seconds).
_MARK = b"fss\x02"
_HEADER = struct.Struct(">4sd")

_LOCK_SUFFIX = ":lock"
#: What follows the prefix in a session key: the hex SHA-256 of the ID.
_SESSION_TAIL = re.compile(rb"[0-9a-f]{64}")
#: Memcached's key length limit, and its cut-over from relative TTLs to dates.
_MEMCACHED_MAX_KEY = 250
_MEMCACHED_MAX_TTL = 30 * 24 * 3600

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
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        package = module.partition(".")[0]
        raise ImportError(
            f"SESSION_CACHELIB {url!r} needs the {package!r} package; install it"
            f" with 'pip install {package}'."
        ) from exc


def _pack(data: bytes, expires: float) -> bytes:
    return _HEADER.pack(_MARK, expires) + data


def _unpack(value: object, key: str) -> Record | None:
    if value is None:
        return None
    if not isinstance(value, bytes) or not value.startswith(_MARK):
        log.warning("Ignoring the value stored under %r: not a session record.", key)
        return None
    try:
        _, expires = _HEADER.unpack_from(value)
    except struct.error:
        log.warning("Ignoring the value stored under %r: it is truncated.", key)
        return None
    return Record(value[_HEADER.size :], expires)


def _ttl_seconds(expires: float) -> int:
    """A native TTL in whole seconds that outlives ``expires``.

    Stores that count in whole seconds may drop a key up to a second early,
    hence one second more; the exact expiry is kept in the value's header.
    """
    return max(1, math.ceil(expires - time.time()) + 1)


def _glob_escape(text: bytes) -> bytes:
    return re.sub(rb"([*?\[\]\\])", rb"\\\1", text)


class _Store(ABC):
    """The operations a kind of cache offers the backend."""

    errors: tuple[type[BaseException], ...] = (OSError,)
    unlisted = "{} cannot list its keys, so {}() is not available."

    def __init__(self, cache: BaseCache) -> None:
        self.cache = cache

    def describe(self) -> str:
        """The cache's class name; network stores add their server."""
        return type(self.cache).__name__

    @abstractmethod
    def load(self, key: str) -> Record | None:
        """The record under ``key``, or ``None`` if missing or not a record."""

    @abstractmethod
    def save(self, key: str, data: bytes, expires: float) -> None:
        """Replace the record under ``key``."""

    def replace(self, key: str, expected: bytes, data: bytes, expires: float) -> bool:
        """:meth:`.Backend.replace`; caches without an atomic compare-and-set
        decline."""
        return False

    @abstractmethod
    def touch(self, key: str, expires: float) -> bool:
        """:meth:`.Backend.touch`: extend a live record, say whether there
        was one."""

    @abstractmethod
    def delete(self, key: str) -> bool:
        """Remove the record; return whether there was one."""

    @abstractmethod
    def acquire(self, lock_key: str, token: str, ttl: float) -> bool:
        """Create ``lock_key`` holding ``token`` unless it exists."""

    @abstractmethod
    def release(self, lock_key: str, token: str) -> None:
        """Remove ``lock_key`` if it still holds ``token``."""

    def count(self, prefix: str, now: float) -> int:
        raise NotImplementedError(self.unlisted.format(type(self.cache).__name__, "count"))

    def clear(self, prefix: str) -> int:
        raise NotImplementedError(self.unlisted.format(type(self.cache).__name__, "clear"))

    def cleanup(self, prefix: str, now: float) -> t.Iterator[int]:
        return iter(())


class _RedisStore(_Store):
    """Raw bytes through the cache's client, with the expiry in the value
    and as the key's TTL.

    A load is one ``GET``. A touch rewrites the header and the TTL in one
    script, which never creates a record; the scripts compare payloads
    only, so a touch does not make an overlapping write take the lock.
    Both scripts also check the expiry in the header against the server's
    clock: the TTL, counted from when the record arrived, may outlive it by
    a few milliseconds.
    """

    #: Lua: whether the record ``value`` has expired by the server's clock.
    _EXPIRED = (
        " local function expired(value)"
        " local now = redis.call('time')"
        " local ms = now[1] * 1000 + math.floor(now[2] / 1000)"
        f" return struct.unpack('>d', value, {len(_MARK) + 1}) * 1000 <= ms end"
    )

    _TOUCH = (
        _EXPIRED + " local value = redis.call('get', KEYS[1])"
        f" if not value or string.sub(value, 1, {len(_MARK)}) ~= ARGV[3] then return 0 end"
        " if expired(value) then return 0 end"
        f" redis.call('set', KEYS[1], ARGV[1] .. string.sub(value, {_HEADER.size + 1}),"
        " 'PX', ARGV[2]) return 1"
    )

    _RELEASE = (
        "if redis.call('get', KEYS[1]) == ARGV[1] then"
        " return redis.call('del', KEYS[1]) end return 0"
    )

    #: Writes ARGV[2] with a TTL of ARGV[3] ms if the SHA-1 of the record's
    #: payload is still ARGV[1], the record has not expired, nobody holds the
    #: lock key, and the server's clock has not passed ARGV[4] (Unix ms).
    _REPLACE = (
        _EXPIRED + " local now = redis.call('time')"
        " if now[1] * 1000 + math.floor(now[2] / 1000) > tonumber(ARGV[4]) then return 0 end"
        " if redis.call('exists', KEYS[2]) == 1 then return 0 end"
        " local value = redis.call('get', KEYS[1])"
        " if not value or redis.sha1hex(string.sub(value, "
        f"{_HEADER.size + 1})) ~= ARGV[1] then return 0 end"
        " if expired(value) then return 0 end"
        " redis.call('set', KEYS[1], ARGV[2], 'PX', ARGV[3]) return 1"
    )

    def __init__(self, cache: BaseCache, client: t.Any) -> None:
        super().__init__(cache)
        self.client = client
        self.errors = _redis_errors()
        self._release = client.register_script(self._RELEASE)
        self._touch = client.register_script(self._TOUCH)
        # A cluster would refuse a script on two keys in different slots.
        self._replace = None if _is_cluster(client) else client.register_script(self._REPLACE)
        pool = getattr(client, "connection_pool", None)
        timeout = getattr(pool, "connection_kwargs", {}).get("socket_timeout")
        #: How long after it is sent a replace may still run: half the
        #: socket timeout, so that a script a frozen server runs once it
        #: wakes up, after the request gave up on it (and answered 503),
        #: writes nothing.
        self._replace_window = timeout / 2 if timeout else math.inf

    def describe(self) -> str:
        pool = getattr(self.client, "connection_pool", None)
        options = getattr(pool, "connection_kwargs", {})
        if "host" in options:
            return f"redis {options['host']}:{options.get('port', 6379)}"
        if "path" in options:
            return f"redis {options['path']}"
        return "redis"

    def prefix(self) -> str:
        """cachelib's ``key_prefix``: a string, or a function returning one."""
        prefix = getattr(self.cache, "key_prefix", None)
        return (prefix() if callable(prefix) else prefix) or ""

    def load(self, key: str) -> Record | None:
        name = self.prefix() + key
        return _unpack(self.client.get(name), name)

    def save(self, key: str, data: bytes, expires: float) -> None:
        self.client.set(self.prefix() + key, _pack(data, expires), px=_ttl_ms(expires))

    def replace(self, key: str, expected: bytes, data: bytes, expires: float) -> bool:
        if self._replace is None:
            return False
        name = self.prefix() + key
        keys = [name, name + _LOCK_SUFFIX]
        deadline = int(min((time.time() + self._replace_window) * 1000, 2**53))
        digest = hashlib.sha1(expected).hexdigest()
        args = [digest, _pack(data, expires), _ttl_ms(expires), deadline]
        return bool(self._replace(keys=keys, args=args))

    def touch(self, key: str, expires: float) -> bool:
        # The key's TTL (in milliseconds) is its expiry: an expired record
        # is gone, and the script never creates one.
        header = _HEADER.pack(_MARK, expires)
        args = [header, _ttl_ms(expires), _MARK]
        return bool(self._touch(keys=[self.prefix() + key], args=args))

    def delete(self, key: str) -> bool:
        return bool(self.client.delete(self.prefix() + key))

    def acquire(self, lock_key: str, token: str, ttl: float) -> bool:
        name = self.prefix() + lock_key
        return bool(self.client.set(name, token, nx=True, px=math.ceil(ttl * 1000)))

    def release(self, lock_key: str, token: str) -> None:
        self._release(keys=[self.prefix() + lock_key], args=[token])

    def _names(self, prefix: str) -> t.Iterator[bytes]:
        start = (self.prefix() + prefix).encode()
        match = _glob_escape(start) + b"*"
        for name in self.client.scan_iter(match=match, count=1000):
            name = name.encode() if isinstance(name, str) else name
            if _SESSION_TAIL.fullmatch(name, len(start)):
                yield name

    def count(self, prefix: str, now: float) -> int:
        return sum(1 for _ in self._names(prefix))

    def clear(self, prefix: str) -> int:
        removed = 0
        batch: list[bytes] = []
        for name in self._names(prefix):
            batch.append(name)
            if len(batch) == 500:
                removed += self.client.delete(*batch)
                batch.clear()
        if batch:
            removed += self.client.delete(*batch)
        return removed


def _ttl_ms(expires: float) -> int:
    return max(1, math.ceil((expires - time.time()) * 1000))


def _is_cluster(client: t.Any) -> bool:
    return any(cls.__name__ in ("RedisCluster", "ValkeyCluster") for cls in type(client).__mro__)


def _redis_errors() -> tuple[type[BaseException], ...]:
    """Connection errors of redis-py and of its fork valkey-py, if installed."""
    errors: list[type[BaseException]] = [OSError]
    for package in ("redis", "valkey"):
        try:
            exceptions = importlib.import_module(f"{package}.exceptions")
        except ImportError:
            continue
        errors += [exceptions.ConnectionError, exceptions.TimeoutError]
    return tuple(errors)


class _MemcachedStore(_Store):
    """Raw bytes through the cache's pymemcache client.

    Memcached cannot report a key's TTL, so the value carries the expiry in
    its header, and a touch rewrites the value with ``gets`` and ``cas``: the
    write fails if a save came in between, or if the record was deleted.
    """

    cache: MemcachedCache
    unlisted = (
        "Memcached cannot list its keys, so {1}() is not available; sessions"
        " still expire on their own and can be deleted one by one."
    )

    def __init__(self, cache: MemcachedCache) -> None:
        super().__init__(cache)
        exceptions = importlib.import_module("pymemcache.exceptions")
        self.errors = (OSError, exceptions.MemcacheServerError)
        self._hash_client = importlib.import_module("pymemcache").HashClient
        _refuse_unpickling_client(cache._client)

    def describe(self) -> str:
        client = self.cache._client
        if isinstance(getattr(client, "server", None), tuple):
            host, port = client.server
            return f"memcached {host}:{port}"
        return "memcached " + ",".join(getattr(client, "clients", {}))

    def _client(self) -> t.ContextManager[t.Any]:
        # cachelib >= 0.15 may hand out clients from a pool.
        context = getattr(self.cache, "_client_context", None)
        return context() if context else nullcontext(self.cache._client)

    def _name(self, key: str) -> str:
        return (self.cache.key_prefix or "") + key

    def load(self, key: str) -> Record | None:
        with self._client() as client:
            return _unpack(client.get(self._name(key)), key)

    def save(self, key: str, data: bytes, expires: float) -> None:
        value = _pack(data, expires)
        with self._client() as client:
            # A client told to ignore errors answers False instead.
            if not client.set(self._name(key), value, _memcached_expiry(expires), noreply=False):
                raise OSError(f"Memcached did not store the record {key!r}.")

    def replace(self, key: str, expected: bytes, data: bytes, expires: float) -> bool:
        """Read the record's cas unique, then check that no lock is held,
        then ``cas``.

        A lock holder gives the record a new cas unique after taking the
        lock (see :meth:`acquire`), so a replace that read the record before
        that fails, and one that read it after sees the lock.
        """
        name = self._name(key)
        with self._client() as client:
            value, cas, locked = self._gets_then_lock(client, name)
            record = _unpack(value, key)
            if locked or record is None or record.data != expected:
                return False
            if record.expires <= time.time():
                return False
            value = _pack(data, expires)
            return bool(client.cas(name, value, cas, _memcached_expiry(expires), noreply=False))

    def _gets_then_lock(self, client: t.Any, name: str) -> tuple[t.Any, t.Any, bool]:
        """The value under ``name`` with its cas unique, then whether its
        lock key exists, read in that order.

        One server answers a multi-get key by key, in order; a client that
        spreads keys over several servers asks twice.
        """
        lock_name = name + _LOCK_SUFFIX
        if isinstance(client, self._hash_client):
            value, cas = client.gets(name)
            return value, cas, client.get(lock_name) is not None
        found = client.gets_many([name, lock_name])
        value, cas = found.get(name, (None, None))
        return value, cas, lock_name in found

    def touch(self, key: str, expires: float) -> bool:
        with self._client() as client:
            return self._rewrite(client, key, expires)

    def delete(self, key: str) -> bool:
        with self._client() as client:
            return bool(client.delete(self._name(key), noreply=False))

    def acquire(self, lock_key: str, token: str, ttl: float) -> bool:
        with self._client() as client:
            expire = math.ceil(ttl)
            if not client.add(self._name(lock_key), token.encode(), expire, noreply=False):
                return False
            # A replace that read the record before the lock was taken
            # must fail: the rewrite gives the record a new cas unique.
            self._rewrite(client, lock_key.removesuffix(_LOCK_SUFFIX))
            return True

    def _rewrite(self, client: t.Any, key: str, expires: float | None = None) -> bool:
        """Rewrite an existing record with ``expires`` (``None``: its own),
        with ``cas`` until no other write comes in between; never create
        one. Return whether it was rewritten.

        A new expiry is only given to a record whose header says it is live:
        Memcached's own TTL is in whole seconds and outlives the record.
        """
        name = self._name(key)
        while True:
            value, cas = client.gets(name)
            record = _unpack(value, key)
            if record is None:
                return False
            if expires is not None and record.expires <= time.time():
                return False
            new_expires = record.expires if expires is None else expires
            value = _pack(record.data, new_expires)
            if client.cas(name, value, cas, _memcached_expiry(new_expires), noreply=False):
                return True

    def release(self, lock_key: str, token: str) -> None:
        name = self._name(lock_key)
        with self._client() as client:
            value, cas = client.gets(name)
            if value == token.encode():
                # A negative expiry drops the item, and cas makes it conditional.
                client.cas(name, b"", cas, -1, noreply=False)


def _refuse_other_memcached_client(client: t.Any) -> None:
    """Refuse a Memcached client other than pymemcache's.

    python-memcached and pylibmc (which ``MemcachedCache(["host:port"])``
    picks when installed) unpickle any value stored with their pickle flag,
    and report an outage as a missing key.
    """
    cls = type(client)
    if cls.__module__.partition(".")[0] == "pymemcache":
        return
    raise ValueError(
        "SESSION_CACHELIB is a MemcachedCache on"
        f" {cls.__module__}.{cls.__qualname__}; only pymemcache clients are"
        " accepted. A python-memcached or pylibmc client (MemcachedCache(['host:port'])"
        " picks one when installed) unpickles any value stored with its pickle flag:"
        " a value planted in Memcached under a session key would run code in the app."
        " Use a memcached://host:port URL, or a MemcachedCache built on a"
        " pymemcache client without a pickling serde, such as"
        " MemcachedCache(pymemcache.PooledClient(('host', 11211)))."
    )


def _refuse_unpickling_client(client: t.Any) -> None:
    """Refuse a pymemcache client whose serde unpickles: it would run any
    pickle planted in Memcached under a session key with the pickle flag."""
    serde = getattr(client, "serde", None) or getattr(client, "default_kwargs", {}).get("serde")
    if serde is None:
        return
    probe = b"\x80\x04K\x00."  # pickle.dumps(0, 4): harmless
    if serde.deserialize(b"probe", probe, 1) != probe:
        raise ValueError(
            "SESSION_CACHELIB is a MemcachedCache whose pymemcache client unpickles"
            f" values (its serde is {serde!r}): session records are read through it, so a"
            " value planted in Memcached would run. Give the sessions a client"
            " without a serde, or use a memcached:// URL."
        )


def _memcached_expiry(expires: float) -> int:
    """Memcached takes TTLs up to 30 days, Unix times beyond."""
    ttl = _ttl_seconds(expires)
    return ttl if ttl <= _MEMCACHED_MAX_TTL else math.ceil(expires) + 1


class _CacheStore(_Store):
    """Any cache, through the :class:`~cachelib.BaseCache` API.

    The cache serializes our bytes itself (usually by pickling them, which is
    safe for an in-process or local cache); a value that is not our bytes is
    ignored. A touch re-reads and rewrites the record under the lock, and a
    delete takes the lock too, so that a touch cannot bring back a deleted
    record. The lock is as exclusive as the cache's ``add``: across processes
    for Memcached, within one process for :class:`~cachelib.SimpleCache`, and
    not at all for :class:`~cachelib.FileSystemCache`, whose ``add`` checks
    then writes.
    """

    def __init__(self, cache: BaseCache, lock: t.Callable[[str], t.ContextManager[None]]) -> None:
        super().__init__(cache)
        self.lock = lock

    def load(self, key: str) -> Record | None:
        return _unpack(self.cache.get(key), key)

    def save(self, key: str, data: bytes, expires: float) -> None:
        if not self.cache.set(key, _pack(data, expires), timeout=_ttl_seconds(expires)):
            raise OSError(f"{type(self.cache).__name__} did not store the record {key!r}.")

    def touch(self, key: str, expires: float) -> bool:
        with self.lock(key):
            record = self.load(key)
            if record is None or record.expires <= time.time():
                return False
            self.save(key, record.data, expires)
            return True

    def delete(self, key: str) -> bool:
        with self.lock(key):
            return self.cache.delete(key)

    def acquire(self, lock_key: str, token: str, ttl: float) -> bool:
        return self.cache.add(lock_key, token, timeout=math.ceil(ttl))

    def release(self, lock_key: str, token: str) -> None:
        if self.cache.get(lock_key) == token:
            self.cache.delete(lock_key)


class _SimpleStore(_CacheStore):
    """A :class:`~cachelib.SimpleCache`, whose keys live in a dict.

    It drops expired entries only when over its threshold, so the backend
    removes them in :meth:`cleanup`.
    """

    cache: SimpleCache

    def _keys(self, prefix: str) -> list[str]:
        with self.cache._lock:
            names = list(self.cache._cache)
        start = len(prefix)
        return [
            name
            for name in names
            if name.startswith(prefix) and _SESSION_TAIL.fullmatch(name.encode(), start)
        ]

    def count(self, prefix: str, now: float) -> int:
        records = (self.load(key) for key in self._keys(prefix))
        return sum(1 for r in records if r is not None and r.expires > now)

    def clear(self, prefix: str) -> int:
        return sum(self.cache.delete(key) for key in self._keys(prefix))

    def cleanup(self, prefix: str, now: float) -> t.Iterator[int]:
        keys = self._keys(prefix)
        for start in range(0, len(keys), 1000):
            yield sum(self._remove_expired(key, now) for key in keys[start : start + 1000])

    def _remove_expired(self, key: str, now: float) -> bool:
        # The cache's own lock keeps a save from slipping in between.
        with self.cache._lock:
            record = self.load(key)
            return (record is None or record.expires <= now) and self.cache.delete(key)


class CacheLibBackend(Backend):
    """Stores sessions in a cachelib cache.

    Redis (:class:`~cachelib.RedisCache`, including one built around your
    own client, Sentinel or cluster) and Memcached (:class:`~cachelib.MemcachedCache`
    on pymemcache) are used through their client with raw bytes, never
    pickles; other keys in the same cache are left alone. Other caches are
    used through the :class:`~cachelib.BaseCache` API: they pickle our bytes
    themselves, which is safe in the process or on the local disk, and their
    lock is as exclusive as their ``add`` (a
    :class:`~cachelib.FileSystemCache`'s is not, across processes).

    Records expire natively, except in a :class:`~cachelib.SimpleCache`,
    which keeps expired entries until it is full; there :meth:`cleanup`
    removes them. Give a SimpleCache of your own a ``threshold`` well above
    the number of live sessions (``simple://`` does), or it evicts some.
    :meth:`count` and :meth:`clear` work on Redis and
    :class:`~cachelib.SimpleCache` only.

    A :class:`~cachelib.MemcachedCache` must be built on pymemcache without
    a pickling ``serde``: python-memcached and pylibmc unpickle what they
    read, so they are refused with a :exc:`ValueError`.

    :param cache: The cache.
    :raises ValueError: ``cache`` is a :class:`~cachelib.MemcachedCache`
        whose client unpickles.

    .. versionchanged:: 0.2
        A :class:`~cachelib.MemcachedCache` on python-memcached or pylibmc
        is refused; it was accepted with a warning.

    .. versionadded:: 0.1
    """

    native_expiry = True

    #: Seconds after which a lock left behind by a crashed process expires.
    lock_ttl: float = 20.0

    #: Seconds :meth:`lock` waits for another holder before raising
    #: :exc:`TimeoutError`.
    lock_wait: float = 10.0

    def __init__(self, cache: BaseCache) -> None:
        if not isinstance(cache, BaseCache):
            raise TypeError(
                f"SESSION_CACHELIB must be a cachelib.BaseCache instance or a URL"
                f" ({_URL_FORMS}), not {cache!r}."
            )
        self.cache = cache
        self._prefix: str | None = None
        self._held: set[tuple[int, str]] = set()
        #: Lock keys this process may hold without knowing it (a request for
        #: them failed, but the store may have run it) -> tokens, deadline.
        self._orphans: dict[str, tuple[list[str], float]] = {}
        self._store = self._make_store(cache)
        self.unavailable_errors = self._store.errors
        self.native_expiry = not isinstance(self._store, _SimpleStore)

    def _make_store(self, cache: BaseCache) -> _Store:
        # RedisCache and ValkeyCache; the write client serves reads too, so
        # that the re-read under the lock never comes from a lagging replica.
        redis_client = getattr(cache, "_write_client", None)
        if redis_client is not None:
            return _RedisStore(cache, redis_client)
        if isinstance(cache, MemcachedCache):
            _refuse_other_memcached_client(cache._client)
            return _MemcachedStore(cache)
        if isinstance(cache, SimpleCache):
            return _SimpleStore(cache, self.lock)
        return _CacheStore(cache, self.lock)

    def configure(self, prefix: str) -> None:
        """Keep the key prefix; check that Memcached keys stay in its limit."""
        if isinstance(self.cache, MemcachedCache):
            _check_memcached_length(self.cache, prefix)
        self._prefix = prefix

    def describe(self) -> str:
        return self._store.describe()

    def load(self, key: str) -> Record | None:
        return self._store.load(key)

    def save(self, key: str, data: bytes, expires: float) -> None:
        self._store.save(key, data, expires)

    def replace(self, key: str, expected: bytes, data: bytes, expires: float) -> bool:
        """Compare and write in one Lua script on Redis, with ``cas`` on
        Memcached (see :doc:`/concurrency`); ``False`` on other caches."""
        return self._store.replace(key, expected, data, expires)

    def touch(self, key: str, expires: float) -> bool:
        return self._store.touch(key, expires)

    def delete(self, key: str) -> bool:
        return self._store.delete(key)

    @contextmanager
    def lock(self, key: str) -> t.Iterator[None]:
        """An exclusive section for ``key``, re-entrant within a thread.

        A lock key next to the record holds a random token; only its owner
        removes it, and it expires after :attr:`lock_ttl` if its owner died.

        :raises TimeoutError: Another holder kept it for :attr:`lock_wait`.
        """
        owner = (threading.get_ident(), key)
        if owner in self._held:
            yield
            return
        lock_key = key + _LOCK_SUFFIX
        token = secrets.token_hex(16)
        self._acquire(lock_key, token)
        self._held.add(owner)
        try:
            yield
        finally:
            self._held.discard(owner)
            self._release(lock_key, token)

    def _acquire(self, lock_key: str, token: str) -> None:
        deadline = time.monotonic() + self.lock_wait
        delay = 0.005
        while True:
            try:
                if self._store.acquire(lock_key, token, self.lock_ttl):
                    return
            except self.unavailable_errors:
                # A hung store may still run the request when it wakes up.
                self._orphan(lock_key, token)
                raise
            if self._release_orphans(lock_key):
                continue
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"The session lock {lock_key!r} is still held by another"
                    f" request after {self.lock_wait} seconds. If its holder"
                    f" crashed, it expires {self.lock_ttl} seconds after it was"
                    " taken."
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def _orphan(self, lock_key: str, token: str) -> None:
        now = time.monotonic()
        for key, (_, until) in list(self._orphans.items()):
            if until < now:
                self._orphans.pop(key, None)
        tokens, _ = self._orphans.get(lock_key, ([], 0.0))
        self._orphans[lock_key] = ([*tokens, token], now + self.lock_ttl)

    def _release_orphans(self, lock_key: str) -> bool:
        """Free ``lock_key`` if a failed request of this process holds it."""
        orphans = self._orphans.pop(lock_key, None)
        if orphans is None or orphans[1] < time.monotonic():
            return False
        for token in orphans[0]:
            self._store.release(lock_key, token)
        return True

    def _release(self, lock_key: str, token: str) -> None:
        try:
            self._store.release(lock_key, token)
        except self.unavailable_errors:
            self._orphan(lock_key, token)
            # The work under the lock is done; the lock expires by itself.
            log.warning(
                "Could not release the session lock %r; it expires within %s seconds.",
                lock_key,
                self.lock_ttl,
                exc_info=True,
            )

    def count(self, now: float) -> int:
        return self._store.count(self._configured_prefix(), now)

    def clear(self) -> int:
        return self._store.clear(self._configured_prefix())

    def cleanup(self, now: float) -> t.Iterator[int]:
        return self._store.cleanup(self._configured_prefix(), now)

    def _configured_prefix(self) -> str:
        if self._prefix is None:
            raise RuntimeError(
                "The backend does not know its key prefix; call configure(prefix)"
                " (ServerSide.init_app does) before listing its records."
            )
        return self._prefix


def _check_memcached_length(cache: MemcachedCache, prefix: str) -> None:
    client_prefix = getattr(cache._client, "key_prefix", b"") or b""
    longest = (
        len((cache.key_prefix or "").encode())
        + len(client_prefix)
        + len(prefix.encode())
        + 64
        + len(_LOCK_SUFFIX)
    )
    if longest > _MEMCACHED_MAX_KEY:
        raise ValueError(
            f"SESSION_KEY_PREFIX {prefix!r} makes Memcached keys {longest} bytes"
            f" long (with the cache's own key prefix), over Memcached's limit of"
            f" {_MEMCACHED_MAX_KEY}. Use a prefix at most"
            f" {len(prefix.encode()) - (longest - _MEMCACHED_MAX_KEY)} bytes long."
        )
