"""The session interface: cookies in, cookies out, store calls in between."""

from __future__ import annotations

import logging
import threading
import time
import typing as t
from datetime import datetime
from datetime import timedelta
from datetime import timezone

from flask.sessions import SessionInterface

from . import ids
from . import signals
from .cookies import CookieHeaders
from .cookies import PLAIN_VALUE
from .exceptions import BackendUnavailable
from .saving import Outcome
from .saving import Saved
from .session import ServerSideSession

if t.TYPE_CHECKING:
    from flask import Flask
    from flask import Request
    from flask import Response
    from flask.sessions import SessionMixin

    from .store import SessionStore

logger = logging.getLogger("flask_serverside")

#: The methods that make the session cookie: where a subclass or an
#: instance attribute overrides one, the cookie is always built through them.
_COOKIE_HOOKS = frozenset(
    {
        "get_cookie_name",
        "get_cookie_domain",
        "get_cookie_path",
        "get_cookie_secure",
        "get_cookie_httponly",
        "get_cookie_samesite",
        "get_cookie_partitioned",
        "get_expiration_time",
        "cookie_value",
    }
)


class ServerSideSessionInterface(SessionInterface):
    """Keeps the session in a store; the cookie carries only its ID.

    ``open_session`` runs for every request, static files included, so it
    only parses the cookie; the store is first contacted when the session's
    data is used.

    :param store: The backend with its settings.
    :param permanent: ``SESSION_PERMANENT``.
    :param sign_id: ``SESSION_SIGN_ID``.
    :param cleanup_interval: ``SESSION_CLEANUP_INTERVAL``, or ``None`` when
        the store expires records itself or cleanup is turned off.

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        store: SessionStore,
        *,
        permanent: bool,
        sign_id: bool,
        cleanup_interval: float | None,
    ) -> None:
        self.store = store
        self.permanent = permanent
        self.sign_id = sign_id
        self.cleanup_interval = cleanup_interval
        self._next_cleanup = 0.0
        self._cleanup_lock = threading.Lock()
        self._cookie_headers = CookieHeaders()
        #: Whether the cookie is Flask's (no hook overridden by the class, no
        #: absolute lifetime): a permanent one is then built from the
        #: settings alone, unless an instance attribute overrides a hook.
        absolute = store.clocks is not None and store.clocks.absolute is not None
        self._flask_cookie = not absolute and all(
            getattr(type(self), hook) is getattr(ServerSideSessionInterface, hook)
            for hook in _COOKIE_HOOKS
        )

    def _signing_keys(self, app: Flask) -> list[str | bytes] | None:
        if not self.sign_id:
            return None
        if not app.secret_key:
            raise RuntimeError(
                "SESSION_SIGN_ID is on but SECRET_KEY is not set. Set"
                " app.config['SECRET_KEY'] to a long random value."
            )
        return [*(app.config.get("SECRET_KEY_FALLBACKS") or ()), app.secret_key]

    def cookie_value(self, app: Flask, sid: str) -> str:
        """The cookie value for ``sid``: the ID, signed if configured."""
        keys = self._signing_keys(app)
        return sid if keys is None else ids.sign(sid, keys)

    def parse_sid(self, app: Flask, value: str) -> str | None:
        """The session ID in a cookie value, or ``None`` if malformed."""
        return ids.parse_cookie(value, self._signing_keys(app))

    def open_session(self, app: Flask, request: Request) -> ServerSideSession:
        value = _request_cookie(request, self.get_cookie_name(app))
        sid = self.parse_sid(app, value) if value else None
        return ServerSideSession(self.store, sid, self.permanent)

    def save_session(self, app: Flask, session: SessionMixin, response: Response) -> None:
        assert isinstance(session, ServerSideSession)
        self._schedule_cleanup(response)
        if session.accessed:
            _vary_on_cookie(response)
        if session.load_failed or session.save_attempted:
            return
        if not session.loaded:
            self._refresh_unloaded(app, session, response)
            return
        # Flask calls save_session again when this one raises; don't retry.
        session.save_attempted = True
        lifetime = app.permanent_session_lifetime.total_seconds()
        try:
            if _only_read(session):
                assert session.stored is not None
                saved = self.store.keep(session.sid, session.stored, session.loaded_at, lifetime)
            else:
                saved = self.store.save(session.changes(), lifetime)
        except BackendUnavailable as exc:
            _replace_response(response, exc)
            return
        if saved.renewed_to is not None:
            session.follow_renewal(saved.renewed_to)
        self._send_signals(app, session, saved)
        self._update_cookie(app, session, response, saved.outcome)

    def _refresh_unloaded(
        self, app: Flask, session: ServerSideSession, response: Response
    ) -> None:
        """Refresh the cookie of a request that read only the session ID.

        The store is not contacted, so the permanent flag is the default one;
        the stored expiry is extended when the data is next used.
        """
        sid = session.cookie_sid
        refresh = self.permanent and app.config["SESSION_REFRESH_EACH_REQUEST"]
        if self.store.clocks is not None and self.store.clocks.absolute is not None:
            # Without the record, the session's end is unknown: a refreshed
            # cookie could outlive the absolute lifetime.
            refresh = False
        if sid is not None and session.accessed and refresh:
            expires = datetime.now(timezone.utc) + app.permanent_session_lifetime
            self._set_cookie(app, response, sid, expires)

    def _update_cookie(
        self, app: Flask, session: ServerSideSession, response: Response, outcome: Outcome
    ) -> None:
        if outcome in (Outcome.CREATED, Outcome.WRITTEN):
            self._set_session_cookie(app, session, response)
        elif outcome is Outcome.EMPTIED or (
            outcome is Outcome.NOTHING and (session.destroyed or session.cookie_sid)
        ):
            self._delete_cookie(app, response)
        elif outcome is Outcome.KEPT and (
            session.renewed_from is not None or self.should_set_cookie(app, session)
        ):
            self._set_session_cookie(app, session, response)

    def get_expiration_time(self, app: Flask, session: SessionMixin) -> datetime | None:
        """Flask's expiry of the cookie, never later than the session's end
        under ``SESSION_ABSOLUTE_LIFETIME``."""
        expires = super().get_expiration_time(app, session)
        clocks = self.store.clocks
        if expires is None or clocks is None or clocks.absolute is None:
            return expires
        assert isinstance(session, ServerSideSession)
        # A session not stored yet is created by this response.
        created = session.created or datetime.now(timezone.utc)
        return min(expires, created + timedelta(seconds=clocks.absolute))

    def _cookie_options(self, app: Flask) -> dict[str, t.Any]:
        return {
            "domain": self.get_cookie_domain(app),
            "path": self.get_cookie_path(app),
            "secure": self.get_cookie_secure(app),
            "httponly": self.get_cookie_httponly(app),
            "samesite": self.get_cookie_samesite(app),
            "partitioned": self.get_cookie_partitioned(app),
        }

    def _set_session_cookie(
        self, app: Flask, session: ServerSideSession, response: Response
    ) -> None:
        if self._flask_cookie and session.permanent and _COOKIE_HOOKS.isdisjoint(vars(self)):
            header = self._cookie_headers.permanent(app.config, self.cookie_value(app, session.sid))
            if header is not None:
                response.headers.add("Set-Cookie", header)
                return
        self._set_cookie(app, response, session.sid, self.get_expiration_time(app, session))

    def _set_cookie(
        self, app: Flask, response: Response, sid: str, expires: datetime | None
    ) -> None:
        name, value = self.get_cookie_name(app), self.cookie_value(app, sid)
        options = self._cookie_options(app)
        header = self._cookie_headers.header(name, value, expires, options)
        if header is None:
            response.set_cookie(name, value, expires=expires, **options)
        else:
            response.headers.add("Set-Cookie", header)

    def _delete_cookie(self, app: Flask, response: Response) -> None:
        response.delete_cookie(self.get_cookie_name(app), **self._cookie_options(app))

    def _send_signals(self, app: Flask, session: ServerSideSession, saved: Saved) -> None:
        if session.renewal is not None:
            old_sid, sid = session.renewal
            signals.session_regenerated.send(app, old_sid=old_sid, sid=sid)
        if session.destroyed_sid is not None and saved.destroy_removed:
            signals.session_destroyed.send(app, sid=session.destroyed_sid)
        for handle in saved.evicted:
            signals.session_revoked.send(app, handle=handle, user_id=session.user_id)
        if saved.outcome is not Outcome.CREATED:
            return
        if session.regenerated_from is not None:
            signals.session_regenerated.send(
                app, old_sid=session.regenerated_from, sid=session.sid
            )
        else:
            signals.session_created.send(app, sid=session.sid)

    def _schedule_cleanup(self, response: Response) -> None:
        """Remove expired records after the response has been sent, at most
        once per ``cleanup_interval`` in this process."""
        if self.cleanup_interval is None or time.monotonic() < self._next_cleanup:
            return
        with self._cleanup_lock:
            now = time.monotonic()
            if now < self._next_cleanup:
                return
            self._next_cleanup = now + self.cleanup_interval
        response.call_on_close(self.run_cleanup)

    def run_cleanup(self) -> int:
        """Remove expired records now; log instead of raising on failure."""
        try:
            removed = sum(self.store.cleanup())
        except Exception:
            logger.exception("Removing expired sessions failed; will retry later.")
            return 0
        logger.info("Removed %d expired sessions.", removed)
        return removed


def _request_cookie(request: Request, name: str) -> str | None:
    """The value of the request's cookie ``name``, as ``request.cookies``
    has it, without parsing every cookie of the request when the header
    plainly holds it once."""
    header: str | None = request.environ.get("HTTP_COOKIE")
    if not header or not name.isascii():
        return request.cookies.get(name) if header else None
    count = header.count(name)
    if count == 0:
        return None
    if count == 1:
        for part in header.split(";"):
            key, equals, value = part.strip().partition("=")
            if key == name:
                if equals and PLAIN_VALUE.fullmatch(value) is not None:
                    return value
                break
    return request.cookies.get(name)


def _only_read(session: ServerSideSession) -> bool:
    """Whether the request only read its stored session (a renewal at load
    moved it already): saving it needs none of :meth:`.SessionStore.save`'s
    work (issue 16)."""
    return session.stored is not None and session.unchanged()


def _vary_on_cookie(response: Response) -> None:
    """Add ``Vary: Cookie``; parsing the header only if it is there.

    ``getlist`` looks without raising and catching a ``KeyError``, as
    ``in`` and ``get`` do when the header is absent (five times the cost);
    then ``add`` appends, where setting the header would look for others
    to replace (ten times the cost of ``add``).
    """
    if response.headers.getlist("Vary"):
        response.vary.add("Cookie")
    else:
        response.headers.add("Vary", "Cookie")


def _replace_response(response: Response, error: BackendUnavailable) -> None:
    """Turn the view's response into the 503 of a store that failed on save.

    Flask would answer an exception raised here with a 500; a 503 tells
    clients and load balancers that trying again later may work. The view's
    headers, its cookies included, are dropped with its body.
    """
    failure = error.get_response()
    response.status = failure.status
    response.headers = failure.headers.copy()
    response.set_data(failure.get_data())
