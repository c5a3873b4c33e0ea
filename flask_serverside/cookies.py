"""The session's ``Set-Cookie`` header, built from a small cache.

werkzeug's ``dump_cookie`` quotes the value, checks every attribute and
formats the expiry on each call: that was much of what a request that only
read its session cost (issue 16). The header changes with the expiry, to
the second, and with the settings, so it is built once per second and
settings, around a mark that the value replaces.
"""

from __future__ import annotations

import re
import time
import typing as t
from datetime import datetime
from datetime import timedelta
from datetime import timezone

from werkzeug.http import dump_cookie

if t.TYPE_CHECKING:
    from flask import Config

#: Cookie values that ``dump_cookie`` sends as they are: IDs and signed IDs
#: are always such.
PLAIN_VALUE = re.compile(r"[A-Za-z0-9_.-]+")
#: Stands for the value in a cached header.
_MARK = "FlaskServerSideValue"
#: Entries kept in each cache before it is emptied (settings rarely change).
_KEEP = 64


class CookieHeaders:
    """``Set-Cookie`` headers of session cookies, as ``dump_cookie`` builds
    them, split around the value and kept for the second they show."""

    def __init__(self) -> None:
        #: (name, expiry second and zone, *attributes) -> the header around
        #: the value.
        self._split: dict[tuple[t.Any, ...], tuple[str, str]] = {}
        #: The settings :meth:`permanent` reads -> what they make.
        self._settings: dict[tuple[t.Any, ...], _Settings] = {}

    def header(
        self, name: str, value: str, expires: datetime | None, options: dict[str, t.Any]
    ) -> str | None:
        """The header ``dump_cookie(name, value, expires=expires, **options)``
        builds, or ``None`` if the value would be quoted (never an ID) or
        the name holds the mark: the caller builds that one itself."""
        if PLAIN_VALUE.fullmatch(value) is None or _MARK in name:
            return None
        second = None if expires is None else (int(expires.timestamp()), expires.tzinfo)
        key = (name, second, *options.values())
        found = self._split.get(key)
        if found is None:
            head, _, tail = dump_cookie(name, _MARK, expires=expires, **options).partition(_MARK)
            found = _remember(self._split, key, (head, tail))
        return f"{found[0]}{value}{found[1]}"

    def permanent(self, config: Config, value: str) -> str | None:
        """The header of a permanent session's cookie under Flask's own
        settings: the attributes ``SessionInterface.get_cookie_*`` return
        and an expiry of now + ``PERMANENT_SESSION_LIFETIME``, read from
        ``config`` directly (the caller checks that no hook is overridden).
        ``None`` where :meth:`header` gives none.
        """
        key = (
            config["SESSION_COOKIE_NAME"],
            config["SESSION_COOKIE_DOMAIN"],
            config["SESSION_COOKIE_PATH"] or config["APPLICATION_ROOT"],
            config["SESSION_COOKIE_SECURE"],
            config["SESSION_COOKIE_HTTPONLY"],
            config["SESSION_COOKIE_SAMESITE"],
            config["SESSION_COOKIE_PARTITIONED"],
            config["PERMANENT_SESSION_LIFETIME"],
        )
        settings = self._settings.get(key)
        if settings is None:
            settings = _remember(self._settings, key, _Settings(key))
        second = int(time.time() + settings.lifetime)
        found = self._split.get((settings.name, (second, timezone.utc), *settings.values))
        if found is None or PLAIN_VALUE.fullmatch(value) is None:
            expires = datetime.fromtimestamp(second, timezone.utc)
            return self.header(settings.name, value, expires, settings.options)
        return f"{found[0]}{value}{found[1]}"


class _Settings:
    """What the settings :meth:`CookieHeaders.permanent` reads make: the
    cookie's name, its attributes, and the lifetime in seconds."""

    def __init__(self, key: tuple[t.Any, ...]) -> None:
        name, domain, path, secure, httponly, samesite, partitioned, lifetime = key
        self.name: str = name
        self.options = {
            "domain": domain,
            "path": path,
            "secure": secure,
            "httponly": httponly,
            "samesite": samesite,
            "partitioned": partitioned,
        }
        self.values = tuple(self.options.values())
        if not isinstance(lifetime, timedelta):
            lifetime = timedelta(seconds=lifetime)  # as Flask's config attribute does
        self.lifetime: float = lifetime.total_seconds()


_V = t.TypeVar("_V")


def _remember(cache: dict[tuple[t.Any, ...], _V], key: tuple[t.Any, ...], value: _V) -> _V:
    if len(cache) >= _KEEP:
        cache.clear()
    cache[key] = value
    return value
