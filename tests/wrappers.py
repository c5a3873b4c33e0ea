"""A backend that hands every call to another one, for tests to extend."""

from __future__ import annotations

import typing as t
from collections.abc import Callable
from collections.abc import Iterator

from flask_serverside.backends import Backend
from flask_serverside.backends import Record


class DelegatingBackend(Backend):
    """A real backend seen through a wrapper: subclasses override the calls
    they want to watch or slow down, and pass the rest on."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.unavailable_errors = inner.unavailable_errors
        self.native_expiry = inner.native_expiry
        #: The cachelib cache behind a CacheLibBackend: whether it may evict
        #: records is read from it (flask_serverside.users.may_evict).
        self.cache = getattr(inner, "cache", None)

    def load(self, key: str) -> Record | None:
        return self.inner.load(key)

    def save(self, key: str, data: bytes, expires: float) -> None:
        self.inner.save(key, data, expires)

    def replace(self, key: str, expected: bytes, data: bytes, expires: float) -> bool:
        return self.inner.replace(key, expected, data, expires)

    def touch(self, key: str, expires: float) -> bool:
        return self.inner.touch(key, expires)

    def delete(self, key: str) -> bool:
        return self.inner.delete(key)

    def lock(self, key: str) -> t.Any:
        return self.inner.lock(key)

    def cleanup(self, now: float) -> Iterator[int]:
        return self.inner.cleanup(now)

    def count(self, now: float) -> int:
        return self.inner.count(now)

    def clear(self) -> int:
        return self.inner.clear()

    def configure(self, prefix: str) -> None:
        self.inner.configure(prefix)


class InterruptedWrites(DelegatingBackend):
    """A backend whose next record write first calls :attr:`armed`, once:
    the one-step :meth:`replace` before it is sent, or, with
    :attr:`one_step` off (every write then takes the lock, as on a store
    without ``replace``), the save under the session lock."""

    def __init__(self, inner: Backend, one_step: bool = True) -> None:
        super().__init__(inner)
        self.armed: Callable[[], None] | None = None
        self.one_step = one_step

    def _fire(self) -> None:
        armed, self.armed = self.armed, None
        if armed is not None:
            armed()

    def replace(self, key: str, expected: bytes, data: bytes, expires: float) -> bool:
        if not self.one_step:
            return False
        self._fire()
        return self.inner.replace(key, expected, data, expires)

    def save(self, key: str, data: bytes, expires: float) -> None:
        self._fire()
        self.inner.save(key, data, expires)
