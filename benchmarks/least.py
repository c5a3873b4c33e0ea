"""``least``: the least work a server-side session that keeps our
guarantees must do, written inline, as the bound of what any such session
layer can cost.

It is the floor (:class:`.apps.FloorInterface`: the store's minimum I/O)
plus what a request that uses a session cannot skip, each done the cheapest
way known:

- read the cookie and check that its value is a well-formed ID;
- hash the ID to the record's key (IDs are never stored as they are);
- read the record and check its expiry (an 8-byte header);
- decode Flask's tagged JSON;
- copy the mutable values the view is handed, and compare them at the end
  (a nested change is a change);
- a write: encode the session and write the record back if no other
  request wrote it since (a compare-and-set: no lost updates; see
  :class:`Records`);
- refresh the cookie (``Set-Cookie`` with a new ``Expires``) and send
  ``Vary: Cookie``.

It loads the record on first use, as ours does. What it leaves out makes
it cheaper than any real implementation: no error handling, no signals, no
touch or renewal clocks, no merge when the compare-and-set finds another
request's write, no checksum of a file's record. It serves the bench views
only (``__getitem__``, ``__setitem__``, ``update``, ``len``). Where even
``least`` is slower than Flask's cookie session, no session layer with
these guarantees can be faster on that machine: the target is bounded by
the work, not by the implementation.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import secrets
import struct
import time
import typing as t

from flask import Flask
from flask import Request
from flask import Response
from flask.json.tag import TaggedJSONSerializer
from flask.sessions import SessionInterface
from werkzeug.http import http_date

from flask_serverside.changes import copy_value
from flask_serverside.serializers import JSONSerializer

from .apps import BareSession
from .apps import COOKIE_NAME
from .apps import FileFloor
from .apps import Floor
from .apps import MemcachedFloor
from .apps import RedisFloor
from .apps import SQLFloor

_ID = re.compile(r"[A-Za-z0-9_-]{43}")
_EXPIRES = struct.Struct(">d")
#: The same tagged JSON as ours (the fastest encoder of that format here).
_JSON = JSONSerializer()
_DECODER = json.JSONDecoder(object_hook=TaggedJSONSerializer().untag)


class LeastSession(BareSession):
    """The session's data, loaded on first use, with what the view was
    handed.

    :param sid: The ID from the cookie, or ``None``.
    :param load: Reads the record: ``(data, token)``, or ``None`` if there
        is no live one.
    """

    def __init__(
        self, sid: str | None, load: t.Callable[[], tuple[dict[str, t.Any], t.Any] | None]
    ) -> None:
        super().__init__()
        self.sid = sid
        self.modified = False
        self._load: t.Callable[[], tuple[dict[str, t.Any], t.Any] | None] | None = (
            None if sid is None else load
        )
        #: Key -> (the value handed out, a copy as it was loaded).
        self.handed: dict[str, tuple[t.Any, t.Any]] = {}
        #: What a compare-and-set of the record needs (see :class:`Records`).
        self.token: t.Any = None

    def _use(self) -> None:
        self.accessed = True
        if self._load is None:
            return
        load, self._load = self._load, None
        found = load()
        if found is None:
            self.sid = None  # an unknown or expired ID: a new session, a new ID
        else:
            data, self.token = found
            dict.update(self, data)

    def __getitem__(self, key: str) -> t.Any:
        self._use()
        value = dict.__getitem__(self, key)
        if type(value) in (list, dict):
            self.handed[key] = (value, copy_value(value))
        return value

    def __setitem__(self, key: str, value: t.Any) -> None:
        self._use()
        dict.__setitem__(self, key, value)
        self.modified = True

    def update(self, *args: t.Any, **kwargs: t.Any) -> None:
        self._use()
        dict.update(self, *args, **kwargs)
        self.modified = True

    def __len__(self) -> int:
        self._use()
        return dict.__len__(self)

    def changed(self) -> bool:
        return self.modified or any(value != copy for value, copy in self.handed.values())


class LeastInterface(SessionInterface):
    """The least work of a session layer, on one store's floor.

    :param floor: The store's minimum I/O (:class:`.apps.Floor`).
    """

    def __init__(self, floor: Floor) -> None:
        self.records = records_of(floor)
        #: The cookie's ``Expires`` of the current second.
        self._expires: tuple[int, str] = (0, "")

    def open_session(self, app: Flask, request: Request) -> t.Any:
        header = request.environ.get("HTTP_COOKIE", "")
        value = header.partition(COOKIE_NAME + "=")[2].partition(";")[0]
        sid = value if _ID.fullmatch(value) is not None else None
        return LeastSession(sid, lambda: self._read(value))

    def _read(self, sid: str) -> tuple[dict[str, t.Any], t.Any] | None:
        raw, token = self.records.read(record_key(sid))
        if raw is None or _EXPIRES.unpack_from(raw)[0] <= time.time():
            return None
        # A file's record may be followed by an older, longer one's end.
        return _DECODER.raw_decode(raw[_EXPIRES.size :].decode())[0], token

    def save_session(self, app: Flask, session: t.Any, response: Response) -> None:
        assert isinstance(session, LeastSession)
        if not session.accessed or (session.sid is None and not dict.__len__(session)):
            return
        lifetime = app.permanent_session_lifetime.total_seconds()
        if session.changed():
            data = _EXPIRES.pack(time.time() + lifetime) + _JSON.dumps(dict(session))
            if session.sid is None:
                session.sid = secrets.token_urlsafe(32)
                self.records.create(record_key(session.sid), data)
            else:
                # If another request wrote since, this writes nothing: a real
                # session layer would merge and try again; the bound stops.
                self.records.replace(record_key(session.sid), session.token, data)
        response.headers.add(
            "Set-Cookie",
            f"{COOKIE_NAME}={session.sid}; Expires={self._expires_at(lifetime)};"
            " HttpOnly; Path=/",
        )
        response.headers.add("Vary", "Cookie")

    def _expires_at(self, lifetime: float) -> str:
        now = int(time.time())
        if self._expires[0] != now:
            self._expires = (now, http_date(now + lifetime))
        return self._expires[1]


def record_key(sid: str) -> str:
    """The key of the record of session ``sid``: the hash of the ID."""
    return "least-" + hashlib.sha256(sid.encode()).hexdigest()


class Records:
    """A floor's records, read with what a compare-and-set needs and
    written back only if no other request wrote them since (no lost
    updates), in the least round trips: the floor's read, then one
    conditional write.

    :param floor: The store's minimum I/O.
    """

    def __init__(self, floor: Floor) -> None:
        self.floor = floor

    def read(self, key: str) -> tuple[bytes | None, t.Any]:
        """The record (``None``: there is none), and the token
        :meth:`replace` compares."""
        raw = self.floor.read(key)
        return raw, raw

    def create(self, key: str, data: bytes) -> None:
        self.floor.setup(key, data)

    def replace(self, key: str, token: t.Any, data: bytes) -> bool:
        raise NotImplementedError


class FileRecords(Records):
    """In place, under the record file's ``flock``, if it still holds what
    was read (the floor's write, plus the lock and a read)."""

    floor: FileFloor

    def replace(self, key: str, token: t.Any, data: bytes) -> bool:
        fd = os.open(os.path.join(self.floor.directory, key), os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.pread(fd, len(token) + 1, 0) != token:
                return False
            os.pwrite(fd, data, 0)
            return True
        finally:
            os.close(fd)


class SQLRecords(Records):
    """``UPDATE ... WHERE id = ? AND data = ?``, as ours' fast path."""

    floor: SQLFloor

    def __init__(self, floor: SQLFloor) -> None:
        super().__init__(floor)
        mark = floor.update.rpartition("= ")[2]
        self.sql = f"{floor.update} AND data = {mark}"

    def replace(self, key: str, token: t.Any, data: bytes) -> bool:
        conn = self.floor.engine.raw_connection()
        try:
            cursor = conn.cursor()
            cursor.execute(self.sql, (data, 1e10, key, token))
            replaced = cursor.rowcount == 1
            cursor.close()
        finally:
            conn.close()
        return replaced


#: Sets KEYS[1] to ARGV[2] (expiring in ARGV[3] seconds) if it holds ARGV[1].
_REDIS_CAS = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
  return 1
end
return 0
"""


class RedisRecords(Records):
    """One script that compares and sets, as ours."""

    floor: RedisFloor

    def __init__(self, floor: RedisFloor) -> None:
        super().__init__(floor)
        self.script = floor.client.register_script(_REDIS_CAS)

    def replace(self, key: str, token: t.Any, data: bytes) -> bool:
        return bool(self.script(keys=[key], args=[token, data, 3600]))


class MemcachedRecords(Records):
    """``gets`` to read, ``cas`` to write (ours adds a lock check)."""

    floor: MemcachedFloor

    def read(self, key: str) -> tuple[bytes | None, t.Any]:
        return t.cast("tuple[bytes | None, t.Any]", self.floor.client.gets(key))

    def replace(self, key: str, token: t.Any, data: bytes) -> bool:
        return bool(self.floor.client.cas(key, data, token, expire=3600, noreply=False))


def records_of(floor: Floor) -> Records:
    """The compare-and-set records of ``floor``'s store."""
    kinds: list[tuple[type[Floor], type[t.Any]]] = [
        (FileFloor, FileRecords),
        (SQLFloor, SQLRecords),
        (RedisFloor, RedisRecords),
        (MemcachedFloor, MemcachedRecords),
    ]
    for floor_kind, records_kind in kinds:
        if isinstance(floor, floor_kind):
            return t.cast(Records, records_kind(floor))
    raise TypeError(f"no compare-and-set for {type(floor).__name__}")
