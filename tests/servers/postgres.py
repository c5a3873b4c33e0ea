"""PostgreSQL for the test suite: a throwaway cluster on a loopback port.

The binaries come from ``PATH`` or Debian's ``/usr/lib/postgresql/*/bin``.
PostgreSQL refuses to run as root, so under root the cluster belongs to the
``postgres`` system user and lives in its own temporary directory (that user
cannot enter pytest's private ones).
"""

from __future__ import annotations

import atexit
import glob
import os
import pathlib
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from dataclasses import field

from . import find_binary
from . import free_port
from . import Server
from . import ServerNotFound
from . import stop_with_parent
from . import wait_for_port

#: The system user that runs PostgreSQL when the tests run as root.
SYSTEM_USER = "postgres"
#: The password of the ``postgres`` database user (connections over TCP,
#: the only ones, must give it).
PASSWORD = "test-password"



@dataclass
class PostgresServer(Server):
    """A PostgreSQL server; :meth:`start_again` waits until it accepts
    queries, not only connections (it refuses them while starting up).

    :param ready_check: A ``pg_isready`` command line for this server.
    """

    ready_check: list[str] = field(default_factory=list)

    @property
    def url_psycopg(self) -> str:
        """:attr:`url` for psycopg 3 instead of psycopg2."""
        return self.url.replace("+psycopg2://", "+psycopg://", 1)

    @property
    def url_psycopg_prepared(self) -> str:
        """:attr:`url_psycopg`, letting psycopg 3 prepare every statement
        (at the protocol level) from its first run."""
        return self.url_psycopg + "?prepare_threshold=0"

    def start_again(self) -> None:
        super().start_again()
        wait_until_ready(self)


def start(tmp_dir: pathlib.Path) -> PostgresServer:
    """Create a cluster and start PostgreSQL on a free loopback port.

    Clients log in as the ``postgres`` superuser with :data:`PASSWORD`
    (so a wrong password really fails), and durability is traded for speed
    (``fsync=off``). The server stops (fast shutdown) when the test process
    exits, even if it never calls :meth:`~tests.servers.Server.stop`.
    :meth:`~tests.servers.Server.pause` freezes the postmaster only: new
    connections hang, those already open keep working.

    :raises ServerNotFound: ``initdb`` or ``postgres`` is not installed.
    """
    bin_dir = os.path.dirname(find_binary("initdb", *_debian_bin_dirs()))
    postgres = find_binary("postgres", bin_dir)
    user = _system_user()
    base = _base_dir(tmp_dir, user)
    data = os.path.join(base, "data")
    _initdb(bin_dir, base, user)
    port = free_port()
    args = [
        postgres,
        *("-D", data, "-p", str(port), "-k", ""),
        *("-c", "listen_addresses=127.0.0.1"),
        *("-c", "fsync=off", "-c", "synchronous_commit=off"),
        *("-c", "full_page_writes=off"),
        *("-c", "logging_collector=on", "-c", "log_directory=log"),
    ]
    kwargs: dict[str, object] = {
        "user": user,
        "cwd": data,
        "stdout": subprocess.DEVNULL,
        "stderr": subprocess.DEVNULL,
        # Fast shutdown: SIGTERM waits for clients to disconnect.
        "preexec_fn": stop_with_parent(signal.SIGINT),
    }
    server = PostgresServer(
        url=f"postgresql+psycopg2://postgres:{PASSWORD}@127.0.0.1:{port}/postgres",
        port=port,
        proc=subprocess.Popen(args, **kwargs),  # type: ignore[call-overload]
        restart_args=args,
        restart_kwargs=kwargs,
        stop_signal=signal.SIGINT,
        ready_check=[
            os.path.join(bin_dir, "pg_isready"),
            *("-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-t", "1"),
        ],
    )

    try:
        wait_for_port(port, server.proc)
        wait_until_ready(server)
    except BaseException:
        server.stop()
        raise

    return server


def wait_until_ready(server: PostgresServer, timeout: float = 30) -> None:
    """Block until ``server`` accepts queries."""
    deadline = time.monotonic() + timeout

    while subprocess.run(server.ready_check, capture_output=True).returncode != 0:
        if time.monotonic() > deadline or server.proc.poll() is not None:
            raise RuntimeError(f"PostgreSQL on port {server.port} is not ready")

        time.sleep(0.05)


def _debian_bin_dirs() -> list[str]:
    """Debian's versioned binary directories, newest first."""
    dirs = glob.glob("/usr/lib/postgresql/*/bin")
    return sorted(dirs, key=lambda d: float(d.split("/")[-2]), reverse=True)


def _system_user() -> str | None:
    """The user to run PostgreSQL as, or ``None`` for the current one."""
    if os.geteuid() != 0:
        return None

    try:
        pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        raise ServerNotFound(
            f"PostgreSQL cannot run as root and there is no {SYSTEM_USER!r} user"
        ) from None

    return SYSTEM_USER


def _base_dir(tmp_dir: pathlib.Path, user: str | None) -> str:
    """A directory for the cluster that ``user`` owns."""
    if user is None:
        return str(tmp_dir)

    base = tempfile.mkdtemp(prefix="flask-serverside-pg-")
    shutil.chown(base, user, pwd.getpwnam(user).pw_gid)
    atexit.register(shutil.rmtree, base, ignore_errors=True)
    return base


def _initdb(bin_dir: str, base: str, user: str | None) -> None:
    """Create the cluster in ``base/data``."""
    password_file = os.path.join(base, "password")

    with open(password_file, "w") as f:
        f.write(PASSWORD)

    if user is not None:
        shutil.chown(password_file, user)

    args = [
        os.path.join(bin_dir, "initdb"),
        *("-D", os.path.join(base, "data"), "-U", "postgres"),
        *("--auth-host=scram-sha-256", "--auth-local=trust"),
        *("--pwfile", password_file, "-E", "UTF8", "--locale=C", "--no-sync"),
    ]
    result = subprocess.run(args, user=user, cwd=base, capture_output=True, text=True)
    os.remove(password_file)

    if result.returncode != 0:
        raise RuntimeError(f"initdb failed:\n{result.stdout}{result.stderr}")


