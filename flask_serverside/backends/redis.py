"""Sessions in Redis (or Valkey), through a cachelib cache's client.

Values are raw bytes, never pickles, under the same keys cachelib would use
(its ``key_prefix`` included); the user's other keys in the same cache keep
working through cachelib as before.
"""

from __future__ import annotations

import hashlib
import importlib
import math
import re
import threading
import time
import typing as t

from .base import glob_escape
from .base import INDEX_TAG
from .base import is_session_key
from .base import Record
from .caches import CacheBackend
from .caches import HEADER
from .caches import LOCK_SUFFIX
from .caches import MARK
from .caches import pack
from .caches import redis_client
from .caches import unpack

if t.TYPE_CHECKING:
    from cachelib import BaseCache


class RedisBackend(CacheBackend):
    """Stores sessions in Redis through a :class:`~cachelib.RedisCache`'s
    client (one built around your own client, Sentinel or cluster too), with
    the expiry in the value and as the key's TTL.

    A load is one ``GET``. A touch rewrites the header and the TTL in one
    script, which never creates a record; the scripts compare payloads
    only, so a touch does not make an overlapping write take the lock.
    Both scripts also check the expiry in the header against the server's
    clock: the TTL, counted from when the record arrived, may outlive it by
    a few milliseconds.
    """

    #: Lua: whether the record ``value`` has expired by the server's clock.
    _EXPIRED = (
        " local function expired(value)"
        " local now = redis.call('time')"
        " local ms = now[1] * 1000 + math.floor(now[2] / 1000)"
        f" return struct.unpack('>d', value, {len(MARK) + 1}) * 1000 <= ms end"
    )

    _TOUCH = (
        _EXPIRED + " local value = redis.call('get', KEYS[1])"
        f" if not value or string.sub(value, 1, {len(MARK)}) ~= ARGV[3] then return 0 end"
        " if expired(value) then return 0 end"
        f" redis.call('set', KEYS[1], ARGV[1] .. string.sub(value, {HEADER.size + 1}),"
        " 'PX', ARGV[2]) return 1"
    )

    _RELEASE = (
        "if redis.call('get', KEYS[1]) == ARGV[1] then"
        " return redis.call('del', KEYS[1]) end return 0"
    )

    #: Writes ARGV[2] with a TTL of ARGV[3] ms if the SHA-1 of the record's
    #: payload is still ARGV[1], the record has not expired, nobody holds the
    #: lock key, and the server's clock has not passed ARGV[4] (Unix ms).
    _REPLACE = (
        _EXPIRED + " local now = redis.call('time')"
        " if now[1] * 1000 + math.floor(now[2] / 1000) > tonumber(ARGV[4]) then return 0 end"
        " if redis.call('exists', KEYS[2]) == 1 then return 0 end"
        " local value = redis.call('get', KEYS[1])"
        " if not value or redis.sha1hex(string.sub(value, "
        f"{HEADER.size + 1})) ~= ARGV[1] then return 0 end"
        " if expired(value) then return 0 end"
        " redis.call('set', KEYS[1], ARGV[2], 'PX', ARGV[3]) return 1"
    )

    def __init__(self, cache: BaseCache) -> None:
        super().__init__(cache)
        client = redis_client(cache)
        if client is None:
            raise TypeError(f"{cache!r} is not a cachelib RedisCache or ValkeyCache.")
        self.client = client
        #: Whether the client is a Redis Cluster's: names then carry the
        #: digest as their hash tag (see :meth:`_name`).
        self.cluster = _is_cluster(client)
        self.unavailable_errors = _redis_errors()
        self._release_script = client.register_script(self._RELEASE)
        self._touch_script = client.register_script(self._TOUCH)
        self._replace_script = client.register_script(self._REPLACE)
        timeout = _connection_options(client).get("socket_timeout")
        #: How long after it is sent a replace may still run: half the
        #: socket timeout, so that a script a frozen server runs once it
        #: wakes up, after the request gave up on it (and answered 503),
        #: writes nothing.
        self._replace_window = timeout / 2 if timeout else math.inf

    def describe(self) -> str:
        if isinstance(self.client, LazyCluster):
            return "redis cluster " + ",".join(self.client.startup_nodes)
        if self.cluster:
            nodes = getattr(self.client, "nodes_manager", None)
            return "redis cluster " + ",".join(getattr(nodes, "startup_nodes", {}))
        pool = getattr(self.client, "connection_pool", None)
        service = getattr(pool, "service_name", None)
        if service is not None:
            return f"redis sentinel {service}"
        options = getattr(pool, "connection_kwargs", {})
        if "host" in options:
            return f"redis {options['host']}:{options.get('port', 6379)}"
        if "path" in options:
            return f"redis {options['path']}"
        return "redis"

    def _cache_prefix(self) -> str:
        """cachelib's ``key_prefix``: a string, or a function returning one."""
        prefix = getattr(self.cache, "key_prefix", None)
        return (prefix() if callable(prefix) else prefix) or ""

    def _name(self, key: str) -> str:
        """The Redis key of a storage key (or of a key derived from one).

        On a cluster, the 64 hex digits of the storage key's digest are
        wrapped in ``{…}``: Redis then hashes only them, so the record, its
        lock key, and whatever else is named after the same digest live in
        one hash slot, and a script may use them together. Elsewhere the
        name is the storage key, as cachelib would name it.
        """
        if self.cluster:
            key = _DIGEST_AT_END.sub(r"{\1}\2", key, count=1)
        return self._cache_prefix() + key

    def load(self, key: str) -> Record | None:
        name = self._name(key)
        return unpack(self.client.get(name), name)

    def save(self, key: str, data: bytes, expires: float) -> None:
        self.client.set(self._name(key), pack(data, expires), px=_ttl_ms(expires))

    def replace(self, key: str, expected: bytes, data: bytes, expires: float) -> bool:
        keys = [self._name(key), self._name(key + LOCK_SUFFIX)]
        deadline = int(min((time.time() + self._replace_window) * 1000, 2**53))
        digest = hashlib.sha1(expected).hexdigest()
        args = [digest, pack(data, expires), _ttl_ms(expires), deadline]
        return bool(self._replace_script(keys=keys, args=args))

    def touch(self, key: str, expires: float) -> bool:
        # The key's TTL (in milliseconds) is its expiry: an expired record
        # is gone, and the script never creates one.
        header = HEADER.pack(MARK, expires)
        args = [header, _ttl_ms(expires), MARK]
        return bool(self._touch_script(keys=[self._name(key)], args=args))

    def delete(self, key: str) -> bool:
        return bool(self.client.delete(self._name(key)))

    def take(self, lock_key: str, token: str, ttl: float) -> bool:
        name = self._name(lock_key)
        return bool(self.client.set(name, token, nx=True, px=math.ceil(ttl * 1000)))

    def give_back(self, lock_key: str, token: str) -> None:
        self._release_script(keys=[self._name(lock_key)], args=[token])

    def _names(self, tag: str = "") -> t.Iterator[bytes]:
        """The names of the session records (with ``tag``, of the users'
        indexes), on every primary of a cluster."""
        start = self._cache_prefix() + self.configured_prefix() + tag
        match = glob_escape(start) + ("{*" if self.cluster else "*")
        for client in self._primaries():
            for name in client.scan_iter(match=match, count=1000):
                text = name.decode("utf-8", "surrogateescape") if isinstance(name, bytes) else name
                if self.cluster:
                    if not (text.startswith(start + "{") and text.endswith("}")):
                        continue
                    text = start + text[len(start) + 1 : -1]
                if is_session_key(text, start):
                    yield name

    def _primaries(self) -> list[t.Any]:
        """A client of each primary: one per cluster node that serves slots
        (``SCAN`` lists one node's keys), else the client itself."""
        if not self.cluster:
            return [self.client]
        return [self.client.get_redis_connection(node) for node in self.client.get_primaries()]

    def count(self, now: float) -> int:
        """Counts with ``SCAN``: every key under the prefix, whose TTL is its
        expiry."""
        return sum(1 for _ in self._names())

    def clear(self) -> int:
        removed = self._delete_all(self._names())
        self._delete_all(self._names(INDEX_TAG))
        return removed

    def _delete_all(self, names: t.Iterator[bytes]) -> int:
        removed = 0
        batch: list[bytes] = []
        for name in names:
            batch.append(name)
            if len(batch) == 500:
                removed += self._delete_many(batch)
                batch.clear()
        if batch:
            removed += self._delete_many(batch)
        return removed

    def _delete_many(self, names: list[bytes]) -> int:
        """Delete ``names``: in one ``DEL``, or on a cluster, where one
        command may only name keys of one slot, one ``DEL`` each, sent
        together in a pipeline that routes each to its slot's primary."""
        if not self.cluster:
            return int(self.client.delete(*names))
        pipe = self.client.pipeline(transaction=False)
        for name in names:
            pipe.delete(name)
        return sum(int(n) for n in pipe.execute())


