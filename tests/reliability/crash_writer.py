"""A fork server for the crash tests: ``python -m tests.reliability.crash_writer SPEC``.

It builds one backend from ``SPEC`` (JSON) without connecting anywhere, then
reads commands on stdin, one a line, and answers on stdout:

- ``writer KEY``: fork a child that saves ever-growing self-validating
  records under KEY, forever, the way the store's save does (load, then
  the one-step replace, or if it declines lock, load, save; then touch);
  answers ``pid N``.
- ``holder KEY``: fork a child that takes ``lock(KEY)`` and holds it forever;
  answers ``pid N``, and the child says ``held N`` once it holds the lock.
- ``wait N``: reap child N; answers ``status S``.

The test kills the children with SIGKILL. This process has one thread, so
forking it is safe, and each child opens its own files and connections.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import typing as t

from flask_serverside.backends import Backend
from flask_serverside.backends import Record

#: Expiry of record ``n``: far in the future, and tied to the counter so a
#: header that does not belong to its data is seen. A touch adds 0.5.
BASE_EXPIRES = 2_000_000_000.0
#: Payload sizes grow with the counter, from 512 bytes to about 192 KiB.
MAX_GROWTH = 196_608


def make_backend(spec: dict[str, t.Any]) -> Backend:
    kind = spec["kind"]
    if kind == "filesystem":
        from flask_serverside.backends.filesystem import FileSystemBackend

        return FileSystemBackend(spec["directory"])
    if kind == "sqlalchemy":
        from flask_serverside.backends.sqlalchemy import SQLAlchemyBackend

        return SQLAlchemyBackend(url=spec["url"])
    if kind == "cachelib":
        from flask_serverside.backends.cachelib import CacheLibBackend
        from flask_serverside.cache_url import cache_from_url

        backend = CacheLibBackend(cache_from_url(spec["url"]))
        backend.configure(spec.get("prefix", "session:"))
        backend.lock_ttl = float(spec.get("lock_ttl", backend.lock_ttl))
        return backend
    raise ValueError(kind)


def encode(counter: int) -> tuple[bytes, float]:
    """Record ``counter``: its data and its expiry."""
    size = 512 + (counter * 4099) % MAX_GROWTH
    payload = os.urandom(size // 2).hex().encode()[:size]
    digest = hashlib.sha256(payload).hexdigest().encode()
    return b"%d:%s:%s" % (counter, digest, payload), BASE_EXPIRES + counter


class Torn(Exception):
    """A record that is not one whole version."""


def decode(record: Record, exact_expiry: bool = True) -> int:
    """The counter of a whole record; :exc:`Torn` for anything else."""
    try:
        counter_text, digest, payload = record.data.split(b":", 2)
        counter = int(counter_text)
    except ValueError as exc:
        raise Torn(f"unparsable record of {len(record.data)} bytes") from exc
    if hashlib.sha256(payload).hexdigest().encode() != digest:
        raise Torn(f"record {counter}: checksum mismatch ({len(payload)} bytes)")
    if exact_expiry and record.expires not in (
        BASE_EXPIRES + counter,
        BASE_EXPIRES + counter + 0.5,
    ):
        raise Torn(f"record {counter}: expiry {record.expires} belongs to another version")
    return counter


def write_forever(backend: Backend, key: str) -> t.NoReturn:
    while True:
        current, data, expires = _next(backend, key)
        if current is None or not backend.replace(key, current.data, data, expires):
            with backend.lock(key):
                _, data, expires = _next(backend, key)
                backend.save(key, data, expires)
        backend.touch(key, expires + 0.5)


def _next(backend: Backend, key: str) -> tuple[Record | None, bytes, float]:
    """The record under ``key`` now, and the data and expiry of the next."""
    current = backend.load(key)
    data, expires = encode(decode(current) + 1 if current is not None else 1)
    return current, data, expires


def hold_forever(backend: Backend, key: str) -> t.NoReturn:
    with backend.lock(key):
        os.write(1, b"held %d\n" % os.getpid())
        while True:
            time.sleep(60)
    raise AssertionError("unreachable")


def _child(mode: str, backend: Backend, key: str) -> t.NoReturn:
    try:
        if mode == "writer":
            write_forever(backend, key)
        hold_forever(backend, key)
    except BaseException as exc:  # noqa: B036 - report anything, then die
        os.write(1, f"error {os.getpid()} {exc!r}\n".encode())
    finally:
        os._exit(3)


def main() -> None:
    backend = make_backend(json.loads(sys.argv[1]))
    os.write(1, b"ready\n")
    for line in sys.stdin:
        command, arg = line.split()
        if command in ("writer", "holder"):
            pid = os.fork()
            if pid == 0:
                _child(command, backend, arg)
            os.write(1, b"pid %d\n" % pid)
        elif command == "wait":
            _, status = os.waitpid(int(arg), 0)
            os.write(1, b"status %d\n" % status)


if __name__ == "__main__":
    main()
