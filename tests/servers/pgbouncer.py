"""PgBouncer for the test suite: Debian's ``pgbouncer`` in transaction pool
mode in front of the test PostgreSQL, on a loopback port.

Clients log in as ``postgres`` with the same password as PostgreSQL itself
(SCRAM, so a wrong password really fails); PgBouncer logs in to PostgreSQL
with it too. PgBouncer refuses to run as root, so under root it runs as the
``postgres`` system user, its files in a temporary directory of that user's.
"""

from __future__ import annotations

import os
import pathlib
import pwd
import signal
import subprocess
from dataclasses import dataclass

from . import find_binary
from . import free_port
from . import Server
from . import stop_with_parent
from . import wait_for_port
from .postgres import _base_dir
from .postgres import _system_user
from .postgres import PASSWORD
from .postgres import PostgresServer


@dataclass
class PgBouncerServer(Server):
    """PgBouncer; :attr:`url` is for psycopg2.

    :param postgres: The PostgreSQL server behind it.
    """

    postgres: PostgresServer | None = None

    @property
    def url_psycopg(self) -> str:
        """:attr:`url` for psycopg 3 instead of psycopg2."""
        return self.url.replace("+psycopg2://", "+psycopg://", 1)


def start(
    tmp_dir: pathlib.Path, postgres: PostgresServer, **settings: object
) -> PgBouncerServer:
    """Start PgBouncer on a free loopback port, pooling ``postgres``'s
    ``postgres`` database per transaction.

    :param postgres: The running PostgreSQL to pool connections to.
    :param settings: More ``[pgbouncer]`` settings (``query_wait_timeout=1``).
    :raises ServerNotFound: ``pgbouncer`` is not installed.
    """
    binary = find_binary("pgbouncer", "/usr/sbin", "/usr/local/bin")
    user = _system_user()
    base = pathlib.Path(_base_dir(tmp_dir, user))
    port = free_port()
    config = _write_config(base, port, postgres.port, user, settings)
    kwargs: dict[str, object] = {
        "user": user,
        "cwd": base,
        "stdout": subprocess.DEVNULL,
        "stderr": subprocess.DEVNULL,
        "preexec_fn": stop_with_parent(signal.SIGTERM),
    }
    args = [binary, str(config)]
    server = PgBouncerServer(
        url=f"postgresql+psycopg2://postgres:{PASSWORD}@127.0.0.1:{port}/postgres",
        postgres=postgres,
        port=port,
        proc=subprocess.Popen(args, **kwargs),  # type: ignore[call-overload]
        restart_args=args,
        restart_kwargs=kwargs,
        # SIGINT waits for clients to leave; SIGTERM ends PgBouncer at once.
        stop_signal=signal.SIGTERM,
    )
    try:
        wait_for_port(port, server.proc)
    except BaseException:
        server.stop()
        raise
    return server


def _write_config(
    base: pathlib.Path,
    port: int,
    postgres_port: int,
    user: str | None,
    settings: dict[str, object],
) -> pathlib.Path:
    """Write ``pgbouncer.ini`` and its user list to ``base``; return the ini."""
    userlist = base / "userlist.txt"
    userlist.write_text(f'"postgres" "{PASSWORD}"\n')
    config = base / "pgbouncer.ini"
    config.write_text(
        "[databases]\n"
        f"postgres = host=127.0.0.1 port={postgres_port} dbname=postgres\n"
        "[pgbouncer]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
        f"auth_type = scram-sha-256\nauth_file = {userlist}\n"
        "pool_mode = transaction\n"
        # Each test builds its own engine and pool: room for all of them.
        "max_client_conn = 1000\ndefault_pool_size = 20\n"
        f"logfile = {base / 'pgbouncer.log'}\npidfile = {base / 'pgbouncer.pid'}\n"
        # A restarted PostgreSQL is tried again soon, not after 15s.
        "server_login_retry = 1\n"
        + "".join(f"{name} = {value}\n" for name, value in settings.items())
    )
    if user is not None:
        for path in (userlist, config):
            os.chmod(path, 0o600)
            os.chown(path, *_ids(user))
    return config


def _ids(user: str) -> tuple[int, int]:
    entry = pwd.getpwnam(user)
    return entry.pw_uid, entry.pw_gid


