"""Copy the sessions that Flask-Session 0.8 stored into this extension's store.

Flask-Session keeps a session under its key prefix followed by the session
ID, which is also the cookie value. Copying a live session under the same ID
(hashed, as every record here) with its remaining lifetime keeps its user
logged in.

Records in Redis and SQL are read as msgpack or JSON only: a record that only
pickle could read is counted and skipped, never unpickled. The files of
Flask-Session's filesystem store are pickles; they are read by an unpickler
that refuses every class and function, so that only plain values load.

.. versionadded:: 0.1
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import typing as t
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

from flask import current_app

from . import ids
from .sources import decoder
from .sources import Found
from .sources import read_file
from .sources import session_files
from .sources import sessions
from .sources import SourceError
from .store import Copy

if t.TYPE_CHECKING:
    from flask import Flask

    from .record import Loaded
    from .store import SessionStore

__all__ = [
    "FlaskSessionFiles",
    "ImportResult",
    "SourceError",
    "adopt_flask_session_files",
    "import_sessions",
]

logger = logging.getLogger("flask_serverside")


@dataclass
class ImportResult:
    """What :func:`import_sessions` did with each session it found.

    .. versionadded:: 0.1
    """

    #: Copied into this store.
    imported: int = 0
    #: Expired: not copied.
    expired: int = 0
    #: Neither msgpack nor JSON (a pickle, say), or not a session: not copied.
    unreadable: int = 0
    #: Already live in this store (an earlier import): left as it is.
    present: int = 0
    #: Live, but its ID is shorter or longer than this extension accepts
    #: (Flask-Session's ``SESSION_ID_LENGTH`` below 16 or above 64).
    bad_id: int = 0
    #: Live, but its ID is unknown: Flask-Session's filesystem store names
    #: files by a hash of the ID, which the cookie holds.
    hashed_id: int = 0
    #: Live, but larger than ``SESSION_MAX_BYTES`` once serialized: it
    #: could never be saved again.
    #:
    #: .. versionadded:: 0.2
    too_large: int = 0


def import_sessions(
    source: str,
    *,
    table: str = "sessions",
    prefix: str = "session:",
    format: str = "msgpack",
) -> ImportResult:
    """Copy the live sessions of a Flask-Session 0.8 store into the current
    app's store, keeping their IDs and remaining lifetime.

    A session already live in this store is left alone, so running the
    import again is safe. A session without an expiry gets
    ``PERMANENT_SESSION_LIFETIME``.

    :param source: A ``redis://`` or ``rediss://`` URL, a SQLAlchemy
        database URL, or the directory of Flask-Session's filesystem store.
    :param table: Flask-Session's ``SESSION_SQLALCHEMY_TABLE``, as
        ``schema.table`` if it had a ``SESSION_SQLALCHEMY_SCHEMA``.
    :param prefix: Flask-Session's ``SESSION_KEY_PREFIX``.
    :param format: Flask-Session's ``SESSION_SERIALIZATION_FORMAT``, tried
        first; the other format is tried next, as Flask-Session does.
    :raises SourceError: Flask-Session's store cannot be read.
    :raises BackendUnavailable: This app's store cannot be reached.
    """
    store = current_app.extensions["serverside"].store
    lifetime = current_app.permanent_session_lifetime.total_seconds()
    counts: Counter[str] = Counter()
    for found in sessions(source, table, prefix, decoder(format)):
        counts[_import_one(store, found, lifetime)] += 1
    return ImportResult(**counts)


def _import_one(store: SessionStore, found: Found, lifetime: float) -> str:
    """Copy one session if it can be; return the :class:`ImportResult` field
    that counts it."""
    now = time.time()
    expires = now + lifetime if found.expires is None else found.expires
    if expires <= now:
        return "expired"
    if found.data is None:
        return "unreadable"
    if found.sid is None:
        return "hashed_id"
    if not ids.is_valid(found.sid):
        return "bad_id"
    return _copy(store, found.sid, found.data, expires)


def _copy(store: SessionStore, sid: str, data: dict[str, t.Any], expires: float) -> str:
    """Save one session unless this store has it live."""
    copy, _ = store.copy_in(sid, lambda: (data, expires))
    return "imported" if copy is Copy.COPIED else copy.value


class FlaskSessionFiles:
    """The directory of Flask-Session 0.8's filesystem store, read one session
    at a time.

    Its files are named by a hash of the key prefix and the session ID, so
    they cannot be listed by ID and copied ahead of time; a session can only
    be found when its user comes back with the cookie.

    :param directory: Flask-Session's ``SESSION_FILE_DIR``.
    :param prefix: Flask-Session's ``SESSION_KEY_PREFIX``.
    """

    def __init__(self, directory: str | os.PathLike[str], prefix: str = "session:") -> None:
        self.directory = os.fspath(directory)
        self.prefix = prefix

    def _paths(self, sid: str) -> list[str]:
        # cachelib names the files by SHA-256 of the key since 0.10, by MD5
        # before that.
        key = (self.prefix + sid).encode()
        return [
            os.path.join(self.directory, digest(key).hexdigest())
            for digest in (hashlib.sha256, hashlib.md5)
        ]

    def adopt(self, store: SessionStore, sid: str) -> Loaded | None:
        """Copy the session into ``store`` if its file is here, then remove
        the file, so that it is taken over once; return it, or ``None``.

        A session over ``SESSION_MAX_BYTES`` is left behind: its user
        starts a new session.
        """
        copy, loaded = store.copy_in(sid, lambda: self.read(sid), lambda: self.forget(sid))
        if copy is Copy.TOO_LARGE:
            logger.warning(
                "Not adopting a session over SESSION_MAX_BYTES=%d: its user"
                " starts a new session.",
                store.max_bytes,
            )
        return loaded

    def read(self, sid: str) -> tuple[dict[str, t.Any], float] | None:
        """The data and expiry of the live session with this ID, or ``None``."""
        for path in self._paths(sid):
            try:
                found = read_file(path)
            except FileNotFoundError:
                continue
            if found is None or found.data is None:
                return None
            expires = found.expires
            if expires is None:
                expires = time.time() + current_app.permanent_session_lifetime.total_seconds()
            return found.data, expires
        return None

    def forget(self, sid: str) -> bool:
        """Remove the session's file; return whether there was one."""
        removed = False
        for path in self._paths(sid):
            try:
                os.unlink(path)
            except FileNotFoundError:
                continue
            removed = True
        return removed

    def count(self) -> int:
        """The number of live sessions that can be adopted."""
        return sum(_is_live(found) for _, found in self._files())

    def clear(self) -> int:
        """Remove every session file; return how many were live."""
        live = 0
        for path, found in self._files():
            try:
                os.unlink(path)
            except FileNotFoundError:
                continue
            live += _is_live(found)
        return live

    def _files(self) -> Iterator[tuple[str, Found]]:
        if not os.path.isdir(self.directory):
            return iter(())
        return session_files(self.directory)


def _is_live(found: Found) -> bool:
    # read_file leaves out the data of an expired or unreadable file.
    return found.data is not None


def adopt_flask_session_files(
    app: Flask, directory: str | os.PathLike[str], prefix: str = "session:"
) -> None:
    """Take over the sessions of Flask-Session's filesystem store as their
    users come back, keeping their IDs.

    Call it after :meth:`~flask_serverside.ServerSide.init_app`. When a
    cookie's ID is not in this store, its file in ``directory`` is read
    (without running code, as :func:`import_sessions` reads it), copied into
    this store with its remaining lifetime, and deleted. Remove the call once
    the old directory is empty or its sessions have expired.

    :param app: The app using this extension.
    :param directory: Flask-Session's ``SESSION_FILE_DIR``.
    :param prefix: Flask-Session's ``SESSION_KEY_PREFIX``.
    """
    extension = app.extensions.get("serverside")
    if extension is None:
        raise RuntimeError("Call adopt_flask_session_files after ServerSide.init_app(app).")
    with app.app_context():
        extension.store.adopter = FlaskSessionFiles(directory, prefix)
