"""The session object: lazy loading, change tracking, regenerate and destroy."""

from __future__ import annotations

import time
import typing as t
from collections.abc import Iterator
from datetime import datetime
from datetime import timezone

from flask import has_request_context
from flask import request
from flask.sessions import SessionMixin

from . import users
from .changes import Changes
from .changes import copy_value
from .changes import Encoded
from .changes import immutable
from .changes import is_empty
from .changes import LEAVES
from .changes import PERMANENT
from .changes import same
from .changes import Unknown

if t.TYPE_CHECKING:
    from .record import Loaded
    from .serializers import Serializer
    from .store import SessionStore

_MISSING: t.Any = object()


class ServerSideSession(SessionMixin):
    """The ``flask.session`` of a request, backed by a server-side store.

    Nothing is read from the store until the data is first used. The changes
    made during the request (including inside nested values) are found at
    save time and merged into the stored record, so overlapping requests do
    not undo each other's work.

    .. versionadded:: 0.1
    """

    def __init__(self, store: SessionStore, sid: str | None, permanent: bool) -> None:
        self._store = store
        #: The ID the request came with; ``None`` when it had no valid cookie.
        self.cookie_sid = sid
        self._sid = sid
        self._default_permanent = permanent
        self._data: dict[str, t.Any] | None = None
        #: What was loaded from the store, or ``None`` for a new session.
        self.stored: Loaded | None = None
        self._written: set[str] = set()
        #: A copy of each mutable value handed out (``session[key]``,
        #: ``get``, ``setdefault``, ``items()``...) as it was then, to find
        #: changes made inside it at save time.
        self._handed: dict[str, t.Any] = {}
        #: Whether the whole data dict was handed out (:attr:`data`): then
        #: anything may have changed, and saving compares everything.
        self._exposed = False
        self.cleared = False
        self.destroyed = False
        #: The stored ID this session had before :meth:`regenerate`.
        self.regenerated_from: str | None = None
        #: The stored ID whose record :meth:`destroy` removes.
        self.destroyed_sid: str | None = None
        #: When the data was read from the store (:func:`time.monotonic`).
        self.loaded_at = 0.0
        #: The ID from the cookie, when the session was found moved to a new
        #: ID (renewed); the response then carries the new one.
        self.renewed_from: str | None = None
        #: ``(old ID, new ID)`` when this request's load renewed the ID.
        self.renewal: tuple[str, str] | None = None
        #: The creation time to store instead of the loaded one (Unix time),
        #: set by :meth:`_restart_clock`.
        self.new_created: float | None = None
        self.new = sid is None
        self.modified = False
        self.accessed = False
        self.load_failed = False
        self.save_attempted = False
        #: The metadata ``extra`` of a binding made by :meth:`bind_user`
        #: during this request, written at save time.
        self.binding: dict[str, str] | None = None

    @property
    def sid(self) -> str:
        """The session ID. Reading it does not load the data.

        Until the data is loaded this is the ID from the cookie; if its record
        turns out to be missing or expired, a fresh ID replaces it then.
        """
        self.accessed = True
        if self._sid is None:
            self._sid = self._store.new_id()
        return self._sid

    @property
    def loaded(self) -> bool:
        """Whether the data has been read (or the session is known new)."""
        return self._data is not None

    @property
    def data(self) -> dict[str, t.Any]:
        """The session's data, loaded from the store on first use.

        Changes made through it are found by comparing the whole session
        with the stored one: the mapping methods, comparing only the values
        they hand out, cost less.
        """
        self._exposed = True
        return self.content

    @property
    def content(self) -> dict[str, t.Any]:
        """The data, loaded on first use, without counting its values as
        handed out: for the store, which only reads it."""
        self.accessed = True
        if self._data is None:
            self._data = self._load()
        return self._data

    def _load(self) -> dict[str, t.Any]:
        if self._sid is None or self.new:
            return {}
        self.loaded_at = time.monotonic()
        try:
            self.stored = self._store.load(self._sid, renew=True)
        except Exception:
            self.load_failed = True
            raise
        if self.stored is None:
            self.new = True
            self._sid = None
            return {}
        if self.stored.sid is not None:
            if self.stored.renewed:
                self.renewal = (self._sid, self.stored.sid)
            self.follow_renewal(self.stored.sid)
        return self.stored.data

    def follow_renewal(self, new_sid: str) -> None:
        """Carry on under the new ID the session was renewed to."""
        if self.regenerated_from is not None:
            self.regenerated_from = new_sid
            return
        if self.renewed_from is None:
            self.renewed_from = self._sid
        self._sid = new_sid

    @property
    def created(self) -> datetime | None:
        """When the session was first stored, as an aware UTC datetime;
        ``None`` before it is stored. Reading it loads the data.

        .. versionadded:: 0.2
        """
        self.content  # noqa: B018 - the creation time is stored with the data.
        if self.new_created is not None:
            return datetime.fromtimestamp(self.new_created, timezone.utc)
        if self.stored is None or self.stored.meta.created is None:
            return None
        return datetime.fromtimestamp(self.stored.meta.created, timezone.utc)

    def __getitem__(self, key: str) -> t.Any:
        value = self.content[key]
        if type(value) not in LEAVES and key not in self._handed:
            self._hand_out(key, value)
        return value

    def __setitem__(self, key: str, value: t.Any) -> None:
        self.content[key] = value
        self._written.add(key)
        self.modified = True

    def __delitem__(self, key: str) -> None:
        del self.content[key]
        self._written.add(key)
        self.modified = True

    def __iter__(self) -> Iterator[str]:
        return iter(self.content)

    def __len__(self) -> int:
        return len(self.content)

    def __contains__(self, key: object) -> bool:
        return key in self.content

    def get(self, key: str, default: t.Any = None) -> t.Any:
        value = self.content.get(key, _MISSING)
        if value is _MISSING:
            return default
        if type(value) not in LEAVES and key not in self._handed:
            self._hand_out(key, value)
        return value

    def _hand_out(self, key: str, value: t.Any) -> None:
        """Keep a copy of a stored value about to be handed out, unless it
        cannot change in place: only values handed out can change inside
        without being assigned, so only they are compared at save time."""
        if self.stored is None or key in self._written or immutable(value):
            return
        try:
            self._handed[key] = copy_value(value)
        except Unknown:
            # A type of a custom serializer: keep its encoded form instead.
            try:
                self._handed[key] = Encoded(self._store.serializer.dumps({key: value}))
            except Exception:
                # Let saving compare everything, and report the error then.
                self._exposed = True

    def _differs(self, key: str, serializer: Serializer) -> bool:
        """Whether a handed-out value is no longer the one handed out."""
        data, then = self.content, self._handed[key]
        if key not in data:
            return True
        if isinstance(then, Encoded):
            return serializer.dumps({key: data[key]}) != then
        return not same(then, data[key])

    def unchanged(self) -> bool:
        """Whether the data is known to be as loaded without encoding it:
        nothing was assigned, deleted or cleared, the dict itself was not
        handed out, and every mutable value handed out is as it was."""
        if self._written or self.cleared or self._exposed or self.modified:
            return False
        serializer = self._store.serializer
        return not any(self._differs(key, serializer) for key in self._handed)

    def changes(self) -> Changes:
        """What this request did to the session, for the store to save."""
        data = self.content
        new_and_empty = self.stored is None and self.binding is None and is_empty(data)
        return Changes(
            data=data,
            loaded=self.stored,
            sid=self._sid or ("" if new_and_empty else self.sid),
            regenerated_from=self.regenerated_from,
            destroyed_sid=self.destroyed_sid,
            binding=self.binding,
            new_created=self.new_created,
            cleared=self.cleared,
            loaded_at=self.loaded_at,
            unchanged=self.unchanged,
            changed_keys=self.changed_keys,
        )

    def __repr__(self) -> str:
        state = repr(self._data) if self._data is not None else "not loaded"
        return f"<{type(self).__name__} {state}>"

    @property
    def permanent(self) -> bool:
        """Whether the cookie outlives the browser session.

        New sessions take ``SESSION_PERMANENT``. The server-side lifetime is
        ``PERMANENT_SESSION_LIFETIME`` either way.
        """
        return bool(self.content.get(PERMANENT, self._default_permanent))

    @permanent.setter
    def permanent(self, value: bool) -> None:
        self[PERMANENT] = bool(value)

    def clear(self) -> None:
        """Remove all data. The stored record is replaced, not merged into."""
        self.content.clear()
        self._written.clear()
        self.cleared = True
        self.modified = True

    def regenerate(self) -> None:
        """Give the session a new ID, keeping its data.

        The old ID stops working when the request ends. Call it on login to
        defend against session fixation.
        """
        self.content  # noqa: B018 - the old record must be known to move it.
        if self.regenerated_from is None and not self.new:
            self.regenerated_from = self._sid
        self._sid = self._store.new_id()
        self.modified = True

    def _restart_clock(self) -> None:
        """Start the absolute lifetime over when the session is next saved.

        Binding the session to another user calls it (with
        :meth:`regenerate`): a new user's session is a new session.
        """
        self.content  # noqa: B018 - the record to rewrite must be known.
        self.new_created = time.time()
        self.modified = True

    @property
    def user_id(self) -> str | None:
        """The user this session is bound to, or ``None``.

        .. versionadded:: 0.2
        """
        if self.binding is not None:
            return self.binding["user"]
        return self._stored_extra("user")

    @property
    def handle(self) -> str | None:
        """The opaque handle of a bound session (see
        :class:`~flask_serverside.SessionInfo`), or ``None``.

        .. versionadded:: 0.2
        """
        if self.binding is not None:
            return self.binding["handle"]
        return self._stored_extra("handle")

    def _stored_extra(self, name: str) -> str | None:
        self.content  # noqa: B018 - the binding is stored with the data.
        return None if self.stored is None else self.stored.meta.extra.get(name)

    def bind_user(self, user_id: str | int) -> None:
        """Tie the session to a user, so that it is listed by
        :meth:`.ServerSide.sessions_of` and ended by :meth:`.ServerSide.revoke_user`.

        Binding to a different user than before gives the session a new ID,
        as :meth:`regenerate` does. With ``SESSION_TRACK_DEVICE``, the client
        address and User-Agent of this request are stored with the binding.

        :param user_id: The user's ID, stored as a string.

        .. versionadded:: 0.2
        """
        if isinstance(user_id, bool) or not isinstance(user_id, (str, int)):
            raise TypeError(
                f"bind_user({user_id!r}): a user ID is a str or an int; pass"
                " the ID your user loader takes, such as user.get_id()."
            )
        user = str(user_id)
        if self.user_id == user:
            return
        self.regenerate()
        self._restart_clock()
        device = _device() if self._store.track_device else (None, None)
        self.binding = users.binding(user, users.new_handle(user), device)

    def destroy(self) -> None:
        """Remove the data, the stored record and the cookie (logout).

        The session starts over, empty and new: data set after this (a
        flashed message, say) goes into a session with a fresh ID.
        """
        self.destroyed_sid = self.regenerated_from or (None if self.new else self._sid)
        self.destroyed = True
        self._data = {}
        self._written.clear()
        self._handed.clear()
        self.stored = None
        self.binding = None
        self.new = True
        self._sid = None
        self.regenerated_from = None
        self.cleared = False
        self.modified = True
        self.accessed = True

    def changed_keys(self, serializer: Serializer) -> set[str]:
        """The top-level keys this request set, deleted or mutated in place.

        Mutations inside nested values are found by comparing each mutable
        value handed out with its copy from then. If the whole dict was
        handed out (:attr:`data`), each key's serialized form is compared
        with the one loaded instead.
        """
        data = self.content
        if self.stored is None:
            return set(data)
        changed = set(self._written)
        if not self._exposed:
            changed.update(
                key for key in self._handed if key not in changed and self._differs(key, serializer)
            )
            return changed
        original = serializer.loads(self.stored.raw)
        for key in original.keys() | data.keys():
            if key in changed:
                continue
            if key not in original or key not in data:
                changed.add(key)
            elif serializer.dumps({key: original[key]}) != serializer.dumps({key: data[key]}):
                changed.add(key)
        return changed


def _device() -> tuple[str | None, str | None]:
    """The client address and User-Agent of the request being served."""
    if not has_request_context():
        return None, None
    return request.remote_addr, request.user_agent.string or None
