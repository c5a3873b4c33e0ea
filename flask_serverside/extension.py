"""The ServerSide extension: wiring and operations."""

from __future__ import annotations

import typing as t

from flask import current_app
from flask import has_request_context
from flask import session

from . import config
from . import ids
from . import signals
from . import users
from .interface import ServerSideSessionInterface
from .session import ServerSideSession
from .store import SessionStore

if t.TYPE_CHECKING:
    from flask import Flask


class ServerSide:
    """Moves the Flask session to a server-side store.

    The cookie carries only a random session ID. Configure the store with the
    ``SESSION_*`` keys, which are read once, by :meth:`init_app`.

    .. code-block:: python

        app = Flask(__name__)
        ServerSide(app)

    :param app: Call :meth:`init_app` on this app now.

    .. versionadded:: 0.1
    """

    def __init__(self, app: Flask | None = None) -> None:
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Read and check the config, then install the session interface,
        the ``flask sessions`` commands and the Flask-Login hooks.

        :raises ValueError: A ``SESSION_*`` key has a value it cannot take.
        :raises RuntimeError: The extension is already registered on ``app``.
        """
        if "serverside" in app.extensions:
            raise RuntimeError(
                "ServerSide is already registered on this app. Call init_app"
                " once per app; change app.config before calling it to"
                " configure it."
            )
        settings = config.read(app)
        app.session_interface = _make_interface(settings)
        app.extensions["serverside"] = self
        from .cli import sessions_cli

        app.cli.add_command(sessions_cli)
        if settings.protect_login:
            _protect_login(app)

    def get(self, sid: str) -> dict[str, t.Any] | None:
        """The data of a live session, or ``None`` if it is missing or expired.

        :param sid: The session ID, bare or as the signed cookie value.
        """
        bare = self._sid(sid)
        return None if bare is None else _store().get(bare)

    def delete(self, sid: str) -> bool:
        """Revoke a session; return whether it existed.

        A session still waiting in the store given to
        :func:`~flask_serverside.migrate.adopt_flask_session_files` is
        removed from there too.

        :param sid: The session ID, bare or as the signed cookie value.

        .. versionchanged:: 0.2
            Also removes the session from the adopted store.
        """
        bare = self._sid(sid)
        return bare is not None and _store().delete(bare)

    def cleanup(self) -> int:
        """Remove expired records now; return how many. ``0`` where the store
        expires records itself."""
        return sum(_store().cleanup())

    def count(self) -> int:
        """The number of live sessions, those still waiting to be adopted
        included.

        :raises NotImplementedError: The store cannot list its keys.

        .. versionchanged:: 0.2
            Counts the sessions waiting to be adopted.
        """
        return _store().count()

    def clear(self) -> int:
        """Remove every session, those still waiting to be adopted included;
        return how many there were.

        Users' indexes are left to expire; their entries of removed sessions
        are dropped when next read.

        :raises NotImplementedError: The store cannot list its keys.

        .. versionchanged:: 0.2
            Removes the sessions waiting to be adopted.
        """
        return _store().clear()

    @property
    def store(self) -> SessionStore:
        """The session store of the current app: its backend with the
        settings every backend shares (key prefix, serializer, size limit).
        Inside an app context only.

        .. code-block:: python

            with app.app_context():
                backend = serverside.store.backend

        .. versionadded:: 0.2
        """
        return _store()

    def sessions_of(self, user_id: str | int) -> list[users.SessionInfo]:
        """The live sessions bound to a user, newest activity first.

        Costs one store read per session of the user, plus one.

        .. versionadded:: 0.2
        """
        lifetime = current_app.permanent_session_lifetime.total_seconds()
        return _store().users_call(
            "listing", users.sessions_of, str(user_id), lifetime, _current_handle()
        )

    def revoke(self, handle: str) -> bool:
        """End the session with this handle (see
        :class:`~flask_serverside.SessionInfo`); return whether there was one.

        Its cookie no longer loads any data, and a request on it still in
        flight saves nothing.

        .. versionadded:: 0.2
        """
        user_id = _store().users_call("revoking", users.revoke, handle)
        if user_id is None:
            return False
        app = current_app._get_current_object()  # type: ignore[attr-defined]
        signals.session_revoked.send(app, handle=handle, user_id=user_id)
        return True

    def revoke_user(self, user_id: str | int, *, except_current: bool = False) -> int:
        """End every session bound to a user; return how many were ended.

        :param except_current: Keep the session of the request being served
            (offer it after a password change).

        .. versionadded:: 0.2
        """
        user = str(user_id)
        keep = _current_handle() if except_current else None
        ended = _store().users_call("revoking", users.revoke_user, user, keep)
        app = current_app._get_current_object()  # type: ignore[attr-defined]
        for handle in ended:
            signals.session_revoked.send(app, handle=handle, user_id=user)
        return len(ended)

    @staticmethod
    def _sid(value: str) -> str | None:
        sid = _interface().parse_sid(current_app, value)
        if sid is None and ids.is_valid(value):
            return value
        return sid


def _interface() -> ServerSideSessionInterface:
    interface = current_app.session_interface
    if not isinstance(interface, ServerSideSessionInterface):
        raise RuntimeError(
            "This app's session_interface is not flask_serverside's; was it"
            " replaced after ServerSide.init_app?"
        )
    return interface


def _store() -> SessionStore:
    return _interface().store


def _make_interface(settings: config.Settings) -> ServerSideSessionInterface:
    backend = settings.backend
    backend.configure(settings.prefix)
    store = SessionStore(
        backend=backend,
        serializer=settings.serializer,
        prefix=settings.prefix,
        id_bytes=settings.id_bytes,
        max_bytes=settings.max_bytes,
        touch_interval=settings.touch_interval,
        clocks=settings.clocks,
        track_device=settings.track_device,
        max_per_user=settings.max_per_user,
        check_index=users.may_evict(backend),
    )
    return ServerSideSessionInterface(
        store,
        permanent=settings.permanent,
        sign_id=settings.sign_id,
        cleanup_interval=settings.cleanup_interval,
    )


def _current_handle() -> str | None:
    """The handle of the session of the request being served, if bound."""
    if not has_request_context() or not isinstance(session, ServerSideSession):
        return None
    return session.handle


def _protect_login(app: Flask) -> None:
    """Regenerate the ID on login and destroy the session on logout."""
    try:
        from flask_login import user_logged_in
        from flask_login import user_logged_out
    except ImportError:
        return
    user_logged_in.connect(_on_login, sender=app, weak=False)
    user_logged_out.connect(_on_logout, sender=app, weak=False)


def _on_login(sender: Flask, user: t.Any = None, **kwargs: t.Any) -> None:
    session.regenerate()  # type: ignore[attr-defined]
    if user is not None:
        session.bind_user(user.get_id())  # type: ignore[attr-defined]


def _on_logout(sender: Flask, **kwargs: t.Any) -> None:
    # logout_user sets "_remember" to "clear" before sending the signal;
    # Flask-Login's after-request hook pops it from the fresh session and
    # deletes the remember cookie, so nothing is stored.
    remember = session.get("_remember")
    session.destroy()  # type: ignore[attr-defined]
    if remember is not None:
        session["_remember"] = remember
