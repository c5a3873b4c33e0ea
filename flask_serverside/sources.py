"""Flask-Session 0.8's stores, read without running a pickle.

Records in Redis and SQL are read as msgpack or JSON only. The files of
Flask-Session's filesystem store (cachelib's FileSystemCache) are pickles;
they are read by an unpickler that refuses every class and function, so
that only plain values load.
"""

from __future__ import annotations

import os
import pickle
import re
import struct
import time
import typing as t
from collections.abc import Callable
from collections.abc import Iterator
from datetime import datetime

import sqlalchemy as sa

from .backends.base import glob_escape
from .backends.base import import_optional
from .backends.base import is_session_key
from .backends.base import utc_timestamp

Decode = Callable[[bytes], "dict[str, t.Any] | None"]

#: The serialization formats of Flask-Session 0.8 (``SESSION_SERIALIZATION_FORMAT``).
_FORMATS = ("msgpack", "json")
#: Seconds to wait for Flask-Session's Redis to connect or answer.
_TIMEOUT = 5.0
#: Rows read from Flask-Session's table per query.
_BATCH = 1000
#: What follows the prefix in a Flask-Session key: a ``secrets.token_urlsafe``.
_TOKEN_RE = re.compile(r"[A-Za-z0-9_-]+")
#: cachelib's FileSystemCache file: the expiry as a native unsigned int
#: (``0``: never), then the pickled value.
_FILE_HEADER = struct.Struct("I")
_FILE_TMP_SUFFIX = ".__wz_cache"


class SourceError(Exception):
    """Flask-Session's store cannot be found, reached or read.

    .. versionadded:: 0.1
    """


class Found(t.NamedTuple):
    """A session found in Flask-Session's store.

    :param sid: Its ID, or ``None`` where the store keeps only a hash.
    :param data: Its data, or ``None`` if it cannot be read without pickle.
    :param expires: Its expiry as a Unix timestamp, or ``None`` if it has
        none.
    """

    sid: str | None
    data: dict[str, t.Any] | None
    expires: float | None


def sessions(source: str, table: str, prefix: str, decode: Decode) -> Iterator[Found]:
    scheme = source.partition("://")[0].lower() if "://" in source else ""
    if scheme in ("redis", "rediss"):
        return _redis_sessions(source, prefix, decode)
    if scheme:
        return _sql_sessions(source, table, prefix, decode)
    return _directory_sessions(source)


def decoder(format: str) -> Decode:
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
                return session_data(decoder.decode(raw))
            except msgspec.DecodeError:
                continue
        return None

    return decode


def session_data(value: object) -> dict[str, t.Any] | None:
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return value
    return None


def _import(module: str, extra: str) -> t.Any:
    try:
        purpose = "Reading this Flask-Session store"
        return import_optional(module, purpose, f"'flask-serverside[{extra}]'")
    except ImportError as exc:
        raise SourceError(str(exc)) from exc


def _redis_sessions(url: str, prefix: str, decode: Decode) -> Iterator[Found]:
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
    match = glob_escape(prefix) + "*"
    try:
        for name in client.scan_iter(match=match, count=1000):
            sid = _sid(name.decode("utf-8", "replace"), prefix)
            if sid is None:
                continue
            value, ttl = client.pipeline(transaction=False).get(name).pttl(name).execute()
            if value is None:
                continue  # It expired since the scan found it.
            expires = None if ttl < 0 else time.time() + ttl / 1000
            yield Found(sid, decode(value), expires)
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
    if not _TOKEN_RE.fullmatch(sid) or is_session_key(sid, ""):
        return None
    return sid


def _sql_sessions(url: str, table: str, prefix: str, decode: Decode) -> Iterator[Found]:
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
                    yield Found(sid, decode(bytes(row.data or b"")), _utc_timestamp(row.expiry))
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
    return 0.0 if expiry is None else utc_timestamp(expiry)


def _directory_sessions(directory: str) -> Iterator[Found]:
    if not os.path.isdir(directory):
        raise SourceError(
            f"--from {directory!r} is neither a redis:// URL, nor a database URL,"
            " nor a directory."
        )
    try:
        for _, found in session_files(directory):
            yield found
    except OSError as exc:
        raise SourceError(f"Cannot read Flask-Session's directory: {exc}") from exc


def session_files(directory: str) -> Iterator[tuple[str, Found]]:
    """The session files of cachelib's FileSystemCache in ``directory``, with
    what each holds; a file removed meanwhile is left out."""
    with os.scandir(directory) as entries:
        for entry in entries:
            if entry.is_file() and not entry.name.endswith(_FILE_TMP_SUFFIX):
                try:
                    found = read_file(entry.path)
                except FileNotFoundError:
                    continue
                if found is not None:
                    yield entry.path, found


def read_file(path: str) -> Found | None:
    """A session file of cachelib's FileSystemCache, or ``None`` for its
    other files (the item counter)."""
    with open(path, "rb") as f:
        head = f.read(_FILE_HEADER.size)
        if len(head) < _FILE_HEADER.size:
            return Found(None, None, None)
        (expires,) = _FILE_HEADER.unpack(head)
        if expires and expires <= time.time():
            return Found(None, None, expires)
        try:
            value = _PlainUnpickler(f).load()
        except Exception:
            return Found(None, None, expires or None)
    if not isinstance(value, dict):
        return None
    return Found(None, session_data(value), expires or None)


class _PlainUnpickler(pickle.Unpickler):
    """Loads plain values only: dicts, lists, tuples, strings, bytes, numbers,
    booleans and ``None``.

    Everything that could run code (a class, a function, ``__reduce__``)
    goes through :meth:`find_class`, which refuses it.
    """

    def find_class(self, module: str, name: str) -> t.Any:
        raise pickle.UnpicklingError(f"Refusing to load {module}.{name} from a session file.")
