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

from . import ids
from . import record as records
from .exceptions import BackendUnavailable
from .exceptions import SessionTooLarge
from .session import is_empty

if t.TYPE_CHECKING:
    from .backends.base import Backend
    from .backends.base import Record
    from .serializers import Serializer
    from .session import ServerSideSession

logger = logging.getLogger("flask_serverside")
T = t.TypeVar("T")

#: Seconds a request may hold its loaded copy of an unmodified session
#: before its save confirms that the record still exists: a slow request
#: confirms its record still exists before re-sending the cookie, so that it
#: does not put back the cookie of a session another request regenerated or
#: destroyed meanwhile. Faster requests refresh the cookie without asking the
#: store, unless ``SESSION_TOUCH_INTERVAL`` is due.
CONFIRM_AFTER = 1.0


@dataclass
class Loaded:
    """A session as read from the store.

    :param data: The decoded data, owned by the session from now on.
    :param raw: The serialized data as stored, to find changes at save time.
    :param expires: The stored expiry, as a Unix timestamp.
    :param meta: The record's metadata (creation time, user binding).
    :param stored: The whole stored record, header included, to check at
        save time that nobody else wrote it meanwhile.
    """

    data: dict[str, t.Any]
    raw: bytes
    expires: float
    meta: records.Meta
    stored: bytes


