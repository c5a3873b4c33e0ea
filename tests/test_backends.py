"""The seam: every :class:`~flask_serverside.backends.Backend` keeps the
same promises. Each test runs on every store (the ``backend_name``
fixture); backend files test only what is peculiar to their store."""

from __future__ import annotations

import threading
import time
import typing as t

import pytest
from flask import Flask

from flask_serverside import ids
from flask_serverside.backends import Backend
from tests.test_contract import ONE_STEP_WRITES


class TestSeam:
    """:meth:`.Backend.replace` writes only over the bytes it was given,
    never over an expired record, and never inside another request's lock
    section (stores that cannot check all that at once decline);
    :meth:`.Backend.touch` extends a live record and says so, and never
    creates a record nor brings back an expired one; :meth:`.Backend.lock`
    is re-entrant within a thread."""

    @pytest.fixture
    def backend(self, app: Flask) -> Backend:
        return t.cast(Backend, app.backend.inner)  # type: ignore[attr-defined]

    @pytest.fixture
    def key(self, app: Flask) -> str:
        return t.cast(str, app.session_interface.store.key(ids.generate(32)))  # type: ignore[attr-defined]

    def test_save_load_touch_delete(self, backend: Backend, key: str) -> None:
        now = time.time()
        assert backend.load(key) is None
        backend.save(key, b"\x00payload", now + 100)
        record = backend.load(key)
        assert record is not None
        assert record.data == b"\x00payload"
        assert record.expires == pytest.approx(now + 100, abs=0.05)
        backend.save(key, b"new", now + 100)
        # The expiry read back is the touched one, not the one written.
        assert backend.touch(key, now + 5000) is True
        assert backend.load(key) == (b"new", pytest.approx(now + 5000, abs=0.05))
        assert backend.delete(key) is True
        assert backend.delete(key) is False
        assert backend.touch(key, now + 100) is False
        assert backend.load(key) is None

    def test_lifetime_over_30_days(self, backend: Backend, key: str) -> None:
        """Memcached reads TTLs over 30 days as dates; the backend sends dates."""
        expires = time.time() + 40 * 24 * 3600
        backend.save(key, b"long", expires)
        record = backend.load(key)
        assert record is not None
        assert record.expires == pytest.approx(expires, abs=0.05)

    def test_lock_is_reentrant_in_a_thread(self, backend: Backend, key: str) -> None:
        """Deletes and touches of stores without atomic commands take the
        lock themselves; inside a held lock they must not wait for it."""
        backend.save(key, b"x", time.time() + 100)
        with backend.lock(key):
            with backend.lock(key):
                assert backend.touch(key, time.time() + 200) is True
            assert backend.delete(key) is True
        with backend.lock(key):
            pass

    def test_replace_writes_over_the_expected_record(
        self, backend: Backend, key: str, backend_name: str
    ) -> None:
        backend.save(key, b"old", time.time() + 60)
        replaced = backend.replace(key, b"old", b"new", time.time() + 120)
        record = backend.load(key)
        assert replaced is (backend_name in ONE_STEP_WRITES)
        assert record is not None and record.data == (b"new" if replaced else b"old")
        if replaced:
            assert record.expires > time.time() + 100

    def test_replace_refuses_a_changed_missing_or_expired_record(
        self, backend: Backend, key: str
    ) -> None:
        assert backend.replace(key, b"old", b"new", time.time() + 60) is False
        assert backend.load(key) is None
        backend.save(key, b"other", time.time() + 60)
        assert backend.replace(key, b"old", b"new", time.time() + 60) is False
        assert backend.load(key) == (b"other", pytest.approx(time.time() + 60, abs=5))
        backend.save(key, b"old", time.time() - 1)
        time.sleep(0.01)  # native TTLs are at least a millisecond
        assert backend.replace(key, b"old", b"new", time.time() + 60) is False
        record = backend.load(key)
        assert record is None or record.expires < time.time()

    @pytest.mark.parametrize("loaded_first", [False, True])
    def test_replace_refuses_while_a_section_holds_the_lock(
        self, backend: Backend, key: str, loaded_first: bool
    ) -> None:
        """Also right after a load of the record, as in a request (a store
        that kept what its load read for the replace must still see the
        section entered since)."""
        backend.save(key, b"old", time.time() + 60)
        if loaded_first:
            assert backend.load(key) is not None
        entered, leave = threading.Event(), threading.Event()

        def section() -> None:
            with backend.lock(key):
                assert backend.load(key) is not None
                entered.set()
                leave.wait(10)
                backend.save(key, b"section", time.time() + 60)

        holder = threading.Thread(target=section)
        holder.start()
        assert entered.wait(10)
        results: list[bool] = []
        fast = threading.Thread(
            target=lambda: results.append(backend.replace(key, b"old", b"fast", time.time() + 60))
        )
        fast.start()
        fast.join(0.2)  # SQL waits here for the section's row or write lock
        leave.set()
        holder.join(10)
        fast.join(10)
        assert results == [False]
        record = backend.load(key)
        assert record is not None and record.data == b"section"

    def test_replace_after_a_load_sees_later_writes(
        self, backend: Backend, key: str, backend_name: str
    ) -> None:
        backend.save(key, b"old", time.time() + 60)
        assert backend.load(key) is not None
        backend.save(key, b"other", time.time() + 60)
        assert backend.replace(key, b"old", b"new", time.time() + 60) is False
        assert backend.load(key) == (b"other", pytest.approx(time.time() + 60, abs=5))
        # A touch in between changes nothing a replace compares.
        assert backend.touch(key, time.time() + 90) is True
        replaced = backend.replace(key, b"other", b"new", time.time() + 60)
        assert replaced is (backend_name in ONE_STEP_WRITES)

    def test_touch_extends_a_live_record(self, backend: Backend, key: str) -> None:
        backend.save(key, b"data", time.time() + 60)
        assert backend.touch(key, time.time() + 120) is True
        record = backend.load(key)
        assert record is not None and record.data == b"data"
        assert record.expires > time.time() + 100

    def test_touch_refuses_a_missing_or_expired_record(self, backend: Backend, key: str) -> None:
        assert backend.touch(key, time.time() + 60) is False
        assert backend.load(key) is None
        backend.save(key, b"data", time.time() - 1)
        time.sleep(0.01)  # native TTLs are at least a millisecond
        assert backend.touch(key, time.time() + 60) is False
        record = backend.load(key)
        assert record is None or record.expires < time.time()
