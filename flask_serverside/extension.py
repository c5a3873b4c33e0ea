"""The ServerSide extension: configuration, wiring and operations."""

from __future__ import annotations

import os
import re
import typing as t

from flask import current_app
from flask import session

from . import ids
from .backends.base import Backend
from .interface import ServerSideSessionInterface
from .serializers import get_serializer
from .store import SessionStore

if t.TYPE_CHECKING:
    from flask import Flask

_BACKEND_NAMES = ("filesystem", "sqlalchemy", "cachelib")
#: The keys that configure one backend; setting one chooses that backend.
_BACKEND_KEYS = {
    "filesystem": ("SESSION_FILE_DIR",),
    "sqlalchemy": (
        "SESSION_SQLALCHEMY_URL",
        "SESSION_SQLALCHEMY_ENGINE",
        "SESSION_SQLALCHEMY_TABLE",
        "SESSION_SQLALCHEMY_CREATE_TABLE",
    ),
    "cachelib": ("SESSION_CACHELIB",),
}
#: What to set instead of a SESSION_BACKEND name people guess.
_REDIS = "SESSION_BACKEND='cachelib' with SESSION_CACHELIB='redis://localhost:6379/0'"
_MEMCACHED = "SESSION_BACKEND='cachelib' with SESSION_CACHELIB='memcached://localhost:11211'"
_POSTGRES = (
    "SESSION_BACKEND='sqlalchemy' with"
    " SESSION_SQLALCHEMY_URL='postgresql+psycopg2://user:password@host/dbname'"
)
_SQL = "SESSION_BACKEND='sqlalchemy' (SQLite in the instance folder, or a SESSION_SQLALCHEMY_URL)"
_ALIASES = {
    "redis": _REDIS,
    "rediss": _REDIS,
    "valkey": _REDIS,
    "memcached": _MEMCACHED,
    "memcache": _MEMCACHED,
    "pymemcache": _MEMCACHED,
    "simple": "SESSION_BACKEND='cachelib' with SESSION_CACHELIB='simple://'",
    "sql": _SQL,
    "sqlite": _SQL,
    "sqlite3": _SQL,
    "database": _SQL,
    "postgres": _POSTGRES,
    "postgresql": _POSTGRES,
    "psycopg2": _POSTGRES,
    "mysql": (
        "SESSION_BACKEND='sqlalchemy' with"
        " SESSION_SQLALCHEMY_URL='mysql+pymysql://user:password@host/dbname'"
    ),
    "file": "SESSION_BACKEND='filesystem'",
    "files": "SESSION_BACKEND='filesystem'",
    "fs": "SESSION_BACKEND='filesystem'",
}
_PREFIX_RE = re.compile(r"[!-~]{1,100}")
_TABLE_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")


