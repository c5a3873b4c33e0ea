"""Redis for the test suite: a throwaway ``redis-server`` on a loopback port.

Its data lives in an append-only file in the test's directory, written on
every command, so a server stopped and started again still holds everything
it acknowledged before (the outage tests rely on that).
"""

from __future__ import annotations

import pathlib

from . import find_binary
from . import free_port
from . import launch
from . import Server


def start(tmp_dir: pathlib.Path) -> Server:
    """Start ``redis-server`` on a free loopback port, its data in ``tmp_dir``.

    :raises ServerNotFound: ``redis-server`` is not installed.
    """
    binary = find_binary("redis-server", "/usr/sbin", "/usr/local/bin")
    port = free_port()
    args = [
        binary,
        *("--bind", "127.0.0.1", "--port", str(port)),
        *("--dir", str(tmp_dir), "--logfile", "redis.log"),
        *("--save", "", "--appendonly", "yes", "--appendfsync", "always"),
    ]
    return launch(f"redis://127.0.0.1:{port}/0", port, args)
