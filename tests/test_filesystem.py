"""What is peculiar to the filesystem backend."""

from __future__ import annotations

import logging
import os
import stat
import sys
import threading
import time
import typing as t

import pytest
from flask import Flask
from flask import session

from flask_serverside import ids
from flask_serverside.backends import filefmt
from flask_serverside.backends.filesystem import FileSystemBackend
from flask_serverside.backends.filesystem import STALE_TMP_SECONDS
from tests.conftest import build_app
from tests.test_contract import session_cookie
from tests.test_contract import start_session


@pytest.fixture
def app(tmp_path: t.Any) -> Flask:
    return build_app(tmp_path, {}, count=False)


def record_files(directory: str) -> list[str]:
    return [
        os.path.join(root, name)
        for root, _, names in os.walk(directory)
        for name in names
        if not name.startswith(".")
    ]


def test_default_directory_and_permissions(app: Flask, tmp_path: t.Any) -> None:
    old = os.umask(0o022)
    try:
        start_session(app.test_client(), a="1")
    finally:
        os.umask(old)
    directory = os.path.join(tmp_path, "sessions")
    assert app.config["SESSION_FILE_DIR"] == directory
    (path,) = record_files(directory)
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_permissions_survive_a_restrictive_umask(tmp_path: t.Any) -> None:
    backend = FileSystemBackend(tmp_path / "s")
    old = os.umask(0o277)
    try:
        backend.save("session:" + "ab" * 32, b"{}", time.time() + 60)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "s").st_mode) == 0o700
    (path,) = record_files(str(tmp_path / "s"))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_records_are_sharded_and_named_by_hash(app: Flask, tmp_path: t.Any) -> None:
    sids = [start_session(app.test_client(), a="1") for _ in range(40)]
    files = record_files(os.path.join(tmp_path, "sessions"))
    assert len(files) == 40
    for path in files:
        name = os.path.basename(path)
        assert name.startswith("session%3A") and len(name) == len("session%3A") + 64
        assert os.path.basename(os.path.dirname(path)) == name[-2:]
        assert not any(sid in path for sid in sids)


def test_lock_files_do_not_pile_up(tmp_path: t.Any) -> None:
    backend = FileSystemBackend(tmp_path)
    for i in range(2000):
        with backend.lock(f"session:{i:064x}"):
            pass
    locks = [p for p in tmp_path.rglob(".lock")]
    assert len(locks) == 256


def test_lock_excludes_threads(tmp_path: t.Any) -> None:
    backend = FileSystemBackend(tmp_path)
    key = "session:" + "cd" * 32
    backend.save(key, b"0", time.time() + 60)

    def work() -> None:
        for _ in range(100):
            with backend.lock(key):
                record = backend.load(key)
                assert record is not None
                backend.save(key, str(int(record.data) + 1).encode(), record.expires)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    record = backend.load(key)
    assert record is not None and record.data == b"400"


def test_nothing_live_is_evicted(app: Flask, tmp_path: t.Any) -> None:
    sids = [start_session(app.test_client(), a="1") for _ in range(600)]
    with app.app_context():
        ext = app.extensions["serverside"]
        assert ext.cleanup() == 0
        assert ext.count() == 600
        assert all(ext.get(sid) == {"a": "1"} for sid in sids[::50])


def test_cleanup_removes_expired_and_stale_temp_files(tmp_path: t.Any) -> None:
    backend = FileSystemBackend(tmp_path)
    now = time.time()
    live, dead = "session:" + "01" * 32, "session:" + "02" * 32
    backend.save(live, b"{}", now + 60)
    backend.save(dead, b"{}", now - 1)
    shard = tmp_path / "01"
    stale, fresh = shard / ".tmp-stale", shard / ".tmp-fresh"
    stale.write_bytes(b"torn")
    fresh.write_bytes(b"being written")
    os.utime(stale, (now - STALE_TMP_SECONDS - 1,) * 2)
    assert sum(backend.cleanup(now)) == 1
    assert backend.load(live) is not None and backend.load(dead) is None
    assert not stale.exists() and fresh.exists()


