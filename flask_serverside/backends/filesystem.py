"""Sessions as files in a directory the app owns."""

from __future__ import annotations

import functools
import logging
import os
import secrets
import struct
import time
import typing as t
import zlib
from collections.abc import Iterator
from contextlib import AbstractContextManager
from contextlib import contextmanager
from urllib.parse import quote

from .base import Backend
from .base import DIGEST_LENGTH
from .base import flock_exclusive
from .base import INDEX_TAG
from .base import is_session_key
from .base import Record
from .base import Reentrant

logger = logging.getLogger("flask_serverside")

# A record file is a header (MAGIC and the capacity of a slot) and two
# slots of that capacity. A slot is a generation, the expiry as a
# big-endian double, a length and a CRC-32 of those and the data, then the
# data.
_MAGIC = b"FSSESS2\n"
_HEADER = struct.Struct(">8sI4x")
_SLOT = struct.Struct(">QdII")
#: The part of a slot's header that its CRC-32 covers.
_SLOT_HEAD = struct.Struct(">QdI")
#: The smallest slot; a slot holds twice the data it was sized for.
_MIN_CAPACITY = 512
_LOCK_NAME = ".lock"
_TMP_PREFIX = ".tmp-"
#: The longest file name most file systems allow (ext4, XFS, tmpfs, APFS).
_NAME_MAX = 255
#: Reads of a record file before it counts as broken: a read that
#: overlaps a write may see neither slot whole.
_READS = 4
#: A temporary file older than this was left by a crashed writer.
STALE_TMP_SECONDS = 3600


