"""A user's sessions: the per-user index, listing and revoking.

Everything here sits above the backend seam and uses only the
:class:`~flask_serverside.backends.Backend` methods, so every store gets it.

A session bound to a user carries, in its record's metadata, the user ID and
an opaque *handle*. Each user has one index record, stored through the same
backend under ``prefix + "user:" + sha256(user_id)``, that maps the handles
of the user's sessions to their storage keys. The index is changed only
inside its key's exclusive section, and a section that also takes a
session's lock takes the index's first, so revoking and binding never miss
each other.

A handle is 16 random bytes followed by the SHA-256 of the user ID (both
URL-safe base64): it names the user's index, and nothing in it comes from
the session ID or its storage key.

.. versionadded:: 0.2
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import secrets
import sys
import time
import typing as t
from contextlib import AbstractContextManager
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime
from datetime import timezone

from . import record as records
from .backends.base import INDEX_TAG

if t.TYPE_CHECKING:
    from .backends.base import Backend
    from .store import SessionStore

#: The client address and User-Agent are cut to this many characters.
DEVICE_CHARS = 256
_TOKEN_BYTES = 16
_HANDLE_RE = re.compile(r"h[A-Za-z0-9_-]{22}([A-Za-z0-9_-]{43})")


@dataclass(frozen=True)
class SessionInfo:
    """One of a user's sessions, as :meth:`.ServerSide.sessions_of` lists it.

    :param handle: Opaque and stable for the session's life; pass it to
        :meth:`.ServerSide.revoke`. It is never the session ID, its storage
        key or anything either can be derived from.
    :param created: When the session was created.
    :param last_seen: When the session was last used, to within
        ``SESSION_TOUCH_INTERVAL``.
    :param expires: When the session expires unless used again.
    :param ip: The client address when the session was bound, if tracked.
    :param user_agent: The browser's User-Agent then, if tracked.
    :param current: Whether this is the session of the request being served.

    .. versionadded:: 0.2
    """

    handle: str
    created: datetime
    last_seen: datetime
    expires: datetime
    ip: str | None
    user_agent: str | None
    current: bool


def _digest(user_id: str) -> bytes:
    return hashlib.sha256(user_id.encode()).digest()


def index_key(prefix: str, user_id: str) -> str:
    """The storage key of a user's index."""
    return prefix + INDEX_TAG + _digest(user_id).hex()


def new_handle(user_id: str) -> str:
    """A fresh handle for a session of ``user_id``.

    It starts with a letter, so that a command line never takes it for an
    option.
    """
    tail = base64.urlsafe_b64encode(_digest(user_id)).rstrip(b"=").decode()
    return "h" + secrets.token_urlsafe(_TOKEN_BYTES) + tail


def handle_index_key(prefix: str, handle: str) -> str | None:
    """The key of the index a handle belongs to, or ``None`` if malformed."""
    match = _HANDLE_RE.fullmatch(handle)
    if match is None:
        return None
    try:
        digest = base64.urlsafe_b64decode(match.group(1) + "=")
    except (binascii.Error, ValueError):
        return None
    return prefix + INDEX_TAG + digest.hex()


def binding(user_id: str, handle: str, device: tuple[str | None, str | None]) -> dict[str, str]:
    """The metadata ``extra`` of a session bound to ``user_id``."""
    extra = {"user": user_id, "handle": handle}
    ip, user_agent = device
    if ip:
        extra["ip"] = ip[:DEVICE_CHARS]
    if user_agent:
        extra["ua"] = user_agent[:DEVICE_CHARS]
    return extra


class Index:
    """A user's index, read from the store: handle to storage key."""

    def __init__(self, backend: Backend, key: str) -> None:
        self.backend = backend
        self.key = key
        record = backend.load(key)
        now = time.time()
        self.expires = 0.0
        self.entries: dict[str, str] = {}
        if record is not None and record.expires > now:
            self.expires = record.expires
            self.entries = _decode(record.data)

    def write(self, expires: float = 0.0) -> None:
        """Store the entries, living at least until ``expires``."""
        if not self.entries:
            self.backend.delete(self.key)
            return
        self.expires = max(self.expires, expires)
        data = json.dumps(self.entries, separators=(",", ":")).encode()
        self.backend.save(self.key, data, self.expires)


def _decode(data: bytes) -> dict[str, str]:
    try:
        value = json.loads(data)
    except ValueError:
        return {}
    if not isinstance(value, dict):
        return {}
    return {k: v for k, v in value.items() if isinstance(k, str) and isinstance(v, str)}


def section(store: SessionStore, user_id: str | None) -> AbstractContextManager[None]:
    """The exclusive section of a user's index.

    Enter it before a session's own lock when a bound record moves to a new
    key, so that no revoke runs between the move and
    :meth:`.SessionStore.moved`. For ``None`` (an unbound session) it does
    nothing.
    """
    if user_id is None:
        return nullcontext()
    return store.backend.lock(index_key(store.prefix, user_id))


def moved(store: SessionStore, meta: records.Meta, new_key: str, expires: float) -> None:
    """Point the index entry of a bound record at its new storage key."""
    if meta.user_id is None or meta.handle is None:
        return
    key = index_key(store.prefix, meta.user_id)
    with store.backend.lock(key):
        index = Index(store.backend, key)
        index.entries[meta.handle] = new_key
        index.write(expires)


def forget(store: SessionStore, meta: records.Meta, key: str) -> None:
    """Drop the entry of a removed session (logged out) from its user's
    index; the index goes with its last entry."""
    if meta.user_id is None or meta.handle is None:
        return
    index_key_ = index_key(store.prefix, meta.user_id)
    with store.backend.lock(index_key_):
        index = Index(store.backend, index_key_)
        if index.entries.get(meta.handle) == key:
            del index.entries[meta.handle]
            index.write()


