"""Real servers for the test suite, started on loopback from system binaries.

Each server module offers a ``start(tmp_dir)`` function that returns a
:class:`Server` or raises :exc:`ServerNotFound` when its binaries are not
installed. ``conftest.py`` turns that into a skip, or into a failure when
servers are required (``--require-servers``, set in CI).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field

_PR_SET_PDEATHSIG = 1
# Loaded here: loading a library in a forked child can deadlock.
_LIBC = ctypes.CDLL(None) if sys.platform == "linux" else None


class ServerNotFound(Exception):
    """The server's binaries are not installed on this machine."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    """Block until ``port`` accepts connections or ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"server did not listen on port {port} within {timeout}s")


def find_binary(name: str, *extra_dirs: str) -> str:
    """Find ``name`` on ``PATH`` or in ``extra_dirs``, or raise ServerNotFound."""
    path = shutil.which(name, path=os.pathsep.join([*extra_dirs, os.environ.get("PATH", "")]))
    if path is None:
        raise ServerNotFound(f"{name} is not installed")
    return path


@dataclass
class Server:
    """A running server process.

    :param url: How clients reach it (scheme depends on the server).
    :param port: Its loopback port.
    :param proc: The process; :meth:`stop` ends it, :meth:`pause` and
        :meth:`resume` freeze it (an unresponsive server, data kept).
    :param restart: Starts the process again on the same port and data.
    :param stop_signal: The signal :meth:`stop` sends first (PostgreSQL
        needs ``SIGINT``: its ``SIGTERM`` waits for clients to disconnect).
    """

    url: str
    port: int
    proc: subprocess.Popen[bytes]
    restart_args: list[str] = field(default_factory=list)
    restart_kwargs: dict[str, object] = field(default_factory=dict)
    stop_signal: int = signal.SIGTERM

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(self.stop_signal)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def start_again(self) -> None:
        """Start the server again after :meth:`stop`, on the same port."""
        self.proc = subprocess.Popen(self.restart_args, **self.restart_kwargs)  # type: ignore[call-overload]
        wait_for_port(self.port, self.proc)

    def pause(self) -> None:
        """Freeze the server; return once every one of its threads stopped."""
        os.kill(self.proc.pid, signal.SIGSTOP)
        deadline = time.monotonic() + 5
        while not _all_threads_stopped(self.proc.pid):
            if time.monotonic() > deadline:
                raise RuntimeError(f"process {self.proc.pid} did not stop")
            time.sleep(0.01)

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)


def stop_with_parent(stop_signal: int) -> Callable[[], None]:
    """A ``preexec_fn`` that asks Linux to send the server ``stop_signal``
    when the process that started it dies, so that a test run killed or
    crashed leaves no server behind.

    It runs in the child after ``Popen`` switched its user (``user=``),
    which would clear the setting if made before.
    """

    def preexec() -> None:
        if _LIBC is not None:
            _LIBC.prctl(_PR_SET_PDEATHSIG, stop_signal)

    return preexec


def launch(url: str, port: int, args: list[str]) -> Server:
    """Start ``args`` as a quiet server listening on ``port``; wait for it.
    It stops with the test process, however that ends."""
    kwargs: dict[str, object] = {
        "stdout": subprocess.DEVNULL,
        "stderr": subprocess.DEVNULL,
        "preexec_fn": stop_with_parent(signal.SIGTERM),
    }
    server = Server(
        url=url,
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


def _all_threads_stopped(pid: int) -> bool:
    tasks = f"/proc/{pid}/task"
    for tid in os.listdir(tasks):
        with open(f"{tasks}/{tid}/stat") as f:
            # The state follows the parenthesised command name.
            if f.read().rsplit(")", 1)[1].split()[0] not in ("T", "t"):
                return False
    return True
