"""Redis Sentinel for the test suite: a primary, one replica and three
``redis-sentinel`` processes on loopback, monitoring them as ``mymaster``.

Data is kept in memory only. The sentinels count a silent primary as down
after :data:`DOWN_AFTER_MS` and give a failover :data:`FAILOVER_TIMEOUT_MS`,
so a failover in a test is over within seconds.
"""

from __future__ import annotations

import pathlib
import signal
import time
from dataclasses import dataclass

import redis

from . import find_binary
from . import free_port
from . import launch
from . import Server

#: The name the sentinels monitor the primary under.
SERVICE = "mymaster"
#: How long the primary may be silent before a sentinel counts it as down.
DOWN_AFTER_MS = 1000
#: How long one failover attempt may take before another is tried.
FAILOVER_TIMEOUT_MS = 5000
#: How long every wait for the set-up may take, in seconds.
TIMEOUT = 30


@dataclass
class RedisSentinel:
    """The running set-up.

    :param redis_servers: The primary and the replica, in start order
        (the roles swap on failover: ask :meth:`primary`).
    :param sentinels: The three sentinels.
    :param url: ``redis+sentinel://`` with every sentinel, then
        ``/mymaster/0``.
    """

    redis_servers: list[Server]
    sentinels: list[Server]
    url: str
    service: str = SERVICE

    @property
    def sentinel_ports(self) -> list[int]:
        return [sentinel.port for sentinel in self.sentinels]

    def primary(self) -> Server:
        """The server the first live sentinel names as primary."""
        port = self._primary_ports()[0]
        return next(server for server in self.redis_servers if server.port == port)

    def replica(self) -> Server:
        """The server that is not :meth:`primary`."""
        primary = self.primary()
        return next(server for server in self.redis_servers if server is not primary)

    def failover(self, timeout: float = TIMEOUT) -> Server:
        """``SENTINEL FAILOVER mymaster``, then wait as :meth:`wait_for_new_primary`."""
        old = self.primary()
        with _client(self.sentinels[0]) as client:
            client.execute_command("SENTINEL FAILOVER", self.service)
        return self.wait_for_new_primary(old, timeout)

    def kill(self, server: Server) -> None:
        """``SIGKILL`` ``server`` (say, the old primary): a crash."""
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(timeout=10)

    def wait_for_new_primary(self, old: Server, timeout: float = TIMEOUT) -> Server:
        """Block until every live sentinel names another primary than
        ``old`` and that server says it is one; return it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ports = set(self._primary_ports())
            if len(ports) == 1 and old.port not in ports:
                new = self.primary()
                if _role(new) == "master":
                    return new
            time.sleep(0.05)
        raise RuntimeError(f"the sentinels named no new primary within {timeout}s")

    def wait_until_ready(self, timeout: float = TIMEOUT) -> None:
        """Block until every sentinel knows the primary, its replica (linked)
        and the two other sentinels: only then can they fail over."""
        deadline = time.monotonic() + timeout
        while not self._ready():
            if time.monotonic() > deadline:
                raise RuntimeError(f"the sentinels are not ready after {timeout}s")
            time.sleep(0.05)

    def stop(self) -> None:
        for server in [*self.sentinels, *self.redis_servers]:
            server.stop()

    def _primary_ports(self) -> list[int]:
        """The primary's port as each live sentinel names it."""
        ports = []
        for sentinel in self.sentinels:
            if sentinel.proc.poll() is not None:
                continue
            try:
                with _client(sentinel) as client:
                    _, port = client.execute_command(
                        "SENTINEL GET-MASTER-ADDR-BY-NAME", self.service
                    )
            except (redis.RedisError, TypeError):
                continue
            ports.append(int(port))
        if not ports:
            raise RuntimeError("no sentinel answers")
        return ports

    def _ready(self) -> bool:
        for sentinel in self.sentinels:
            try:
                with _client(sentinel) as client:
                    state = client.sentinel_master(self.service)
            except redis.RedisError:
                return False
            if state["num-other-sentinels"] != 2 or state["num-slaves"] != 1:
                return False
            if "s_down" in state["flags"] or "o_down" in state["flags"]:
                return False
        replica = self.replica()
        with redis.Redis(port=replica.port, socket_timeout=5) as client:
            return bool(client.info("replication").get("master_link_status") == "up")


def start(tmp_dir: pathlib.Path) -> RedisSentinel:
    """Start a primary, its replica and three sentinels on free loopback
    ports, and wait until the sentinels can fail over.

    :raises ServerNotFound: ``redis-server`` or ``redis-sentinel`` is not
        installed.
    """
    binary = find_binary("redis-server", "/usr/sbin", "/usr/local/bin")
    sentinel_binary = find_binary("redis-sentinel", "/usr/sbin", "/usr/local/bin")
    servers: list[Server] = []
    try:
        primary = _launch_redis(binary, tmp_dir / "primary", free_port())
        servers.append(primary)
        servers.append(_launch_redis(binary, tmp_dir / "replica", free_port(), primary.port))
        sentinels = [
            _launch_sentinel(sentinel_binary, tmp_dir / f"sentinel-{i}", primary.port)
            for i in range(3)
        ]
        servers += sentinels
        hosts = ",".join(f"127.0.0.1:{sentinel.port}" for sentinel in sentinels)
        setup = RedisSentinel(
            redis_servers=servers[:2],
            sentinels=sentinels,
            url=f"redis+sentinel://{hosts}/{SERVICE}/0",
        )
        setup.wait_until_ready()
    except BaseException:
        for server in reversed(servers):
            server.stop()
        raise
    return setup


def _launch_redis(
    binary: str, directory: pathlib.Path, port: int, primary: int | None = None
) -> Server:
    directory.mkdir(parents=True)
    args = [
        binary,
        *("--bind", "127.0.0.1", "--port", str(port)),
        *("--dir", str(directory), "--logfile", "redis.log"),
        *("--save", "", "--appendonly", "no"),
        # The first full copy goes to the replica at once, not after 5s.
        *("--repl-diskless-sync-delay", "0"),
    ]
    if primary is not None:
        args += ["--replicaof", "127.0.0.1", str(primary)]
    return launch(f"redis://127.0.0.1:{port}/0", port, args)


def _launch_sentinel(binary: str, directory: pathlib.Path, primary: int) -> Server:
    """Start a sentinel; its config file is its own (sentinels rewrite it)."""
    directory.mkdir(parents=True)
    port = free_port()
    config = directory / "sentinel.conf"
    config.write_text(
        f"bind 127.0.0.1\n"
        f"port {port}\n"
        f"dir {directory}\n"
        f"logfile {directory / 'sentinel.log'}\n"
        f"sentinel monitor {SERVICE} 127.0.0.1 {primary} 2\n"
        f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}\n"
        f"sentinel failover-timeout {SERVICE} {FAILOVER_TIMEOUT_MS}\n"
        f"sentinel parallel-syncs {SERVICE} 1\n"
    )
    return launch(f"redis://127.0.0.1:{port}", port, [binary, str(config)])


def _client(server: Server) -> redis.Redis:
    return redis.Redis(port=server.port, socket_timeout=5, socket_connect_timeout=5)


def _role(server: Server) -> str | None:
    try:
        with redis.Redis(port=server.port, socket_timeout=5) as client:
            return str(client.info("replication").get("role"))
    except redis.RedisError:
        return None