def _defaults(app: Flask) -> dict[str, t.Any]:
    return {
        "SESSION_BACKEND": "filesystem",
        "SESSION_FILE_DIR": os.path.join(app.instance_path, "sessions"),
        "SESSION_SQLALCHEMY_URL": "sqlite:///"
        + os.path.join(app.instance_path, "sessions.sqlite3"),
        "SESSION_SQLALCHEMY_ENGINE": None,
        "SESSION_SQLALCHEMY_TABLE": "sessions",
        "SESSION_SQLALCHEMY_CREATE_TABLE": True,
        "SESSION_CACHELIB": None,
        "SESSION_KEY_PREFIX": "session:",
        "SESSION_PERMANENT": True,
        "SESSION_ID_BYTES": 32,
        "SESSION_SIGN_ID": False,
        "SESSION_SERIALIZER": "json",
        "SESSION_MAX_BYTES": 262144,
        "SESSION_TOUCH_INTERVAL": 60,
        "SESSION_PROTECT_LOGIN": True,
        "SESSION_CLEANUP_INTERVAL": 3600,
    }


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
        defaults = _defaults(app)
        _choose_backend(app.config, defaults)
        for key, value in defaults.items():
            app.config.setdefault(key, value)
        app.session_interface = _make_interface(app.config)
        app.extensions["serverside"] = self
        from .cli import sessions_cli

        app.cli.add_command(sessions_cli)
        if _boolean(app.config, "SESSION_PROTECT_LOGIN"):
            _protect_login(app)

    def get(self, sid: str) -> dict[str, t.Any] | None:
        """The data of a live session, or ``None`` if it is missing or expired.

        :param sid: The session ID, bare or as the signed cookie value.
        """
        key = self._sid(sid)
        return None if key is None else _store().get(key)

    def delete(self, sid: str) -> bool:
        """Revoke a session; return whether it existed.

        A session still waiting in the store given to
        :func:`~flask_serverside.migrate.adopt_flask_session_files` is
        removed from there too.

        :param sid: The session ID, bare or as the signed cookie value.

        .. versionchanged:: 0.2
            Also removes the session from the adopted store.
        """
        key = self._sid(sid)
        return key is not None and _store().delete(key)

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

        :raises NotImplementedError: The store cannot list its keys.

        .. versionchanged:: 0.2
            Removes the sessions waiting to be adopted.
        """
        return _store().clear()

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


def _make_interface(config: t.Mapping[str, t.Any]) -> ServerSideSessionInterface:
    backend = _make_backend(config)
    prefix = config["SESSION_KEY_PREFIX"]
    if not isinstance(prefix, str) or not _PREFIX_RE.fullmatch(prefix):
        raise ValueError(
            f"SESSION_KEY_PREFIX={prefix!r} is not allowed: use 1 to 100"
            " printable ASCII characters without spaces, such as 'session:'."
        )
    backend.configure(prefix)
    store = SessionStore(
        backend=backend,
        serializer=get_serializer(config["SESSION_SERIALIZER"]),
        prefix=prefix,
        id_bytes=_integer(config, "SESSION_ID_BYTES", ids.MIN_BYTES, ids.MAX_BYTES),
        max_bytes=_integer(config, "SESSION_MAX_BYTES", 1),
        touch_interval=_seconds(config, "SESSION_TOUCH_INTERVAL"),
    )
    cleanup = _cleanup_interval(config)
    return ServerSideSessionInterface(
        store,
        permanent=_boolean(config, "SESSION_PERMANENT"),
        sign_id=_boolean(config, "SESSION_SIGN_ID"),
        cleanup_interval=None if backend.native_expiry else cleanup,
    )


def _choose_backend(config: dict[str, t.Any], defaults: dict[str, t.Any]) -> None:
    """Set ``SESSION_BACKEND`` to the backend whose keys are set, if it is not
    set; refuse keys of a backend other than the chosen one.

    A key set to ``None`` where that is its default counts as not set.

    :raises ValueError: Keys of two backends, or of a backend other than the
        one ``SESSION_BACKEND`` names.
    """
    chosen = config.get("SESSION_BACKEND")
    if isinstance(chosen, Backend):
        return  # A ready backend; the keys that build one do not apply.
    given = [
        (name, key)
        for name, keys in _BACKEND_KEYS.items()
        for key in keys
        if key in config and not (config[key] is None and defaults[key] is None)
    ]
    if "SESSION_BACKEND" not in config:
        if not given:
            return
        chosen = config["SESSION_BACKEND"] = given[0][0]
        for name, key in given:
            if name != chosen:
                raise ValueError(
                    f"{given[0][1]} (a setting of the {chosen!r} backend) and {key} (of"
                    f" the {name!r} backend) are both set. Keep only the settings of the"
                    " backend you use, and set SESSION_BACKEND to its name."
                )
        return
    for name, key in given:
        if name != chosen and chosen in _BACKEND_KEYS:
            raise ValueError(
                f"SESSION_BACKEND={chosen!r} and {key} are both set, but {key} is a"
                f" setting of the {name!r} backend, so it would be ignored. Remove"
                f" {key}, or set SESSION_BACKEND={name!r}."
            )


def _make_backend(config: t.Mapping[str, t.Any]) -> Backend:
    name = config["SESSION_BACKEND"]
    if isinstance(name, Backend):
        return name
    if name == "filesystem":
        return _filesystem_backend(config)
    if name == "sqlalchemy":
        return _sqlalchemy_backend(config)
    if name == "cachelib":
        return _cachelib_backend(config)
    advice = _ALIASES.get(name.lower()) if isinstance(name, str) else None
    if advice is not None:
        raise ValueError(f"SESSION_BACKEND={name!r} is not a backend name: use {advice}.")
    raise ValueError(
        f"SESSION_BACKEND={name!r} is not a backend: use one of"
        f" {', '.join(map(repr, _BACKEND_NAMES))} or a"
        " flask_serverside.backends.Backend instance."
    )


def _filesystem_backend(config: t.Mapping[str, t.Any]) -> Backend:
    from .backends.filesystem import FileSystemBackend

    directory = config["SESSION_FILE_DIR"]
    if not isinstance(directory, (str, os.PathLike)) or not os.fspath(directory):
        raise ValueError(
            f"SESSION_FILE_DIR={directory!r} is not a directory path: set it to"
            " a path the app can write to."
        )
    return FileSystemBackend(directory)


def _sqlalchemy_backend(config: t.Mapping[str, t.Any]) -> Backend:
    import sqlalchemy

    from .backends.sqlalchemy import SQLAlchemyBackend

    table = config["SESSION_SQLALCHEMY_TABLE"]
    if not isinstance(table, str) or not _TABLE_RE.fullmatch(table):
        raise ValueError(
            f"SESSION_SQLALCHEMY_TABLE={table!r} is not a table name: use"
            " letters, digits and underscores, starting with a letter."
        )
    create = _boolean(config, "SESSION_SQLALCHEMY_CREATE_TABLE")
    engine = config["SESSION_SQLALCHEMY_ENGINE"]
    if engine is not None:
        if not isinstance(engine, sqlalchemy.Engine):
            raise ValueError(
                f"SESSION_SQLALCHEMY_ENGINE={engine!r} is not a sqlalchemy.Engine:"
                " pass an engine (such as Flask-SQLAlchemy's db.engine) or None."
            )
        return SQLAlchemyBackend(engine=engine, table=table, create_table=create)
    url = config["SESSION_SQLALCHEMY_URL"]
    try:
        return SQLAlchemyBackend(url=url, table=table, create_table=create)
    except (ImportError, sqlalchemy.exc.NoSuchModuleError) as exc:
        raise ValueError(
            f"SESSION_SQLALCHEMY_URL={url!r} needs a database driver that is not"
            f" installed ({exc}); for PostgreSQL install 'flask-serverside[postgres]'."
        ) from exc
    except (sqlalchemy.exc.ArgumentError, TypeError) as exc:
        raise ValueError(
            f"SESSION_SQLALCHEMY_URL={url!r} is not a database URL, such as"
            " 'postgresql+psycopg2://user:password@host/dbname'."
        ) from exc


def _cachelib_backend(config: t.Mapping[str, t.Any]) -> Backend:
    from cachelib import BaseCache

    from .backends.cachelib import backend_for_cache
    from .config import cache_from_url

    cache = config["SESSION_CACHELIB"]
    if isinstance(cache, str):
        cache = cache_from_url(cache)
    if not isinstance(cache, BaseCache):
        raise ValueError(
            f"SESSION_CACHELIB={cache!r} is not a cache: SESSION_BACKEND="
            "'cachelib' needs a cachelib.BaseCache instance or a URL such as"
            " 'redis://localhost:6379/0', 'memcached://localhost:11211' or"
            " 'simple://'."
        )
    return backend_for_cache(cache)


def _boolean(config: t.Mapping[str, t.Any], key: str) -> bool:
    value = config[key]
    if not isinstance(value, bool):
        raise ValueError(f"{key}={value!r} is not allowed: use True or False.")
    return value


def _integer(
    config: t.Mapping[str, t.Any], key: str, low: int, high: int | None = None
) -> int:
    value = config[key]
    ok = isinstance(value, int) and not isinstance(value, bool)
    if ok and low <= value and (high is None or value <= high):
        return t.cast(int, value)
    allowed = f"from {low} to {high}" if high is not None else f"{low} or more"
    raise ValueError(f"{key}={value!r} is not allowed: use a whole number {allowed}.")


def _seconds(config: t.Mapping[str, t.Any], key: str) -> float:
    value = config[key]
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
        return float(value)
    raise ValueError(f"{key}={value!r} is not allowed: use a number of seconds, 0 or more.")


def _cleanup_interval(config: t.Mapping[str, t.Any]) -> float | None:
    if config["SESSION_CLEANUP_INTERVAL"] in (None, 0):
        return None
    return _seconds(config, "SESSION_CLEANUP_INTERVAL")


def _protect_login(app: Flask) -> None:
    """Regenerate the ID on login and destroy the session on logout."""
    try:
        from flask_login import user_logged_in
        from flask_login import user_logged_out
    except ImportError:
        return
    user_logged_in.connect(_on_login, sender=app, weak=False)
    user_logged_out.connect(_on_logout, sender=app, weak=False)


def _on_login(sender: Flask, **kwargs: t.Any) -> None:
    session.regenerate()  # type: ignore[attr-defined]


def _on_logout(sender: Flask, **kwargs: t.Any) -> None:
    # logout_user sets "_remember" to "clear" before sending the signal;
    # Flask-Login's after-request hook pops it from the fresh session and
    # deletes the remember cookie, so nothing is stored.
    remember = session.get("_remember")
    session.destroy()  # type: ignore[attr-defined]
    if remember is not None:
        session["_remember"] = remember