class LazyCluster:
    """A Redis Cluster client that is built by its first command.

    redis-py's :class:`~redis.cluster.RedisCluster` asks its startup nodes
    for the slot map in its constructor and raises if none answers, so an
    app that built one at start-up could not start while the cluster is
    down. This stands in for it: every attribute is the built client's, and
    a command while no node answers raises
    :exc:`redis.exceptions.ConnectionError` (a 503), the next one tries to
    build the client again.

    :param build: Builds the client.
    :param startup_nodes: The ``host:port`` of each startup node, to name
        the cluster in messages before it is reached.
    :param connection_kwargs: The options of the connections to each node.
    """

    def __init__(
        self,
        build: t.Callable[[], t.Any],
        startup_nodes: list[str],
        connection_kwargs: dict[str, t.Any],
    ) -> None:
        self._build = build
        self._client: t.Any = None
        self._lock = threading.Lock()
        self.startup_nodes = startup_nodes
        self.connection_kwargs = connection_kwargs

    def built(self) -> t.Any:
        """The cluster client, built now if it is not yet.

        :raises redis.exceptions.ConnectionError: No startup node answers.
        """
        client = self._client
        if client is None:
            with self._lock:
                if self._client is None:
                    self._client = self._connect()
                client = self._client
        return client

    def _connect(self) -> t.Any:
        exceptions = importlib.import_module("redis.exceptions")
        try:
            return self._build()
        except exceptions.RedisClusterException as exc:
            # Raised when no startup node answers (there is no more precise
            # class); the message says which node and why.
            raise exceptions.ConnectionError(str(exc)) from exc

    def register_script(self, script: str | bytes) -> t.Any:
        """A script that is sent by its first call, as redis-py's are; the
        text is encoded here so that registering contacts no node."""
        commands = importlib.import_module("redis.commands.core")
        return commands.Script(self, script.encode() if isinstance(script, str) else script)

    def __getattr__(self, name: str) -> t.Any:
        # Only public names are the client's: a private or special one
        # (``copy`` asks for ``__setstate__`` before ``__init__`` ran) must
        # not build the client, or recurse through ``_client``.
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.built(), name)

    def __repr__(self) -> str:
        return f"<LazyCluster {','.join(self.startup_nodes)}>"


