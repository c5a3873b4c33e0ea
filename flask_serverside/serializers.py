"""Turn session data into bytes and back. Never with pickle."""

from __future__ import annotations

import datetime
import json
import typing as t
import uuid

from flask.json.tag import TaggedJSONSerializer
from markupsafe import Markup


class Serializer(t.Protocol):
    """What ``SESSION_SERIALIZER`` accepts besides a name.

    .. versionadded:: 0.1
    """

    def dumps(self, data: dict[str, t.Any]) -> bytes: ...

    def loads(self, data: bytes) -> dict[str, t.Any]: ...


#: Types that Flask's tagger hands to JSON as they are (not subclasses:
#: ``Markup`` is a ``str``, an ``IntEnum`` an ``int``).
_PLAIN = frozenset({str, int, float, bool, type(None)})


class JSONSerializer:
    """Flask's tagged JSON: tuples, bytes, datetimes, UUIDs and
    :class:`~markupsafe.Markup` round-trip, as in Flask's cookie session.

    Keys are sorted so that equal data always gives equal bytes.

    .. versionadded:: 0.1
    """

    def __init__(self) -> None:
        self._tagger = TaggedJSONSerializer()
        # json.dumps and json.loads build a new encoder or decoder on every
        # call that passes options; these are built once.
        self._encoder = json.JSONEncoder(separators=(",", ":"), sort_keys=True)
        self._decoder = json.JSONDecoder(object_hook=self._tagger.untag)

    def dumps(self, data: dict[str, t.Any]) -> bytes:
        return self._encoder.encode(self._tag(data)).encode()

    def _tag(self, value: t.Any) -> t.Any:
        """Flask's ``TaggedJSONSerializer.tag``, faster on the types JSON
        holds as they are: Flask's tries each of its tags on every value,
        this looks at the exact type first. Anything else (a subclass, a
        tuple, bytes, a dict whose only key is a tag's) goes to Flask's, so
        the result is always the same as Flask's."""
        kind = type(value)
        if kind in _PLAIN:
            return value
        if kind is list:
            return [self._tag(item) for item in value]
        if kind is dict and not (len(value) == 1 and next(iter(value)) in self._tagger.tags):
            return {key: self._tag(item) for key, item in value.items()}
        return self._tagger.tag(value)

    def loads(self, data: bytes) -> dict[str, t.Any]:
        if data[:1] == b"{" and data[1:2] != b"\0":
            # What this serializer writes (UTF-8, no space around): one call
            # to the C decoder, without json.loads' checks around it.
            text = data.decode("utf-8", "surrogatepass")
            value, end = self._decoder.raw_decode(text)
            if end != len(text):
                value = self._decoder.decode(text)  # space after it, or an error
        else:
            # What json.loads does with bytes.
            text = data.decode(json.detect_encoding(data), "surrogatepass")
            value = self._decoder.decode(text)
        # A tag's object ({" t": [...]}) decodes to a tuple, bytes...
        if not isinstance(value, dict):
            raise ValueError("a session record must hold a JSON object")
        return value


class MsgpackSerializer:
    """MessagePack through msgspec: smaller and faster than JSON.

    The same types as :class:`JSONSerializer` round-trip: tuples, bytes,
    datetimes, UUIDs and :class:`~markupsafe.Markup` (what
    ``flash(Markup(...))`` stores). Tuples, UUIDs and Markup are MessagePack
    extension types; datetimes use MessagePack's timestamp type and come back
    in UTC, naive ones as naive. Needs the ``msgpack`` extra.

    .. versionadded:: 0.1

    .. versionchanged:: 0.2
        Tuples, UUIDs and Markup round-trip.
    """

    def __init__(self) -> None:
        import msgspec

        self._ext = msgspec.msgpack.Ext
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(dict[str, t.Any], ext_hook=self._untag)
        self._item_decoder = msgspec.msgpack.Decoder(ext_hook=self._untag)

    def dumps(self, data: dict[str, t.Any]) -> bytes:
        return self._encoder.encode(self._tag(data))

    def loads(self, data: bytes) -> dict[str, t.Any]:
        return self._decoder.decode(data)

    def _tag(self, value: t.Any) -> t.Any:
        """``value`` with the types MessagePack lacks as extension types."""
        if isinstance(value, dict):
            return {k: self._tag(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self._tag(v) for v in value]
        if isinstance(value, tuple):
            items = self._encoder.encode([self._tag(v) for v in value])
            return self._ext(_TUPLE, items)
        if isinstance(value, Markup):
            return self._ext(_MARKUP, str(value).encode())
        if isinstance(value, uuid.UUID):
            return self._ext(_UUID, value.bytes)
        if isinstance(value, datetime.datetime) and value.tzinfo is None:
            return self._ext(_NAIVE_DATETIME, value.isoformat().encode())
        return value

    def _untag(self, code: int, data: memoryview) -> t.Any:
        if code == _TUPLE:
            return tuple(self._item_decoder.decode(data))
        if code == _MARKUP:
            return Markup(bytes(data).decode())
        if code == _UUID:
            return uuid.UUID(bytes=bytes(data))
        if code == _NAIVE_DATETIME:
            return datetime.datetime.fromisoformat(bytes(data).decode())
        raise ValueError(f"unknown MessagePack extension type {code}")


# MessagePack extension type codes of MsgpackSerializer. Never reuse one: old
# records hold them.
_TUPLE = 1
_MARKUP = 2
_UUID = 3
_NAIVE_DATETIME = 4


def get_serializer(value: str | Serializer) -> Serializer:
    """Build the serializer named by ``SESSION_SERIALIZER``.

    :raises ValueError: An unknown name or an object without ``dumps`` and
        ``loads``.
    """
    if value == "json":
        return JSONSerializer()
    if value == "msgpack":
        try:
            return MsgpackSerializer()
        except ImportError as exc:
            raise ValueError(
                "SESSION_SERIALIZER='msgpack' needs msgspec: install"
                " 'flask-serverside[msgpack]'."
            ) from exc
    if callable(getattr(value, "dumps", None)) and callable(getattr(value, "loads", None)):
        return t.cast(Serializer, value)
    raise ValueError(
        f"SESSION_SERIALIZER={value!r} is not supported: use 'json', 'msgpack',"
        " or an object with dumps(dict) -> bytes and loads(bytes) -> dict."
    )
