"""The seam between the session machinery and a store.

Everything that is the same for every store (IDs, hashing, serialization,
expiry rules, change merging, size limits, error mapping) lives above this
module. A backend only moves bytes for a storage key, with an expiry, and
offers an exclusive section per key.
"""

from __future__ import annotations

import typing as t
from abc import ABC
from abc import abstractmethod
from contextlib import AbstractContextManager


class Record(t.NamedTuple):
    """What a backend stores for one key.

    :param data: The serialized session, opaque to the backend.
    :param expires: When the record expires, as a Unix timestamp.
    """

    data: bytes
    expires: float


class Backend(ABC):
    """Base class of session stores.

    Keys are the storage keys built above the seam (the configured prefix
    followed by the hex SHA-256 of a session ID): printable ASCII without
    white space, at most 200 characters.

    A backend never decides whether a record is expired, except where it can
    skip expired records for free (a SQL ``WHERE``, a native TTL); the caller
    checks :attr:`Record.expires` again on every read.

    .. versionadded:: 0.1
    """

    #: Exceptions that mean "the store cannot be reached or did not answer".
    #: The caller turns them into :exc:`~flask_serverside.BackendUnavailable`.
    unavailable_errors: tuple[type[BaseException], ...] = (OSError,)

    #: Whether the store removes expired records by itself. If it does,
    #: :meth:`cleanup` is never scheduled.
    native_expiry: bool = False

    @abstractmethod
    def load(self, key: str) -> Record | None:
        """Return the record stored under ``key``, or ``None``.

        A record that exists but cannot be read as a record (a corrupt file)
        is ``None`` as well.
        """

    @abstractmethod
    def save(self, key: str, data: bytes, expires: float) -> None:
        """Store ``data`` under ``key``, replacing any previous record.

        The write is atomic: a reader sees the old record or the new one.
        """

    def replace(self, key: str, expected: bytes, data: bytes, expires: float) -> bool:
        """Store ``data`` under ``key`` if the record still holds ``expected``.

        The optional fast path of a save: one atomic step instead of a
        :meth:`lock` section. It must not write while another request holds
        ``lock(key)``, or over a record that has expired, and returns whether
        it wrote. A backend that cannot check all of that in one atomic step
        returns ``False``, as this default does, and the caller takes the
        lock instead.
        """
        return False

    @abstractmethod
    def touch(self, key: str, expires: float) -> bool:
        """Move the expiry of a live record; return whether there was one.

        It never creates a record, nor extends one that has expired: the
        check of the stored expiry and the write are one atomic step (or
        happen inside :meth:`lock`), so an expired record stays expired.

        .. versionchanged:: 0.2
            Returns whether a live record was extended.
        """

    @abstractmethod
    def delete(self, key: str) -> bool:
        """Remove the record; return whether there was one."""

    @abstractmethod
    def lock(self, key: str) -> AbstractContextManager[None]:
        """An exclusive section for ``key`` across threads and processes.

        Saves re-read and write the record inside it, so two overlapping
        requests on one session merge their changes instead of losing one.
        """

    def cleanup(self, now: float) -> t.Iterator[int]:
        """Remove records that expired before ``now``.

        Yields the number removed by each bounded step, so a caller can show
        progress; stores with native expiry yield nothing.
        """
        return iter(())

    @abstractmethod
    def count(self, now: float) -> int:
        """Return how many records have not expired at ``now``.

        :raises NotImplementedError: The store cannot list its keys.
        """

    @abstractmethod
    def clear(self) -> int:
        """Remove every record of this backend; return how many.

        :raises NotImplementedError: The store cannot list its keys.
        """

    def describe(self) -> str:
        """Where the store is, for log messages: a directory, a database URL
        without its password, a server's ``host:port``. Never a secret.

        The default is the class name.

        .. versionadded:: 0.2
        """
        return type(self).__name__

    def configure(self, prefix: str) -> None:  # noqa: B027
        """Called once by ``init_app`` with the key prefix in use.

        Backends that list or clear their keys use it to keep away from other
        data in a shared store. The default does nothing.
        """
