"""Everything between the session object and a backend, done once.

Storage keys, serialization, expiry, size limits, the change merge and the
mapping of store errors to :exc:`~flask_serverside.BackendUnavailable`.
"""

from __future__ import annotations

import enum
import logging
import time
import typing as t
from collections.abc import Callable
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from dataclasses import field

from . import ids
from . import record as records
from . import renewal
from . import saving
from . import users
from .exceptions import BackendUnavailable
from .exceptions import SessionTooLarge
from .record import Loaded
from .saving import Saved

if t.TYPE_CHECKING:
    from .backends.base import Backend
    from .backends.base import Record
    from .changes import Changes
    from .clocks import Clocks
    from .serializers import Serializer

logger = logging.getLogger("flask_serverside")
T = t.TypeVar("T")


class Copy(enum.Enum):
    """What :meth:`SessionStore.copy_in` did."""

    #: The session was copied into this store.
    COPIED = "copied"
    #: This store holds the session live already; nothing was copied.
    PRESENT = "present"
    #: The session is over ``SESSION_MAX_BYTES``; nothing was copied.
    TOO_LARGE = "too_large"
    #: The serializer cannot store the session's data; nothing was copied.
    UNREADABLE = "unreadable"
    #: The other store no longer holds the session.
    GONE = "gone"


class Adopter(t.Protocol):
    """A store of another session extension whose sessions this store takes
    over as their users come back (:mod:`flask_serverside.migrate`)."""

    def adopt(self, store: SessionStore, sid: str) -> Loaded | None:
        """Copy the session into ``store`` if the adopter holds it (with
        :meth:`SessionStore.copy_in`); return it, or ``None``."""

    def forget(self, sid: str) -> bool:
        """Remove the session; return whether there was one."""

    def count(self) -> int:
        """The number of live sessions waiting to be taken over."""

    def clear(self) -> int:
        """Remove every session; return how many were live."""


