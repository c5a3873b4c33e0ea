"""The seam between the session machinery and a store.

Everything that is the same for every store (IDs, hashing, serialization,
expiry rules, change merging, size limits, error mapping) lives above this
module. A backend only moves bytes for a storage key, with an expiry, and
offers an exclusive section per key.
"""

from __future__ import annotations

import fcntl
import importlib
import re
import sys
import threading
import time
import types
import typing as t
from abc import ABC
from abc import abstractmethod
from contextlib import AbstractContextManager
from datetime import datetime
from datetime import timezone


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


#: Hex digits after the prefix in a session's storage key: a SHA-256.
DIGEST_LENGTH = 64
_DIGEST_RE = re.compile(rf"[0-9a-f]{{{DIGEST_LENGTH}}}")


#: What follows the key prefix in the key of a user's index of sessions
#: (:mod:`flask_serverside.users`), before the 64 hex digits. Backends that
#: list their keys clean up and clear those records with the sessions, but
#: count only sessions.
INDEX_TAG = "user:"


def is_session_key(name: str, prefix: str) -> bool:
    """Whether ``name`` is a storage key under ``prefix``: the prefix
    followed by exactly 64 lowercase hex digits.

    Backends that list their keys use it to keep away from other data in a
    shared store (a longer prefix that starts with this one gives longer
    names).
    """
    return name.startswith(prefix) and _DIGEST_RE.fullmatch(name, len(prefix)) is not None


def is_own_key(name: str, prefix: str) -> bool:
    """Whether ``name`` is a session's key or a user index's key under
    ``prefix``: what :meth:`Backend.cleanup` and :meth:`Backend.clear` cover."""
    return is_session_key(name, prefix) or is_session_key(name, prefix + INDEX_TAG)


class Reentrant:
    """Makes a per-key exclusive section re-entrant within a thread: a
    thread that holds the section for a key enters it again at no cost.

    :param section: Enters the exclusive section of a key.
    """

    def __init__(self, section: t.Callable[[str], AbstractContextManager[None]]) -> None:
        self._section = section
        self._local = threading.local()

    def __call__(self, key: str) -> AbstractContextManager[None]:
        return _Entry(self._section, self._local, key)


class _Entry:
    """One ``with`` block of a :class:`Reentrant` section. (A class, not a
    generator: a store's every write enters one.)"""

    __slots__ = ("_section", "_local", "_key", "_entered")

    def __init__(
        self,
        section: t.Callable[[str], AbstractContextManager[None]],
        local: threading.local,
        key: str,
    ) -> None:
        self._section = section
        self._local = local
        self._key = key
        self._entered: AbstractContextManager[None] | None = None

    def __enter__(self) -> None:
        held: set[str] = self._local.__dict__.setdefault("keys", set())
        if self._key in held:
            return
        section = self._section(self._key)
        section.__enter__()
        held.add(self._key)
        self._entered = section

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> bool | None:
        section, self._entered = self._entered, None
        if section is None:
            return None
        self._local.keys.discard(self._key)
        return section.__exit__(exc_type, exc, tb)


def import_optional(module: str, purpose: str, install: str) -> t.Any:
    """Import a module of an optional dependency.

    :param purpose: What needs it, the start of the error message.
    :param install: What to ``pip install`` to get it.
    :raises ImportError: The module is missing; the message says what to
        install.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        package = module.partition(".")[0]
        raise ImportError(
            f"{purpose} needs the {package!r} package; install it with 'pip install {install}'."
        ) from exc


def glob_escape(text: str) -> str:
    """``text`` with the special characters of a Redis ``MATCH`` pattern
    escaped."""
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


def utc_now() -> datetime:
    """The current time as an aware UTC datetime."""
    return datetime.now(timezone.utc)


def utc_datetime(timestamp: float) -> datetime:
    """A Unix timestamp as an aware UTC datetime."""
    return datetime.fromtimestamp(timestamp, timezone.utc)


def utc_timestamp(value: datetime) -> float:
    """A datetime as a Unix timestamp; a naive one is taken as UTC (SQLite
    stores no zone)."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.timestamp()


def flock_exclusive(fd: int) -> None:
    """Lock ``fd`` exclusively, waiting as long as its holder keeps it.

    Under gevent's monkey-patching, a blocking :func:`fcntl.flock` would
    stop every greenlet of the process, the holder's too (which may never
    get to let go): there the wait polls without blocking, with gevent's
    :func:`time.sleep` in between, which lets the others run.
    """
    if not gevent_patched():
        fcntl.flock(fd, fcntl.LOCK_EX)
        return
    delay = 0.001
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            time.sleep(delay)
            delay = min(delay * 2, 0.02)


def gevent_patched() -> bool:
    """Whether gevent has monkey-patched :mod:`time` (and so the process
    runs its requests in greenlets of one thread)."""
    monkey = sys.modules.get("gevent.monkey")
    return monkey is not None and bool(monkey.is_module_patched("time"))
