"""The cost of the parts of a request that ours runs, without a profiler.

Each part is timed alone (median of 15 runs of a loop of about 5 ms), in
µs per call, to set beside the cProfile output of ``run.py --profile``
(which inflates pure-Python code more than C). Run from the repository
root: ``python benchmarks/parts.py``.
"""

from __future__ import annotations

import hashlib
import pathlib
import statistics
import sys
import time
import typing as t
import zlib
from datetime import datetime
from datetime import timezone

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from flask import Flask  # noqa: E402
from flask import Response  # noqa: E402
from werkzeug.http import parse_cookie  # noqa: E402

from benchmarks import apps  # noqa: E402
from flask_serverside import ids  # noqa: E402
from flask_serverside.serializers import get_serializer  # noqa: E402


def cost(func: t.Callable[[], t.Any]) -> float:
    """Median µs per call."""
    start = time.perf_counter()
    func()
    n = max(10, round(0.005 / max(time.perf_counter() - start, 1e-7)))
    runs = []
    for _ in range(15):
        start = time.perf_counter()
        for _ in range(n):
            func()
        runs.append((time.perf_counter() - start) / n)
    return statistics.median(runs) * 1e6


def main() -> None:
    json = get_serializer("json")
    small = {**apps.CONTENT, "_permanent": True}
    big = {**small, "notes": apps.NOTES}
    small_raw, big_raw = json.dumps(small), json.dumps(big)
    sid = ids.generate(32)
    app = Flask(__name__)
    app.config["SECRET_KEY"] = apps.SECRET_KEY
    response = Response("ok")
    expires = datetime.now(timezone.utc)
    parts: list[tuple[str, t.Callable[[], t.Any]]] = [
        ("tagged JSON dumps, 100-byte session", lambda: json.dumps(small)),
        ("tagged JSON loads, 100-byte session", lambda: json.loads(small_raw)),
        ("tagged JSON dumps, 64 KB session", lambda: json.dumps(big)),
        ("tagged JSON loads, 64 KB session", lambda: json.loads(big_raw)),
        ("bytes == bytes, 64 KB", lambda: big_raw == bytes(big_raw)),
        ("zlib.crc32 of 64 KB (filesystem slot check)", lambda: zlib.crc32(big_raw)),
        ("zlib.adler32 of 64 KB", lambda: zlib.adler32(big_raw)),
        ("hashlib.sha1 of 64 KB", lambda: hashlib.sha1(big_raw).digest()),
        ("ids.storage_key (sha256 of the ID)", lambda: ids.storage_key("s:", sid)),
        ("ids.is_valid (regex)", lambda: ids.is_valid(sid)),
        ("ids.sign (SESSION_SIGN_ID)", lambda: ids.sign(sid, [apps.SECRET_KEY])),
        ("response.set_cookie (werkzeug dump_cookie)", lambda: _set_cookie(response, sid, expires)),
        ("datetime.now(timezone.utc)", lambda: datetime.now(timezone.utc)),
        ("time.time()", time.time),
        ("werkzeug parse_cookie of the request", lambda: parse_cookie(f"session={sid}")),
        ("hashlib.sha256 of 100 bytes", lambda: hashlib.sha256(small_raw).digest()),
    ]
    with app.test_request_context():
        lifetime = app.permanent_session_lifetime
        parts.append(
            (
                "datetime.now + permanent_session_lifetime",
                lambda: datetime.now(timezone.utc) + lifetime,
            )
        )
        for name, func in parts:
            print(f"{cost(func):8.2f} µs  {name}", flush=True)


def _set_cookie(response: Response, sid: str, expires: datetime) -> None:
    response.set_cookie("session", sid, expires=expires, httponly=True, samesite="Lax", path="/")


if __name__ == "__main__":
    main()
