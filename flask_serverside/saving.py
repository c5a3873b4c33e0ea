"""Saving a session: what changed, and the one-step or locked write that
stores it, merged with what other requests wrote meanwhile.

.. versionadded:: 0.2
"""

from __future__ import annotations

import enum
import logging
import time
import typing as t

from . import record as records
from . import renewal
from . import users
from .record import Loaded
from .session import is_empty

if t.TYPE_CHECKING:
    from .backends.base import Record
    from .session import ServerSideSession
    from .store import SessionStore

logger = logging.getLogger("flask_serverside")

#: Seconds a request may hold its loaded copy of an unmodified session
#: before its save confirms that the record still exists: a slow request
#: confirms its record still exists before re-sending the cookie, so that it
#: does not put back the cookie of a session another request regenerated or
#: destroyed meanwhile. Faster requests refresh the cookie without asking the
#: store, unless ``SESSION_TOUCH_INTERVAL`` is due.
CONFIRM_AFTER = 1.0


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


def save(store: SessionStore, session: ServerSideSession, lifetime: float) -> Outcome:
    """Apply the session's changes to the store (inside its error guard)."""
    if session.destroyed_sid is not None:
        session.destroy_removed = _destroy(store, store.key(session.destroyed_sid))
    user_id = _moving_user(store, session)
    if user_id is None:
        outcome = _save(store, session, lifetime)
        if outcome is Outcome.WRITTEN and session.stored is not None:
            # A write moves the expiry, as a touch does.
            users.touched(store, session.stored.meta, time.time() + lifetime)
        return outcome
    # The index's section first: no revoke runs between the record's
    # move and its index entry's.
    with users.section(store, user_id):
        outcome = _save(store, session, lifetime)
        if outcome is Outcome.CREATED:
            _index(store, session, time.time() + lifetime)
        return outcome


def _destroy(store: SessionStore, key: str) -> bool:
    """Remove a destroyed session's record under its lock, and its entry in
    its user's index; return whether there was a record."""
    with store.backend.lock(key):
        record = store.backend.load(key)
        removed = store.backend.delete(key)
    meta = renewal.peek(record, time.time())
    if meta is not None:
        users.forget(store, meta, key)
    return removed


def _moving_user(store: SessionStore, session: ServerSideSession) -> str | None:
    """The user whose index this save changes: the one being bound, or
    the one of a bound session moving to a new ID."""
    if session.binding is not None:
        return session.binding["user"]
    if session.regenerated_from is None or session.stored is None:
        return None
    return session.stored.meta.user_id


def _index(store: SessionStore, session: ServerSideSession, expires: float) -> None:
    key = store.key(session.sid)
    if session.binding is None:
        assert session.stored is not None
        store.moved(session.stored.meta, key, expires)
        return
    meta = records.Meta(extra=session.binding)
    session.evicted = users.bound(store, meta, key, expires, store.max_per_user)


def _save(store: SessionStore, session: ServerSideSession, lifetime: float) -> Outcome:
    if session.stored is None:
        return _create(store, session, lifetime)
    if store.clocks is not None and renewal.ended(store, session, store.clocks):
        return Outcome.DROPPED
    same_record = session.regenerated_from is None and session.new_created is None
    if same_record and session.unchanged():
        # Nothing assigned and no handed-out value changed: no encoding.
        return _touch(store, session, session.stored, lifetime)
    raw = store.serializer.dumps(session.content)
    if same_record and raw == session.stored.raw:
        return _touch(store, session, session.stored, lifetime)
    return _write(store, session, session.stored, raw, lifetime)


def _create(store: SessionStore, session: ServerSideSession, lifetime: float) -> Outcome:
    if is_empty(session.content) and session.binding is None:
        return Outcome.NOTHING
    raw = store.encode(session.content)
    now = time.time()
    meta = records.Meta(created=now, issued=now, extra=session.binding or {})
    stored = records.pack(meta, raw)
    store.backend.save(store.key(session.sid), stored, now + lifetime)
    return Outcome.CREATED


