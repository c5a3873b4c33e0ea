"""``flask sessions import-flask-session``, on records that the real
Flask-Session 0.8 wrote."""

from __future__ import annotations

import os
import pathlib
import pickle
import sqlite3
import struct
import time
import typing as t
import uuid

import pytest
import redis
import sqlalchemy as sa
from flask import Flask
from flask import request
from flask import session
from flask_session import Session
from flask_sqlalchemy import SQLAlchemy

from flask_serverside import ids
from flask_serverside import record as records
from flask_serverside.migrate import adopt_flask_session_files
from flask_serverside.migrate import FlaskSessionFiles
from tests.conftest import build_app
from tests.servers import free_port
from tests.servers import Server

DATA = {"user": "ada", "cart": [1, 2, 3], "prefs": {"dark": True}, "visits": 7}
#: What the session holds after Flask-Session stored DATA: it adds the flag.
STORED = {**DATA, "_permanent": True}
#: Flask-Session's PERMANENT_SESSION_LIFETIME in these tests, in seconds.
OLD_LIFETIME = 600

# Flask-Session warns about its own deprecated options and calls utcnow().
flask_session_warnings = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning:flask_session"),
    pytest.mark.filterwarnings("ignore:datetime.datetime.utcnow:DeprecationWarning"),
]
pytestmark = flask_session_warnings


