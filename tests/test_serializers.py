"""The serializers alone: the JSON serializer's bytes are Flask's tagged
JSON's, whatever the data, so a record written before its fast path (or by
Flask's own tagger) compares equal, and reads back the same."""

from __future__ import annotations

import collections
import datetime
import enum
import json
import typing as t
import uuid

import pytest
from flask.json.tag import TaggedJSONSerializer
from markupsafe import Markup

from flask_serverside.serializers import JSONSerializer


class Colour(enum.IntEnum):
    RED = 1


class Text(str):
    """A str subclass without ``__html__``."""


VALUES: list[t.Any] = [
    "text",
    "",
    "<b>x</b>",
    Markup("<b>x</b>"),
    Text("sub"),
    0,
    -7,
    2**70,
    1.5,
    float("inf"),
    True,
    None,
    Colour.RED,
    b"\x00\xff",
    (1, (2, "x")),
    [],
    [1, [2, [3, (4,)]], {"a": b"b"}],
    {},
    {"a": {"b": ["c"]}},
    {" t": [1, 2]},  # one key that is a tag's: escaped as " di"
    {" di": {" t": 1}},
    {" t": 1, "other": 2},  # two keys: not escaped
    {" x": 1},  # not a tag's key
    collections.OrderedDict(b=1, a=2),
    uuid.UUID(int=7),
    datetime.datetime(2024, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc),
    {"deep": [{"m": Markup("<i>")}, ({"u": uuid.UUID(int=1)},)]},
]


def flask_dumps(data: dict[str, t.Any]) -> bytes:
    """What Flask's tagger and the serializer's JSON options give."""
    tagged = TaggedJSONSerializer().tag(data)
    return json.dumps(tagged, separators=(",", ":"), sort_keys=True).encode()


@pytest.mark.parametrize("value", VALUES, ids=repr)
def test_json_bytes_are_flasks(value: t.Any) -> None:
    serializer = JSONSerializer()
    data = {"value": value, "z": [value], "a": {"k": value}}
    raw = serializer.dumps(data)
    assert raw == flask_dumps(data)
    assert serializer.loads(raw) == TaggedJSONSerializer().loads(raw.decode())


@pytest.mark.parametrize("value", [{" t": [1]}, {" di": 2}], ids=repr)
def test_a_session_whose_only_key_is_a_tags(value: dict[str, t.Any]) -> None:
    """The session dict itself goes through the same escaping."""
    serializer = JSONSerializer()
    raw = serializer.dumps(value)
    assert raw == flask_dumps(value)
    assert serializer.loads(raw) == value


def test_unknown_types_fail_as_in_flask() -> None:
    with pytest.raises(TypeError):
        JSONSerializer().dumps({"value": object()})
    with pytest.raises(TypeError):
        flask_dumps({"value": object()})


@pytest.mark.parametrize(
    "raw",
    [
        b'{"a":1}',
        b' {"a":1}\n',
        b'{"a":1} ',
        '{"a":"\u00e9"}'.encode(),
        '{"a":"\u00e9"}'.encode("utf-16"),
        '{"a":1}'.encode("utf-16-le"),
        '{"a":1}'.encode("utf-8-sig"),
    ],
)
def test_json_reads_what_json_loads_reads(raw: bytes) -> None:
    """A record is read as ``json.loads`` reads its bytes: whitespace
    around it, any of the encodings JSON may come in."""
    assert JSONSerializer().loads(raw) == json.loads(raw)


@pytest.mark.parametrize(
    "raw",
    [
        b'{"a":1}x',
        b'{"a":1}{}',
        b'{"a":1',
        b"[1]",
        b"1",
        b"",
        b'{"a":"\xff"}',
        b'{" t":[]}',
        b'{" t":["a",1]}',
        b'{" b":"eA=="}',
    ],
)
def test_json_refuses_what_is_not_one_object(raw: bytes) -> None:
    """Trailing data, a truncated record or another JSON value is an error
    (the store then ignores the record, as corrupt); so is an object that
    Flask's tags turn into a tuple or bytes."""
    with pytest.raises(ValueError):
        JSONSerializer().loads(raw)
