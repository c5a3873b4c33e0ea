"""What a stored record holds besides the session's data.

Every record starts with a small fixed header: when the session was created
and when its current ID was issued (for the absolute lifetime and ID
renewal). A session bound to a user adds a short JSON object with the user,
the session's opaque handle and, if tracked, the device. The backend sees
the whole record as opaque bytes; only this module knows its layout.

Records written before the header existed (they start with the serializer's
own first byte, never NUL) still load, with no known creation time.
"""

from __future__ import annotations

import json
import struct
import typing as t
from dataclasses import dataclass
from dataclasses import field

#: Starts every record with a header; NUL never starts a JSON or msgpack map.
_MAGIC = b"\x00FS1"
#: Magic, created, ID issued (Unix timestamps), length of the JSON extra.
_HEADER = struct.Struct(">4sddI")


@dataclass
class Meta:
    """The metadata stored with a session.

    :param created: When the session was first stored (Unix time), or
        ``None`` for a record from before headers existed.
    :param issued: When the session's current ID was issued.
    :param extra: The user binding and device, empty for an unbound session:
        ``user`` (the user ID as a string), ``handle`` (opaque, for listing
        and revoking), ``ip`` and ``ua`` (the device, if tracked) and
        ``renewed`` (on a record that was renewed: the new ID, sealed with
        the old one).
    """

    created: float | None = None
    issued: float | None = None
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def user_id(self) -> str | None:
        return self.extra.get("user")

    @property
    def handle(self) -> str | None:
        return self.extra.get("handle")


def pack(meta: Meta, payload: bytes) -> bytes:
    """The stored bytes of a record: the header, then the payload."""
    extra = json.dumps(meta.extra, separators=(",", ":")).encode() if meta.extra else b""
    created = meta.created if meta.created is not None else 0.0
    issued = meta.issued if meta.issued is not None else created
    return _HEADER.pack(_MAGIC, created, issued, len(extra)) + extra + payload


def unpack(stored: bytes) -> tuple[Meta, bytes]:
    """Split stored bytes into metadata and payload.

    :raises ValueError: The header is damaged.
    """
    if not stored.startswith(_MAGIC):
        return Meta(), stored
    if len(stored) < _HEADER.size:
        raise ValueError("the record's header is truncated")
    _, created, issued, length = _HEADER.unpack_from(stored)
    end = _HEADER.size + length
    if len(stored) < end:
        raise ValueError("the record's metadata is truncated")
    extra = _decode_extra(stored[_HEADER.size : end]) if length else {}
    return Meta(created or None, issued or None, extra), stored[end:]


def _decode_extra(raw: bytes) -> dict[str, str]:
    value = json.loads(raw)
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ValueError("the record's metadata is not an object of strings")
    return t.cast("dict[str, str]", value)


@dataclass
class Loaded:
    """A session as read from the store.

    :param data: The decoded data, owned by the session from now on.
    :param raw: The serialized data as stored, to find changes at save time.
    :param expires: The stored expiry, as a Unix timestamp.
    :param meta: The record's metadata (creation time, user binding).
    :param stored: The whole stored record, header included, to check at
        save time that nobody else wrote it meanwhile.
    :param sid: The ID the session is stored under now, when it is not the
        one asked for: its ID was renewed.
    :param renewed: Whether this load renewed the ID (rather than following
        an earlier renewal).
    """

    data: dict[str, t.Any]
    raw: bytes
    expires: float
    meta: Meta
    stored: bytes
    sid: str | None = None
    renewed: bool = False
