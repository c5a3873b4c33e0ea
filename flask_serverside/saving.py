"""Saving a session: from the :class:`~flask_serverside.changes.Changes`
of a request, the one-step or locked write that stores them, merged with
what other requests wrote meanwhile; what the save found comes back as a
:class:`Saved`.

.. versionadded:: 0.2
"""

from __future__ import annotations

import enum
import logging
import time
import typing as t
from dataclasses import dataclass
from dataclasses import replace

from . import record as records
from . import renewal
from . import users
from .changes import Changes
from .changes import is_empty
from .record import Loaded

if t.TYPE_CHECKING:
    from .backends.base import Record
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


@dataclass(frozen=True)
class Saved:
    """What saving a session did, and what it found out on the way.

    .. versionadded:: 0.2
    """

    outcome: Outcome
    #: Whether a destroyed session's record was found and removed.
    destroy_removed: bool = False
    #: The handles of sessions that binding this one ended
    #: (``SESSION_MAX_PER_USER``).
    evicted: tuple[str, ...] = ()
    #: The ID the session was found renewed to while saving; the changes
    #: went there, and so does the cookie.
    renewed_to: str | None = None


def save(store: SessionStore, changes: Changes, lifetime: float) -> Saved:
    """Apply a request's changes to the store (inside its error guard)."""
    removed = False
    if changes.destroyed_sid is not None:
        removed = _destroy(store, store.key(changes.destroyed_sid))
    user_id = _moving_user(changes)
    if user_id is None:
        saved = _save(store, changes, lifetime)
        if saved.outcome is Outcome.WRITTEN and changes.loaded is not None:
            # A write moves the expiry, as a touch does.
            users.touched(store, changes.loaded.meta, time.time() + lifetime)
        # dataclasses.replace costs as much as the rest of a read's save.
        return replace(saved, destroy_removed=True) if removed else saved
    # The index's section first: no revoke runs between the record's
    # move and its index entry's.
    with users.section(store, user_id):
        saved = _save(store, changes, lifetime)
        evicted: tuple[str, ...] = ()
        if saved.outcome is Outcome.CREATED:
            if saved.renewed_to is not None:
                changes = changes.following(saved.renewed_to)
            evicted = _index(store, changes, time.time() + lifetime)
        return replace(saved, destroy_removed=removed, evicted=evicted)


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


def _moving_user(changes: Changes) -> str | None:
    """The user whose index this save changes: the one being bound, or
    the one of a bound session moving to a new ID."""
    if changes.binding is not None:
        return changes.binding["user"]
    if changes.regenerated_from is None or changes.loaded is None:
        return None
    return changes.loaded.meta.user_id


def _index(store: SessionStore, changes: Changes, expires: float) -> tuple[str, ...]:
    """Index the session's new key; return the handles of the sessions
    that binding it evicted."""
    key = store.key(changes.sid)
    if changes.binding is None:
        assert changes.loaded is not None
        store.moved(changes.loaded.meta, key, expires)
        return ()
    meta = records.Meta(extra=changes.binding)
    return tuple(users.bound(store, meta, key, expires, store.max_per_user))


#: What :func:`keep` can find, built once: a read request's save builds nothing.
_KEEP_OUTCOMES = {outcome: Saved(outcome) for outcome in (Outcome.KEPT, Outcome.DROPPED)}


def keep(
    store: SessionStore, sid: str, loaded: Loaded, loaded_at: float, lifetime: float
) -> Saved:
    """Save a session its request only read (nothing assigned, and every
    value handed out as it was): no :class:`Changes` to build, nothing to
    encode or write; the record is extended if due (see :func:`_touch`).

    :param sid: The ID the session is stored under.
    :param loaded_at: When the request read it (:func:`time.monotonic`).
    """
    if store.clocks is not None and renewal.ended(store, loaded.meta, sid, store.clocks):
        return _KEEP_OUTCOMES[Outcome.DROPPED]
    return _KEEP_OUTCOMES[_touch(store, sid, loaded, loaded_at, lifetime)]


def _save(store: SessionStore, changes: Changes, lifetime: float) -> Saved:
    loaded = changes.loaded
    if loaded is None:
        return Saved(_create(store, changes, lifetime))
    same_record = changes.regenerated_from is None and changes.new_created is None
    if same_record and changes.unchanged():
        # Nothing assigned and no handed-out value changed: no encoding.
        return keep(store, changes.sid, loaded, changes.loaded_at, lifetime)
    sid = changes.regenerated_from or changes.sid
    if store.clocks is not None and renewal.ended(store, loaded.meta, sid, store.clocks):
        return Saved(Outcome.DROPPED)
    raw = store.serializer.dumps(changes.data)
    if same_record and raw == loaded.raw:
        return Saved(_touch(store, sid, loaded, changes.loaded_at, lifetime))
    return _write(store, changes, loaded, raw, lifetime)


