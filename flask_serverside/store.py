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

from . import clocks as clock
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
    :param sid: The ID the session is stored under now, when it is not the
        one asked for: its ID was renewed.
    :param renewed: Whether this load renewed the ID (rather than following
        an earlier renewal).
    """

    data: dict[str, t.Any]
    raw: bytes
    expires: float
    meta: records.Meta
    stored: bytes
    sid: str | None = None
    renewed: bool = False


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


class Adopter(t.Protocol):
    """A store of another session extension that sessions are taken from."""

    def read(self, sid: str) -> tuple[dict[str, t.Any], float] | None:
        """The data and expiry of a live session with this ID, or ``None``."""

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
    clocks: clock.Clocks | None = None
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
            loaded = self._decode(record, time.time())
        else:
            with self._guard("loading"):
                loaded = self._clocked(sid, record, self.clocks, renew)
        if loaded is not None and self.check_index and loaded.meta.user_id is not None:
            key = key if loaded.sid is None else self.key(loaded.sid)
            if not self._call("loading", users.indexed, self, loaded.meta, key):
                return None
        if loaded is None and self.adopter is not None:
            loaded = self._adopt(sid, self.adopter)
        return loaded

    def _adopt(self, sid: str, adopter: Adopter) -> Loaded | None:
        """Copy a session the adopter still holds into this store, then
        have the adopter forget it, so it can only be taken over once.

        It happens inside the key's exclusive section, so that
        :meth:`delete` cannot run between the copy and the forgetting, and a
        session is in both stores only while that section is held.
        """
        key = self.key(sid)
        with self._guard("adopting"), self.backend.lock(key):
            # Another request may have adopted it since this one looked.
            loaded = self._decode(self.backend.load(key), time.time())
            if loaded is not None:
                return loaded
            found = adopter.read(sid)
            if found is None:
                return None
            data, expires = found
            raw = self.serializer.dumps(data)
            if len(raw) > self.max_bytes:
                logger.warning(
                    "Not adopting a session of %d bytes, more than"
                    " SESSION_MAX_BYTES=%d: its user starts a new session.",
                    len(raw),
                    self.max_bytes,
                )
                return None
            now = time.time()
            meta = records.Meta(created=now, issued=now)
            stored = records.pack(meta, raw)
            self.backend.save(key, stored, expires)
            try:
                adopter.forget(sid)
            except BaseException:
                self.backend.delete(key)
                raise
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

    @staticmethod
    def _peek(record: Record | None, now: float) -> records.Meta | None:
        """The header of a live record, or ``None``."""
        if record is None or record.expires <= now:
            return None
        try:
            return records.unpack(record.data)[0]
        except ValueError:
            return None

    def _clocked(
        self, sid: str, record: Record | None, clocks: clock.Clocks, renew: bool
    ) -> Loaded | None:
        """:meth:`load` with the absolute lifetime and ID renewal applied."""
        now = time.time()
        meta = self._peek(record, now)
        if meta is not None and clock.RENEWED in meta.extra:
            return self._follow(sid, meta, clocks, now)
        loaded = self._decode(record, now)
        if loaded is None:
            return None
        if loaded.meta.created is None:
            # A record from before headers: its lifetime starts now.
            loaded.meta = records.Meta(now, now, loaded.meta.extra)
        if clocks.ended(loaded.meta, now):
            self._end(self.key(sid), clocks)
            return None
        if renew and clocks.renewal_due(loaded.meta, now):
            return self._renew(sid, clocks, loaded.meta.user_id)
        return loaded

    def _end(self, key: str, clocks: clock.Clocks) -> None:
        """Remove a record past its absolute lifetime, under its lock, so a
        request in the middle of its locked write cannot put it back."""
        with self.backend.lock(key):
            now = time.time()
            meta = self._peek(self.backend.load(key), now)
            if meta is not None and clocks.ended(meta, now):
                self.backend.delete(key)

    def _follow(
        self, sid: str, pointer: records.Meta, clocks: clock.Clocks, now: float
    ) -> Loaded | None:
        """The session a renewed ID points to, within the grace period."""
        new_sid = self._pointer_target(sid, pointer, clocks, now)
        if new_sid is None:
            return None
        loaded = self._decode(self.backend.load(self.key(new_sid)), now)
        if loaded is None or clocks.ended(loaded.meta, now):
            return None
        loaded.sid = new_sid
        return loaded

    @staticmethod
    def _pointer_target(
        sid: str, pointer: records.Meta, clocks: clock.Clocks, now: float
    ) -> str | None:
        if not clocks.pointer_live(pointer, now):
            return None
        return clock.unseal(pointer.extra[clock.RENEWED], sid)

    def _renew(self, sid: str, clocks: clock.Clocks, user_id: str | None) -> Loaded | None:
        """Move a session whose renewal is due to a new ID, once: requests
        that arrive meanwhile find the pointer under the lock and follow it.
        A bound session's index is locked first, as for any move."""
        key = self.key(sid)
        with users.section(self, user_id), self.backend.lock(key):
            record = self.backend.load(key)
            now = time.time()
            meta = self._peek(record, now)
            if meta is not None and clock.RENEWED in meta.extra:
                return self._follow(sid, meta, clocks, now)
            loaded = self._decode(record, now)
            if loaded is None or not clocks.renewal_due(loaded.meta, now):
                return loaded
            return self._move_to_new_id(sid, loaded, clocks, now)

    def _move_to_new_id(
        self, old_sid: str, loaded: Loaded, clocks: clock.Clocks, now: float
    ) -> Loaded:
        """Store a session under a new ID (data, creation time and binding
        kept; issued now) and leave a pointer to it under the old key for
        the grace period. Called under the old key's lock."""
        new_sid = self.new_id()
        meta = records.Meta(loaded.meta.created, now, dict(loaded.meta.extra))
        stored = records.pack(meta, loaded.raw)
        self.backend.save(self.key(new_sid), stored, loaded.expires)
        self.moved(meta, self.key(new_sid), loaded.expires)
        if clocks.grace > 0:
            sealed = {clock.RENEWED: clock.seal(new_sid, old_sid)}
            pointer = records.pack(records.Meta(loaded.meta.created, now, sealed), b"")
            expires = min(loaded.expires, now + clocks.grace)
            self.backend.save(self.key(old_sid), pointer, expires)
        else:
            self.backend.delete(self.key(old_sid))
        return Loaded(loaded.data, loaded.raw, loaded.expires, meta, stored, new_sid, True)

    def _encode(self, data: dict[str, t.Any]) -> bytes:
        raw = self.serializer.dumps(data)
        self._check_size(raw)
        return raw

    def _check_size(self, raw: bytes) -> None:
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
            new_sid = self._renewed_to(sid, self.backend.load(key), time.time())
        if self.adopter is None:
            deleted = self._delete(key)
        else:
            with self.backend.lock(key):
                forgotten = self.adopter.forget(sid)
                deleted = self.backend.delete(key) or forgotten
        if new_sid is not None:
            deleted = self._delete(self.key(new_sid)) or deleted
        return deleted

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
        try:
            return self._save_guarded(session, lifetime)
        except self.backend.unavailable_errors as exc:
            raise self._unavailable("saving", exc) from exc

    def _save_guarded(self, session: ServerSideSession, lifetime: float) -> Outcome:
        """The body of :meth:`save`, which turns its store errors into
        :exc:`~flask_serverside.BackendUnavailable`."""
        if session.destroyed_sid is not None:
            session.destroy_removed = self._delete(self.key(session.destroyed_sid))
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
        if self.clocks is not None and self._ended(session, self.clocks):
            return Outcome.DROPPED
        same_record = session.regenerated_from is None and session.new_created is None
        if same_record and session.unchanged():
            # Nothing assigned and no handed-out value changed: no encoding.
            return self._touch(session, session.stored, lifetime)
        raw = self.serializer.dumps(session.content)
        if same_record and raw == session.stored.raw:
            return self._touch(session, session.stored, lifetime)
        return self._write(session, session.stored, raw, lifetime)

    def _create(self, session: ServerSideSession, lifetime: float) -> Outcome:
        if is_empty(session.content) and session.binding is None:
            return Outcome.NOTHING
        raw = self._encode(session.content)
        now = time.time()
        meta = records.Meta(created=now, issued=now, extra=session.binding or {})
        stored = records.pack(meta, raw)
        self.backend.save(self.key(session.sid), stored, now + lifetime)
        return Outcome.CREATED

    def _ended(self, session: ServerSideSession, clocks: clock.Clocks) -> bool:
        """Whether the session passed its absolute lifetime while this request
        ran; if so its record is removed and nothing is saved."""
        assert session.stored is not None
        if not clocks.ended(session.stored.meta, time.time()):
            return False
        self._end(self.key(session.regenerated_from or session.sid), clocks)
        logger.info("Dropping this request's session changes: the session ended.")
        return True

    def _touch(self, session: ServerSideSession, stored: Loaded, lifetime: float) -> Outcome:
        """Extend an unmodified session's record when the touch interval is
        due, or when the request held its copy for over :data:`CONFIRM_AFTER`
        seconds; a record found gone (destroyed, regenerated or expired
        meanwhile) is :attr:`Outcome.DROPPED`."""
        now = time.time()
        if stored.expires <= now:
            # Expired while this request ran: touching would bring it back.
            return Outcome.DROPPED
        due = now - (stored.expires - lifetime) >= min(self.touch_interval, lifetime / 2)
        slow = time.monotonic() - session.loaded_at > CONFIRM_AFTER
        if due or slow:
            if not self.backend.touch(self.key(session.sid), now + lifetime):
                return Outcome.DROPPED
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
        sid = session.regenerated_from or session.sid
        key = self.key(sid)
        with self.backend.lock(key):
            now = time.time()
            record = self.backend.load(key)
            moved = self._renewed_to(sid, record, now)
            if moved is None:
                return self._write_locked(session, stored, raw, lifetime, key, record, now)
        # Renewed since this request read it: the changes go to the new ID.
        session.follow_renewal(moved)
        return self._write(session, stored, raw, lifetime)

    def _renewed_to(self, sid: str, record: Record | None, now: float) -> str | None:
        """The new ID of a session renewed within the grace period."""
        if self.clocks is None:
            return None
        meta = self._peek(record, now)
        if meta is None or clock.RENEWED not in meta.extra:
            return None
        return self._pointer_target(sid, meta, self.clocks, now)

    def _write_locked(
        self,
        session: ServerSideSession,
        stored: Loaded,
        raw: bytes,
        lifetime: float,
        key: str,
        record: Record | None,
        now: float,
    ) -> Outcome:
        """The part of :meth:`_write` inside the exclusive section of ``key``,
        whose ``record`` was read there."""
        data, meta = session.content, stored.meta
        if record is None or record.expires <= now or record.data != stored.stored:
            current = self._decode(record, now)
            merged = self._merge(session, current)
            if current is None or merged is None:
                return Outcome.DROPPED
            data, raw, meta = merged, self.serializer.dumps(merged), current.meta
        if is_empty(data) and session.binding is None:
            self.backend.delete(key)
            return Outcome.EMPTIED
        self._check_size(raw)
        meta = _restarted(session, meta)
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
        if session.regenerated_from is not None or is_empty(session.content):
            return False
        if len(raw) > self.max_bytes:
            return False
        key = self.key(session.sid)
        data = records.pack(_restarted(session, stored.meta), raw)
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
            return dict(session.content)
        merged = current.data
        for key in session.changed_keys(self.serializer):
            if key in session.content:
                merged[key] = session.content[key]
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

def _restarted(session: ServerSideSession, meta: records.Meta) -> records.Meta:
    """The header to write: with a new creation time if the session's
    absolute lifetime was restarted (binding to another user)."""
    if session.new_created is None:
        return meta
    return records.Meta(session.new_created, meta.issued, meta.extra)
