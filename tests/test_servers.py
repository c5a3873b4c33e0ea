"""The distributed set-ups of ``tests/servers`` come up and serve a plain
redis-py client: the infrastructure the cluster and sentinel tests build on;
and a server never outlives the test run that started it."""

from __future__ import annotations

import pathlib
import subprocess
import sys
import time
import uuid

import pytest
from redis.cluster import RedisCluster
from redis.exceptions import MovedError
from redis.sentinel import Sentinel

from tests.servers.redis_cluster import RedisCluster as ClusterSetup
from tests.servers.redis_sentinel import RedisSentinel

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_cluster_has_three_primaries_with_a_replica_each(
    redis_cluster_server: ClusterSetup,
) -> None:
    assert len(redis_cluster_server.ports) == 6
    primaries = redis_cluster_server.primaries()
    assert len(primaries) == 3
    for node in redis_cluster_server.nodes:
        with node.client() as client:
            assert client.cluster("info")["cluster_state"] == "ok"
    replicas = [node for node in redis_cluster_server.nodes if node not in primaries]
    for node in replicas:
        assert node.info("INFO REPLICATION")["role"] == "slave"
    seeds = redis_cluster_server.url.removeprefix("redis+cluster://").split(",")
    assert seeds == [f"127.0.0.1:{port}" for port in redis_cluster_server.ports[:3]]


def test_cluster_client_sets_and_gets_on_every_primary(
    redis_cluster_server: ClusterSetup,
) -> None:
    client = RedisCluster(host="127.0.0.1", port=redis_cluster_server.ports[0])
    try:
        keys = [f"smoke:{uuid.uuid4().hex}" for _ in range(30)]
        for key in keys:
            client.set(key, key, ex=60)
        assert [client.get(key) for key in keys] == [key.encode() for key in keys]
        owners = {redis_cluster_server.primary_for_key(key).port for key in keys}
        assert len(owners) == 3  # 30 random keys land on every primary
        # A primary serves its own slots and redirects the others.
        owner = redis_cluster_server.primary_for_key(keys[0])
        other = next(k for k in keys if redis_cluster_server.primary_for_key(k) is not owner)
        with owner.client() as node:
            assert node.get(keys[0]) == keys[0].encode()
            with pytest.raises(MovedError):
                node.get(other)
    finally:
        client.close()


def test_sentinels_name_the_primary_and_serve_it(redis_sentinel_server: RedisSentinel) -> None:
    sentinel = Sentinel(
        [("127.0.0.1", port) for port in redis_sentinel_server.sentinel_ports], socket_timeout=5
    )
    host, port = sentinel.discover_master("mymaster")
    assert (host, port) == ("127.0.0.1", redis_sentinel_server.primary().port)
    assert sentinel.discover_slaves("mymaster") == [
        ("127.0.0.1", redis_sentinel_server.replica().port)
    ]
    primary = sentinel.master_for("mymaster", socket_timeout=5)
    key = f"smoke:{uuid.uuid4().hex}"
    try:
        primary.set(key, "value", ex=60)
        assert primary.get(key) == b"value"
    finally:
        primary.close()
    hosts = ",".join(f"127.0.0.1:{port}" for port in redis_sentinel_server.sentinel_ports)
    assert redis_sentinel_server.url == f"redis+sentinel://{hosts}/mymaster/0"


@pytest.mark.parametrize("name", ["redis", "memcached"])
def test_a_killed_test_run_leaves_no_server_behind(
    name: str, tmp_path: pathlib.Path, request: pytest.FixtureRequest
) -> None:
    """A process that started a server and is then SIGKILLed (a CI run cut
    off by its time limit) takes the server down with it."""
    script = (
        "import pathlib, time\n"
        f"from tests.servers import ServerNotFound, {name}\n"
        "try:\n"
        f"    server = {name}.start(pathlib.Path({str(tmp_path)!r}))\n"
        "except ServerNotFound as exc:\n"
        "    print('missing', exc, flush=True)\n"
        "    raise SystemExit\n"
        "print(server.proc.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    with subprocess.Popen(
        [sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True
    ) as parent:
        assert parent.stdout is not None
        line = parent.stdout.readline()
        parent.kill()
    if line.startswith("missing"):
        if request.config.getoption("--require-servers"):
            pytest.fail(f"{name} is required (CI or --require-servers): {line}")
        pytest.skip(line)
    pid = int(line)
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pid)


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, ended but not reaped, does not)."""
    try:
        state = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"
