"""Finding what a request changed inside the session's values without
encoding the session: a copy of each mutable value handed out, compared at
save time the way a serializer would tell them apart.

.. versionadded:: 0.2
"""

from __future__ import annotations

import typing as t
from datetime import datetime
from uuid import UUID

from markupsafe import Markup

#: Types whose values cannot change in place: handing one out needs no
#: snapshot. (A tuple is immutable if its items are.)
LEAVES = frozenset({str, int, float, bool, type(None), bytes, Markup, datetime, UUID})


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
        return len(old) == len(new) and all(map(same, old, new))
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
