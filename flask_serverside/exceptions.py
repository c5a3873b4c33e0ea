"""Exceptions a user of flask_serverside can see."""

from __future__ import annotations

from werkzeug.exceptions import ServiceUnavailable


class BackendUnavailable(ServiceUnavailable):
    """The session store could not be reached; the request gets a 503.

    The store's own exception is the ``__cause__``.

    .. versionadded:: 0.1
    """

    description = (
        "The session store is not available right now. Please try again in a"
        " moment."
    )


class SessionTooLarge(Exception):
    """The serialized session is larger than ``SESSION_MAX_BYTES``.

    Nothing is stored; the record saved before the request stays as it was.

    .. versionadded:: 0.1
    """

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(
            f"The session is {size} bytes when serialized, more than"
            f" SESSION_MAX_BYTES={limit}. Store less in the session (keep large"
            " data in your database and put its key in the session) or raise"
            " SESSION_MAX_BYTES."
        )
        self.size = size
        self.limit = limit
