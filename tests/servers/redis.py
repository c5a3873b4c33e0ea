"""Redis for the test suite: a throwaway ``redis-server`` on a loopback port.

Its data lives in an append-only file in the test's directory, written on
every command, so a server stopped and started again still holds everything
it acknowledged before (the outage tests rely on that).
"""

from __future__ import annotations

import pathlib
import subprocess

from . import find_binary
from . import free_port
from . import Server
from . import wait_for_port


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
    kwargs: dict[str, object] = {
        "stdout": subprocess.DEVNULL,
        "stderr": subprocess.DEVNULL,
    }
    server = Server(
        url=f"redis://127.0.0.1:{port}/0",
        port=port,
        proc=subprocess.Popen(args, **kwargs),  # type: ignore[call-overload]
        restart_args=args,
        restart_kwargs=kwargs,
    )
    try:
        wait_for_port(port, server.proc)
    except BaseException:
        server.stop()
        raise
    return server
