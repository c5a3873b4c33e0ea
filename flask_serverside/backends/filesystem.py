"""Sessions as files in a directory the app owns."""

from __future__ import annotations

import functools
import logging
import os
import secrets
import time
import typing as t
from collections.abc import Iterator
from contextlib import AbstractContextManager
from urllib.parse import quote

from . import filefmt
from .base import Backend
from .base import DIGEST_LENGTH
from .base import flock_exclusive
from .base import INDEX_TAG
from .base import is_session_key
from .base import Record
from .base import Reentrant

logger = logging.getLogger("flask_serverside")

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
        path = self._path(key)
        # Reads again if no slot held: a reader can catch the slot being
        # written, then the other one being wiped once it is whole.
        for _ in range(_READS):
            try:
                newest = _read_newest(path)
            except FileNotFoundError:
                return None
            if newest is not None:
                return Record(newest.data, newest.expires)
        logger.warning("Session record %r is not a valid record; ignoring it.", key)
        return None

    def save(self, key: str, data: bytes, expires: float) -> None:
        shard = self._shard(key)
        path = self._path(key)
        with self._lock_shard(shard):
            if not _write_slot(path, data, expires):
                self._write_file(shard, path, data, expires)

    def replace(self, key: str, expected: bytes, data: bytes, expires: float) -> bool:
        """Rewrite the record in place, under its shard's lock, if its newest
        version is live and holds ``expected``: one open, read and write of
        the file. The lock is what a :meth:`lock` section holds, so a
        replace waits for the section, then finds what it wrote.

        ``False`` if the record is missing, expired or changed, or if the
        data outgrows its slots (the caller's locked save then moves it to
        a bigger file).
        """
        with self._lock_shard(self._shard(key)):
            path = self._path(key)
            return _write_slot(path, data, expires, expected=expected, live_at=time.time())

    def _write_file(self, shard: str, path: str, data: bytes, expires: float) -> None:
        """Create the record file, or replace one whose slots are too small."""
        tmp = os.path.join(shard, _TMP_PREFIX + secrets.token_hex(8))
        fd = self._open_new(tmp)
        try:
            with open(fd, "wb", closefd=True) as f:
                f.write(filefmt.encode(data, expires))
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
        # Under the shard lock no write comes between the check and the slot.
        with self._lock_shard(self._shard(key)):
            return _write_slot(self._path(key), None, expires, live_at=time.time())

    def delete(self, key: str) -> bool:
        return _unlink(self._path(key))

    def lock(self, key: str) -> AbstractContextManager[None]:
        return self._lock_shard(self._shard(key))

    def _flock_shard(self, shard: str) -> _Flock:
        return _Flock(self._open_lock, os.path.join(shard, _LOCK_NAME))

    def _open_lock(self, path: str) -> int:
        # Without O_CREAT, the common case, the kernel does not lock the
        # directory to look the name up.
        try:
            return os.open(path, os.O_RDWR)
        except FileNotFoundError:
            pass
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


class _Flock:
    """An exclusive :func:`fcntl.flock` on a shard's lock file while in
    the ``with`` block.

    flock, unlike lockf, also excludes threads of one process, as each
    entry opens its own file description. (A class, not a generator: every
    write enters it.)
    """

    __slots__ = ("_open", "_path", "_fd")

    def __init__(self, open_lock: t.Callable[[str], int], path: str) -> None:
        self._open = open_lock
        self._path = path
        self._fd = -1

    def __enter__(self) -> None:
        fd = self._open(self._path)
        try:
            flock_exclusive(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def __exit__(self, *exc_info: object) -> None:
        os.close(self._fd)


@functools.lru_cache(maxsize=32)
def _escape(prefix: str) -> str:
    name = quote(prefix, safe="")
    if name.startswith("."):
        # Names starting with a dot are the lock and temporary files.
        name = "%2E" + name[1:]
    return name


def _read_newest(path: str) -> filefmt.Slot | None:
    """The newest slot of a record file whose checksum holds, if any.

    :raises FileNotFoundError: There is no such file.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        found = filefmt.newest(fd, os.read(fd, filefmt.FIRST_READ))
    finally:
        os.close(fd)
    return None if found is None else found[1]


def _write_slot(
    path: str,
    data: bytes | None,
    expires: float,
    expected: bytes | None = None,
    live_at: float | None = None,
) -> bool:
    """Write ``data`` (``None``: the newest slot's again) with ``expires``
    into the older slot of an existing record file.

    ``False`` if there is no valid file, ``data`` does not fit its slots,
    or the newest slot does not hold ``expected`` or has expired at
    ``live_at`` (each checked if given).
    """
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        raw = filefmt.read_whole(fd)
        found = filefmt.newest(fd, raw)
        if found is None:
            return False
        capacity, newest = found
        if live_at is not None and newest.expires <= live_at:
            return False
        if expected is not None and newest.data != expected:
            return False
        data = newest.data if data is None else data
        if len(data) > capacity:
            return False
        new = filefmt.slot(newest.generation + 1, data, expires)
        filefmt.write_then_wipe(fd, raw, new, capacity, newest.position)
    finally:
        os.close(fd)
    return True


def _read_expiry(path: str) -> float:
    """The expiry of a record file; ``0`` if unreadable or gone."""
    try:
        newest = _read_newest(path)
    except FileNotFoundError:
        return 0.0
    return 0.0 if newest is None else newest.expires


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
