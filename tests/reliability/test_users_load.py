"""Revoking a user's sessions under load, through real gunicorn workers.

A user has several sessions, each in steady use by its own client thread,
across 4 worker processes; ``revoke_user`` runs in the middle. Every request
that starts after it returns must see none of the revoked data, and nothing
of a revoked session may come back afterwards (a request in flight at the
time saves nothing into it).
"""

from __future__ import annotations

import threading
import time
import typing as t
from collections import Counter
from collections.abc import Iterator

import pytest

from tests.conftest import store_config
from tests.reliability.figures import record
from tests.reliability.test_load import get
from tests.reliability.test_load import Gunicorn
from tests.reliability.test_load import gunicorn

#: Sessions of the user under test, each with its own client thread.
SESSIONS = 6
#: Seconds of steady use before the revoke, and after it.
BEFORE = AFTER = 1.5


@pytest.fixture(scope="module", params=["filesystem", "redis"])
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gunicorn]:
    name = request.param
    instance = str(tmp_path_factory.mktemp(f"gunicorn-users-{name}"))
    with gunicorn(instance, store_config(request, name), workers=4, threads=4) as server:
        server.name = name
        yield server


def _login(port: int, user: str) -> str:
    first = get(port, "/set/seed/1")
    assert first.cookie is not None
    reply = get(port, f"/login/{user}", first.cookie.value)
    assert reply.status == 200 and reply.cookie is not None
    return reply.cookie.value


def test_revoke_user_under_load(served: Gunicorn, request: pytest.FixtureRequest) -> None:
    port = served.port
    sids = [_login(port, "u") for _ in range(SESSIONS)]
    bystander = _login(port, "v")
    assert get(port, "/sessions-of/u").json == SESSIONS
    revoked_at: list[float] = []
    stop = threading.Event()
    counts: Counter[str] = Counter()
    lock = threading.Lock()

    def use(sid: str) -> None:
        while not stop.is_set():
            reply = get(port, "/incr/n", sid)
            late = bool(revoked_at) and reply.t0 > revoked_at[0]
            with lock:
                counts["requests"] += 1
                if reply.status != 200:
                    counts["errors"] += 1
                elif late and (reply.json["value"] != 1 or _same(reply, sid)):
                    counts["revoked_seen_with_data"] += 1
                elif late:
                    counts["revoked_requests"] += 1

    threads = [threading.Thread(target=use, args=(sid,)) for sid in sids]
    for thread in threads:
        thread.start()
    time.sleep(BEFORE)
    revoked = get(port, "/revoke-user/u").json
    revoked_at.append(time.monotonic())
    time.sleep(AFTER)
    stop.set()
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads)

    came_back = sum(get(port, "/dump", sid).json != {} for sid in sids)
    came_back += sum(get(port, f"/exists/{sid}").json for sid in sids)
    left = get(port, "/sessions-of/u").json
    record(
        request,
        "users_load",
        f"{served.name}: {counts['requests']} requests, {revoked} sessions revoked,"
        f" {counts['revoked_requests']} requests on revoked cookies after the revoke,"
        f" {counts['revoked_seen_with_data']} of them saw data, {came_back} came back",
        requests=counts["requests"],
        revoked=revoked,
        revoked_seen_with_data=counts["revoked_seen_with_data"],
        came_back=came_back,
    )
    assert revoked == SESSIONS
    assert counts["errors"] == 0
    assert counts["revoked_requests"] > 0
    assert counts["revoked_seen_with_data"] == 0
    assert came_back == 0 and left == 0
    assert get(port, "/dump", bystander).json.get("user") == "v"


def _same(reply: t.Any, sid: str) -> bool:
    """Whether a reply kept the revoked ID alive in its cookie."""
    return reply.cookie is not None and reply.cookie.value == sid and not reply.cookie.deleting
