"""The bench app for gunicorn (``benchmarks/throughput.py`` starts it).

Configured by environment variables: ``BENCH_KIND`` (``cookie``, ``ours`` or
``flask-session``), ``BENCH_STORE`` (``filesystem`` or ``redis``),
``BENCH_TMP`` (a directory for files and the app's instance folder) and
``BENCH_URL`` (the server's URL, for Redis).
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
