"""Shared by the reliability suites."""

from __future__ import annotations

import os
import typing as t

from werkzeug.http import parse_cookie

#: Every store, and those that live outside the test process.
ALL_BACKENDS = ["filesystem", "sqlite", "postgres", "simple", "redis", "memcached"]
SHARED_BACKENDS = ["filesystem", "sqlite", "postgres", "redis", "memcached"]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class SetCookie(t.NamedTuple):
    """One parsed ``Set-Cookie`` header."""

    name: str
    value: str
    attributes: dict[str, str]
    header: str

    @property
    def deleting(self) -> bool:
        return self.attributes.get("max-age") == "0" or "1970" in self.attributes.get("expires", "")


def parse_set_cookie(header: str) -> SetCookie:
    first, *rest = header.split(";")
    name, _, _ = first.partition("=")
    value = parse_cookie(first.strip()).get(name.strip(), "")
    attributes: dict[str, str] = {}
    for part in rest:
        key, _, val = part.strip().partition("=")
        attributes[key.lower()] = val
    return SetCookie(name.strip(), value, attributes, header)


def session_set_cookie(headers: t.Iterable[str], name: str = "session") -> SetCookie | None:
    """The ``Set-Cookie`` for the session cookie among ``headers``."""
    for header in headers:
        parsed = parse_set_cookie(header)
        if parsed.name == name:
            return parsed
    return None


