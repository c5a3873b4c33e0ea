"""What the absolute lifetime and ID renewal do to a store's loads and
saves (:mod:`.clocks` holds the rules and the sealing of the new ID).

Only called when one of the two clocks is set, so that a store without
them pays nothing.

.. versionadded:: 0.2
"""

from __future__ import annotations

import logging
import time
import typing as t

from . import record as records
from . import users
from .clocks import Clocks
from .clocks import RENEWED
from .clocks import seal
from .clocks import unseal
from .record import Loaded

if t.TYPE_CHECKING:
    from .backends.base import Record
    from .store import SessionStore

logger = logging.getLogger("flask_serverside")


def peek(record: Record | None, now: float) -> records.Meta | None:
    """The header of a live record, or ``None``."""
    if record is None or record.expires <= now:
        return None
    try:
        return records.unpack(record.data)[0]
    except ValueError:
        return None


def load(
    store: SessionStore, sid: str, record: Record | None, clocks: Clocks, renew: bool
) -> Loaded | None:
    """A load of ``sid``, whose ``record`` was just read, with the absolute
    lifetime and ID renewal applied."""
    now = time.time()
    meta = peek(record, now)
    if meta is not None and RENEWED in meta.extra:
        return follow(store, sid, meta, clocks, now)
    loaded = store.decode(record, now)
    if loaded is None:
        return None
    if loaded.meta.created is None:
        # A record from before headers: its lifetime starts now.
        loaded.meta = records.Meta(now, now, loaded.meta.extra)
    if clocks.ended(loaded.meta, now):
        end(store, store.key(sid), clocks)
        return None
    if renew and clocks.renewal_due(loaded.meta, now):
        return renew_id(store, sid, clocks, loaded.meta.user_id)
    return loaded


def end(store: SessionStore, key: str, clocks: Clocks) -> None:
    """Remove a record past its absolute lifetime, under its lock, so a
    request in the middle of its locked write cannot put it back."""
    with store.backend.lock(key):
        now = time.time()
        meta = peek(store.backend.load(key), now)
        if meta is not None and clocks.ended(meta, now):
            store.backend.delete(key)


def follow(
    store: SessionStore, sid: str, pointer: records.Meta, clocks: Clocks, now: float
) -> Loaded | None:
    """The session a renewed ID points to, within the grace period."""
    new_sid = pointer_target(sid, pointer, clocks, now)
    if new_sid is None:
        return None
    loaded = store.decode(store.backend.load(store.key(new_sid)), now)
    if loaded is None or clocks.ended(loaded.meta, now):
        return None
    loaded.sid = new_sid
    return loaded


def pointer_target(sid: str, pointer: records.Meta, clocks: Clocks, now: float) -> str | None:
    if not clocks.pointer_live(pointer, now):
        return None
    return unseal(pointer.extra[RENEWED], sid)


def renew_id(store: SessionStore, sid: str, clocks: Clocks, user_id: str | None) -> Loaded | None:
    """Move a session whose renewal is due to a new ID, once: requests
    that arrive meanwhile find the pointer under the lock and follow it.
    A bound session's index is locked first, as for any move."""
    key = store.key(sid)
    with users.section(store, user_id), store.backend.lock(key):
        record = store.backend.load(key)
        now = time.time()
        meta = peek(record, now)
        if meta is not None and RENEWED in meta.extra:
            return follow(store, sid, meta, clocks, now)
        loaded = store.decode(record, now)
        if loaded is None or not clocks.renewal_due(loaded.meta, now):
            return loaded
        return move_to_new_id(store, sid, loaded, clocks, now)


def move_to_new_id(
    store: SessionStore, old_sid: str, loaded: Loaded, clocks: Clocks, now: float
) -> Loaded:
    """Store a session under a new ID (data, creation time and binding
    kept; issued now) and leave a pointer to it under the old key for
    the grace period. Called under the old key's lock."""
    new_sid = store.new_id()
    meta = records.Meta(loaded.meta.created, now, dict(loaded.meta.extra))
    stored = records.pack(meta, loaded.raw)
    store.backend.save(store.key(new_sid), stored, loaded.expires)
    store.moved(meta, store.key(new_sid), loaded.expires)
    if clocks.grace > 0:
        sealed = {RENEWED: seal(new_sid, old_sid)}
        pointer = records.pack(records.Meta(loaded.meta.created, now, sealed), b"")
        expires = min(loaded.expires, now + clocks.grace)
        store.backend.save(store.key(old_sid), pointer, expires)
    else:
        store.backend.delete(store.key(old_sid))
    return Loaded(loaded.data, loaded.raw, loaded.expires, meta, stored, new_sid, True)


def ended(store: SessionStore, meta: records.Meta, sid: str, clocks: Clocks) -> bool:
    """Whether the session stored under ``sid`` with ``meta`` passed its
    absolute lifetime while this request ran; if so its record is removed
    and nothing is saved."""
    if not clocks.ended(meta, time.time()):
        return False
    end(store, store.key(sid), clocks)
    logger.info("Dropping this request's session changes: the session ended.")
    return True


def renewed_to(store: SessionStore, sid: str, record: Record | None, now: float) -> str | None:
    """The new ID of a session renewed within the grace period."""
    if store.clocks is None:
        return None
    meta = peek(record, now)
    if meta is None or RENEWED not in meta.extra:
        return None
    return pointer_target(sid, meta, store.clocks, now)