class FileSystemBackend(Backend):
    """One file per session, in 256 shard directories.

    A record file holds two slots. A write (a touch too) fills the slot
    that does not hold the newest version, in place, with a generation
    number, the expiry, the data and a checksum, then zeroes the slot of the
    version it replaced, so that data removed from a session does not stay
    on disk; a reader takes the newest slot whose checksum holds. So a
    crash of the process in the middle of a write leaves the previous
    version readable, and a write costs no rename (which ext4
    makes wait for the data's writeback when it replaces a file). A new
    record, or one whose data outgrew its slots, is written to a temporary
    file that :func:`os.replace` moves into place.

    The exclusive section is an :func:`fcntl.flock` on one ``.lock`` file
    per shard, re-entrant within a thread: it holds across threads and
    processes, is never swapped away by a write, and keeps the number of
    lock files fixed. Every write takes it. Records are never evicted to
    make room.

    Needs a POSIX system (``fcntl``).

    :param directory: Where sessions live; created with mode 0o700.

    .. versionadded:: 0.1
    """

    unavailable_errors = (OSError,)

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = os.fspath(directory)
        self._name_prefix = _escape("session:")
        self._index_prefix = _escape("session:" + INDEX_TAG)
        self._lock_shard = Reentrant(self._flock_shard)

    def describe(self) -> str:
        return f"filesystem {self.directory}"

    def configure(self, prefix: str) -> None:
        name = _escape(prefix)
        # A user's index has the longest names: the prefix, "user:", the digest.
        length = len(_escape(prefix + INDEX_TAG).encode()) + DIGEST_LENGTH
        if length > _NAME_MAX:
            raise ValueError(
                f"SESSION_KEY_PREFIX={prefix!r} is too long for the filesystem backend:"
                f" escaped for a file name ({name!r}) it makes names of"
                f" {length} bytes, over the limit of {_NAME_MAX}. Use at"
                f" most {_NAME_MAX - DIGEST_LENGTH - len(_escape(INDEX_TAG))} bytes once"
                " escaped (characters other than letters, digits and '_.-~' take"
                " three)."
            )
        self._name_prefix = name
        self._index_prefix = _escape(prefix + INDEX_TAG)

    def _is_ours(self, name: str) -> bool:
        """Whether a file name is a session under this backend's key prefix."""
        return is_session_key(name, self._name_prefix)

    def _is_own(self, name: str) -> bool:
        """Whether a file name is a session or a user's index under this
        backend's key prefix."""
        return self._is_ours(name) or is_session_key(name, self._index_prefix)

    def _shard(self, key: str) -> str:
        return f"{self.directory}/{key[-2:]}"

    def _path(self, key: str) -> str:
        # Keys are a prefix and a hex digest: only the prefix needs escaping.
        name = _escape(key[:-DIGEST_LENGTH]) + key[-DIGEST_LENGTH:]
        return f"{self.directory}/{key[-2:]}/{name}"

    def load(self, key: str) -> Record | None:
        # Reads again if no slot held: a reader can catch the slot being
        # written, then the other one being wiped once it is whole.
        for _ in range(_READS):
            try:
                with open(self._path(key), "rb") as f:
                    raw = f.read()
            except FileNotFoundError:
                return None
            record = _parse(raw)
            if record is not None:
                return record
        logger.warning("Session record %r is not a valid record; ignoring it.", key)
        return None

    def save(self, key: str, data: bytes, expires: float) -> None:
        shard = self._shard(key)
        path = self._path(key)
        with self._lock_shard(shard):
            if not _write_slot(path, data, expires):
                self._write_file(shard, path, data, expires)

    def _write_file(self, shard: str, path: str, data: bytes, expires: float) -> None:
        """Create the record file, or replace one whose slots are too small."""
        tmp = os.path.join(shard, _TMP_PREFIX + secrets.token_hex(8))
        fd = self._open_new(tmp)
        try:
            with open(fd, "wb", closefd=True) as f:
                f.write(_encode(data, expires))
            os.replace(tmp, path)
        except BaseException:
            _unlink(tmp)
            raise

    def _open_new(self, path: str) -> int:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        try:
            fd = os.open(path, flags, 0o600)
        except FileNotFoundError:
            self._make_dirs(os.path.dirname(path))
            fd = os.open(path, flags, 0o600)
        # The umask may have removed bits we need, never added any.
        os.fchmod(fd, 0o600)
        return fd

    def _make_dirs(self, shard: str) -> None:
        # mkdir's mode is filtered by the umask; chmod what we create.
        if not os.path.isdir(self.directory):
            os.makedirs(self.directory, 0o700, exist_ok=True)
            os.chmod(self.directory, 0o700)
        try:
            os.mkdir(shard, 0o700)
        except FileExistsError:
            return
        os.chmod(shard, 0o700)

    def touch(self, key: str, expires: float) -> bool:
        path = self._path(key)
        # Under the shard lock no write comes between the check and the slot.
        with self._lock_shard(self._shard(key)):
            if _read_expiry(path) <= time.time():
                return False
            return _write_slot(path, None, expires)

    def delete(self, key: str) -> bool:
        return _unlink(self._path(key))

    def lock(self, key: str) -> AbstractContextManager[None]:
        return self._lock_shard(self._shard(key))

    @contextmanager
    def _flock_shard(self, shard: str) -> Iterator[None]:
        fd = self._open_lock(os.path.join(shard, _LOCK_NAME))
        try:
            # flock, unlike lockf, also excludes threads of one process, as
            # each call opens its own file description.
            flock_exclusive(fd)
            yield
        finally:
            os.close(fd)

    def _open_lock(self, path: str) -> int:
        try:
            return os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except FileNotFoundError:
            self._make_dirs(os.path.dirname(path))
            return os.open(path, os.O_RDWR | os.O_CREAT, 0o600)

    def cleanup(self, now: float) -> Iterator[int]:
        for shard in self._shards():
            yield self._cleanup_shard(shard, now)

    def _cleanup_shard(self, shard: str, now: float) -> int:
        removed = 0
        for entry in _scan(shard):
            if entry.name.startswith(_TMP_PREFIX):
                try:
                    stale = entry.stat().st_mtime < now - STALE_TMP_SECONDS
                except FileNotFoundError:
                    continue  # its save has just renamed it over a record
                if stale:
                    _unlink(entry.path)
            elif self._is_own(entry.name):
                # A user's index goes too, but only sessions are counted.
                gone = self._remove_if_expired(shard, entry.path, now)
                removed += gone if self._is_ours(entry.name) else 0
        return removed

    def _remove_if_expired(self, shard: str, path: str, now: float) -> int:
        if _read_expiry(path) > now:
            return 0
        # Re-check under the lock: a save may have just replaced the file.
        with self._lock_shard(shard):
            if _read_expiry(path) > now:
                return 0
            return int(_unlink(path))

    def count(self, now: float) -> int:
        return sum(_read_expiry(path) > now for path in self._records(self._is_ours))

    def clear(self) -> int:
        removed = 0
        for path in self._records(self._is_own):
            if _unlink(path) and self._is_ours(os.path.basename(path)):
                removed += 1
        return removed

    def _records(self, wanted: t.Callable[[str], bool]) -> Iterator[str]:
        for shard in self._shards():
            for entry in _scan(shard):
                if wanted(entry.name):
                    yield entry.path

    def _shards(self) -> Iterator[str]:
        for entry in _scan(self.directory):
            if entry.is_dir(follow_symlinks=False) and len(entry.name) == 2:
                yield entry.path


