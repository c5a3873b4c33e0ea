"""A tiny app for the load tests, served by gunicorn.

``gunicorn 'tests.reliability.wsgi_app:create_app()'`` builds it in each
worker from two environment variables:

- ``RELIABILITY_CONFIG``: the app's config, as a JSON object;
- ``RELIABILITY_INSTANCE``: the app's instance path.

A request with an ``X-Slow-Save: <seconds>`` header makes every record write
of that request take that much longer (a slow disk or network), and marks
the time spent so with a file in the instance folder; ``/destroy`` with an
``X-When-Saving`` header waits until such a write is under way in any
worker, so that the logout lands inside another request's save.

``/hold/<sid>/<seconds>?name=<name>`` enters the session lock of ``sid``
and holds it for ``seconds``; it marks its wait (``waiting-<name>``) and its
hold (``held-<name>``) with files in the instance folder, and answers the
times (``time.monotonic()``) it got and left the lock. ``/clock`` touches no
session and answers the time it ran.

With ``RELIABILITY_PSYCOGREEN=1`` the app makes psycopg2 wait through
gevent's hub (psycogreen), as the docs tell gevent deployments to.
"""

from __future__ import annotations

import glob
import json
import os
import threading
import time

from flask import Flask
from flask import has_request_context
from flask import jsonify
from flask import request
from flask import session
from flask.typing import ResponseReturnValue

from flask_serverside import ServerSide
from flask_serverside.backends import Backend
from tests.wrappers import DelegatingBackend


class SlowSaves(DelegatingBackend):
    """The app's backend, with writes slowed down on request."""

    def __init__(self, inner: Backend, instance: str) -> None:
        super().__init__(inner)
        self.instance = instance

    def save(self, key: str, data: bytes, expires: float) -> None:
        if has_request_context() and "X-Slow-Save" in request.headers:
            flag = os.path.join(self.instance, f"saving-{os.getpid()}-{threading.get_ident()}")
            open(flag, "w").close()
            try:
                time.sleep(float(request.headers["X-Slow-Save"]))
            finally:
                os.unlink(flag)
        self.inner.save(key, data, expires)


def create_app() -> Flask:
    if os.environ.get("RELIABILITY_PSYCOGREEN") == "1":
        from psycogreen.gevent import patch_psycopg  # type: ignore[import-not-found]

        patch_psycopg()
    app = Flask(__name__, instance_path=os.environ["RELIABILITY_INSTANCE"])
    app.config["SECRET_KEY"] = "reliability"
    app.config.update(json.loads(os.environ.get("RELIABILITY_CONFIG", "{}")))
    ServerSide(app)
    store = app.session_interface.store  # type: ignore[attr-defined]
    store.backend = SlowSaves(store.backend, app.instance_path)

    @app.get("/nothing")
    def nothing() -> ResponseReturnValue:
        return "nothing"

    @app.get("/incr/<key>")
    def incr(key: str) -> ResponseReturnValue:
        value = session.get(key, 0) + 1
        session[key] = value
        return jsonify(value=value, pid=os.getpid())

    @app.get("/set/<key>/<value>")
    def set_(key: str, value: str) -> ResponseReturnValue:
        session[key] = value
        return jsonify(pid=os.getpid())

    @app.get("/dump")
    def dump() -> ResponseReturnValue:
        return jsonify(dict(session))

    @app.get("/destroy")
    def destroy() -> ResponseReturnValue:
        if "X-When-Saving" in request.headers:
            deadline = time.monotonic() + 5
            pattern = os.path.join(app.instance_path, "saving-*")
            while not glob.glob(pattern) and time.monotonic() < deadline:
                time.sleep(0.0005)
        session.destroy()  # type: ignore[attr-defined]
        return jsonify(pid=os.getpid())

    @app.get("/login/<user>")
    def login(user: str) -> ResponseReturnValue:
        session["user"] = user
        session.bind_user(user)  # type: ignore[attr-defined]
        return jsonify(pid=os.getpid())

    @app.get("/revoke-user/<user>")
    def revoke_user(user: str) -> ResponseReturnValue:
        return jsonify(app.extensions["serverside"].revoke_user(user))

    @app.get("/sessions-of/<user>")
    def sessions_of(user: str) -> ResponseReturnValue:
        return jsonify(len(app.extensions["serverside"].sessions_of(user)))

    @app.get("/exists/<sid>")
    def exists(sid: str) -> ResponseReturnValue:
        return jsonify(app.extensions["serverside"].get(sid) is not None)

    def mark(name: str) -> None:
        open(os.path.join(app.instance_path, name), "w").close()

    @app.get("/hold/<sid>/<float:seconds>")
    def hold(sid: str, seconds: float) -> ResponseReturnValue:
        name = request.args["name"]
        mark(f"waiting-{name}")
        with store.backend.lock(store.key(sid)):
            acquired = time.monotonic()
            mark(f"held-{name}")
            time.sleep(seconds)
            released = time.monotonic()
        return jsonify(acquired=acquired, released=released, pid=os.getpid())

    @app.get("/clock")
    def clock() -> ResponseReturnValue:
        return jsonify(time=time.monotonic(), pid=os.getpid())

    return app