def _ttl_ms(expires: float) -> int:
    return max(1, math.ceil((expires - time.time()) * 1000))


#: A storage key's digest, at its end or before the lock suffix.
_DIGEST_AT_END = re.compile(rf"([0-9a-f]{{64}})((?:{re.escape(LOCK_SUFFIX)})?)\Z")


def _is_cluster(client: t.Any) -> bool:
    """Whether ``client`` is redis-py's or valkey-py's cluster client."""
    if isinstance(client, LazyCluster):
        return True
    for package, name in (("redis", "RedisCluster"), ("valkey", "ValkeyCluster")):
        try:
            cls = getattr(importlib.import_module(f"{package}.cluster"), name)
        except (ImportError, AttributeError):
            continue
        if isinstance(client, cls):
            return True
    return False


def _connection_options(client: t.Any) -> dict[str, t.Any]:
    """The options a client opens its connections with (on a cluster, the
    connections to each node)."""
    if isinstance(client, LazyCluster):
        return client.connection_kwargs
    for owner in ("connection_pool", "nodes_manager"):
        options = getattr(getattr(client, owner, None), "connection_kwargs", None)
        if isinstance(options, dict):
            return options
    return {}


def _redis_errors() -> tuple[type[BaseException], ...]:
    """The errors of redis-py and of its fork valkey-py, if installed, that
    mean the store cannot answer now: no connection, no reply in time, or,
    on a cluster, a slot without a primary until a replica takes over."""
    errors: list[type[BaseException]] = [OSError]
    names = ["ConnectionError", "TimeoutError", "ClusterDownError", "TryAgainError"]
    names.append("SlotNotCoveredError")
    for package in ("redis", "valkey"):
        try:
            exceptions = importlib.import_module(f"{package}.exceptions")
        except ImportError:
            continue
        errors += [getattr(exceptions, n) for n in names if hasattr(exceptions, n)]
    return tuple(errors)
