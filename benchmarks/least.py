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
- a write: encode the session and write the record back;
- refresh the cookie (``Set-Cookie`` with a new ``Expires``) and send
  ``Vary: Cookie``.

What it leaves out makes it cheaper than any real implementation: no error
handling, no signals, no touch or renewal clocks, no locking, and its write
is the floor's plain write, where ours is a compare-and-set (no lost
updates). It serves the bench views only (``__getitem__``, ``__setitem__``,
``update``). Where even ``least`` is slower than Flask's cookie session, no
session layer with these guarantees can be faster on that machine: the
target is bounded by the work, not by the implementation.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import struct
import time
import typing as t

from flask import Flask
from flask import Request
from flask import Response
from flask.sessions import SessionInterface
from werkzeug.http import http_date

from flask_serverside.changes import copy_value
from flask_serverside.serializers import JSONSerializer

from .apps import BareSession
from .apps import COOKIE_NAME
from .apps import FileFloor
from .apps import Floor
from .apps import READ_PATHS

_ID = re.compile(r"[A-Za-z0-9_-]{43}")
_EXPIRES = struct.Struct(">d")
#: The same tagged JSON as ours (the fastest encoder of that format here).
_JSON = JSONSerializer()


class LeastSession(BareSession):
    """The session's data, with what the view was handed."""

    def __init__(self, sid: str | None, data: dict[str, t.Any] | None = None) -> None:
        super().__init__(data or {})
        self.sid = sid
        self.modified = False
        #: Key -> (the value handed out, a copy as it was loaded).
        self.handed: dict[str, tuple[t.Any, t.Any]] = {}

    def __getitem__(self, key: str) -> t.Any:
        self.accessed = True
        value = dict.__getitem__(self, key)
        if type(value) in (list, dict):
            self.handed[key] = (value, copy_value(value))
        return value

    def __setitem__(self, key: str, value: t.Any) -> None:
        dict.__setitem__(self, key, value)
        self.accessed = self.modified = True

    def update(self, *args: t.Any, **kwargs: t.Any) -> None:
        dict.update(self, *args, **kwargs)
        self.accessed = self.modified = True

    def changed(self) -> bool:
        return self.modified or any(value != copy for value, copy in self.handed.values())


class LeastInterface(SessionInterface):
    """The least work of a session layer, on one store's floor.

    :param floor: The store's minimum I/O (:class:`.apps.Floor`).
    :param paths: The request paths that use the session: the session is
        loaded up front on those (a lazy load adds one attribute check).
    """

    def __init__(self, floor: Floor, paths: t.Collection[str] = READ_PATHS) -> None:
        self.floor = floor
        self.paths = paths
        # The floor writes a file in place, as its records keep their size;
        # a session's may change (write_bytes truncates).
        self._write = floor.setup if isinstance(floor, FileFloor) else floor.write
        #: The cookie's ``Expires`` of the current second.
        self._expires: tuple[int, str] = (0, "")

    def open_session(self, app: Flask, request: Request) -> t.Any:
        header = request.environ.get("HTTP_COOKIE", "")
        value = header.partition(COOKIE_NAME + "=")[2].partition(";")[0]
        if _ID.fullmatch(value) is None:
            return LeastSession(None)
        session = LeastSession(value)
        if request.path in self.paths:
            raw = self.floor.read(_key(value))
            if _EXPIRES.unpack_from(raw)[0] > time.time():
                dict.update(session, _JSON.loads(raw[_EXPIRES.size :]))
        return session

    def save_session(self, app: Flask, session: t.Any, response: Response) -> None:
        assert isinstance(session, LeastSession)
        if not session.accessed or (not session and session.sid is None):
            return
        lifetime = app.permanent_session_lifetime.total_seconds()
        if session.changed():
            if session.sid is None:
                session.sid = secrets.token_urlsafe(32)
                write = self.floor.setup
            else:
                write = self._write
            expires = _EXPIRES.pack(time.time() + lifetime)
            write(_key(session.sid), expires + _JSON.dumps(dict(session)))
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


def _key(sid: str) -> str:
    return "least-" + hashlib.sha256(sid.encode()).hexdigest()
