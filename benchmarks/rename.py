"""Why the filesystem backend rewrites records in place: the cost of
replacing a file by renaming a new one over it.

Writing a temporary file and renaming it over the old record is the usual
way to replace a file atomically. On ext4 (``auto_da_alloc``, the default),
renaming a file that still has unwritten data over an existing one starts
writeback of that data first. The backend only does that to create a record
or to grow it; it rewrites a record in the older of its two checksummed
slots instead. This script measures, in interleaved rounds, in the directory
given (the system's temp dir by default):

- ``replace``: create, write 200 bytes, ``os.replace`` over a record;
- ``create``: the same without the rename (the temporary file is removed);
- ``exchange``: ``renameat2(RENAME_EXCHANGE)`` instead of the rename, then
  unlink the old record. ext4 does not start writeback for it, but after a
  power loss the record may then be empty.

Run it: ``python benchmarks/rename.py [--dir /dev/shm]``.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import secrets
import statistics
import tempfile
import time
import typing as t

PAYLOAD = b"x" * 200
RENAME_EXCHANGE = 2
AT_FDCWD = -100


def _new_file(directory: str) -> str:
    path = os.path.join(directory, ".tmp-" + secrets.token_hex(8))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, PAYLOAD)
    os.close(fd)
    return path


def variants(directory: str) -> dict[str, t.Callable[[], None]]:
    record = os.path.join(directory, "record")
    with open(record, "wb") as f:
        f.write(PAYLOAD)
    libc = ctypes.CDLL(None, use_errno=True)

    def replace() -> None:
        os.replace(_new_file(directory), record)

    def create() -> None:
        os.unlink(_new_file(directory))

    def exchange() -> None:
        tmp = _new_file(directory)
        if libc.renameat2(AT_FDCWD, tmp.encode(), AT_FDCWD, record.encode(), RENAME_EXCHANGE):
            raise OSError(ctypes.get_errno(), "renameat2(RENAME_EXCHANGE) failed")
        os.unlink(tmp)

    return {"replace": replace, "create": create, "exchange": exchange}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=tempfile.gettempdir())
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--per-round", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as directory:
        timings: dict[str, list[float]] = {}
        for _ in range(args.rounds):
            for name, func in variants(directory).items():
                started = time.perf_counter()
                for _ in range(args.per_round):
                    func()
                elapsed = (time.perf_counter() - started) / args.per_round * 1e6
                timings.setdefault(name, []).append(elapsed)
    medians = {name: statistics.median(values) for name, values in timings.items()}
    print(f"{args.dir}: median µs per write over {args.rounds} interleaved rounds")
    for name, value in medians.items():
        print(f"  {name:9} {value:7.1f} µs")
    print(f"  the rename over the old record: {medians['replace'] - medians['create']:.1f} µs")


if __name__ == "__main__":
    main()
