"""The bench app for gunicorn (``benchmarks/throughput.py`` starts it).

Configured by environment variables: ``BENCH_KIND`` (``cookie``, ``ours`` or
``flask-session``), ``BENCH_STORE`` (one of :data:`benchmarks.apps.BACKENDS`:
``filesystem``, ``sqlite``, ``postgres``, ``postgres3``, ``redis``,
``memcached``), ``BENCH_TMP`` (a directory for files, the SQLite database
and the app's instance folder) and ``BENCH_URL`` (the store's URL for the
servers: SQLAlchemy's, ``postgresql+psycopg://`` for psycopg 3, or
``redis://`` / ``memcached://``; empty for files and SQLite).
"""

from __future__ import annotations

import os
import pathlib

from benchmarks import apps

apps.quiet()
_tmp = pathlib.Path(os.environ["BENCH_TMP"])
_store = apps.configure_store(
    os.environ.get("BENCH_STORE", "filesystem"), _tmp, os.environ.get("BENCH_URL") or None
)
app = apps.make_app(os.environ["BENCH_KIND"], _store, _tmp / f"instance-{os.environ['BENCH_KIND']}")