def _create(store: SessionStore, changes: Changes, lifetime: float) -> Outcome:
    if is_empty(changes.data) and changes.binding is None:
        return Outcome.NOTHING
    raw = store.encode(changes.data)
    now = time.time()
    meta = records.Meta(created=now, issued=now, extra=changes.binding or {})
    stored = records.pack(meta, raw)
    store.backend.save(store.key(changes.sid), stored, now + lifetime)
    return Outcome.CREATED


def _touch(
    store: SessionStore, sid: str, stored: Loaded, loaded_at: float, lifetime: float
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
    slow = time.monotonic() - loaded_at > CONFIRM_AFTER
    if due or slow:
        if not store.backend.touch(store.key(sid), now + lifetime):
            return Outcome.DROPPED
        users.touched(store, stored.meta, now + lifetime)
    return Outcome.KEPT


def _write(
    store: SessionStore, changes: Changes, stored: Loaded, raw: bytes, lifetime: float
) -> Saved:
    """Write the session, in one atomic step if nobody else wrote it since
    this request read it, else inside the exclusive section of its key.

    If another request wrote the record since this one read it, this
    request's changed keys are applied to the fresh record instead.
    """
    if _replace(store, changes, stored, raw, lifetime):
        return Saved(Outcome.WRITTEN)
    sid = changes.regenerated_from or changes.sid
    key = store.key(sid)
    with store.backend.lock(key):
        now = time.time()
        record = store.backend.load(key)
        moved = renewal.renewed_to(store, sid, record, now)
        if moved is None:
            return Saved(_write_locked(store, changes, stored, raw, lifetime, key, record, now))
    # Renewed since this request read it: the changes go to the new ID.
    saved = _write(store, changes.following(moved), stored, raw, lifetime)
    return saved if saved.renewed_to is not None else replace(saved, renewed_to=moved)


def _write_locked(
    store: SessionStore,
    changes: Changes,
    stored: Loaded,
    raw: bytes,
    lifetime: float,
    key: str,
    record: Record | None,
    now: float,
) -> Outcome:
    """The part of :meth:`_write` inside the exclusive section of ``key``,
    whose ``record`` was read there."""
    data, meta = changes.data, stored.meta
    if record is None or record.expires <= now or record.data != stored.stored:
        current = store.decode(record, now)
        merged = _merge(store, changes, current)
        if current is None or merged is None:
            return Outcome.DROPPED
        data, raw, meta = merged, store.serializer.dumps(merged), current.meta
    if is_empty(data) and changes.binding is None:
        store.backend.delete(key)
        return Outcome.EMPTIED
    store.check_size(raw)
    meta = _restarted(changes, meta)
    if changes.regenerated_from is None:
        store.backend.save(key, records.pack(meta, raw), now + lifetime)
        return Outcome.WRITTEN
    meta = records.Meta(meta.created, now, changes.binding or meta.extra)
    store.backend.save(store.key(changes.sid), records.pack(meta, raw), now + lifetime)
    store.backend.delete(key)
    return Outcome.CREATED


def _replace(
    store: SessionStore, changes: Changes, stored: Loaded, raw: bytes, lifetime: float
) -> bool:
    """The fast path of :meth:`_write` for a plain rewrite of a record.

    Regenerating, emptying and an oversized session take the locked path,
    which handles them.
    """
    if changes.regenerated_from is not None or is_empty(changes.data):
        return False
    if len(raw) > store.max_bytes:
        return False
    key = store.key(changes.sid)
    data = records.pack(_restarted(changes, stored.meta), raw)
    return store.backend.replace(key, stored.stored, data, time.time() + lifetime)


def _merge(
    store: SessionStore, changes: Changes, current: Loaded | None
) -> dict[str, t.Any] | None:
    """This request's changes applied to a record another request wrote,
    or ``None`` if that request destroyed or regenerated the session."""
    if current is None:
        logger.info(
            "Dropping this request's session changes: the session expired,"
            " or another request destroyed or regenerated it, meanwhile."
        )
        return None
    if changes.cleared:
        return dict(changes.data)
    merged = current.data
    for key in changes.changed_keys(store.serializer):
        if key in changes.data:
            merged[key] = changes.data[key]
        else:
            merged.pop(key, None)
    return merged


def _restarted(changes: Changes, meta: records.Meta) -> records.Meta:
    """The header to write: with a new creation time if the session's
    absolute lifetime was restarted (binding to another user)."""
    if changes.new_created is None:
        return meta
    return records.Meta(changes.new_created, meta.issued, meta.extra)