@functools.lru_cache(maxsize=32)
def _escape(prefix: str) -> str:
    name = quote(prefix, safe="")
    if name.startswith("."):
        # Names starting with a dot are the lock and temporary files.
        name = "%2E" + name[1:]
    return name


def _encode(data: bytes, expires: float) -> bytes:
    """A new record file: the data in the first slot, the second empty."""
    capacity = _capacity_for(len(data))
    first = _slot(1, data, expires).ljust(_SLOT.size + capacity, b"\0")
    return _HEADER.pack(_MAGIC, capacity) + first + bytes(_SLOT.size + capacity)


def _capacity_for(size: int) -> int:
    capacity = _MIN_CAPACITY
    while capacity < 2 * size:
        capacity *= 2
    return capacity


def _slot(generation: int, data: bytes, expires: float) -> bytes:
    head = _SLOT_HEAD.pack(generation, expires, len(data))
    return head + zlib.crc32(data, zlib.crc32(head)).to_bytes(4, "big") + data


def _slot_offset(index: int, capacity: int) -> int:
    return _HEADER.size + index * (_SLOT.size + capacity)


class _Slot(t.NamedTuple):
    generation: int
    position: int
    data: bytes
    expires: float


def _newest(raw: bytes) -> tuple[int, _Slot] | None:
    """The capacity of a record file's slots and its newest slot whose
    checksum holds; ``None`` if it has none, or is no record file."""
    if len(raw) < _HEADER.size or not raw.startswith(_MAGIC):
        return None
    capacity = _HEADER.unpack_from(raw)[1]
    newest = None
    for index in (0, 1):
        start = _slot_offset(index, capacity) + _SLOT.size
        if len(raw) < start:
            break
        generation, expires, length, crc = _SLOT.unpack_from(raw, start - _SLOT.size)
        data = raw[start : start + length]
        head = raw[start - _SLOT.size : start - 4]
        if length > capacity or len(data) != length or zlib.crc32(data, zlib.crc32(head)) != crc:
            continue
        if newest is None or generation > newest.generation:
            newest = _Slot(generation, index, data, expires)
    return None if newest is None else (capacity, newest)


def _parse(raw: bytes) -> Record | None:
    found = _newest(raw)
    return None if found is None else Record(found[1].data, found[1].expires)


def _write_slot(path: str, data: bytes | None, expires: float) -> bool:
    """Write ``data`` (``None``: the newest slot's again) with ``expires``
    into the older slot of an existing record file. ``False`` if there is
    no valid file, or ``data`` does not fit its slots."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        raw = os.pread(fd, os.fstat(fd).st_size, 0)
        found = _newest(raw)
        if found is None:
            return False
        capacity, newest = found
        data = newest.data if data is None else data
        if len(data) > capacity:
            return False
        slot = _slot(newest.generation + 1, data, expires)
        _write_then_wipe(fd, raw, slot, capacity, newest.position)
    finally:
        os.close(fd)
    return True


def _write_then_wipe(fd: int, raw: bytes, slot: bytes, capacity: int, newest: int) -> None:
    """Write ``slot`` into the slot other than ``newest``, then zero
    ``newest``, so that no earlier version stays readable in the file.

    The new slot is written over all the bytes an older version left in it,
    past its own end too. The wipe comes only once the new slot is whole: a
    crash before it leaves both versions, during it the new one.
    """
    target = _slot_offset(1 - newest, capacity)
    _pwrite_all(fd, slot.ljust(_used(raw, target, capacity), b"\0"), target)
    start = _slot_offset(newest, capacity)
    _pwrite_all(fd, bytes(_used(raw, start, capacity)), start)


def _used(raw: bytes, start: int, capacity: int) -> int:
    """How many bytes of the slot at ``start`` are not zero, up to the last."""
    return len(raw[start : start + _SLOT.size + capacity].rstrip(b"\0"))


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    if os.pwrite(fd, data, offset) != len(data):
        raise OSError(f"Short write to a session record at offset {offset}.")


def _read_expiry(path: str) -> float:
    """The expiry of a record file; ``0`` if unreadable or gone."""
    try:
        with open(path, "rb") as f:
            record = _parse(f.read())
    except FileNotFoundError:
        return 0.0
    return 0.0 if record is None else record.expires


def _scan(path: str) -> Iterator[os.DirEntry[str]]:
    try:
        with os.scandir(path) as it:
            yield from it
    except FileNotFoundError:
        return


def _unlink(path: str) -> bool:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True
