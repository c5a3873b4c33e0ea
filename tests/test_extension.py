"""ServerSide itself: configuration, registration, Flask-Login."""

from __future__ import annotations

import typing as t

import pytest
from flask import Flask
from flask import request
from flask import session

from flask_serverside import ServerSide
from flask_serverside import ServerSideSessionInterface
from flask_serverside import signals
from tests.conftest import add_routes
from tests.test_contract import session_cookie
from tests.test_contract import set_cookies


def make(tmp_path: t.Any, **config: t.Any) -> Flask:
    app = Flask(__name__, instance_path=str(tmp_path))
    app.config.update(SECRET_KEY="secret", **config)
    return app


def test_init_app_registers_everything(tmp_path: t.Any) -> None:
    app = make(tmp_path)
    ext = ServerSide()
    ext.init_app(app)
    assert app.extensions["serverside"] is ext
    assert isinstance(app.session_interface, ServerSideSessionInterface)
    assert "sessions" in app.cli.commands
    assert not hasattr(ext, "app")


def test_init_app_twice_is_an_error(tmp_path: t.Any) -> None:
    app = make(tmp_path)
    ext = ServerSide(app)
    with pytest.raises(RuntimeError, match="already registered"):
        ext.init_app(app)


def test_defaults(tmp_path: t.Any) -> None:
    app = make(tmp_path)
    ServerSide(app)
    config = app.config
    assert config["SESSION_BACKEND"] == "filesystem"
    assert config["SESSION_FILE_DIR"] == str(tmp_path / "sessions")
    assert config["SESSION_SQLALCHEMY_URL"] == f"sqlite:///{tmp_path}/sessions.sqlite3"
    assert config["SESSION_SQLALCHEMY_TABLE"] == "sessions"
    assert config["SESSION_KEY_PREFIX"] == "session:"
    assert config["SESSION_ID_BYTES"] == 32
    assert config["SESSION_MAX_BYTES"] == 262144
    assert config["SESSION_TOUCH_INTERVAL"] == 60
    assert config["SESSION_CLEANUP_INTERVAL"] == 3600
    assert config["SESSION_SERIALIZER"] == "json"
    assert config["SESSION_PERMANENT"] is True
    assert config["SESSION_SIGN_ID"] is False
    assert config["SESSION_PROTECT_LOGIN"] is True
    assert config["SESSION_SQLALCHEMY_CREATE_TABLE"] is True
    assert config["SESSION_SQLALCHEMY_ENGINE"] is None
    assert config["SESSION_CACHELIB"] is None


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("SESSION_BACKEND", "mongodb"),
        ("SESSION_BACKEND", None),
        ("SESSION_ID_BYTES", 15),
        ("SESSION_ID_BYTES", 65),
        ("SESSION_ID_BYTES", "32"),
        ("SESSION_ID_BYTES", True),
        ("SESSION_MAX_BYTES", 0),
        ("SESSION_TOUCH_INTERVAL", -1),
        ("SESSION_TOUCH_INTERVAL", "60"),
        ("SESSION_CLEANUP_INTERVAL", -5),
        ("SESSION_SERIALIZER", "pickle"),
        ("SESSION_PERMANENT", "yes"),
        ("SESSION_SIGN_ID", 1),
        ("SESSION_PROTECT_LOGIN", None),
        ("SESSION_KEY_PREFIX", ""),
        ("SESSION_KEY_PREFIX", "has space"),
        ("SESSION_KEY_PREFIX", "x" * 101),
        ("SESSION_FILE_DIR", ""),
    ],
)
def test_bad_values_name_key_and_value(tmp_path: t.Any, key: str, value: t.Any) -> None:
    app = make(tmp_path, **{key: value})
    with pytest.raises(ValueError) as info:
        ServerSide(app)
    assert key in str(info.value) and repr(value)[:20] in str(info.value)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("SESSION_SQLALCHEMY_TABLE", "drop table;"),
        ("SESSION_SQLALCHEMY_URL", "not a url"),
        ("SESSION_SQLALCHEMY_ENGINE", "sqlite://"),
        ("SESSION_SQLALCHEMY_CREATE_TABLE", "no"),
    ],
)
def test_bad_sql_values(tmp_path: t.Any, key: str, value: t.Any) -> None:
    app = make(tmp_path, SESSION_BACKEND="sqlalchemy", **{key: value})
    with pytest.raises(ValueError, match=key):
        ServerSide(app)


@pytest.mark.parametrize("value", [None, 42, "ftp://host", "redis://host:notaport"])
def test_bad_cachelib_values(tmp_path: t.Any, value: t.Any) -> None:
    app = make(tmp_path, SESSION_BACKEND="cachelib", SESSION_CACHELIB=value)
    with pytest.raises(ValueError, match="SESSION_CACHELIB"):
        ServerSide(app)


