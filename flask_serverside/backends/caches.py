"""What the cache stores share: the record format of a value, the token
lock, and the one place that reads cachelib's private attributes.

Nothing here is ever pickled: Redis and Memcached are used through the
cache's client with raw bytes, and the value carries its own expiry.
"""

from __future__ import annotations

import logging
import math
import secrets
import struct
import time
import typing as t
from abc import abstractmethod
from contextlib import AbstractContextManager
from contextlib import contextmanager
from contextlib import nullcontext

from .base import Backend
from .base import Record
from .base import Reentrant

if t.TYPE_CHECKING:
    from cachelib import BaseCache
    from cachelib import MemcachedCache
    from cachelib import SimpleCache

log = logging.getLogger(__name__)

#: Starts every value, followed by the expiry as a big-endian double, then
#: the payload. Native TTLs outlive the expiry a little (see ttl_seconds).
MARK = b"fss\x02"
HEADER = struct.Struct(">4sd")
#: Added to a record's key to name its lock.
LOCK_SUFFIX = ":lock"


def pack(data: bytes, expires: float) -> bytes:
    """The value stored for a record."""
    return HEADER.pack(MARK, expires) + data


def unpack(value: object, key: str) -> Record | None:
    """The record in a stored value, or ``None`` if it is not one."""
    if value is None:
        return None
    if not isinstance(value, bytes) or not value.startswith(MARK):
        log.warning("Ignoring the value stored under %r: not a session record.", key)
        return None
    try:
        _, expires = HEADER.unpack_from(value)
    except struct.error:
        log.warning("Ignoring the value stored under %r: it is truncated.", key)
        return None
    return Record(value[HEADER.size :], expires)


def ttl_seconds(expires: float) -> int:
    """A native TTL in whole seconds that outlives ``expires``.

    Stores that count in whole seconds may drop a key up to a second early,
    hence one second more; the exact expiry is kept in the value's header.
    """
    return max(1, math.ceil(expires - time.time()) + 1)


# cachelib's private attributes, read here only.


def redis_client(cache: BaseCache) -> t.Any:
    """The client of a RedisCache or ValkeyCache, else ``None``.

    The write client serves reads too, so that the re-read under the lock
    never comes from a lagging replica.
    """
    return getattr(cache, "_write_client", None)


def memcached_client(cache: MemcachedCache) -> t.Any:
    """The client a MemcachedCache was built with."""
    return cache._client


def memcached_connection(cache: MemcachedCache) -> AbstractContextManager[t.Any]:
    """A client to use for one operation: cachelib >= 0.15 may hand them out
    from a pool."""
    context = getattr(cache, "_client_context", None)
    return context() if context else nullcontext(cache._client)


def simple_names(cache: SimpleCache) -> list[str]:
    """The keys a SimpleCache holds now."""
    with cache._lock:
        return list(cache._cache)


def simple_lock(cache: SimpleCache) -> AbstractContextManager[t.Any]:
    """The SimpleCache's own lock, which every write of the cache takes."""
    return t.cast(AbstractContextManager[t.Any], cache._lock)


class CacheBackend(Backend):
    """A store in a cache, whose exclusive section is a lock key next to the
    record: it holds a random token, only its owner removes it, and it
    expires after :attr:`lock_ttl` if its owner died.

    Subclasses take and give back the lock key in one step of their cache
    (:meth:`take`, :meth:`give_back`).

    .. versionadded:: 0.2
    """

    native_expiry = True

    #: Seconds after which a lock left behind by a crashed process expires.
    lock_ttl: float = 20.0

    #: Seconds :meth:`lock` waits for another holder before raising
    #: :exc:`TimeoutError`.
    lock_wait: float = 10.0

    #: The message of :meth:`count` and :meth:`clear` on a cache that cannot
    #: list its keys, formatted with the cache's name and the method's.
    unlisted = "{} cannot list its keys, so {}() is not available."

    def __init__(self, cache: BaseCache) -> None:
        self.cache = cache
        self._prefix: str | None = None
        self._reentrant = Reentrant(self._section)
        #: Lock keys this process may hold without knowing it (a request for
        #: them failed, but the store may have run it) -> tokens, deadline.
        self._orphans: dict[str, tuple[list[str], float]] = {}

    def configure(self, prefix: str) -> None:
        """Keep the key prefix, which :meth:`count` and :meth:`clear` use."""
        self._prefix = prefix

    def describe(self) -> str:
        """The cache's class name; network stores add their server."""
        return type(self.cache).__name__

    @abstractmethod
    def take(self, lock_key: str, token: str, ttl: float) -> bool:
        """Create ``lock_key`` holding ``token`` unless it exists."""

    @abstractmethod
    def give_back(self, lock_key: str, token: str) -> None:
        """Remove ``lock_key`` if it still holds ``token``."""

    def lock(self, key: str) -> AbstractContextManager[None]:
        """An exclusive section for ``key``, re-entrant within a thread.

        :raises TimeoutError: Another holder kept it for :attr:`lock_wait`.
        """
        return self._reentrant(key)

    @contextmanager
    def _section(self, key: str) -> t.Iterator[None]:
        lock_key = key + LOCK_SUFFIX
        token = secrets.token_hex(16)
        self._acquire(lock_key, token)
        try:
            yield
        finally:
            self._release(lock_key, token)

    def _acquire(self, lock_key: str, token: str) -> None:
        deadline = time.monotonic() + self.lock_wait
        delay = 0.005
        while True:
            try:
                if self.take(lock_key, token, self.lock_ttl):
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
            self.give_back(lock_key, token)
        return True

    def _release(self, lock_key: str, token: str) -> None:
        try:
            self.give_back(lock_key, token)
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
        raise NotImplementedError(self.unlisted.format(type(self.cache).__name__, "count"))

    def clear(self) -> int:
        raise NotImplementedError(self.unlisted.format(type(self.cache).__name__, "clear"))

    def configured_prefix(self) -> str:
        """The prefix given to :meth:`configure`, for listing keys."""
        if self._prefix is None:
            raise RuntimeError(
                "The backend does not know its key prefix; call configure(prefix)"
                " (ServerSide.init_app does) before listing its records."
            )
        return self._prefix
