"""Memcached for the test suite: a throwaway ``memcached`` on a loopback port.

Memcached keeps nothing on disk: after a stop and a start it is empty.
"""

from __future__ import annotations

import os
import pathlib
import sys

from . import find_binary
from . import free_port
from . import launch
from . import Server


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
    return launch(f"memcached://127.0.0.1:{port}", port, args)
