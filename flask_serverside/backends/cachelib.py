"""Sessions in a cachelib cache, and the factory that picks the backend of
a cache: Redis and Memcached have their own (:mod:`.redis`,
:mod:`.memcached`); any other :class:`~cachelib.BaseCache` is used through
the BaseCache API by :class:`CacheLibBackend`.

Other caches (:class:`~cachelib.SimpleCache`, :class:`~cachelib.FileSystemCache`,
subclasses) keep their values in the process or on the local disk, where
nobody but the application can plant one.
"""

from __future__ import annotations

import math
import time
import typing as t

from cachelib import BaseCache
from cachelib import MemcachedCache
from cachelib import SimpleCache

from .base import Backend
from .base import is_own_key
from .base import is_session_key
from .base import Record
from .caches import CacheBackend
from .caches import pack
from .caches import redis_client
from .caches import simple_lock
from .caches import simple_names
from .caches import ttl_seconds
from .caches import unpack
from .memcached import MemcachedBackend
from .redis import RedisBackend

__all__ = ["CacheLibBackend", "backend_for_cache"]

#: Rows :meth:`CacheLibBackend.cleanup` removes per step.
_CLEANUP_BATCH = 1000


def backend_for_cache(cache: BaseCache) -> Backend:
    """The backend for a cachelib cache: a :class:`.RedisBackend` for a
    :class:`~cachelib.RedisCache` (or ValkeyCache), a
    :class:`.MemcachedBackend` for a :class:`~cachelib.MemcachedCache`, a
    :class:`CacheLibBackend` for any other cache.

    :param cache: The cache.
    :raises TypeError: ``cache`` is not a :class:`~cachelib.BaseCache`.
    :raises ValueError: ``cache`` is a :class:`~cachelib.MemcachedCache`
        whose client unpickles.

    .. versionadded:: 0.2
    """
    if not isinstance(cache, BaseCache):
        raise TypeError(
            "SESSION_CACHELIB must be a cachelib.BaseCache instance or a URL"
            " ('redis://...', 'memcached://...' or 'simple://'), not"
            f" {cache!r}."
        )
    if redis_client(cache) is not None:
        return RedisBackend(cache)
    if isinstance(cache, MemcachedCache):
        return MemcachedBackend(cache)
    return CacheLibBackend._generic(cache)


class CacheLibBackend(CacheBackend):
    """Stores sessions in a cachelib cache.

    ``CacheLibBackend(cache)`` returns the backend that
    :func:`backend_for_cache` picks: a :class:`.RedisBackend` or a
    :class:`.MemcachedBackend` for those caches, which are used through
    their client with raw bytes, never pickles (other keys in the same
    cache are left alone), and an instance of this class for any other
    cache.

    Other caches are used through the :class:`~cachelib.BaseCache` API: they
    pickle our bytes themselves, which is safe in the process or on the
    local disk. A touch re-reads and rewrites the record under the lock, and
    a delete takes the lock too, so that a touch cannot bring back a deleted
    record. The lock is as exclusive as the cache's ``add``: within one
    process for :class:`~cachelib.SimpleCache`, and not at all across
    processes for :class:`~cachelib.FileSystemCache`, whose ``add`` checks
    then writes.

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
        Redis and Memcached caches get a :class:`.RedisBackend` or a
        :class:`.MemcachedBackend`, picked by :func:`backend_for_cache`.

    .. versionchanged:: 0.2
        A :class:`~cachelib.MemcachedCache` on python-memcached or pylibmc
        is refused; it was accepted with a warning.

    .. versionadded:: 0.1
    """

    _simple: SimpleCache | None

    def __new__(cls, cache: BaseCache) -> t.Any:
        return backend_for_cache(cache)

    def __init__(self, cache: BaseCache) -> None:
        # __new__ set the instance up, through backend_for_cache.
        pass

    @classmethod
    def _generic(cls, cache: BaseCache) -> CacheLibBackend:
        """The backend of a cache other than Redis and Memcached."""
        self = super().__new__(cls)
        CacheBackend.__init__(self, cache)
        #: The cache if it is a SimpleCache, whose keys can be listed.
        self._simple = cache if isinstance(cache, SimpleCache) else None
        self.native_expiry = self._simple is None
        return self

    def load(self, key: str) -> Record | None:
        return unpack(self.cache.get(key), key)

    def save(self, key: str, data: bytes, expires: float) -> None:
        if not self.cache.set(key, pack(data, expires), timeout=ttl_seconds(expires)):
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
            return bool(self.cache.delete(key))

    def take(self, lock_key: str, token: str, ttl: float) -> bool:
        return bool(self.cache.add(lock_key, token, timeout=math.ceil(ttl)))

    def give_back(self, lock_key: str, token: str) -> None:
        if self.cache.get(lock_key) == token:
            self.cache.delete(lock_key)

    def _keys(self, indexes: bool = False) -> list[str]:
        """The session keys of a :class:`~cachelib.SimpleCache`, whose keys
        live in a dict; other caches cannot list theirs. With ``indexes``,
        the keys of users' indexes too."""
        if self._simple is None:
            return []
        prefix = self.configured_prefix()
        wanted = is_own_key if indexes else is_session_key
        return [name for name in simple_names(self._simple) if wanted(name, prefix)]

    def count(self, now: float) -> int:
        if self._simple is None:
            return super().count(now)
        records = (self.load(key) for key in self._keys())
        return sum(1 for r in records if r is not None and r.expires > now)

    def clear(self) -> int:
        if self._simple is None:
            return super().clear()
        prefix = self.configured_prefix()
        removed = [key for key in self._keys(indexes=True) if self.cache.delete(key)]
        return sum(is_session_key(key, prefix) for key in removed)

    def cleanup(self, now: float) -> t.Iterator[int]:
        """Remove expired entries of a :class:`~cachelib.SimpleCache`, which
        drops them only when over its threshold."""
        prefix = self.configured_prefix()
        keys = self._keys(indexes=True)
        for start in range(0, len(keys), _CLEANUP_BATCH):
            batch = keys[start : start + _CLEANUP_BATCH]
            removed = [key for key in batch if self._remove_expired(key, now)]
            yield sum(is_session_key(key, prefix) for key in removed)

    def _remove_expired(self, key: str, now: float) -> bool:
        # The cache's own lock keeps a save from slipping in between.
        assert self._simple is not None
        with simple_lock(self._simple):
            record = self.load(key)
            return (record is None or record.expires <= now) and bool(self.cache.delete(key))


def __getattr__(name: str) -> t.Any:
    # cache_from_url parses a config value, so it moved to the config layer.
    if name == "cache_from_url":
        from ..cache_url import cache_from_url

        return cache_from_url
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
