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
import importlib
import os
import pickle
import re
import struct
import time
import typing as t
from collections import Counter
from collections.abc import Callable
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from datetime import timezone

import sqlalchemy as sa
from flask import current_app

from . import ids
from .exceptions import BackendUnavailable

if t.TYPE_CHECKING:
    from flask import Flask

    from .store import SessionStore

Decode = Callable[[bytes], "dict[str, t.Any] | None"]

#: The serialization formats of Flask-Session 0.8 (``SESSION_SERIALIZATION_FORMAT``).
_FORMATS = ("msgpack", "json")
#: Seconds to wait for Flask-Session's Redis to connect or answer.
_TIMEOUT = 5.0
#: Rows read from Flask-Session's table per query.
_BATCH = 1000
#: What follows the prefix in a Flask-Session key: a ``secrets.token_urlsafe``.
_TOKEN_RE = re.compile(r"[A-Za-z0-9_-]+")
#: What follows the prefix in this extension's own keys, which a shared
#: Redis also holds: the hex SHA-256 of an ID.
_OWN_KEY_RE = re.compile(r"[0-9a-f]{64}")
#: cachelib's FileSystemCache file: the expiry as a native unsigned int
#: (``0``: never), then the pickled value.
_FILE_HEADER = struct.Struct("I")
_FILE_TMP_SUFFIX = ".__wz_cache"


class SourceError(Exception):
    """Flask-Session's store cannot be found, reached or read.

    .. versionadded:: 0.1
    """


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


class _Found(t.NamedTuple):
    """A session found in Flask-Session's store.

    :param sid: Its ID, or ``None`` where the store keeps only a hash.
    :param data: Its data, or ``None`` if it cannot be read without pickle.
    :param expires: Its expiry as a Unix timestamp, or ``None`` if it has
        none.
    """

    sid: str | None
    data: dict[str, t.Any] | None
    expires: float | None


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
    from .extension import _store

    store = _store()
    lifetime = current_app.permanent_session_lifetime.total_seconds()
    counts: Counter[str] = Counter()
    for found in _sessions(source, table, prefix, _decoder(format)):
        counts[_import_one(store, found, lifetime)] += 1
    return ImportResult(**counts)


def _import_one(store: SessionStore, found: _Found, lifetime: float) -> str:
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
    try:
        raw = store.serializer.dumps(data)
    except Exception:
        # A value Flask-Session could store that this serializer cannot.
        return "unreadable"
    if len(raw) > store.max_bytes:
        return "too_large"
    key = store.key(sid)
    try:
        with store.backend.lock(key):
            current = store.backend.load(key)
            if current is not None and current.expires > time.time():
                return "present"
            store.backend.save(key, raw, expires)
    except store.backend.unavailable_errors as exc:
        raise BackendUnavailable() from exc
    return "imported"


def _sessions(source: str, table: str, prefix: str, decode: Decode) -> Iterator[_Found]:
    scheme = source.partition("://")[0].lower() if "://" in source else ""
    if scheme in ("redis", "rediss"):
        return _redis_sessions(source, prefix, decode)
    if scheme:
        return _sql_sessions(source, table, prefix, decode)
    return _directory_sessions(source)


def _decoder(format: str) -> Decode:
    """Flask-Session's decoding, without its pickle fallback."""
    if format not in _FORMATS:
        raise ValueError(f"format={format!r} is not one of {_FORMATS!r}.")
    msgspec = _import("msgspec", "msgpack")
    decoders: list[t.Any] = [msgspec.msgpack.Decoder(), msgspec.json.Decoder()]
    if format == "json":
        decoders.reverse()

    def decode(raw: bytes) -> dict[str, t.Any] | None:
        for decoder in decoders:
            try:
                return _session_data(decoder.decode(raw))
            except msgspec.DecodeError:
                continue
        return None

    return decode


def _session_data(value: object) -> dict[str, t.Any] | None:
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return value
    return None


def _import(module: str, extra: str) -> t.Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise SourceError(
            f"Reading this Flask-Session store needs the {module!r} package:"
            f" install 'flask-serverside[{extra}]'."
        ) from exc


def _redis_sessions(url: str, prefix: str, decode: Decode) -> Iterator[_Found]:
    redis = _import("redis", "redis")
    try:
        client = redis.Redis.from_url(
            url, socket_timeout=_TIMEOUT, socket_connect_timeout=_TIMEOUT
        )
    except ValueError as exc:
        raise SourceError(
            f"--from {_hide_password(url)!r} is not a Redis URL such as"
            f" 'redis://localhost:6379/0': {exc}"
        ) from exc
    match = re.sub(r"([*?\[\]\\])", r"\\\1", prefix) + "*"
    try:
        for name in client.scan_iter(match=match, count=1000):
            sid = _sid(name.decode("utf-8", "replace"), prefix)
            if sid is None:
                continue
            value, ttl = client.pipeline(transaction=False).get(name).pttl(name).execute()
            if value is None:
                continue  # It expired since the scan found it.
            expires = None if ttl < 0 else time.time() + ttl / 1000
            yield _Found(sid, decode(value), expires)
    except redis.RedisError as exc:
        raise SourceError(
            f"Cannot read Flask-Session's Redis at {_hide_password(url)!r}: {exc}"
        ) from exc
    finally:
        client.close()


def _hide_password(url: str) -> str:
    return re.sub(r"//[^/@]*@", "//***@", url, count=1)


def _sid(name: str, prefix: str) -> str | None:
    """The session ID in a Flask-Session key, or ``None`` for other keys."""
    if not name.startswith(prefix):
        return None
    sid = name[len(prefix) :]
    if not _TOKEN_RE.fullmatch(sid) or _OWN_KEY_RE.fullmatch(sid):
        return None
    return sid