def test_cleanup_interval_off(tmp_path: t.Any) -> None:
    for value in (0, None):
        app = make(tmp_path, SESSION_CLEANUP_INTERVAL=value)
        ServerSide(app)
        assert app.session_interface.cleanup_interval is None  # type: ignore[attr-defined]


def test_one_instance_serves_several_apps(tmp_path: t.Any) -> None:
    ext = ServerSide()
    first, second = make(tmp_path / "a"), make(tmp_path / "b")
    for app in (first, second):
        ext.init_app(app)
        add_routes(app)
    sid = session_cookie(first.test_client().get("/set/a/1"))
    assert sid
    with first.app_context():
        assert ext.get(sid) == {"a": "1"}
    with second.app_context():
        assert ext.get(sid) is None


def test_init_app_needs_no_running_store(tmp_path: t.Any) -> None:
    app = make(
        tmp_path,
        SESSION_BACKEND="sqlalchemy",
        SESSION_SQLALCHEMY_URL="postgresql+psycopg2://nobody@127.0.0.1:1/none",
    )
    ServerSide(app)
    add_routes(app)
    app.testing = False
    client = app.test_client()
    assert client.get("/nothing").status_code == 200
    assert client.get("/set/a/1").status_code == 503


def test_signing_without_secret_key_says_what_to_do(tmp_path: t.Any) -> None:
    app = Flask(__name__, instance_path=str(tmp_path))
    app.config.update(SESSION_SIGN_ID=True, TESTING=True)
    ServerSide(app)
    add_routes(app)
    with pytest.raises(RuntimeError, match="SECRET_KEY"):
        app.test_client().get("/set/a/1")


class TestFlaskLogin:
    """With the real Flask-Login, on every store."""

    @pytest.fixture(autouse=True)
    def _store(self, backend_config: dict[str, t.Any]) -> None:
        self.backend_config = backend_config

    def make_app(self, tmp_path: t.Any, **config: t.Any) -> Flask:
        flask_login = pytest.importorskip("flask_login")
        config = {**self.backend_config, **config}

        class User(flask_login.UserMixin):  # type: ignore[name-defined, misc]
            id = "7"

        app = make(tmp_path, **config)
        ServerSide(app)
        manager = flask_login.LoginManager(app)
        manager.user_loader(lambda uid: User() if uid == "7" else None)

        @app.get("/login")
        def login() -> str:
            session["cart"] = ["apple"]
            flask_login.login_user(User(), remember="remember" in request.args)
            return "in"

        @app.get("/logout")
        def logout() -> str:
            flask_login.logout_user()
            return "out"

        @app.get("/me")
        def me() -> str:
            user = flask_login.current_user
            return "anonymous" if user.is_anonymous else str(user.id)

        return app

    def test_login_regenerates_and_logout_destroys(self, tmp_path: t.Any) -> None:
        app = self.make_app(tmp_path)
        client = app.test_client()
        client.get("/login")
        before = session_cookie(client.get("/me"))
        events: list[str] = []
        with signals.session_regenerated.connected_to(lambda s, **kw: events.append("regen")):
            after = session_cookie(client.get("/login"))
        assert before and after and after != before and events == ["regen"]
        assert client.get("/me").text == "7"
        with app.app_context():
            assert app.extensions["serverside"].get(before) is None
        response = client.get("/logout")
        assert session_cookie(response) == ""
        with app.app_context():
            assert app.extensions["serverside"].get(after) is None
        assert client.get("/me").text == "anonymous"

    def test_logout_forgets_remember_me(self, tmp_path: t.Any) -> None:
        app = self.make_app(tmp_path)
        client = app.test_client()
        client.get("/login?remember")
        assert client.get_cookie("remember_token") is not None
        response = client.get("/logout")
        assert session_cookie(response) == ""
        assert "Max-Age=0" in set_cookies(response)["remember_token"]
        assert client.get_cookie("remember_token") is None
        assert client.get("/me").text == "anonymous"

    def test_protection_can_be_turned_off(self, tmp_path: t.Any) -> None:
        app = self.make_app(tmp_path, SESSION_PROTECT_LOGIN=False)
        client = app.test_client()
        first = session_cookie(client.get("/login"))
        assert session_cookie(client.get("/login")) in (first, None)
        assert client.get("/me").text == "7"


@pytest.mark.parametrize("url", ["postgresql+pg8000://u@h/db", "mysql+nosuch://u@h/db"])
def test_missing_database_driver_names_the_key(tmp_path: t.Any, url: str) -> None:
    app = make(tmp_path, SESSION_BACKEND="sqlalchemy", SESSION_SQLALCHEMY_URL=url)
    with pytest.raises(ValueError, match="needs a database driver that is not installed"):
        ServerSide(app)


def test_in_memory_sqlite_is_refused(tmp_path: t.Any) -> None:
    app = make(tmp_path, SESSION_BACKEND="sqlalchemy", SESSION_SQLALCHEMY_URL="sqlite://")
    with pytest.raises(ValueError, match="memory"):
        ServerSide(app)


