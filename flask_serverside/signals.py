"""Blinker signals sent with the app as sender.

.. versionadded:: 0.1
"""

from __future__ import annotations

from blinker import Namespace

_signals = Namespace()

#: A new session was stored for the first time. Sent with ``sid``.
session_created = _signals.signal("session-created")

#: A session moved to a new ID. Sent with ``old_sid`` and ``sid``.
session_regenerated = _signals.signal("session-regenerated")

#: A session's record was removed by :meth:`~.ServerSideSession.destroy`.
#: Sent with ``sid``.
session_destroyed = _signals.signal("session-destroyed")

#: A user's session was ended by :meth:`.ServerSide.revoke`,
#: :meth:`.ServerSide.revoke_user` or ``SESSION_MAX_PER_USER``. Sent once per
#: session, with ``handle`` and ``user_id``.
#:
#: .. versionadded:: 0.2
session_revoked = _signals.signal("session-revoked")
