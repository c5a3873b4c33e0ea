"""Exceptions a user of flask_serverside can see."""

from __future__ import annotations

from werkzeug.exceptions import ServiceUnavailable


class BackendUnavailable(ServiceUnavailable):
    """The session store could not be reached; the request gets a 503.

    The store's own exception is the ``__cause__``. The response carries
    ``Retry-After: 5`` (:data:`~flask_serverside.exceptions.RETRY_AFTER`
    seconds), so that clients and load balancers wait a moment before they
    try again.

    .. versionadded:: 0.1

    .. versionchanged:: 0.2
        The response has a ``Retry-After`` header.
    """

    description = (
        "The session store is not available right now. Please try again in a"
        " moment."
    )

    def __init__(self, description: str | None = None) -> None:
        super().__init__(description, retry_after=RETRY_AFTER)


#: Seconds the ``Retry-After`` header of a :exc:`BackendUnavailable` 503 asks
#: clients to wait: short, since most outages are a restart or a failover.
RETRY_AFTER = 5


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