@dataclass
class SessionStore:
    """A backend with the settings that apply to every backend.

    :param backend: Where the bytes go.
    :param serializer: How data becomes bytes.
    :param prefix: ``SESSION_KEY_PREFIX``.
    :param id_bytes: ``SESSION_ID_BYTES``.
    :param max_bytes: ``SESSION_MAX_BYTES``.
    :param touch_interval: ``SESSION_TOUCH_INTERVAL``.
    :param clocks: The absolute lifetime and ID renewal, or ``None`` when
        neither is configured.
    """

    backend: Backend
    serializer: Serializer
    prefix: str
    id_bytes: int
    max_bytes: int
    touch_interval: float
    clocks: Clocks | None = None
    #: ``SESSION_TRACK_DEVICE``: store the client address and User-Agent
    #: with a user binding.
    track_device: bool = True
    #: ``SESSION_MAX_PER_USER``.
    max_per_user: int | None = None
    #: Whether the store may evict live records (Memcached): a bound session
    #: then loads only while its user's index still lists it.
    check_index: bool = False
    #: Another store whose sessions are taken over as their users come back;
    #: see :func:`flask_serverside.migrate.adopt_flask_session_files`.
    adopter: Adopter | None = None
    _last_key: tuple[str, str] = field(default=("", ""), init=False, repr=False)

    def new_id(self) -> str:
        return ids.generate(self.id_bytes)

    def key(self, sid: str) -> str:
        # A request asks for its key up to three times (load, touch or
        # write, index): the last one is kept rather than hashed again.
        last = self._last_key
        if last[0] == sid:
            return last[1]
        key = ids.storage_key(self.prefix, sid)
        self._last_key = (sid, key)
        return key

    @contextmanager
    def _guard(self, action: str) -> Iterator[None]:
        try:
            yield
        except self.backend.unavailable_errors as exc:
            raise self._unavailable(action, exc) from exc

    def _unavailable(self, action: str, exc: BaseException) -> BackendUnavailable:
        """Log a store failure; the error to raise instead of it."""
        logger.error(
            "Session store unavailable while %s (%s): %s",
            action,
            self.backend.describe(),
            _error_text(exc),
        )
        return BackendUnavailable()

    def _call(self, action: str, func: Callable[..., T], *args: t.Any) -> T:
        # Not through _guard: a generator context manager costs more than
        # the rest of a request's store call around it.
        try:
            return func(*args)
        except self.backend.unavailable_errors as exc:
            raise self._unavailable(action, exc) from exc

    def load(self, sid: str, renew: bool = False) -> Loaded | None:
        """Read a live session, or ``None`` if missing, expired or corrupt.

        :param renew: Move the session to a new ID if its renewal is due
            (a request does; operations that do not answer with a cookie
            must not).
        :raises BackendUnavailable: The store could not be reached.
        """
        key = self.key(sid)
        record = self._call("loading", self.backend.load, key)
        if self.clocks is None:
            loaded = self.decode(record, time.time())
        else:
            with self._guard("loading"):
                loaded = renewal.load(self, sid, record, self.clocks, renew)
        if loaded is not None and self.check_index and loaded.meta.user_id is not None:
            key = key if loaded.sid is None else self.key(loaded.sid)
            if not self._call("loading", users.indexed, self, loaded.meta, key):
                return None
        if loaded is None and self.adopter is not None:
            loaded = self.adopter.adopt(self, sid)
        return loaded

    def copy_in(
        self,
        sid: str,
        fetch: Callable[[], tuple[dict[str, t.Any], float] | None],
        then: Callable[[], object] | None = None,
    ) -> tuple[Copy, Loaded | None]:
        """Copy a session from another store, unless this store holds it
        live; return what happened, and the session now live here.

        It happens inside the key's exclusive section: ``fetch`` reads the
        session's data and expiry there (``None``: it is gone), and ``then``
        (the other store forgetting it) runs there after the save, which is
        undone if ``then`` raises. So :meth:`delete` cannot run between the
        copy and the forgetting.

        :raises BackendUnavailable: The store could not be reached.
        """
        key = self.key(sid)
        with self._guard("copying"), self.backend.lock(key):
            # Another request may have copied it since this one looked.
            current = self.decode(self.backend.load(key), time.time())
            if current is not None:
                return Copy.PRESENT, current
            found = fetch()
            if found is None:
                return Copy.GONE, None
            data, expires = found
            try:
                raw = self.serializer.dumps(data)
            except Exception:
                return Copy.UNREADABLE, None
            if len(raw) > self.max_bytes:
                return Copy.TOO_LARGE, None
            now = time.time()
            meta = records.Meta(created=now, issued=now)
            stored = records.pack(meta, raw)
            self.backend.save(key, stored, expires)
            try:
                if then is not None:
                    then()
            except BaseException:
                self.backend.delete(key)
                raise
        return Copy.COPIED, Loaded(data, raw, expires, meta, stored)

    def decode(self, record: Record | None, now: float) -> Loaded | None:
        if record is None or record.expires <= now:
            return None
        try:
            meta, raw = records.unpack(record.data)
            data = self.serializer.loads(raw)
        except Exception as exc:
            logger.warning("Ignoring a session record that fails to decode: %r", exc)
            return None
        return Loaded(data, raw, record.expires, meta, record.data)

    def encode(self, data: dict[str, t.Any]) -> bytes:
        raw = self.serializer.dumps(data)
        self.check_size(raw)
        return raw

    def check_size(self, raw: bytes) -> None:
        if len(raw) > self.max_bytes:
            raise SessionTooLarge(len(raw), self.max_bytes)

    def delete(self, sid: str) -> bool:
        """Remove a session's record, and the adopter's; return whether there
        was one.

        A renewed ID, within its grace period, removes the session it was
        renewed to as well.
        """
        return self._call("deleting", self._delete_session, sid)

    def _delete_session(self, sid: str) -> bool:
        key = self.key(sid)
        new_sid = None
        if self.clocks is not None:
            new_sid = renewal.renewed_to(self, sid, self.backend.load(key), time.time())
        if self.adopter is None:
            deleted = self.delete_record(key)
        else:
            with self.backend.lock(key):
                forgotten = self.adopter.forget(sid)
                deleted = self.backend.delete(key) or forgotten
        if new_sid is not None:
            deleted = self.delete_record(self.key(new_sid)) or deleted
        return deleted

    def delete_record(self, key: str) -> bool:
        # Inside the key's exclusive section: a request in the middle of its
        # locked write must not put the record back after it is removed.
        with self.backend.lock(key):
            return self.backend.delete(key)

    def save(self, changes: Changes, lifetime: float) -> Saved:
        """Apply a request's changes to the store.

        :param changes: What the request did, from
            :meth:`.ServerSideSession.changes`.
        :param lifetime: Seconds a written session lives.
        :return: What the save did and found.
        :raises BackendUnavailable: The store could not be reached; the
            stored record is as it was.
        :raises SessionTooLarge: The session is over ``max_bytes``; the stored
            record is as it was.
        """
        try:
            return saving.save(self, changes, lifetime)
        except self.backend.unavailable_errors as exc:
            raise self._unavailable("saving", exc) from exc

    def keep(self, sid: str, loaded: Loaded, loaded_at: float, lifetime: float) -> Saved:
        """Save a session its request only read: extend its record if due.

        The cheap case of :meth:`save`, for a request that assigned
        nothing, regenerated nothing and changed no value handed out.

        :param loaded_at: When the request read it (:func:`time.monotonic`).
        :return: :attr:`~.Outcome.KEPT`, or :attr:`~.Outcome.DROPPED` if the
            record was found gone or the session ended, as a :class:`.Saved`.
        :raises BackendUnavailable: The store could not be reached.
        """
        try:
            return saving.keep(self, sid, loaded, loaded_at, lifetime)
        except self.backend.unavailable_errors as exc:
            raise self._unavailable("saving", exc) from exc

    def moved(self, meta: records.Meta, new_key: str, expires: float) -> None:
        """Record that a session moved to a new storage key.

        Call it whenever a record moves to a new key (regenerate, renewal),
        inside :func:`users.section(self, meta.user_id) <.users.section>`, entered
        before the record's own lock. It points the user's index entry of a
        bound session at ``new_key`` and keeps the index alive until at
        least ``expires``; for an unbound session it does nothing.

        .. versionadded:: 0.2
        """
        users.moved(self, meta, new_key, expires)

    def users_call(self, action: str, func: Callable[..., T], *args: t.Any) -> T:
        """Run one of :mod:`.users`' operations on this store."""
        return self._call(action, func, self, *args)

    def get(self, sid: str) -> dict[str, t.Any] | None:
        """The data of a live session, or ``None``."""
        loaded = self.load(sid)
        return None if loaded is None else loaded.data

    def cleanup(self) -> Iterator[int]:
        """Remove expired records, yielding how many each step removed."""
        with self._guard("cleaning up"):
            yield from self.backend.cleanup(time.time())

    def count(self) -> int:
        """The number of live sessions, the adopter's included."""
        count = self._call("counting", self.backend.count, time.time())
        return count + (0 if self.adopter is None else self.adopter.count())

    def clear(self) -> int:
        """Remove every session, the adopter's first so that none of them is
        adopted afterwards; return how many were live."""
        waiting = 0 if self.adopter is None else self.adopter.clear()
        return self._call("clearing", self.backend.clear) + waiting


def _error_text(exc: BaseException) -> str:
    """The exception's type and message on one line, for the log."""
    message = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__