def test_corrupt_header_is_a_missing_session(
    tmp_path: t.Any, caplog: pytest.LogCaptureFixture
) -> None:
    backend = FileSystemBackend(tmp_path)
    key = "session:" + "04" * 32
    backend.save(key, b"{}", time.time() + 60)
    (path,) = record_files(str(tmp_path))
    with open(path, "wb") as f:
        f.write(b"garbage")
    with caplog.at_level(logging.WARNING, "flask_serverside"):
        assert backend.load(key) is None
    assert "not a valid record" in caplog.text


def test_unwritable_directory_is_unavailable(tmp_path: t.Any) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    app = build_app(tmp_path, {"SESSION_FILE_DIR": str(blocker / "sessions")}, count=False)
    app.testing = False
    client = app.test_client()
    client.set_cookie("session", ids.generate(32))
    assert client.get("/nothing").status_code == 200
    response = client.get("/get/a")
    assert response.status_code == 503
    assert "session store is not available" in response.text
    assert client.get("/set/a/1").status_code == 503


def test_failed_save_keeps_old_record(tmp_path: t.Any, caplog: pytest.LogCaptureFixture) -> None:
    app = build_app(tmp_path, {}, count=False)
    app.testing = False

    @app.get("/break-then-set")
    def break_then_set() -> str:
        session.get("a")
        # The store fails between load and save: its shard is no directory.
        os.rename(shard, moved)
        shard.write_text("not a directory")
        session["a"] = "2"
        return "ok"

    client = app.test_client()
    sid = start_session(client, a="1")
    shard = next((tmp_path / "sessions").iterdir())
    moved = tmp_path / "moved"
    response = client.get("/break-then-set")
    shard.unlink()
    os.rename(moved, shard)
    assert response.status_code == 503
    assert "Set-Cookie" not in response.headers
    assert "Session store unavailable while saving" in caplog.text
    with app.app_context():
        assert app.extensions["serverside"].get(sid) == {"a": "1"}


def test_automatic_cleanup_runs_after_the_response(tmp_path: t.Any) -> None:
    app = build_app(tmp_path, {"SESSION_CLEANUP_INTERVAL": 3600}, count=False)
    seen: list[bool] = []
    backend = app.session_interface.store.backend  # type: ignore[attr-defined]
    dead = "session:" + "05" * 32

    @app.get("/check")
    def check() -> str:
        seen.append(backend.load(dead) is not None)
        return "ok"

    backend.save(dead, b"{}", time.time() - 1)
    response = app.test_client().get("/check")
    assert backend.load(dead) is not None, "not before the response is closed"
    response.close()
    assert seen == [True]
    assert backend.load(dead) is None
    backend.save(dead, b"{}", time.time() - 1)
    app.test_client().get("/check").close()
    assert backend.load(dead) is not None, "runs at most once per interval"


def test_automatic_cleanup_can_be_turned_off(tmp_path: t.Any) -> None:
    app = build_app(tmp_path, {"SESSION_CLEANUP_INTERVAL": 0}, count=False)
    backend = app.session_interface.store.backend  # type: ignore[attr-defined]
    dead = "session:" + "06" * 32
    backend.save(dead, b"{}", time.time() - 1)
    app.test_client().get("/nothing").close()
    assert os.path.exists(tmp_path / "sessions" / "06")
    assert record_files(str(tmp_path / "sessions"))


def test_session_survives_an_app_restart(tmp_path: t.Any) -> None:
    client = build_app(tmp_path, {}, count=False).test_client()
    sid = session_cookie(client.get("/set/a/1"))
    restarted = build_app(tmp_path, {}, count=False).test_client()
    assert sid
    restarted.set_cookie("session", sid)
    assert restarted.get("/get/a").json == "1"


def test_count_and_clear_keep_to_their_prefix(tmp_path: t.Any) -> None:
    ours, theirs = FileSystemBackend(tmp_path), FileSystemBackend(tmp_path)
    ours.configure("app1:")
    theirs.configure("app2:")
    ours.save("app1:" + "07" * 32, b"{}", time.time() + 60)
    theirs.save("app2:" + "08" * 32, b"{}", time.time() + 60)
    theirs.save("app2:" + "09" * 32, b"{}", time.time() - 1)
    assert ours.count(time.time()) == 1
    assert sum(ours.cleanup(time.time())) == 0
    assert ours.clear() == 1
    assert theirs.count(time.time()) == 1
    assert sum(theirs.cleanup(time.time())) == 1


