"""Turn session data into bytes and back. Never with pickle."""

from __future__ import annotations

import json
import typing as t

from flask.json.tag import TaggedJSONSerializer


class Serializer(t.Protocol):
    """What ``SESSION_SERIALIZER`` accepts besides a name.

    .. versionadded:: 0.1
    """

    def dumps(self, data: dict[str, t.Any]) -> bytes: ...

    def loads(self, data: bytes) -> dict[str, t.Any]: ...


class JSONSerializer:
    """Flask's tagged JSON: tuples, bytes, datetimes, UUIDs and
    :class:`~markupsafe.Markup` round-trip, as in Flask's cookie session.

    Keys are sorted so that equal data always gives equal bytes.

    .. versionadded:: 0.1
    """

    def __init__(self) -> None:
        self._tagger = TaggedJSONSerializer()

    def dumps(self, data: dict[str, t.Any]) -> bytes:
        tagged = self._tagger.tag(data)
        return json.dumps(tagged, separators=(",", ":"), sort_keys=True).encode()

    def loads(self, data: bytes) -> dict[str, t.Any]:
        value = json.loads(data, object_hook=self._tagger.untag)
        if not isinstance(value, dict):
            raise ValueError("a session record must hold a JSON object")
        return value


class MsgpackSerializer:
    """MessagePack through msgspec: smaller and faster than JSON.

    Tuples come back as lists. Needs the ``msgpack`` extra.

    .. versionadded:: 0.1
    """

    def __init__(self) -> None:
        import msgspec

        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(dict[str, t.Any])

    def dumps(self, data: dict[str, t.Any]) -> bytes:
        return self._encoder.encode(data)

    def loads(self, data: bytes) -> dict[str, t.Any]:
        return self._decoder.decode(data)


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
