"""Server-side sessions for Flask: the cookie carries only a random ID."""

from __future__ import annotations

from .exceptions import BackendUnavailable
from .exceptions import SessionTooLarge
from .extension import ServerSide
from .interface import ServerSideSessionInterface
from .session import ServerSideSession
from .users import SessionInfo

__version__ = "0.2.0.dev0"

__all__ = [
    "BackendUnavailable",
    "ServerSide",
    "ServerSideSession",
    "ServerSideSessionInterface",
    "SessionInfo",
    "SessionTooLarge",
]
