"""The config layer: every ``SESSION_*`` key, its default and its check,
read once by :meth:`~flask_serverside.ServerSide.init_app`; the backend
the keys choose. :mod:`.cache_url` turns a ``SESSION_CACHELIB`` URL into
a cache.

Adding a key takes a line in :func:`defaults` and a check in :func:`read`.
"""

from __future__ import annotations

import os
import re
import typing as t
from dataclasses import dataclass
from datetime import timedelta

from cachelib import BaseCache

from . import ids
from .backends.base import Backend
from .cache_url import cache_from_url
from .clocks import Clocks
from .serializers import get_serializer

if t.TYPE_CHECKING:
    from flask import Flask

    from .serializers import Serializer

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


def defaults(app: Flask) -> dict[str, t.Any]:
    """Every key with its default, some of them in ``app``'s instance folder."""
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
        "SESSION_ABSOLUTE_LIFETIME": None,
        "SESSION_RENEWAL_INTERVAL": None,
        "SESSION_RENEWAL_GRACE": 30,
        "SESSION_TRACK_DEVICE": True,
        "SESSION_MAX_PER_USER": None,
    }


@dataclass(frozen=True)
class Settings:
    """The checked values of the keys, as the extension uses them."""

    backend: Backend
    prefix: str
    serializer: Serializer
    id_bytes: int
    max_bytes: int
    touch_interval: float
    permanent: bool
    sign_id: bool
    #: ``SESSION_CLEANUP_INTERVAL``; ``None`` where the store expires
    #: records itself.
    cleanup_interval: float | None
    protect_login: bool
    #: The absolute lifetime and ID renewal; ``None`` when both are off.
    clocks: Clocks | None
    track_device: bool
    max_per_user: int | None


def read(app: Flask) -> Settings:
    """Set the defaults of the keys not set in ``app.config``, check every
    key, and build the backend they choose.

    :raises ValueError: A key has a value it cannot take.
    """
    config = app.config
    table = defaults(app)
    _choose_backend(config, table)
    for key, value in table.items():
        config.setdefault(key, value)
    backend = make_backend(config)
    cleanup = _cleanup_interval(config)
    return Settings(
        backend=backend,
        prefix=_key_prefix(config),
        serializer=get_serializer(config["SESSION_SERIALIZER"]),
        id_bytes=_integer(config, "SESSION_ID_BYTES", ids.MIN_BYTES, ids.MAX_BYTES),
        max_bytes=_integer(config, "SESSION_MAX_BYTES", 1),
        touch_interval=_seconds(config, "SESSION_TOUCH_INTERVAL"),
        permanent=_boolean(config, "SESSION_PERMANENT"),
        sign_id=_boolean(config, "SESSION_SIGN_ID"),
        cleanup_interval=None if backend.native_expiry else cleanup,
        protect_login=_boolean(config, "SESSION_PROTECT_LOGIN"),
        clocks=_clocks(config),
        track_device=_boolean(config, "SESSION_TRACK_DEVICE"),
        max_per_user=_max_per_user(config),
    )


def _key_prefix(config: t.Mapping[str, t.Any]) -> str:
    return _matching(
        config,
        "SESSION_KEY_PREFIX",
        _PREFIX_RE,
        "is not allowed: use 1 to 100 printable ASCII characters without spaces,"
        " such as 'session:'",
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


def make_backend(config: t.Mapping[str, t.Any]) -> Backend:
    """The backend that ``SESSION_BACKEND`` and its keys describe."""
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

    table = _matching(
        config,
        "SESSION_SQLALCHEMY_TABLE",
        _TABLE_RE,
        "is not a table name: use letters, digits and underscores, starting with a letter",
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
    from .backends.cachelib import backend_for_cache

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


def _matching(
    config: t.Mapping[str, t.Any], key: str, pattern: re.Pattern[str], advice: str
) -> str:
    """The string value of ``key`` if ``pattern`` matches all of it.

    :param advice: What is wrong and what to use, after the key and value.
    """
    value = config[key]
    if isinstance(value, str) and pattern.fullmatch(value):
        return value
    raise ValueError(f"{key}={value!r} {advice}.")


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


def _duration(config: t.Mapping[str, t.Any], key: str, optional: bool) -> float | None:
    """A ``timedelta`` or number of seconds: above 0, or ``None`` if optional;
    0 is allowed where ``None`` is not."""
    value = config[key]
    if value is None and optional:
        return None
    seconds = value.total_seconds() if isinstance(value, timedelta) else value
    number = isinstance(seconds, (int, float)) and not isinstance(seconds, bool)
    if number and (seconds > 0 or (seconds == 0 and not optional)):
        return float(seconds)
    allowed = "above 0, or None to turn it off" if optional else "0 or more"
    raise ValueError(
        f"{key}={value!r} is not allowed: use a datetime.timedelta or a number"
        f" of seconds, {allowed}."
    )


def _clocks(config: t.Mapping[str, t.Any]) -> Clocks | None:
    """The absolute lifetime and renewal, or ``None`` if neither is set, so
    that a request then pays nothing for them."""
    absolute = _duration(config, "SESSION_ABSOLUTE_LIFETIME", optional=True)
    renewal = _duration(config, "SESSION_RENEWAL_INTERVAL", optional=True)
    grace = _duration(config, "SESSION_RENEWAL_GRACE", optional=False)
    if absolute is None and renewal is None:
        return None
    return Clocks(absolute, renewal, t.cast(float, grace))


def _max_per_user(config: t.Mapping[str, t.Any]) -> int | None:
    if config["SESSION_MAX_PER_USER"] is None:
        return None
    return _integer(config, "SESSION_MAX_PER_USER", 1)
