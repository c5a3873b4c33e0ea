"""Sessions as files in a directory the app owns."""

from __future__ import annotations

import fcntl
import functools
import logging
import os
import secrets
import struct
import typing as t
from collections.abc import Iterator
from contextlib import AbstractContextManager
from contextlib import contextmanager
from urllib.parse import quote

from .base import Backend
from .base import Record

logger = logging.getLogger("flask_serverside")

# A record file is MAGIC, the expiry as a big-endian double, then the data.
# The expiry sits at an 8-byte aligned offset so touch() can rewrite it in
# place with one small write.
_MAGIC = b"FSSESS1\n"
_HEADER = struct.Struct(">8sd")
_LOCK_NAME = ".lock"
_TMP_PREFIX = ".tmp-"
#: The longest file name most file systems allow (ext4, XFS, tmpfs, APFS).
_NAME_MAX = 255
#: A temporary file older than this was left by a crashed writer.
STALE_TMP_SECONDS = 3600


class FileSystemBackend(Backend):
    """One file per session, in 256 shard directories.

    Writes go to a temporary file in the same directory, then
    :func:`os.replace` it over the record, so a crash leaves the old or the
    new record, never a torn one. The exclusive section is an
    :func:`fcntl.flock` on one ``.lock`` file per shard: it holds across
    threads and processes, is never swapped away by a write, and keeps the
    number of lock files fixed. Records are never evicted to make room.

    Needs a POSIX system (``fcntl``).

    :param directory: Where sessions live; created with mode 0o700.

    .. versionadded:: 0.1
    """

    unavailable_errors = (OSError,)

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = os.fspath(directory)
        self._name_prefix = _escape("session:")

    def configure(self, prefix: str) -> None:
        name = _escape(prefix)
        if len(name.encode()) + 64 > _NAME_MAX:
            raise ValueError(
                f"SESSION_KEY_PREFIX={prefix!r} is too long for the filesystem backend:"
                f" escaped for a file name ({name!r}) it makes names of"
                f" {len(name.encode()) + 64} bytes, over the limit of {_NAME_MAX}. Use at"
                f" most {_NAME_MAX - 64} bytes once escaped (characters other than"
                " letters, digits and '_.-~' take three)."
            )
        self._name_prefix = name

    def _is_ours(self, name: str) -> bool:
        """Whether a file name is a record under this backend's key prefix."""
        return name.startswith(self._name_prefix) and len(name) == len(self._name_prefix) + 64

    def _shard(self, key: str) -> str:
        return f"{self.directory}/{key[-2:]}"

    def _path(self, key: str) -> str:
        # Keys are a prefix and a hex digest: only the prefix needs escaping.
        name = _escape(key[:-64]) + key[-64:]
        return f"{self.directory}/{key[-2:]}/{name}"

    def load(self, key: str) -> Record | None:
        try:
            with open(self._path(key), "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return None
        return _parse(raw, key)

    def save(self, key: str, data: bytes, expires: float) -> None:
        shard = self._shard(key)
        tmp = os.path.join(shard, _TMP_PREFIX + secrets.token_hex(8))
        fd = self._open_new(tmp)
        try:
            with open(fd, "wb", closefd=True) as f:
                f.write(_HEADER.pack(_MAGIC, expires))
                f.write(data)
            os.replace(tmp, self._path(key))
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

    def touch(self, key: str, expires: float) -> None:
        try:
            fd = os.open(self._path(key), os.O_WRONLY)
        except FileNotFoundError:
            return
        try:
            os.pwrite(fd, struct.pack(">d", expires), len(_MAGIC))
        finally:
            os.close(fd)

    def delete(self, key: str) -> bool:
        return _unlink(self._path(key))

    def lock(self, key: str) -> AbstractContextManager[None]:
        return self._lock_shard(self._shard(key))

    @contextmanager
    def _lock_shard(self, shard: str) -> Iterator[None]:
        fd = self._open_lock(os.path.join(shard, _LOCK_NAME))
        try:
            # flock, unlike lockf, also excludes threads of one process, as
            # each call opens its own file description.
            fcntl.flock(fd, fcntl.LOCK_EX)
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
            elif self._is_ours(entry.name):
                removed += self._remove_if_expired(shard, entry.path, now)
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
        return sum(_read_expiry(path) > now for path in self._records())

    def clear(self) -> int:
        return sum(_unlink(path) for path in self._records())

    def _records(self) -> Iterator[str]:
        for shard in self._shards():
            for entry in _scan(shard):
                if self._is_ours(entry.name):
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


def _parse(raw: bytes, key: str) -> Record | None:
    if len(raw) < _HEADER.size or not raw.startswith(_MAGIC):
        logger.warning("Session record %r is not a valid record; ignoring it.", key)
        return None
    _, expires = _HEADER.unpack_from(raw)
    return Record(raw[_HEADER.size :], expires)


def _read_expiry(path: str) -> float:
    """The expiry in a record file's header; ``0`` if unreadable or gone."""
    try:
        with open(path, "rb") as f:
            head = f.read(_HEADER.size)
    except FileNotFoundError:
        return 0.0
    if len(head) < _HEADER.size or not head.startswith(_MAGIC):
        return 0.0
    return t.cast(float, _HEADER.unpack(head)[1])


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