def _sql_sessions(url: str, table: str, prefix: str, decode: Decode) -> Iterator[_Found]:
    engine = _source_engine(url)
    schema, _, name = table.rpartition(".")
    sessions = sa.table(
        name,
        sa.column("session_id", sa.String()),
        sa.column("data", sa.LargeBinary()),
        sa.column("expiry", sa.DateTime()),
        schema=schema or None,
    )
    query = (
        sa.select(sessions.c.session_id, sessions.c.data, sessions.c.expiry)
        .where(sessions.c.session_id.is_not(None))
        .order_by(sessions.c.session_id)
        .limit(_BATCH)
    )
    last = None
    try:
        _check_table(engine, name, schema or None)
        while True:
            # A connection per batch: no lock is held while this store writes.
            page = query if last is None else query.where(sessions.c.session_id > last)
            with engine.connect() as conn:
                rows = conn.execute(page).all()
            for row in rows:
                sid = _sid(row.session_id, prefix)
                if sid is not None:
                    yield _Found(sid, decode(bytes(row.data or b"")), _utc_timestamp(row.expiry))
            if len(rows) < _BATCH:
                return
            last = rows[-1].session_id
    except sa.exc.SQLAlchemyError as exc:
        raise SourceError(f"Cannot read Flask-Session's table {table!r}: {exc}") from exc
    finally:
        engine.dispose()


def _source_engine(url: str) -> sa.Engine:
    try:
        parsed = sa.make_url(url)
        engine = sa.create_engine(parsed)
    except (sa.exc.ArgumentError, ValueError, ImportError) as exc:
        raise SourceError(
            f"--from {_hide_password(url)!r} is neither a redis:// URL, nor a database URL that"
            f" SQLAlchemy can use, nor a directory: {exc}"
        ) from exc
    database = parsed.database
    if parsed.get_backend_name() == "sqlite" and not (database and os.path.isfile(database)):
        # SQLite would create an empty database instead of failing.
        raise SourceError(f"There is no SQLite database file at {database!r}.")
    return engine


def _check_table(engine: sa.Engine, name: str, schema: str | None) -> None:
    with engine.connect() as conn:
        if not sa.inspect(conn).has_table(name, schema=schema):
            raise SourceError(
                f"There is no table {name!r} in {engine.url!r}; pass Flask-Session's"
                " SESSION_SQLALCHEMY_TABLE with --table."
            )


def _utc_timestamp(expiry: datetime | None) -> float:
    """Flask-Session's naive UTC expiry as a timestamp; none is expired."""
    if expiry is None:
        return 0.0
    if expiry.tzinfo is None:
        expiry = expiry.replace(tzinfo=timezone.utc)
    return expiry.timestamp()


def _directory_sessions(directory: str) -> Iterator[_Found]:
    if not os.path.isdir(directory):
        raise SourceError(
            f"--from {directory!r} is neither a redis:// URL, nor a database URL,"
            " nor a directory."
        )
    try:
        for _, found in _session_files(directory):
            yield found
    except OSError as exc:
        raise SourceError(f"Cannot read Flask-Session's directory: {exc}") from exc


def _session_files(directory: str) -> Iterator[tuple[str, _Found]]:
    """The session files of cachelib's FileSystemCache in ``directory``, with
    what each holds; a file removed meanwhile is left out."""
    with os.scandir(directory) as entries:
        for entry in entries:
            if entry.is_file() and not entry.name.endswith(_FILE_TMP_SUFFIX):
                try:
                    found = _read_file(entry.path)
                except FileNotFoundError:
                    continue
                if found is not None:
                    yield entry.path, found


def _read_file(path: str) -> _Found | None:
    """A session file of cachelib's FileSystemCache, or ``None`` for its
    other files (the item counter)."""
    with open(path, "rb") as f:
        head = f.read(_FILE_HEADER.size)
        if len(head) < _FILE_HEADER.size:
            return _Found(None, None, None)
        (expires,) = _FILE_HEADER.unpack(head)
        if expires and expires <= time.time():
            return _Found(None, None, expires)
        try:
            value = _PlainUnpickler(f).load()
        except Exception:
            return _Found(None, None, expires or None)
    if not isinstance(value, dict):
        return None
    return _Found(None, _session_data(value), expires or None)


class _PlainUnpickler(pickle.Unpickler):
    """Loads plain values only: dicts, lists, tuples, strings, bytes, numbers,
    booleans and ``None``.

    Everything that could run code (a class, a function, ``__reduce__``)
    goes through :meth:`find_class`, which refuses it.
    """

    def find_class(self, module: str, name: str) -> t.Any:
        raise pickle.UnpicklingError(f"Refusing to load {module}.{name} from a session file.")


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

    def read(self, sid: str) -> tuple[dict[str, t.Any], float] | None:
        for path in self._paths(sid):
            try:
                found = _read_file(path)
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

    def _files(self) -> Iterator[tuple[str, _Found]]:
        if not os.path.isdir(self.directory):
            return iter(())
        return _session_files(self.directory)


def _is_live(found: _Found) -> bool:
    # _read_file leaves out the data of an expired or unreadable file.
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
    from .interface import ServerSideSessionInterface

    interface = app.session_interface
    if not isinstance(interface, ServerSideSessionInterface):
        raise RuntimeError("Call adopt_flask_session_files after ServerSide.init_app(app).")
    interface.store.adopter = FlaskSessionFiles(directory, prefix)
