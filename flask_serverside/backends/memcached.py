"""Sessions in Memcached, through a cachelib cache's pymemcache client.

Values are raw bytes, never pickles, under the same keys cachelib would use
(its ``key_prefix`` included).
"""

from __future__ import annotations

import importlib
import math
import time
import typing as t

from .base import DIGEST_LENGTH
from .base import Record
from .caches import CacheBackend
from .caches import LOCK_SUFFIX
from .caches import memcached_client
from .caches import memcached_connection
from .caches import pack
from .caches import ttl_seconds
from .caches import unpack

if t.TYPE_CHECKING:
    from cachelib import MemcachedCache

#: Memcached's key length limit, and its cut-over from relative TTLs to dates.
_MEMCACHED_MAX_KEY = 250
_MEMCACHED_MAX_TTL = 30 * 24 * 3600


class MemcachedBackend(CacheBackend):
    """Stores sessions in Memcached through a :class:`~cachelib.MemcachedCache`'s
    pymemcache client, with raw bytes.

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
        _refuse_other_memcached_client(memcached_client(cache))
        exceptions = importlib.import_module("pymemcache.exceptions")
        self.unavailable_errors = (OSError, exceptions.MemcacheServerError)
        self._hash_client = importlib.import_module("pymemcache").HashClient
        _refuse_unpickling_client(memcached_client(cache))

    def configure(self, prefix: str) -> None:
        """Keep the key prefix; check that keys stay in Memcached's limit."""
        _check_key_length(self.cache, prefix)
        super().configure(prefix)

    def describe(self) -> str:
        client = memcached_client(self.cache)
        if isinstance(getattr(client, "server", None), tuple):
            host, port = client.server
            return f"memcached {host}:{port}"
        return "memcached " + ",".join(getattr(client, "clients", {}))

    def _client(self) -> t.ContextManager[t.Any]:
        return memcached_connection(self.cache)

    def _name(self, key: str) -> str:
        return (self.cache.key_prefix or "") + key

    def load(self, key: str) -> Record | None:
        with self._client() as client:
            return unpack(client.get(self._name(key)), key)

    def save(self, key: str, data: bytes, expires: float) -> None:
        value = pack(data, expires)
        with self._client() as client:
            # A client told to ignore errors answers False instead.
            if not client.set(self._name(key), value, _memcached_expiry(expires), noreply=False):
                raise OSError(f"Memcached did not store the record {key!r}.")

    def replace(self, key: str, expected: bytes, data: bytes, expires: float) -> bool:
        """Read the record's cas unique, then check that no lock is held,
        then ``cas``.

        A lock holder gives the record a new cas unique after taking the
        lock (see :meth:`take`), so a replace that read the record before
        that fails, and one that read it after sees the lock.
        """
        name = self._name(key)
        with self._client() as client:
            value, cas, locked = self._gets_then_lock(client, name)
            record = unpack(value, key)
            if locked or record is None or record.data != expected:
                return False
            if record.expires <= time.time():
                return False
            value = pack(data, expires)
            return bool(client.cas(name, value, cas, _memcached_expiry(expires), noreply=False))

    def _gets_then_lock(self, client: t.Any, name: str) -> tuple[t.Any, t.Any, bool]:
        """The value under ``name`` with its cas unique, then whether its
        lock key exists, read in that order.

        One server answers a multi-get key by key, in order; a client that
        spreads keys over several servers asks twice.
        """
        lock_name = name + LOCK_SUFFIX
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

    def take(self, lock_key: str, token: str, ttl: float) -> bool:
        with self._client() as client:
            expire = math.ceil(ttl)
            if not client.add(self._name(lock_key), token.encode(), expire, noreply=False):
                return False
            # A replace that read the record before the lock was taken
            # must fail: the rewrite gives the record a new cas unique.
            self._rewrite(client, lock_key.removesuffix(LOCK_SUFFIX))
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
            record = unpack(value, key)
            if record is None:
                return False
            if expires is not None and record.expires <= time.time():
                return False
            new_expires = record.expires if expires is None else expires
            value = pack(record.data, new_expires)
            if client.cas(name, value, cas, _memcached_expiry(new_expires), noreply=False):
                return True

    def give_back(self, lock_key: str, token: str) -> None:
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
    ttl = ttl_seconds(expires)
    return ttl if ttl <= _MEMCACHED_MAX_TTL else math.ceil(expires) + 1


def _check_key_length(cache: MemcachedCache, prefix: str) -> None:
    client_prefix = getattr(memcached_client(cache), "key_prefix", b"") or b""
    longest = (
        len((cache.key_prefix or "").encode())
        + len(client_prefix)
        + len(prefix.encode())
        + DIGEST_LENGTH
        + len(LOCK_SUFFIX)
    )
    if longest > _MEMCACHED_MAX_KEY:
        raise ValueError(
            f"SESSION_KEY_PREFIX {prefix!r} makes Memcached keys {longest} bytes"
            f" long (with the cache's own key prefix), over Memcached's limit of"
            f" {_MEMCACHED_MAX_KEY}. Use a prefix at most"
            f" {len(prefix.encode()) - (longest - _MEMCACHED_MAX_KEY)} bytes long."
        )