# The two slots of a record file


def slot_key(n: int) -> str:
    return "session:" + f"{n:02x}" * 32


def test_rewrite_is_in_place(tmp_path: t.Any) -> None:
    """A record that fits its slots is rewritten in place: same file, no
    temporary file, no rename; a bigger one moves to a new, larger file."""
    backend = FileSystemBackend(tmp_path)
    key = slot_key(5)
    backend.save(key, b"v1", time.time() + 60)
    (path,) = record_files(str(tmp_path))
    inode = os.stat(path).st_ino
    for version in range(2, 6):
        backend.save(key, b"v%d" % version, time.time() + 60)
        assert os.stat(path).st_ino == inode
        assert backend.load(key).data == b"v%d" % version  # type: ignore[union-attr]
    size = os.stat(path).st_size
    big = b"x" * (size * 2)
    backend.save(key, big, time.time() + 60)
    assert os.stat(path).st_ino != inode and os.stat(path).st_size > size
    assert backend.load(key).data == big  # type: ignore[union-attr]
    assert [n for n in os.listdir(os.path.dirname(path)) if n.startswith(".tmp-")] == []


def test_torn_write_leaves_the_previous_version(
    tmp_path: t.Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A write cut short (a power loss in the middle of it) fails its
    checksum: readers get the previous version, and the next write goes on
    from it. With both slots broken, the session is missing and the next
    write starts a new file."""
    backend = FileSystemBackend(tmp_path)
    key = slot_key(6)
    backend.save(key, b"first", time.time() + 60)
    (path,) = record_files(str(tmp_path))
    with open(path, "rb") as f:
        capacity = filefmt.HEADER.unpack_from(f.read())[1]
    # The next save, cut short: half of its data reached the disk.
    torn = filefmt.slot(2, b"second", time.time() + 60).replace(b"second", b"SEC")
    with open(path, "r+b") as f:
        f.seek(filefmt.slot_offset(1, capacity))
        f.write(torn)
    assert backend.load(key).data == b"first"  # type: ignore[union-attr]
    backend.save(key, b"third", time.time() + 60)
    assert backend.load(key).data == b"third"  # type: ignore[union-attr]
    with open(path, "rb") as f:
        raw = f.read()
    assert b"first" not in raw and b"SEC" not in raw
    with open(path, "r+b") as f:
        f.seek(raw.index(b"third"))
        f.write(b"XXXXX")
    with caplog.at_level(logging.WARNING, "flask_serverside"):
        assert backend.load(key) is None
    assert "not a valid record" in caplog.text
    backend.save(key, b"fourth", time.time() + 60)
    assert backend.load(key).data == b"fourth"  # type: ignore[union-attr]


def test_readers_never_see_a_write_in_progress(tmp_path: t.Any) -> None:
    """Readers take no lock; writers in several threads rewrite the same
    record in place all along. Every read finds a whole version."""
    backend = FileSystemBackend(tmp_path)
    key = slot_key(7)
    versions = [bytes([65 + n]) * (100 + 37 * n) for n in range(20)]
    backend.save(key, versions[0], time.time() + 60)
    done = threading.Event()
    seen: list[bytes | None] = []

    def write(offset: int) -> None:
        for n in range(300):
            backend.save(key, versions[(n + offset) % 20], time.time() + 60)

    def read() -> None:
        while not done.is_set():
            record = backend.load(key)
            seen.append(None if record is None else record.data)

    readers = [threading.Thread(target=read) for _ in range(2)]
    writers = [threading.Thread(target=write, args=(n,)) for n in range(3)]
    for thread in readers + writers:
        thread.start()
    for thread in writers:
        thread.join(60)
    done.set()
    for thread in readers:
        thread.join(10)
    assert seen and all(data in versions for data in seen)


def test_touch_writes_the_other_slot(tmp_path: t.Any) -> None:
    """A touch keeps the data and moves the expiry, in the slot that does
    not hold the newest version: the version it touched stays whole until
    the touch is, then is wiped."""
    backend = FileSystemBackend(tmp_path)
    key = slot_key(8)
    backend.save(key, b"data", time.time() + 60)
    (path,) = record_files(str(tmp_path))
    with open(path, "rb") as f:
        before = f.read()
    backend.touch(key, time.time() + 600)
    with open(path, "rb") as f:
        after = f.read()
    assert len(after) == len(before) and after.count(b"data") == 1
    assert after.index(b"data") != before.index(b"data")
    record = backend.load(key)
    assert record is not None and record.data == b"data"
    assert record.expires == pytest.approx(time.time() + 600, abs=5)


# Removed data does not stay on disk


def raw_record(directory: t.Any) -> bytes:
    (path,) = record_files(str(directory))
    with open(path, "rb") as f:
        return f.read()


def test_a_popped_secret_is_not_left_in_the_file(app: Flask, tmp_path: t.Any) -> None:
    """A value removed from the session (a reset token) is gone from the
    record file once the save that removed it completes."""
    client = app.test_client()
    start_session(client, user="alice", token="reset-6f1c0ffee")
    client.get("/delete/token")
    raw = raw_record(tmp_path / "sessions")
    assert b"alice" in raw
    assert b"reset-6f1c0ffee" not in raw
    client.get("/nothing")  # a read-only request
    assert b"reset-6f1c0ffee" not in raw_record(tmp_path / "sessions")


@pytest.mark.parametrize("pad", [10, 20000])
def test_no_earlier_version_remains_in_either_slot(tmp_path: t.Any, pad: int) -> None:
    """Neither the previous version nor the tail of an older, longer one
    survives a save or a touch, in small slots as in big ones (mostly
    zeros, which a write skips by blocks)."""
    backend = FileSystemBackend(tmp_path)
    key = slot_key(9)
    backend.save(key, b"a" * pad + b"SECRET-ONE", time.time() + 60)
    backend.save(key, b"second", time.time() + 60)
    assert b"SECRET-ONE" not in raw_record(tmp_path)
    backend.save(key, b"SECRET-TWO" + b"b" * (3 * pad), time.time() + 60)
    backend.save(key, b"third", time.time() + 60)
    backend.touch(key, time.time() + 600)
    raw = raw_record(tmp_path)
    assert b"SECRET" not in raw and raw.count(b"third") == 1
    assert b"b" * 10 not in raw and b"a" * 10 not in raw
    record = backend.load(key)
    assert record is not None and record.data == b"third"


def test_a_file_left_with_an_older_tail_is_cleaned_by_the_next_save(tmp_path: t.Any) -> None:
    """A file written before this fix, or by a writer killed between its
    two writes, may hold an older version in the slot a save fills, past
    the new data's end: the save overwrites it too."""
    backend = FileSystemBackend(tmp_path)
    key = slot_key(10)
    backend.save(key, b"current", time.time() + 60)
    (path,) = record_files(str(tmp_path))
    with open(path, "rb") as f:
        capacity = filefmt.HEADER.unpack_from(f.read())[1]
    # Slot 1 (the older one) holds an old version: the next save fills it.
    old = filefmt.slot(0, b"x" * 20 + b"OLD-SECRET", time.time() + 60)
    with open(path, "r+b") as f:
        f.seek(filefmt.slot_offset(1, capacity))
        f.write(old)
    backend.save(key, b"new", time.time() + 60)
    raw = raw_record(tmp_path)
    assert b"OLD-SECRET" not in raw and b"current" not in raw
    assert backend.load(key).data == b"new"  # type: ignore[union-attr]


# The one-step write and the cost of a read


_opened: list[str] | None = None


def _note_open(event: str, args: tuple[t.Any, ...]) -> None:
    if event == "open" and _opened is not None and isinstance(args[0], str):
        _opened.append(args[0])


@pytest.fixture
def opened() -> t.Iterator[list[str]]:
    """The paths this process opens (``os.open`` and ``open`` alike) while
    the test runs, from the interpreter's audit events."""
    global _opened
    if not getattr(sys, "_flask_serverside_open_hook", False):
        sys.addaudithook(_note_open)
        sys._flask_serverside_open_hook = True  # type: ignore[attr-defined]
    _opened = []
    try:
        yield _opened
    finally:
        _opened = None


def test_replace_is_one_open_of_the_record_file(tmp_path: t.Any, opened: list[str]) -> None:
    """A plain rewrite is one open, read and in-place write of the record
    file, under the shard's lock: not a lock section that reads it again."""
    backend = FileSystemBackend(tmp_path)
    key = slot_key(11)
    backend.save(key, b"old", time.time() + 60)
    (path,) = record_files(str(tmp_path))
    lock = os.path.join(os.path.dirname(path), ".lock")
    opened.clear()
    assert backend.replace(key, b"old", b"new", time.time() + 120) is True
    assert opened == [lock, path]
    record = backend.load(key)
    assert record is not None and record.data == b"new"
    assert record.expires == pytest.approx(time.time() + 120, abs=5)
    opened.clear()
    assert backend.touch(key, time.time() + 600) is True
    assert opened == [lock, path]
    # Data that outgrows the slots needs a new file: the locked save's job.
    big = b"x" * (2 * os.stat(path).st_size)
    assert backend.replace(key, b"new", big, time.time() + 60) is False
    assert backend.load(key).data == b"new"  # type: ignore[union-attr]


def test_replace_zeroes_the_version_it_replaced(tmp_path: t.Any) -> None:
    """The one-step write keeps the two-slot guarantees: the version it
    replaced is wiped, and the next write goes on from the new one."""
    backend = FileSystemBackend(tmp_path)
    key = slot_key(12)
    backend.save(key, b"a" * 10 + b"SECRET-ONE", time.time() + 60)
    assert backend.replace(key, b"a" * 10 + b"SECRET-ONE", b"second", time.time() + 60)
    raw = raw_record(tmp_path)
    assert b"SECRET-ONE" not in raw and raw.count(b"second") == 1
    assert backend.replace(key, b"second", b"third", time.time() + 60)
    raw = raw_record(tmp_path)
    assert b"second" not in raw and raw.count(b"third") == 1
    assert backend.load(key).data == b"third"  # type: ignore[union-attr]


def read_bytes() -> int:
    """Bytes this thread has read with ``read``-like system calls so far."""
    with open("/proc/thread-self/io", "rb") as f:
        fields = dict(line.split(b": ") for line in f.read().splitlines())
    return int(fields[b"rchar"])


@pytest.mark.skipif(not os.path.exists("/proc/thread-self/io"), reason="Linux only")
def test_a_read_takes_the_newest_slot_not_the_whole_file(tmp_path: t.Any) -> None:
    """A record's slots have room for twice its data: a load reads the
    header and the newest slot, not the empty room around them."""
    backend = FileSystemBackend(tmp_path)
    key = slot_key(13)
    for version in (b"1", b"2"):  # the newest in either slot
        data = version * 65536
        backend.save(key, data, time.time() + 60)
        (path,) = record_files(str(tmp_path))
        before = read_bytes()
        record = backend.load(key)
        spent = read_bytes() - before
        assert record is not None and record.data == data
        assert spent < len(data) + 20000 < os.stat(path).st_size / 2


def test_a_slot_reaching_past_the_file_is_not_read(
    tmp_path: t.Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A damaged header that claims huge slots makes the record invalid;
    nothing that size is read or allocated."""
    backend = FileSystemBackend(tmp_path)
    key = slot_key(14)
    backend.save(key, b"x" * 40000, time.time() + 60)
    (path,) = record_files(str(tmp_path))
    with open(path, "r+b") as f:
        f.write(filefmt.HEADER.pack(filefmt.MAGIC, 2**32 - 1))
        f.write(filefmt.SLOT.pack(1, time.time() + 60, 2**32 - 2, 0))
    with caplog.at_level(logging.WARNING, "flask_serverside"):
        assert backend.load(key) is None
    assert "not a valid record" in caplog.text