def _touch(
    store: SessionStore, session: ServerSideSession, stored: Loaded, lifetime: float
) -> Outcome:
    """Extend an unmodified session's record when the touch interval is
    due, or when the request held its copy for over :data:`CONFIRM_AFTER`
    seconds; a record found gone (destroyed, regenerated or expired
    meanwhile) is :attr:`Outcome.DROPPED`."""
    now = time.time()
    if stored.expires <= now:
        # Expired while this request ran: touching would bring it back.
        return Outcome.DROPPED
    due = now - (stored.expires - lifetime) >= min(store.touch_interval, lifetime / 2)
    slow = time.monotonic() - session.loaded_at > CONFIRM_AFTER
    if due or slow:
        if not store.backend.touch(store.key(session.sid), now + lifetime):
            return Outcome.DROPPED
        users.touched(store, stored.meta, now + lifetime)
    return Outcome.KEPT


def _write(
    store: SessionStore, session: ServerSideSession, stored: Loaded, raw: bytes, lifetime: float
) -> Outcome:
    """Write the session, in one atomic step if nobody else wrote it since
    this request read it, else inside the exclusive section of its key.

    If another request wrote the record since this one read it, this
    request's changed keys are applied to the fresh record instead.
    """
    if _replace(store, session, stored, raw, lifetime):
        return Outcome.WRITTEN
    sid = session.regenerated_from or session.sid
    key = store.key(sid)
    with store.backend.lock(key):
        now = time.time()
        record = store.backend.load(key)
        moved = renewal.renewed_to(store, sid, record, now)
        if moved is None:
            return _write_locked(store, session, stored, raw, lifetime, key, record, now)
    # Renewed since this request read it: the changes go to the new ID.
    session.follow_renewal(moved)
    return _write(store, session, stored, raw, lifetime)


def _write_locked(
    store: SessionStore,
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
        current = store.decode(record, now)
        merged = _merge(store, session, current)
        if current is None or merged is None:
            return Outcome.DROPPED
        data, raw, meta = merged, store.serializer.dumps(merged), current.meta
    if is_empty(data) and session.binding is None:
        store.backend.delete(key)
        return Outcome.EMPTIED
    store.check_size(raw)
    meta = _restarted(session, meta)
    if session.regenerated_from is None:
        store.backend.save(key, records.pack(meta, raw), now + lifetime)
        return Outcome.WRITTEN
    meta = records.Meta(meta.created, now, session.binding or meta.extra)
    store.backend.save(store.key(session.sid), records.pack(meta, raw), now + lifetime)
    store.backend.delete(key)
    return Outcome.CREATED


def _replace(
    store: SessionStore, session: ServerSideSession, stored: Loaded, raw: bytes, lifetime: float
) -> bool:
    """The fast path of :meth:`_write` for a plain rewrite of a record.

    Regenerating, emptying and an oversized session take the locked path,
    which handles them.
    """
    if session.regenerated_from is not None or is_empty(session.content):
        return False
    if len(raw) > store.max_bytes:
        return False
    key = store.key(session.sid)
    data = records.pack(_restarted(session, stored.meta), raw)
    return store.backend.replace(key, stored.stored, data, time.time() + lifetime)


def _merge(
    store: SessionStore, session: ServerSideSession, current: Loaded | None
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
    for key in session.changed_keys(store.serializer):
        if key in session.content:
            merged[key] = session.content[key]
        else:
            merged.pop(key, None)
    return merged


def _restarted(session: ServerSideSession, meta: records.Meta) -> records.Meta:
    """The header to write: with a new creation time if the session's
    absolute lifetime was restarted (binding to another user)."""
    if session.new_created is None:
        return meta
    return records.Meta(session.new_created, meta.issued, meta.extra)
