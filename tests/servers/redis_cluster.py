"""Redis Cluster for the test suite: three primaries and three replicas of
``redis-server --cluster-enabled yes`` on loopback, joined by ``redis-cli
--cluster create``.

Each node keeps its data in memory only (``--save ''``, no append-only
file) and its cluster state in its own directory. Nodes time each other out
after :data:`NODE_TIMEOUT_MS`, so a killed primary's replica takes over
within a few seconds, and a replica may always take over (however stale):
asynchronous replication can lose acknowledged writes, which the failover
tests measure rather than hide.
"""

from __future__ import annotations

import pathlib
import signal
import socket
import subprocess
import time
from dataclasses import dataclass

import redis

from . import find_binary
from . import launch
from . import Server

#: How long a node may be silent before the others count it as failing.
NODE_TIMEOUT_MS = 1000
#: How long every wait for the cluster may take, in seconds.
TIMEOUT = 30
#: A node's cluster bus listens on its port plus this.
BUS_OFFSET = 10000


@dataclass
class ClusterNode:
    """One ``redis-server`` of the cluster.

    :param server: Its process and port.
    :param node_id: Its cluster node ID.
    """

    server: Server
    node_id: str = ""

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def alive(self) -> bool:
        return self.server.proc.poll() is None

    def client(self) -> redis.Redis:
        """A plain (non-cluster) client of this node alone."""
        return redis.Redis(port=self.port, socket_timeout=5, socket_connect_timeout=5)

    def info(self, command: str) -> dict[str, str]:
        """``CLUSTER INFO`` and the like as a dict, ``{}`` if unreachable."""
        try:
            with self.client() as client:
                reply = client.execute_command(command)
        except redis.RedisError:
            return {}
        if isinstance(reply, dict):  # redis-py parses some replies itself
            return {str(key): _text(value) for key, value in reply.items()}
        lines = _text(reply).splitlines()
        return dict(line.strip().split(":", 1) for line in lines if ":" in line)


