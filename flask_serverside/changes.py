"""What a request changed in its session: :class:`Changes`, the one value
the session hands to the store, and finding what changed inside the
session's values without encoding the session: a copy of each mutable value
handed out, compared at save time the way a serializer would tell them apart.

.. versionadded:: 0.2
"""

from __future__ import annotations

import typing as t
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import replace
from datetime import datetime
from operator import is_
from uuid import UUID

from markupsafe import Markup

if t.TYPE_CHECKING:
    from .record import Loaded
    from .serializers import Serializer

#: The key of the session's permanent flag in its data.
PERMANENT = "_permanent"

#: Types whose values cannot change in place: handing one out needs no
#: snapshot. (A tuple is immutable if its items are.)
LEAVES = frozenset({str, int, float, bool, type(None), bytes, Markup, datetime, UUID})
#: Leaves that serialize alike exactly when they are equal and of one type
#: (not floats: ``-0.0 == 0.0``; not datetimes: equal times in other zones).
_PLAIN = LEAVES - {float, datetime}


def is_empty(data: t.Mapping[str, t.Any]) -> bool:
    """Whether session data holds nothing but the permanent flag."""
    return all(key == PERMANENT for key in data)


@dataclass(frozen=True)
class Changes:
    """What a request did to its session, as saving it needs to know:
    the session builds it (:meth:`.ServerSideSession.changes`) and the store
    saves from it, never reading the session itself.

    .. versionadded:: 0.2
    """

    #: The data to store: the session's own dict, not a copy.
    data: dict[str, t.Any]
    #: What was loaded from the store, or ``None`` for a new session.
    loaded: Loaded | None
    #: The ID to store the data under; empty for a new session with nothing
    #: to store, which gets no ID.
    sid: str
    #: The stored ID the session had before it was regenerated.
    regenerated_from: str | None
    #: The stored ID whose record a destroy removes.
    destroyed_sid: str | None
    #: The user binding (metadata ``extra``) made during the request.
    binding: dict[str, str] | None
    #: The creation time to store instead of the loaded one (Unix time).
    new_created: float | None
    #: Whether the data was cleared: the record is replaced, not merged into.
    cleared: bool
    #: When the data was read from the store (:func:`time.monotonic`).
    loaded_at: float
    #: Whether the data is known to be as loaded, found without encoding it.
    unchanged: Callable[[], bool]
    #: The top-level keys set, deleted or changed in place, found with the
    #: given serializer only when a merge needs them.
    changed_keys: Callable[[Serializer], set[str]]

    def following(self, new_sid: str) -> Changes:
        """These changes, for a session renewed to ``new_sid`` meanwhile."""
        if self.regenerated_from is not None:
            return replace(self, regenerated_from=new_sid)
        return replace(self, sid=new_sid)


class Unknown(Exception):
    """A value of a type :func:`copy_value` does not know."""


class Encoded(bytes):
    """The serialized ``{key: value}`` of a handed-out value of an unknown
    type, kept instead of a copy."""


def immutable(value: t.Any) -> bool:
    """Whether ``value`` cannot change in place."""
    kind = type(value)
    if kind in LEAVES:
        return True
    return kind is tuple and all(immutable(item) for item in value)


def copy_value(value: t.Any) -> t.Any:
    """A deep copy of session data made of the types every serializer
    round-trips.

    :raises Unknown: It holds another type.
    """
    kind = type(value)
    if kind in LEAVES:
        return value
    if kind is list:
        if all(type(item) in LEAVES for item in value):
            return value.copy()  # leaves are immutable: no deeper copy
        return [copy_value(item) for item in value]
    if kind is dict:
        return {_key(k): copy_value(v) for k, v in value.items()}
    if kind is tuple:
        return tuple(copy_value(item) for item in value)
    raise Unknown


def _key(key: t.Any) -> t.Any:
    if not immutable(key):
        raise Unknown
    return key


def same(old: t.Any, new: t.Any) -> bool:
    """Whether two values serialize alike: the same types all the way down,
    the same items in the same order, equal leaves. Unequal means changed;
    where in doubt (an equivalent time zone object), it says changed."""
    kind = type(old)
    if kind is not type(new):
        return False
    if kind is list or kind is tuple:
        if len(old) != len(new):
            return False
        if all(map(is_, old, new)):
            return True  # the copy of a list of leaves holds the same objects
        if all(type(a) in _PLAIN and type(a) is type(b) for a, b in zip(old, new)):
            return bool(old == new)  # one comparison in C, not a call per item
        return all(map(same, old, new))
    if kind is dict:
        return (
            len(old) == len(new)
            and all(map(same, old, new))
            and all(same(v, new[k]) for k, v in old.items())
        )
    if kind is float:
        # Tells -0.0 from 0.0, and a NaN equals itself.
        return bool(old.hex() == new.hex())
    if kind is datetime:
        return bool(old == new and old.tzinfo is new.tzinfo)
    return bool(old == new)
