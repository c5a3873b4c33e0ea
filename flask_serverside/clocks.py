"""The absolute lifetime and ID renewal of sessions.

The idle timeout is ``PERMANENT_SESSION_LIFETIME``, kept by the store's
expiry. The two other clocks read the record's header
(:class:`~flask_serverside.record.Meta`): an absolute lifetime counted from
``created``, and an ID renewal counted from ``issued``.

A renewed session's old record becomes a pointer for a grace period: it
holds the new ID sealed with the old one, so the raw new ID never appears in
storage and only a holder of the old ID can follow it.

.. versionadded:: 0.2
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass

from . import ids
from .record import Meta

#: The key of :attr:`.Meta.extra` that marks a renewed record's pointer.
RENEWED = "renewed"
_SEAL = b"flask_serverside.renew"


@dataclass(frozen=True)
class Clocks:
    """The clocks configured beyond the idle timeout, in seconds.

    :param absolute: ``SESSION_ABSOLUTE_LIFETIME``, or ``None``.
    :param renewal: ``SESSION_RENEWAL_INTERVAL``, or ``None``.
    :param grace: ``SESSION_RENEWAL_GRACE``.
    """

    absolute: float | None
    renewal: float | None
    grace: float

    def ended(self, meta: Meta, now: float) -> bool:
        """Whether the session is past its absolute lifetime."""
        if self.absolute is None or meta.created is None:
            return False
        return meta.created + self.absolute <= now

    def deadline(self, meta: Meta) -> float | None:
        """When the session ends however active it is, if it does."""
        if self.absolute is None or meta.created is None:
            return None
        return meta.created + self.absolute

    def renewal_due(self, meta: Meta, now: float) -> bool:
        """Whether the session's ID is older than the renewal interval."""
        if self.renewal is None or meta.issued is None:
            return False
        return now - meta.issued >= self.renewal

    def pointer_live(self, meta: Meta, now: float) -> bool:
        """Whether a pointer record written at ``meta.issued`` is in its grace.

        Checked on the header, not only the stored expiry, so a pointer whose
        expiry was moved by a request that loaded it before the renewal still
        ends on time.
        """
        return meta.issued is not None and now < meta.issued + self.grace


def _pad(old_sid: str, length: int) -> bytes:
    return hashlib.shake_256(_SEAL + old_sid.encode("ascii")).digest(length)


def seal(new_sid: str, old_sid: str) -> str:
    """The new ID of a renewed session, readable only with the old ID."""
    raw = new_sid.encode("ascii")
    mixed = bytes(a ^ b for a, b in zip(raw, _pad(old_sid, len(raw))))
    return base64.urlsafe_b64encode(mixed).decode("ascii")


def unseal(sealed: str, old_sid: str) -> str | None:
    """The new ID sealed by :func:`seal`, or ``None`` if ``old_sid`` is not
    the ID it was sealed with."""
    try:
        mixed = base64.urlsafe_b64decode(sealed)
        raw = bytes(a ^ b for a, b in zip(mixed, _pad(old_sid, len(mixed))))
        sid = raw.decode("ascii")
    except ValueError:
        return None
    return sid if ids.is_valid(sid) else None