@pytest.mark.parametrize(
    ("config", "backend"),
    [
        ({"SESSION_CACHELIB": "simple://"}, "CacheLibBackend"),
        ({"SESSION_SQLALCHEMY_URL": "sqlite://{tmp}/s.db"}, "SQLAlchemyBackend"),
        ({"SESSION_SQLALCHEMY_TABLE": "my_sessions"}, "SQLAlchemyBackend"),
        ({"SESSION_FILE_DIR": "{tmp}/files"}, "FileSystemBackend"),
        ({}, "FileSystemBackend"),
    ],
)
def test_store_setting_picks_its_backend(
    tmp_path: t.Any, config: dict[str, t.Any], backend: str
) -> None:
    config = {k: v.format(tmp="/" + str(tmp_path).lstrip("/")) for k, v in config.items()}
    app = make(tmp_path, **config)
    ServerSide(app)
    assert type(app.session_interface.store.backend).__name__ == backend  # type: ignore[attr-defined]


def test_engine_setting_picks_sqlalchemy(tmp_path: t.Any) -> None:
    import sqlalchemy

    engine = sqlalchemy.create_engine(f"sqlite:///{tmp_path}/s.db")
    app = make(tmp_path, SESSION_SQLALCHEMY_ENGINE=engine)
    ServerSide(app)
    assert app.session_interface.store.backend.engine is engine  # type: ignore[attr-defined]
    engine.dispose()


@pytest.mark.parametrize(
    ("config", "keys"),
    [
        (
            {"SESSION_CACHELIB": "simple://", "SESSION_SQLALCHEMY_URL": "sqlite://"},
            ("SESSION_CACHELIB", "SESSION_SQLALCHEMY_URL"),
        ),
        (
            {"SESSION_FILE_DIR": "/tmp/x", "SESSION_CACHELIB": "simple://"},
            ("SESSION_FILE_DIR", "SESSION_CACHELIB"),
        ),
        (
            {"SESSION_BACKEND": "cachelib", "SESSION_CACHELIB": "simple://",
             "SESSION_FILE_DIR": "/tmp/x"},
            ("SESSION_BACKEND", "SESSION_FILE_DIR"),
        ),
        (
            {"SESSION_BACKEND": "filesystem", "SESSION_SQLALCHEMY_URL": "sqlite://"},
            ("SESSION_BACKEND", "SESSION_SQLALCHEMY_URL"),
        ),
        (
            {"SESSION_BACKEND": "sqlalchemy", "SESSION_CACHELIB": "simple://"},
            ("SESSION_BACKEND", "SESSION_CACHELIB"),
        ),
    ],
)
def test_conflicting_store_settings_name_both_keys(
    tmp_path: t.Any, config: dict[str, t.Any], keys: tuple[str, str]
) -> None:
    app = make(tmp_path, **config)
    with pytest.raises(ValueError) as info:
        ServerSide(app)
    for key in keys:
        assert key in str(info.value)


@pytest.mark.parametrize(
    ("name", "advice"),
    [
        ("redis", "SESSION_CACHELIB='redis://localhost:6379/0'"),
        ("Redis", "SESSION_CACHELIB='redis://localhost:6379/0'"),
        ("memcached", "SESSION_CACHELIB='memcached://localhost:11211'"),
        ("memcache", "SESSION_CACHELIB='memcached://localhost:11211'"),
        ("simple", "SESSION_CACHELIB='simple://'"),
        ("sql", "SESSION_BACKEND='sqlalchemy'"),
        ("sqlite", "SESSION_BACKEND='sqlalchemy'"),
        ("postgres", "SESSION_SQLALCHEMY_URL='postgresql+psycopg2://"),
        ("postgresql", "SESSION_SQLALCHEMY_URL='postgresql+psycopg2://"),
        ("files", "SESSION_BACKEND='filesystem'"),
    ],
)
def test_backend_alias_says_what_to_use(tmp_path: t.Any, name: str, advice: str) -> None:
    app = make(tmp_path, SESSION_BACKEND=name)
    with pytest.raises(ValueError) as info:
        ServerSide(app)
    assert f"SESSION_BACKEND={name!r}" in str(info.value)
    assert advice in str(info.value)


def test_store_is_the_current_apps_store(tmp_path: t.Any) -> None:
    """``ServerSide.store`` is the public handle on the store of the app in
    context, for one extension object on several apps."""
    extension = ServerSide()
    first, second = make(tmp_path / "first"), make(tmp_path / "second")
    extension.init_app(first)
    extension.init_app(second)
    with first.app_context():
        assert extension.store is first.session_interface.store  # type: ignore[attr-defined]
    with second.app_context():
        assert extension.store is second.session_interface.store  # type: ignore[attr-defined]
        assert extension.store.backend.directory == str(tmp_path / "second" / "sessions")  # type: ignore[attr-defined]