@dataclass
class RedisCluster:
    """A running cluster of six nodes.

    :param nodes: Every node, in start order (the roles change on failover:
        ask :meth:`primaries` or :meth:`primary_for_slot`).
    :param url: ``redis+cluster://`` with the first three nodes as seeds.
    """

    nodes: list[ClusterNode]
    url: str

    @property
    def ports(self) -> list[int]:
        return [node.port for node in self.nodes]

    def node(self, port: int) -> ClusterNode:
        return next(node for node in self.nodes if node.port == port)

    def key_slot(self, key: str | bytes) -> int:
        """The hash slot of ``key`` (``CLUSTER KEYSLOT``)."""
        with self._live_node().client() as client:
            return int(client.execute_command("CLUSTER KEYSLOT", key))

    def primaries(self) -> list[ClusterNode]:
        """The live nodes a live node sees as primaries serving slots."""
        return [self.node(port) for port in self._slot_owners().values()]

    def primary_for_slot(self, slot: int) -> ClusterNode:
        """The node that serves ``slot`` now, as a live node sees it."""
        for (start, end), port in self._slot_owners().items():
            if start <= slot <= end:
                return self.node(port)
        raise RuntimeError(f"no node serves slot {slot}: is the cluster down?")

    def primary_for_key(self, key: str | bytes) -> ClusterNode:
        return self.primary_for_slot(self.key_slot(key))

    def kill(self, node: ClusterNode) -> None:
        """``SIGKILL`` ``node``: a crash, no goodbye to the cluster."""
        node.server.proc.send_signal(signal.SIGKILL)
        node.server.proc.wait(timeout=10)

    def wait_for_failover(
        self, slot: int, old: ClusterNode, timeout: float = TIMEOUT
    ) -> ClusterNode:
        """Block until another node serves ``slot`` than ``old`` (killed),
        and every live node reports ``cluster_state:ok``; return the new one.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                new = self.primary_for_slot(slot)
            except RuntimeError:
                new = old
            if new is not old and new.alive and self._all_ok():
                return new
            time.sleep(0.05)
        raise RuntimeError(f"no replica took over slot {slot} from port {old.port} in {timeout}s")

    def wait_until_ok(self, timeout: float = TIMEOUT) -> None:
        """Block until every live node reports ``cluster_state:ok`` and every
        live replica's link to its primary is up."""
        deadline = time.monotonic() + timeout
        while not (self._all_ok() and self._replicas_linked()):
            if time.monotonic() > deadline:
                states = {
                    node.port: node.info("CLUSTER INFO").get("cluster_state") for node in self.nodes
                }
                raise RuntimeError(f"the Redis Cluster is not ok after {timeout}s: {states}")
            time.sleep(0.05)

    def stop(self) -> None:
        for node in self.nodes:
            node.server.stop()

    def _live_node(self) -> ClusterNode:
        for node in self.nodes:
            if node.alive:
                return node
        raise RuntimeError("every node of the cluster is stopped")

    def _slot_owners(self) -> dict[tuple[int, int], int]:
        """Slot range to the port of its primary (``CLUSTER SLOTS``)."""
        for node in self.nodes:
            if not node.alive:
                continue
            try:
                with node.client() as client:
                    slots = client.execute_command("CLUSTER SLOTS")
            except redis.RedisError:
                continue
            return {(int(s[0]), int(s[1])): int(s[2][1]) for s in slots}
        raise RuntimeError("no node of the cluster answers")

    def _all_ok(self) -> bool:
        live = [node for node in self.nodes if node.alive]
        return all(node.info("CLUSTER INFO").get("cluster_state") == "ok" for node in live)

    def _replicas_linked(self) -> bool:
        for node in self.nodes:
            if not node.alive:
                continue
            info = node.info("INFO REPLICATION")
            if info.get("role") == "slave" and info.get("master_link_status") != "up":
                return False
        return True


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def start(tmp_dir: pathlib.Path) -> RedisCluster:
    """Start six cluster nodes on free loopback ports and join them: the
    first three start as primaries, the others as their replicas.

    :raises ServerNotFound: ``redis-server`` or ``redis-cli`` is not installed.
    """
    binary = find_binary("redis-server", "/usr/sbin", "/usr/local/bin")
    cli = find_binary("redis-cli", "/usr/local/bin")
    nodes: list[ClusterNode] = []
    try:
        for port in cluster_ports(6):
            nodes.append(ClusterNode(launch_node(binary, tmp_dir / f"node-{port}", port)))
        _create(cli, [node.port for node in nodes])
        seeds = ",".join(f"127.0.0.1:{node.port}" for node in nodes[:3])
        cluster = RedisCluster(nodes=nodes, url=f"redis+cluster://{seeds}")
        cluster.wait_until_ok()
        for node in nodes:
            with node.client() as client:
                node.node_id = client.execute_command("CLUSTER MYID").decode()
    except BaseException:
        for node in nodes:
            node.server.stop()
        raise
    return cluster


def launch_node(binary: str, directory: pathlib.Path, port: int) -> Server:
    """Start one cluster-enabled ``redis-server``, its files in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    args = [
        binary,
        *("--bind", "127.0.0.1", "--port", str(port)),
        *("--dir", str(directory), "--logfile", "redis.log"),
        *("--save", "", "--appendonly", "no"),
        *("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"),
        *("--cluster-node-timeout", str(NODE_TIMEOUT_MS)),
        # A replica takes over however long its link was down: the tests
        # kill primaries and measure what that loses.
        *("--cluster-replica-validity-factor", "0"),
        # A primary sends its first full copy to a replica at once (Redis
        # waits 5 seconds for more replicas by default).
        *("--repl-diskless-sync-delay", "0"),
    ]
    return launch(f"redis://127.0.0.1:{port}/0", port, args)


def _create(cli: str, ports: list[int]) -> None:
    """Join the nodes: slots to the first three, one replica each."""
    args = [
        cli,
        "--cluster",
        "create",
        *(f"127.0.0.1:{port}" for port in ports),
        *("--cluster-replicas", "1", "--cluster-yes"),
    ]
    result = subprocess.run(args, capture_output=True, text=True, timeout=TIMEOUT)
    if result.returncode != 0:
        raise RuntimeError(f"redis-cli --cluster create failed:\n{result.stdout}{result.stderr}")


def cluster_ports(count: int) -> list[int]:
    """``count`` free loopback ports whose cluster bus ports are free too."""
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket() as sock, socket.socket() as bus:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
            if port + BUS_OFFSET > 65535 or port in ports:
                continue
            try:
                bus.bind(("127.0.0.1", port + BUS_OFFSET))
            except OSError:
                continue
            ports.append(port)
    return ports