def touched(store: SessionStore, meta: records.Meta, expires: float) -> None:
    """Keep a user's index alive as long as a session it lists.

    Every session lives at most one lifetime from its last use, so the
    index's expiry moves to the same point as the session's.
    """
    if meta.user_id is not None:
        store.backend.touch(index_key(store.prefix, meta.user_id), expires)


def indexed(store: SessionStore, meta: records.Meta, key: str) -> bool:
    """Whether a bound record is still listed in its user's index.

    Checked on load on stores that may evict records (Memcached): there the
    index is the authority, so a session whose index entry was lost, with
    the whole index or by a revoke, never loads.
    """
    if meta.user_id is None or meta.handle is None:
        return True
    index = Index(store.backend, index_key(store.prefix, meta.user_id))
    return index.entries.get(meta.handle) == key


@dataclass
class _Member:
    handle: str
    key: str
    meta: records.Meta
    expires: float


def _members(store: SessionStore, user_id: str, index: Index) -> list[_Member]:
    """The live sessions an index lists; the entries of others are dropped."""
    now = time.time()
    members = []
    for handle, key in list(index.entries.items()):
        record = store.backend.load(key)
        meta = _meta(record.data) if record is not None and record.expires > now else None
        if meta is None or meta.user_id != user_id or meta.handle != handle:
            del index.entries[handle]
            continue
        assert record is not None
        members.append(_Member(handle, key, meta, record.expires))
    return members


def _meta(data: bytes) -> records.Meta | None:
    try:
        return records.unpack(data)[0]
    except ValueError:
        return None


def sessions_of(
    store: SessionStore, user_id: str, lifetime: float, current: str | None
) -> list[SessionInfo]:
    """The live sessions of a user, newest activity first.

    Entries of sessions that are gone or expired are removed from the index.
    """
    key = index_key(store.prefix, user_id)
    with store.backend.lock(key):
        index = Index(store.backend, key)
        before = len(index.entries)
        members = _members(store, user_id, index)
        if len(index.entries) != before:
            index.write()
    infos = [_info(member, lifetime, current) for member in members]
    return sorted(infos, key=lambda info: info.last_seen, reverse=True)


def _info(member: _Member, lifetime: float, current: str | None) -> SessionInfo:
    extra = member.meta.extra
    last_seen = member.expires - lifetime
    created = member.meta.created if member.meta.created is not None else last_seen
    return SessionInfo(
        handle=member.handle,
        created=_utc(created),
        last_seen=_utc(max(last_seen, created)),
        expires=_utc(member.expires),
        ip=extra.get("ip"),
        user_agent=extra.get("ua"),
        current=member.handle == current,
    )


def _utc(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, timezone.utc)


def revoke(store: SessionStore, handle: str) -> str | None:
    """End the session with this handle; return its user, or ``None`` if
    there was no such live session."""
    key = handle_index_key(store.prefix, handle)
    if key is None:
        return None
    with store.backend.lock(key):
        index = Index(store.backend, key)
        target = index.entries.pop(handle, None)
        if target is None:
            return None
        user_id = _end(store, target, handle)
        index.write()
    return user_id


def _end(store: SessionStore, key: str, handle: str) -> str | None:
    """Remove a bound record inside its lock; return its user if it was a
    live session with this handle."""
    with store.backend.lock(key):
        record = store.backend.load(key)
        store.backend.delete(key)
    if record is None or record.expires <= time.time():
        return None
    meta = _meta(record.data)
    return None if meta is None or meta.handle != handle else meta.user_id


def revoke_user(store: SessionStore, user_id: str, keep: str | None) -> list[str]:
    """End every session of a user but the one with handle ``keep``; return
    the handles of those ended."""
    key = index_key(store.prefix, user_id)
    ended = []
    with store.backend.lock(key):
        index = Index(store.backend, key)
        for handle, target in list(index.entries.items()):
            if handle == keep:
                continue
            del index.entries[handle]
            if _end(store, target, handle) == user_id:
                ended.append(handle)
        index.write()
    return ended


def bound(
    store: SessionStore, meta: records.Meta, new_key: str, expires: float, limit: int | None
) -> list[str]:
    """Add a newly bound record to its user's index, inside the index's
    section; end the least recently seen others beyond ``limit``. Return
    the handles of the sessions ended."""
    user_id, handle = meta.user_id, meta.handle
    assert user_id is not None and handle is not None
    index = Index(store.backend, index_key(store.prefix, user_id))
    index.entries[handle] = new_key
    ended = []
    if limit is not None and len(index.entries) > limit:
        others = [m for m in _members(store, user_id, index) if m.handle != handle]
        others.sort(key=lambda member: member.expires)
        for member in others[: max(0, len(others) + 1 - limit)]:
            del index.entries[member.handle]
            if _end(store, member.key, member.handle) == user_id:
                ended.append(member.handle)
    index.write(expires)
    return ended


def may_evict(backend: Backend) -> bool:
    """Whether a store may drop live records to make room: Memcached, and a
    :class:`~cachelib.SimpleCache` with a finite threshold. There a bound
    session loads only while its user's index lists it (:func:`indexed`).
    """
    from cachelib import MemcachedCache
    from cachelib import SimpleCache

    cache = getattr(backend, "cache", None)
    if isinstance(cache, MemcachedCache):
        return True
    return isinstance(cache, SimpleCache) and cache._threshold < sys.maxsize
