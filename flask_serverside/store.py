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
from . import users
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
    #: Another request destroyed or regenerated the session; changes dropped.
    DROPPED = "dropped"


class Adopter(t.Protocol):
    """A store of another session extension that sessions are taken from."""

    def read(self, sid: str) -> tuple[dict[str, t.Any], float] | None:
        """The data and expiry of a live session with this ID, or ``None``."""

    def forget(self, sid: str) -> None:
        """Remove the session once this store holds it."""


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

    def new_id(self) -> str:
        return ids.generate(self.id_bytes)

    def key(self, sid: str) -> str:
        return ids.storage_key(self.prefix, sid)

    @contextmanager
    def _guard(self, action: str) -> Iterator[None]:
        try:
            yield
        except self.backend.unavailable_errors as exc:
            logger.error("Session store unavailable while %s: %r", action, exc)
            raise BackendUnavailable() from exc

    def _call(self, action: str, func: Callable[..., T], *args: t.Any) -> T:
        with self._guard(action):
            return func(*args)

    def load(self, sid: str) -> Loaded | None:
        """Read a live session, or ``None`` if missing, expired or corrupt.

        :raises BackendUnavailable: The store could not be reached.
        """
        key = self.key(sid)
        record = self._call("loading", self.backend.load, key)
        loaded = self._decode(record, time.time())
        if loaded is not None and self.check_index and loaded.meta.user_id is not None:
            if not self._call("loading", users.indexed, self, loaded.meta, key):
                return None
        if loaded is None and self.adopter is not None:
            loaded = self._adopt(sid, self.adopter)
        return loaded

    def _adopt(self, sid: str, adopter: Adopter) -> Loaded | None:
        """Copy a session the adopter still holds into this store, then
        have the adopter forget it, so it can only be taken over once."""
        found = adopter.read(sid)
        if found is None:
            return None
        data, expires = found
        raw = self.serializer.dumps(data)
        now = time.time()
        meta = records.Meta(created=now, issued=now)
        stored = records.pack(meta, raw)
        self._call("adopting", self.backend.save, self.key(sid), stored, expires)
        adopter.forget(sid)
        return Loaded(data, raw, expires, meta, stored)

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
        """Remove a session's record; return whether there was one."""
        return self._call("deleting", self._delete, self.key(sid))

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
                self._delete(self.key(session.destroyed_sid))
            user_id = self._moving_user(session)
            if user_id is None:
                outcome = self._save(session, lifetime)
                if outcome is Outcome.WRITTEN and session.stored is not None:
                    # A write moves the expiry, as a touch does.
                    users.touched(self, session.stored.meta, time.time() + lifetime)
                return outcome
            # The index's section first: no revoke runs between the record's
            # move and its index entry's.
            with users.section(self, user_id):
                outcome = self._save(session, lifetime)
                if outcome is Outcome.CREATED:
                    self._index(session, time.time() + lifetime)
                return outcome

    def _moving_user(self, session: ServerSideSession) -> str | None:
        """The user whose index this save changes: the one being bound, or
        the one of a bound session moving to a new ID."""
        if session.binding is not None:
            return session.binding["user"]
        if session.regenerated_from is None or session.stored is None:
            return None
        return session.stored.meta.user_id

    def _index(self, session: ServerSideSession, expires: float) -> None:
        key = self.key(session.sid)
        if session.binding is None:
            assert session.stored is not None
            self.moved(session.stored.meta, key, expires)
            return
        meta = records.Meta(extra=session.binding)
        session.evicted = users.bound(self, meta, key, expires, self.max_per_user)

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

    def _save(self, session: ServerSideSession, lifetime: float) -> Outcome:
        if session.stored is None:
            return self._create(session, lifetime)
        raw = self.serializer.dumps(session.data)
        if raw == session.stored.raw and session.regenerated_from is None:
            return self._touch(session, session.stored, lifetime)
        return self._write(session, session.stored, raw, lifetime)

    def _create(self, session: ServerSideSession, lifetime: float) -> Outcome:
        if is_empty(session.data) and session.binding is None:
            return Outcome.NOTHING
        raw = self._encode(session.data)
        now = time.time()
        meta = records.Meta(created=now, issued=now, extra=session.binding or {})
        stored = records.pack(meta, raw)
        self.backend.save(self.key(session.sid), stored, now + lifetime)
        return Outcome.CREATED

    def _touch(self, session: ServerSideSession, stored: Loaded, lifetime: float) -> Outcome:
        now = time.time()
        if now - (stored.expires - lifetime) >= min(self.touch_interval, lifetime / 2):
            self.backend.touch(self.key(session.sid), now + lifetime)
            users.touched(self, stored.meta, now + lifetime)
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
            if record is None or record.data != stored.stored:
                current = self._decode(record, now)
                merged = self._merge(session, current)
                if current is None or merged is None:
                    return Outcome.DROPPED
                data, raw, meta = merged, self.serializer.dumps(merged), current.meta
            if is_empty(data) and session.binding is None:
                self.backend.delete(key)
                return Outcome.EMPTIED
            self._check_size(raw)
            if session.regenerated_from is None:
                self.backend.save(key, records.pack(meta, raw), now + lifetime)
                return Outcome.WRITTEN
            meta = records.Meta(meta.created, now, session.binding or meta.extra)
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
                "Dropping this request's session changes: another request"
                " destroyed or regenerated the session meanwhile."
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
        return self._call("counting", self.backend.count, time.time())

    def clear(self) -> int:
        return self._call("clearing", self.backend.clear)

