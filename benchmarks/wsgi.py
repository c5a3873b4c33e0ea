"""The bench app for gunicorn (``benchmarks/throughput.py`` starts it).

Configured by environment variables: ``BENCH_KIND`` (``cookie``, ``ours``,
``least``, ``flask-session`` or ``floor``: :class:`SessionFloor`), ``BENCH_STORE``
(one of :data:`benchmarks.apps.BACKENDS`:
``filesystem``, ``sqlite``, ``postgres``, ``postgres3``, ``postgres3p``,
``redis``, ``memcached``), ``BENCH_TMP`` (a directory for files, the SQLite database
and the app's instance folder) and ``BENCH_URL`` (the store's URL for the
servers: SQLAlchemy's, ``postgresql+psycopg://`` for psycopg 3, or
``redis://`` / ``memcached://``; empty for files and SQLite).
"""

from __future__ import annotations

import os
import pathlib

from flask import Request

from benchmarks import apps


class SessionFloor(apps.FloorInterface):
    """The floor under gunicorn: bare plus the store's minimum work on the
    record of the request's own cookie (``session=<name>``; the record is
    ``floor-<name>``, written by ``throughput.py`` before the workers
    start), so that concurrent writes go to different records, as ours'."""

    def __init__(self, floor: apps.Floor) -> None:
        self.floor = floor

    def record_key(self, request: Request) -> str:
        return "floor-" + request.cookies.get(apps.COOKIE_NAME, "")


apps.quiet()
_tmp = pathlib.Path(os.environ["BENCH_TMP"])
_store = apps.configure_store(
    os.environ.get("BENCH_STORE", "filesystem"), _tmp, os.environ.get("BENCH_URL") or None
)
_kind = os.environ["BENCH_KIND"]
if _kind == "floor":
    assert _store.floor is not None
    app = apps.bare_app(_tmp / "instance-floor", SessionFloor(_store.floor()))
else:
    app = apps.make_app(_kind, _store, _tmp / f"instance-{_kind}")
