from __future__ import annotations

import pytest

from flask_serverside import record
from flask_serverside.record import Meta


def test_round_trip_unbound() -> None:
    stored = record.pack(Meta(created=100.5, issued=200.25), b'{"a":1}')
    meta, payload = record.unpack(stored)
    assert (meta.created, meta.issued, meta.extra, payload) == (100.5, 200.25, {}, b'{"a":1}')


def test_round_trip_bound() -> None:
    extra = {"user": "42", "handle": "h", "ip": "127.0.0.1", "ua": "curl/8"}
    meta, payload = record.unpack(record.pack(Meta(1.0, 2.0, extra), b"x"))
    assert meta.extra == extra and meta.user_id == "42" and meta.handle == "h"
    assert payload == b"x"


def test_record_without_header_is_all_payload() -> None:
    meta, payload = record.unpack(b'{"a":1}')
    assert meta == Meta() and meta.created is None and payload == b'{"a":1}'


@pytest.mark.parametrize("cut", [3, 10, 27, 30])
def test_truncated_header_is_an_error(cut: int) -> None:
    stored = record.pack(Meta(1.0, 2.0, {"user": "1"}), b"data")
    with pytest.raises(ValueError):
        record.unpack(stored[:cut] if cut > 3 else stored[:4] + b"\x00")


def test_extra_must_be_strings() -> None:
    stored = record.pack(Meta(1.0, 2.0, {"user": "1"}), b"")
    broken = stored.replace(b'"1"', b"123")
    with pytest.raises(ValueError):
        record.unpack(broken)