class Outcome(enum.Enum):
    """What saving a session did to the store."""

    #: Nothing stored, nothing changed.
    NOTHING = "nothing"
    #: Unchanged; its expiry may have been extended.
    KEPT = "kept"
    #: A new record was created, or the record moved to a new ID.
    CREATED = "created"
    #: The record was rewritten.
    WRITTEN = "written"
    #: The merged session was empty, so its record was removed.
    EMPTIED = "emptied"
    #: The record was gone by the time of the save: another request destroyed
    #: or regenerated the session, or it expired. Changes are dropped and no
    #: cookie is sent.
    DROPPED = "dropped"


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
    """

    backend: Backend
    serializer: Serializer
    prefix: str
    id_bytes: int
    max_bytes: int
    touch_interval: float
    #: Another store whose sessions are taken over as their users come back;
    #: see :func:`flask_serverside.migrate.adopt_flask_session_files`.
    adopter: Adopter | None = None

    def new_id(self) -> str:
        return ids.generate(self.id_bytes)

    def key(self, sid: str) -> str:
        return ids.storage_key(self.prefix, sid)

    @contextmanager
    def _guard(self, action: str) -> Iterator[None]:
        try:
            yield
        except self.backend.unavailable_errors as exc:
            logger.error(
                "Session store unavailable while %s (%s): %s",
                action,
                self.backend.describe(),
                _error_text(exc),
            )
            raise BackendUnavailable() from exc

    def _call(self, action: str, func: Callable[..., T], *args: t.Any) -> T:
        with self._guard(action):
            return func(*args)

    def load(self, sid: str) -> Loaded | None:
        """Read a live session, or ``None`` if missing, expired or corrupt.

        :raises BackendUnavailable: The store could not be reached.
        """
        record = self._call("loading", self.backend.load, self.key(sid))
        loaded = self._decode(record, time.time())
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
            current = self._decode(self.backend.load(key), time.time())
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

    def _decode(self, record: Record | None, now: float) -> Loaded | None:
        if record is None or record.expires <= now:
            return None
        try:
            meta, raw = records.unpack(record.data)
            data = self.serializer.loads(raw)
        except Exception as exc:
            logger.warning("Ignoring a session record that fails to decode: %r", exc)
            return None
        return Loaded(data, raw, record.expires, meta, record.data)

    def _encode(self, data: dict[str, t.Any]) -> bytes:
        raw = self.serializer.dumps(data)
        self._check_size(raw)
        return raw

    def _check_size(self, raw: bytes) -> None:
        if len(raw) > self.max_bytes:
            raise SessionTooLarge(len(raw), self.max_bytes)

    def delete(self, sid: str) -> bool:
        """Remove a session's record, and the adopter's; return whether there
        was one."""
        if self.adopter is None:
            return self._call("deleting", self._delete, self.key(sid))
        key = self.key(sid)
        with self._guard("deleting"), self.backend.lock(key):
            forgotten = self.adopter.forget(sid)
            return self.backend.delete(key) or forgotten

    def _delete(self, key: str) -> bool:
        # Inside the key's exclusive section: a request in the middle of its
        # locked write must not put the record back after it is removed.
        with self.backend.lock(key):
            return self.backend.delete(key)

    def save(self, session: ServerSideSession, lifetime: float) -> Outcome:
        """Apply the session's changes to the store.

        :param lifetime: Seconds a written session lives.
        :raises BackendUnavailable: The store could not be reached; the
            stored record is as it was.
        :raises SessionTooLarge: The session is over ``max_bytes``; the stored
            record is as it was.
        """
        with self._guard("saving"):
            if session.destroyed_sid is not None:
                session.destroy_removed = self._delete(self.key(session.destroyed_sid))
            if session.stored is None:
                return self._create(session, lifetime)
            raw = self.serializer.dumps(session.data)
            if raw == session.stored.raw and session.regenerated_from is None:
                return self._touch(session, session.stored, lifetime)
            return self._write(session, session.stored, raw, lifetime)

    def _create(self, session: ServerSideSession, lifetime: float) -> Outcome:
        if is_empty(session.data):
            return Outcome.NOTHING
        raw = self._encode(session.data)
        now = time.time()
        stored = records.pack(records.Meta(created=now, issued=now), raw)
        self.backend.save(self.key(session.sid), stored, now + lifetime)
        return Outcome.CREATED

    def _touch(self, session: ServerSideSession, stored: Loaded, lifetime: float) -> Outcome:
        """Extend an unmodified session's record when the touch interval is
        due, or when the request held its copy for over :data:`CONFIRM_AFTER`
        seconds; a record found gone (destroyed, regenerated or expired
        meanwhile) is :attr:`Outcome.DROPPED`."""
        now = time.time()
        due = now - (stored.expires - lifetime) >= min(self.touch_interval, lifetime / 2)
        slow = time.monotonic() - session.loaded_at > CONFIRM_AFTER
        if (due or slow) and not self.backend.touch(self.key(session.sid), now + lifetime):
            return Outcome.DROPPED
        return Outcome.KEPT

    def _write(
        self, session: ServerSideSession, stored: Loaded, raw: bytes, lifetime: float
    ) -> Outcome:
        """Write the session, in one atomic step if nobody else wrote it since
        this request read it, else inside the exclusive section of its key.

        If another request wrote the record since this one read it, this
        request's changed keys are applied to the fresh record instead.
        """
        if self._replace(session, stored, raw, lifetime):
            return Outcome.WRITTEN
        key = self.key(session.regenerated_from or session.sid)
        with self.backend.lock(key):
            now = time.time()
            record = self.backend.load(key)
            data, meta = session.data, stored.meta
            # An expired record is gone: merging finds nothing to write into.
            if record is None or record.data != stored.stored or record.expires <= now:
                current = self._decode(record, now)
                merged = self._merge(session, current)
                if current is None or merged is None:
                    return Outcome.DROPPED
                data, raw, meta = merged, self.serializer.dumps(merged), current.meta
            if is_empty(data):
                self.backend.delete(key)
                return Outcome.EMPTIED
            self._check_size(raw)
            if session.regenerated_from is None:
                self.backend.save(key, records.pack(meta, raw), now + lifetime)
                return Outcome.WRITTEN
            meta = records.Meta(meta.created, now, meta.extra)
            self.backend.save(self.key(session.sid), records.pack(meta, raw), now + lifetime)
            self.backend.delete(key)
            return Outcome.CREATED

    def _replace(
        self, session: ServerSideSession, stored: Loaded, raw: bytes, lifetime: float
    ) -> bool:
        """The fast path of :meth:`_write` for a plain rewrite of a record.

        Regenerating, emptying and an oversized session take the locked path,
        which handles them.
        """
        if session.regenerated_from is not None or is_empty(session.data):
            return False
        if len(raw) > self.max_bytes:
            return False
        key = self.key(session.sid)
        data = records.pack(stored.meta, raw)
        return self.backend.replace(key, stored.stored, data, time.time() + lifetime)

    def _merge(
        self, session: ServerSideSession, current: Loaded | None
    ) -> dict[str, t.Any] | None:
        """This request's changes applied to a record another request wrote,
        or ``None`` if that request destroyed or regenerated the session."""
        if current is None:
            logger.info(
                "Dropping this request's session changes: the session expired,"
                " or another request destroyed or regenerated it, meanwhile."
            )
            return None
        if session.cleared:
            return dict(session.data)
        merged = current.data
        for key in session.changed_keys(self.serializer):
            if key in session.data:
                merged[key] = session.data[key]
            else:
                merged.pop(key, None)
        return merged

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