class Armed:
    """Unpickling this runs ``os.mkdir(path)``: a marker that code ran."""

    def __init__(self, path: pathlib.Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[t.Any, ...]:
        return (os.mkdir, (self.path,))


def armed_payload(marker: pathlib.Path) -> bytes:
    """A pickle that creates ``marker`` when loaded; checked to be live."""
    proof = marker.with_name(marker.name + "-proof")
    pickle.loads(pickle.dumps(Armed(proof)))
    assert proof.is_dir()
    return pickle.dumps(Armed(marker))


def flask_session_app(instance: pathlib.Path, **config: t.Any) -> Flask:
    """An app on Flask-Session 0.8 with ``config``."""
    app = Flask("flask_session_app", instance_path=os.fspath(instance))
    app.config.update(
        SECRET_KEY="old secret", TESTING=True, PERMANENT_SESSION_LIFETIME=OLD_LIFETIME
    )
    app.config.update(config)
    sqlalchemy = config.get("SESSION_SQLALCHEMY")
    if sqlalchemy is not None:
        sqlalchemy.init_app(app)
    Session(app)

    @app.post("/set")
    def set_() -> str:
        session.update(request.get_json())
        return "ok"

    return app


def start_old_session(app: Flask) -> str:
    """Store DATA in a new Flask-Session session; return the cookie value."""
    client = app.test_client()
    assert client.post("/set", json=DATA).status_code == 200
    cookie = client.get_cookie("session")
    assert cookie is not None
    return cookie.value


def new_app(tmp_path: pathlib.Path, **config: t.Any) -> Flask:
    return build_app(tmp_path / "new", config, count=False)


def run_import(app: Flask, *args: str) -> t.Any:
    return app.test_cli_runner().invoke(args=["sessions", "import-flask-session", *args])


def session_seen(app: Flask, cookie: str) -> t.Any:
    """The session a client with this cookie sees in ``app``."""
    client = app.test_client()
    client.set_cookie("session", cookie)
    return client.get("/dump").get_json()


def stored_expiry(app: Flask, sid: str) -> float | None:
    with app.app_context():
        store = app.session_interface.store  # type: ignore[attr-defined]
        record = store.backend.load(store.key(sid))
    return None if record is None else float(record.expires)


def assert_old_lifetime(app: Flask, sid: str) -> None:
    """The imported record keeps Flask-Session's remaining lifetime, not
    this app's 31 days (until a request touches it), and starts its life
    in this store now, as an adopted one does."""
    expires = stored_expiry(app, sid)
    assert expires is not None
    assert time.time() + OLD_LIFETIME - 30 < expires <= time.time() + OLD_LIFETIME + 1
    with app.app_context():
        store = app.extensions["serverside"].store
        stored = store.backend.load(store.key(sid))
    meta, _ = records.unpack(stored.data)
    assert meta.created is not None and time.time() - 60 < meta.created <= time.time()


@pytest.fixture
def prefix() -> str:
    """A Flask-Session key prefix of this test alone, in the shared Redis."""
    return f"t{uuid.uuid4().hex[:12]}:"


@pytest.fixture
def redis_client(redis_server: Server) -> t.Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


@pytest.mark.parametrize("format", ["msgpack", "json"])
def test_redis(
    tmp_path: pathlib.Path,
    redis_server: Server,
    redis_client: redis.Redis,
    prefix: str,
    format: str,
) -> None:
    old = flask_session_app(
        tmp_path / "old",
        SESSION_TYPE="redis",
        SESSION_REDIS=redis_client,
        SESSION_KEY_PREFIX=prefix,
        SESSION_SERIALIZATION_FORMAT=format,
    )
    sid = start_old_session(old)
    marker = tmp_path / "marker"
    planted = ids.generate(32)
    redis_client.set(prefix + planted, armed_payload(marker), ex=OLD_LIFETIME)
    new = new_app(tmp_path)

    result = run_import(new, "--from", redis_server.url, "--prefix", prefix, "--format", format)

    assert result.exit_code == 0, result.output
    assert "Imported 1 sessions." in result.output
    assert "Skipped 0 expired, 1 unreadable and 0 already in this store." in result.output
    assert not marker.exists()
    assert_old_lifetime(new, sid)
    assert session_seen(new, sid) == STORED
    assert session_seen(new, planted) == {}


def test_redis_shared_with_this_store(
    tmp_path: pathlib.Path, redis_server: Server, redis_client: redis.Redis, prefix: str
) -> None:
    """Both extensions in one Redis under one prefix: a second import skips
    what the first copied, keeps changes made since, and ignores this
    store's own keys."""
    old = flask_session_app(
        tmp_path / "old",
        SESSION_TYPE="redis",
        SESSION_REDIS=redis_client,
        SESSION_KEY_PREFIX=prefix,
    )
    sid = start_old_session(old)
    new = new_app(
        tmp_path,
        SESSION_BACKEND="cachelib",
        SESSION_CACHELIB=redis_server.url,
        SESSION_KEY_PREFIX=prefix,
    )
    args = ("--from", redis_server.url, "--prefix", prefix)
    assert "Imported 1 sessions." in run_import(new, *args).output
    client = new.test_client()
    client.set_cookie("session", sid)
    client.get("/set/user/grace")

    result = run_import(new, *args)

    assert result.exit_code == 0, result.output
    assert "Imported 0 sessions." in result.output
    assert "Skipped 0 expired, 0 unreadable and 1 already in this store." in result.output
    assert session_seen(new, sid) == {**STORED, "user": "grace"}


def test_redis_signed_cookie_is_not_accepted(
    tmp_path: pathlib.Path, redis_server: Server, redis_client: redis.Redis, prefix: str
) -> None:
    """SESSION_USE_SIGNER cookies carry Flask-Session's own signature, which
    neither a bare ID nor SESSION_SIGN_ID accepts: those users start over."""
    old = flask_session_app(
        tmp_path / "old",
        SESSION_TYPE="redis",
        SESSION_REDIS=redis_client,
        SESSION_KEY_PREFIX=prefix,
        SESSION_USE_SIGNER=True,
    )
    signed = start_old_session(old)
    sid = signed.rpartition(".")[0]
    assert ids.is_valid(sid) and signed != sid
    new = new_app(tmp_path)
    assert "Imported 1 sessions." in run_import(
        new, "--from", redis_server.url, "--prefix", prefix
    ).output

    assert session_seen(new, signed) == {}
    assert session_seen(new_app(tmp_path, SESSION_SIGN_ID=True), signed) == {}
    assert session_seen(new, sid) == STORED


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> str:
    """Where Flask-Session's table lives."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'flask_session.sqlite3'}"
    return t.cast(str, request.getfixturevalue("postgres_server").url)


def test_sqlalchemy(tmp_path: pathlib.Path, database_url: str) -> None:
    table = f"old_{uuid.uuid4().hex[:12]}"
    old = flask_session_app(
        tmp_path / "old",
        SQLALCHEMY_DATABASE_URI=database_url,
        SESSION_TYPE="sqlalchemy",
        SESSION_SQLALCHEMY=SQLAlchemy(),
        SESSION_SQLALCHEMY_TABLE=table,
    )
    sid = start_old_session(old)
    expired = start_old_session(old)
    marker = tmp_path / "marker"
    planted = ids.generate(32)
    engine = sa.create_engine(database_url)
    with engine.begin() as conn:
        conn.execute(
            sa.text(f"UPDATE {table} SET expiry = '2000-01-01 00:00:00' WHERE session_id = :id"),
            {"id": "session:" + expired},
        )
        conn.execute(
            sa.text(
                f"INSERT INTO {table} (session_id, data, expiry)"
                f" SELECT :planted, :data, expiry FROM {table} WHERE session_id = :id"
            ),
            {
                "planted": "session:" + planted,
                "data": armed_payload(marker),
                "id": "session:" + sid,
            },
        )
    engine.dispose()
    new = new_app(tmp_path)

    result = run_import(new, "--from", database_url, "--table", table)

    assert result.exit_code == 0, result.output
    assert "Imported 1 sessions." in result.output
    assert "Skipped 1 expired, 1 unreadable and 0 already in this store." in result.output
    assert not marker.exists()
    assert_old_lifetime(new, sid)
    assert session_seen(new, sid) == STORED
    assert session_seen(new, expired) == {}
    assert session_seen(new, planted) == {}


def test_sqlalchemy_missing_table(tmp_path: pathlib.Path) -> None:
    database = tmp_path / "empty.sqlite3"
    sqlite3.connect(database).close()
    result = run_import(new_app(tmp_path), "--from", f"sqlite:///{database}")
    assert result.exit_code == 1
    assert "no table 'sessions'" in result.output and "--table" in result.output


def test_filesystem(tmp_path: pathlib.Path) -> None:
    """Flask-Session's files are cachelib pickles named by a hash of the ID:
    read without running code, counted, but not importable."""
    directory = tmp_path / "flask_session"
    old = flask_session_app(
        tmp_path / "old", SESSION_TYPE="filesystem", SESSION_FILE_DIR=os.fspath(directory)
    )
    sid = start_old_session(old)
    start_old_session(old)
    expired = next(p for p in directory.iterdir() if _file_holds(p, STORED))
    expired.write_bytes(struct.pack("I", int(time.time()) - 10) + expired.read_bytes()[4:])
    marker = tmp_path / "marker"
    armed = struct.pack("I", int(time.time()) + OLD_LIFETIME) + armed_payload(marker)
    (directory / ("0" * 64)).write_bytes(armed)
    new = new_app(tmp_path)

    result = run_import(new, "--from", os.fspath(directory))

    assert result.exit_code == 1
    assert "Imported 0 sessions." in result.output
    assert "Skipped 1 expired, 1 unreadable and 0 already in this store." in result.output
    assert "1 live sessions were not imported" in result.output
    assert "hash" in result.output
    assert not marker.exists()
    assert session_seen(new, sid) == {}


def test_filesystem_sessions_are_adopted_as_users_come_back(tmp_path: pathlib.Path) -> None:
    directory = tmp_path / "flask_session"
    old = flask_session_app(
        tmp_path / "old", SESSION_TYPE="filesystem", SESSION_FILE_DIR=os.fspath(directory)
    )
    sid = start_old_session(old)
    other = start_old_session(old)
    planted = ids.generate(32)
    marker = tmp_path / "marker"
    armed = struct.pack("I", int(time.time()) + OLD_LIFETIME) + armed_payload(marker)
    adopter = FlaskSessionFiles(directory)
    pathlib.Path(adopter._paths(planted)[0]).write_bytes(armed)
    new = new_app(tmp_path)
    adopt_flask_session_files(new, directory)

    assert session_seen(new, sid) == STORED
    assert not os.path.exists(adopter._paths(sid)[0]), "adopted once, then forgotten"
    assert session_seen(new, sid) == STORED
    assert os.path.exists(adopter._paths(other)[0]), "the others wait for their users"
    assert session_seen(new, planted) == {} and not marker.exists()
    assert session_seen(new, ids.generate(32)) == {}


def _file_holds(path: pathlib.Path, data: dict[str, t.Any]) -> bool:
    """Whether a FileSystemCache file holds ``data`` (read by the test only)."""
    raw = path.read_bytes()
    return len(raw) > 4 and raw[4:5] == b"\x80" and pickle.loads(raw[4:]) == data


def test_bad_source(tmp_path: pathlib.Path) -> None:
    result = run_import(new_app(tmp_path), "--from", os.fspath(tmp_path / "nowhere"))
    assert result.exit_code == 1
    assert "nowhere" in result.output and "directory" in result.output


def test_unreachable_redis(tmp_path: pathlib.Path) -> None:
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    result = run_import(new_app(tmp_path), "--from", url)
    assert result.exit_code == 1
    assert "Cannot read Flask-Session's Redis" in result.output
    assert "hunter2" not in result.output


def assert_one_line_error(result: t.Any, *words: str) -> None:
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit), result.exception
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:"), result.output
    for word in words:
        assert word in lines[0], result.output


@pytest.mark.parametrize(
    "source",
    ["redis://h:notaport/0", "redis://h:99999/0", "postgresql://u@h:notaport/x"],
)
def test_malformed_source_url(tmp_path: pathlib.Path, source: str) -> None:
    result = run_import(new_app(tmp_path), "--from", source)
    assert_one_line_error(result, "--from", source.rpartition("@")[2])


def test_import_into_missing_table(tmp_path: pathlib.Path) -> None:
    database_url = f"sqlite:///{tmp_path / 'flask_session.sqlite3'}"
    old = flask_session_app(
        tmp_path / "old",
        SQLALCHEMY_DATABASE_URI=database_url,
        SESSION_TYPE="sqlalchemy",
        SESSION_SQLALCHEMY=SQLAlchemy(),
    )
    start_old_session(old)
    new = new_app(
        tmp_path, SESSION_BACKEND="sqlalchemy", SESSION_SQLALCHEMY_CREATE_TABLE=False
    )
    result = run_import(new, "--from", database_url)
    assert_one_line_error(result, "does not exist", "SESSION_SQLALCHEMY_CREATE_TABLE")


def test_import_skips_sessions_over_max_bytes(
    tmp_path: pathlib.Path, redis_server: Server, redis_client: redis.Redis, prefix: str
) -> None:
    old = flask_session_app(
        tmp_path / "old",
        SESSION_TYPE="redis",
        SESSION_REDIS=redis_client,
        SESSION_KEY_PREFIX=prefix,
    )
    small = start_old_session(old)
    client = old.test_client()
    assert client.post("/set", json={"blob": "x" * 2000}).status_code == 200
    large = client.get_cookie("session").value  # type: ignore[union-attr]
    new = new_app(tmp_path, SESSION_MAX_BYTES=1000)

    result = run_import(new, "--from", redis_server.url, "--prefix", prefix)

    assert result.exit_code == 0, result.output
    assert "Imported 1 sessions." in result.output
    assert "Skipped 1 sessions larger than SESSION_MAX_BYTES=1000." in result.output
    assert session_seen(new, small) == STORED
    assert session_seen(new, large) == {}
    client = new.test_client()
    client.set_cookie("session", small)
    assert client.get("/set/more/1").status_code == 200


def test_adoption_skips_sessions_over_max_bytes(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    directory = tmp_path / "flask_session"
    old = flask_session_app(
        tmp_path / "old", SESSION_TYPE="filesystem", SESSION_FILE_DIR=os.fspath(directory)
    )
    small = start_old_session(old)
    client = old.test_client()
    assert client.post("/set", json={"blob": "x" * 2000}).status_code == 200
    large = client.get_cookie("session").value  # type: ignore[union-attr]
    new = new_app(tmp_path, SESSION_MAX_BYTES=1000)
    adopt_flask_session_files(new, directory)

    assert session_seen(new, large) == {}
    assert "SESSION_MAX_BYTES=1000" in caplog.text
    assert stored_expiry(new, large) is None
    assert session_seen(new, small) == STORED


def adopting_app(tmp_path: pathlib.Path) -> tuple[Flask, pathlib.Path, list[str]]:
    """An app adopting Flask-Session's files, and three sessions waiting there."""
    directory = tmp_path / "flask_session"
    old = flask_session_app(
        tmp_path / "old", SESSION_TYPE="filesystem", SESSION_FILE_DIR=os.fspath(directory)
    )
    sids = [start_old_session(old) for _ in range(3)]
    new = new_app(tmp_path)
    adopt_flask_session_files(new, directory)
    return new, directory, sids


def test_delete_revokes_sessions_waiting_for_adoption(tmp_path: pathlib.Path) -> None:
    new, directory, (waiting, adopted, never) = adopting_app(tmp_path)
    assert session_seen(new, adopted) == STORED
    runner = new.test_cli_runner()

    for sid in (waiting, adopted):
        result = runner.invoke(args=["sessions", "delete", "--", sid])
        assert result.exit_code == 0 and "Session deleted." in result.output, result.output
        assert session_seen(new, sid) == {}
    result = runner.invoke(args=["sessions", "delete", "--", waiting])
    assert result.exit_code == 1 and "No such session" in result.output
    with new.app_context():
        assert new.extensions["serverside"].delete(never) is True
        assert new.extensions["serverside"].delete(never) is False
    assert session_seen(new, never) == {}


def test_count_and_clear_include_sessions_waiting_for_adoption(tmp_path: pathlib.Path) -> None:
    new, directory, (waiting, adopted, expired) = adopting_app(tmp_path)
    assert session_seen(new, adopted) == STORED
    path = pathlib.Path(FlaskSessionFiles(directory)._paths(expired)[0])
    path.write_bytes(struct.pack("I", int(time.time()) - 10) + path.read_bytes()[4:])
    start_session_in(new)
    runner = new.test_cli_runner()

    assert runner.invoke(args=["sessions", "count"]).output == "3\n"
    with new.app_context():
        assert new.extensions["serverside"].count() == 3
    result = runner.invoke(args=["sessions", "clear", "--yes"])

    assert result.exit_code == 0 and "Removed 3 sessions." in result.output, result.output
    assert session_seen(new, waiting) == {} and session_seen(new, adopted) == {}
    assert not any(_file_holds(p, STORED) for p in directory.iterdir())
    with new.app_context():
        assert new.extensions["serverside"].count() == 0
        assert new.extensions["serverside"].clear() == 0


def start_session_in(app: Flask) -> None:
    assert app.test_client().get("/set/a/1").status_code == 200
