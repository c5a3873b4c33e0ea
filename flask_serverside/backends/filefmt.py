"""The record files of the filesystem store: their layout, and reading and
writing their slots through an open file descriptor.

A record file is a header (:data:`MAGIC` and the capacity of a slot) and
two slots of that capacity. A slot is a generation, the expiry as a
big-endian double, a length and a CRC-32 of those and the data, then the
data. The newest slot whose checksum holds is the record.

.. versionadded:: 0.2
"""

from __future__ import annotations

import os
import struct
import typing as t
import zlib

MAGIC = b"FSSESS2\n"
HEADER = struct.Struct(">8sI4x")
SLOT = struct.Struct(">QdII")
#: The part of a slot's header that its CRC-32 covers, with the data: the
#: generation, expiry and length.
_SLOT_HEAD = struct.Struct(">QdI")
#: The smallest slot; a slot holds twice the data it was sized for.
MIN_CAPACITY = 512
#: What a read takes at first: the whole file of a record whose slots hold
#: 8 KB (a session of up to 4 KB). Of a bigger file, a load then reads only
#: the other slot's header and the newest slot's data.
FIRST_READ = HEADER.size + 2 * (SLOT.size + 8192)
#: What :func:`_used` compares the end of a slot with, big blocks first.
_ZERO_BLOCKS = (bytes(4096), bytes(64))


class Slot(t.NamedTuple):
    """The newest version in a record file."""

    generation: int
    #: Which of the two slots holds it: 0 or 1.
    position: int
    data: bytes
    expires: float


def encode(data: bytes, expires: float) -> bytes:
    """A new record file: the data in the first slot, the second empty."""
    capacity = _capacity_for(len(data))
    first = slot(1, data, expires).ljust(SLOT.size + capacity, b"\0")
    return HEADER.pack(MAGIC, capacity) + first + bytes(SLOT.size + capacity)


def _capacity_for(size: int) -> int:
    capacity = MIN_CAPACITY
    while capacity < 2 * size:
        capacity *= 2
    return capacity


def slot(generation: int, data: bytes, expires: float) -> bytes:
    """The bytes of a slot holding ``data``."""
    head = _SLOT_HEAD.pack(generation, expires, len(data))
    return head + zlib.crc32(data, zlib.crc32(head)).to_bytes(4, "big") + data


def slot_offset(index: int, capacity: int) -> int:
    """Where slot ``index`` (0 or 1) of a file with that capacity starts."""
    return HEADER.size + index * (SLOT.size + capacity)


def read_whole(fd: int) -> bytes:
    """All of the record file open as ``fd``."""
    raw = os.read(fd, FIRST_READ)
    if len(raw) < FIRST_READ:
        return raw
    return os.pread(fd, os.fstat(fd).st_size, 0)


def newest(fd: int, raw: bytes) -> tuple[int, Slot] | None:
    """The capacity of the slots of the record file open as ``fd`` and its
    newest slot whose checksum holds; ``None`` if it has none, or is no
    record file.

    :param raw: The start of the file (at least :data:`FIRST_READ` bytes
        of it, or all): what lies past it is read only if needed.
    """
    if len(raw) < HEADER.size + SLOT.size or not raw.startswith(MAGIC):
        return None
    capacity = HEADER.unpack_from(raw)[1]
    # Bytes past ``raw`` exist only if the first read was not short.
    size = len(raw) if len(raw) < FIRST_READ else os.fstat(fd).st_size
    heads = []
    for index in (0, 1):
        start = slot_offset(index, capacity)
        head = _span(fd, raw, size, start, SLOT.size)
        if head is not None:
            heads.append((SLOT.unpack(head), index, start, head))
    # The older slot is checked only if the newer one's checksum fails.
    if len(heads) == 2 and heads[1][0][0] > heads[0][0][0]:
        heads.reverse()
    for (generation, expires, length, crc), index, start, head in heads:
        data = _span(fd, raw, size, start + SLOT.size, length) if length <= capacity else None
        if data is not None and zlib.crc32(data, zlib.crc32(head[: _SLOT_HEAD.size])) == crc:
            return capacity, Slot(generation, index, data, expires)
    return None


def _span(fd: int, raw: bytes, size: int, start: int, length: int) -> bytes | None:
    """``length`` bytes of the file at ``start``, from ``raw`` or read;
    ``None`` if the file ends before them."""
    end = start + length
    if end <= len(raw):
        return raw[start:end]
    if end > size:
        return None
    data = os.pread(fd, length, start)
    return data if len(data) == length else None


def write_then_wipe(fd: int, raw: bytes, new: bytes, capacity: int, newest: int) -> None:
    """Write the slot ``new`` into the slot other than ``newest``, then zero
    ``newest``, so that no earlier version stays readable in the file.

    The new slot is written over all the bytes an older version left in it,
    past its own end too. The wipe comes only once the new slot is whole: a
    crash before it leaves both versions, during it the new one.

    :param raw: The whole file, as read under the shard's lock.
    :param newest: The position of the newest slot, 0 or 1.
    """
    target = slot_offset(1 - newest, capacity)
    _pwrite_all(fd, new.ljust(_used(raw, target, capacity), b"\0"), target)
    start = slot_offset(newest, capacity)
    _pwrite_all(fd, bytes(_used(raw, start, capacity)), start)


def _used(raw: bytes, start: int, capacity: int) -> int:
    """How many bytes of the slot at ``start`` are not zero, up to the last."""
    end = min(start + SLOT.size + capacity, len(raw))
    # Most of a big slot is zeros: skip them by blocks (a compare each),
    # then bytes (a strip scans its bytes one call at a time).
    for zeros in _ZERO_BLOCKS:
        size = len(zeros)
        while end - size >= start and raw[end - size : end] == zeros:
            end -= size
    return len(raw[start:end].rstrip(b"\0")) if end > start else 0


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    if os.pwrite(fd, data, offset) != len(data):
        raise OSError(f"Short write to a session record at offset {offset}.")
