"""Session IDs: generate, validate, sign and hash them."""

from __future__ import annotations

import hashlib
import re
import secrets
import typing as t

from itsdangerous import BadSignature
from itsdangerous import Signer

#: The fewest and most random bytes a session ID may carry.
MIN_BYTES = 16
MAX_BYTES = 64

# token_urlsafe(n) is the unpadded URL-safe base64 of n bytes.
_ID_RE = re.compile(
    rf"[A-Za-z0-9_-]{{{-(-MIN_BYTES * 4 // 3)},{-(-MAX_BYTES * 4 // 3)}}}"
)
_SALT = "flask_serverside.sid"


def generate(nbytes: int) -> str:
    """Return a new random session ID carrying ``nbytes`` of entropy."""
    return secrets.token_urlsafe(nbytes)


def is_valid(sid: str) -> bool:
    """Whether ``sid`` has the shape of a session ID of any allowed length."""
    return _ID_RE.fullmatch(sid) is not None


def storage_key(prefix: str, sid: str) -> str:
    """The key a session is stored under: never the raw ID itself."""
    return prefix + hashlib.sha256(sid.encode("ascii")).hexdigest()


def _signer(keys: t.Sequence[str | bytes]) -> Signer:
    # itsdangerous signs with the last key and verifies with all of them.
    return Signer(list(keys), salt=_SALT, digest_method=hashlib.sha256)  # type: ignore[arg-type]


def sign(sid: str, keys: t.Sequence[str | bytes]) -> str:
    """Sign ``sid`` with the last of ``keys``."""
    return _signer(keys).sign(sid).decode("ascii")


def parse_cookie(value: str, keys: t.Sequence[str | bytes] | None) -> str | None:
    """Return the session ID in a cookie value, or ``None`` if malformed.

    :param value: The cookie value.
    :param keys: The signing keys, oldest first, or ``None`` when IDs are not
        signed.
    """
    if len(value) > 256 or not value.isascii():
        return None
    if keys is not None:
        try:
            value = _signer(keys).unsign(value).decode("ascii")
        except BadSignature:
            return None
    return value if is_valid(value) else None
