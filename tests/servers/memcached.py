"""Memcached for the test suite: a throwaway ``memcached`` on a loopback port.

Memcached keeps nothing on disk: after a stop and a start it is empty.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

from . import find_binary
from . import free_port
from . import Server
from . import wait_for_port


def start(tmp_dir: pathlib.Path) -> Server:
    """Start ``memcached`` on a free loopback TCP port (UDP off).

    :param tmp_dir: Unused: Memcached keeps its data in memory.
    :raises ServerNotFound: ``memcached`` is not installed.
    """
    binary = find_binary("memcached", "/usr/sbin", "/usr/local/bin")
    port = free_port()
    args = [binary, "-l", "127.0.0.1", "-p", str(port), "-U", "0"]
    if sys.platform != "win32" and os.geteuid() == 0:
        # memcached refuses to run as root unless told which user to be.
        args += ["-u", "root"]
    kwargs: dict[str, object] = {
        "stdout": subprocess.DEVNULL,
        "stderr": subprocess.DEVNULL,
    }
    server = Server(
        url=f"memcached://127.0.0.1:{port}",
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
