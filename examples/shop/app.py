"""A tiny shop that keeps its session on the server with flask_serverside.

Run it from the repository root::

    flask --app examples/shop/app.py run --host 127.0.0.1 --port 5000

Sessions are files under ``examples/shop/instance/sessions``; the browser
only holds a random session ID, so a restart of the server keeps the carts.
Logging in binds the session to the user, and *Devices* lists the user's
sessions, to end one or all the others.
"""

from __future__ import annotations

import hmac
import os
import re
import secrets
import typing as t
from datetime import datetime
from datetime import timezone

from flask import abort
from flask import current_app
from flask import flash
from flask import Flask
from flask import redirect
from flask import render_template
from flask import request
from flask import session
from flask import url_for
from werkzeug.exceptions import HTTPException

from flask_serverside import ServerSide
from flask_serverside import SessionInfo

HERE = os.path.dirname(os.path.abspath(__file__))

#: The catalogue: product ID -> (name, price in cents).
PRODUCTS: dict[str, tuple[str, int]] = {
    "tea": ("Green tea, 100 g", 450),
    "mug": ("Enamel mug", 1200),
    "honey": ("Wildflower honey", 790),
    "biscuits": ("Oat biscuits", 320),
}

#: (pattern in the User-Agent, name), first match wins: Edge and Opera
#: also say "Chrome", Chrome also says "Safari".
BROWSERS: list[tuple[str, str]] = [
    (r"Edg(e|A|iOS)?/", "Edge"),
    (r"OPR/|Opera", "Opera"),
    (r"Firefox/|FxiOS/", "Firefox"),
    (r"HeadlessChrome/", "Headless Chrome"),
    (r"Chrome/|CriOS/", "Chrome"),
    (r"Version/[\d.]+.*Safari/", "Safari"),
    (r"^curl/", "curl"),
    (r"^Werkzeug/", "Werkzeug test client"),
]
#: (pattern in the User-Agent, name), first match wins: Android also says
#: "Linux", iOS also says "Mac OS X".
SYSTEMS: list[tuple[str, str]] = [
    (r"Windows", "Windows"),
    (r"Android", "Android"),
    (r"iPhone|iPad|iPod", "iOS"),
    (r"Mac OS X|Macintosh", "macOS"),
    (r"CrOS", "ChromeOS"),
    (r"Linux|X11", "Linux"),
]


def browser_name(user_agent: str | None) -> str:
    """A short readable name for a User-Agent, such as "Chrome on Linux"."""
    if not user_agent:
        return "Unknown browser"
    browser = next((n for p, n in BROWSERS if re.search(p, user_agent)), None)
    system = next((n for p, n in SYSTEMS if re.search(p, user_agent)), None)
    if browser is None:
        # Unknown: its first word ("python-requests/2.32" -> "python-requests").
        browser = user_agent.split("/", 1)[0].split(" ", 1)[0][:40] or "Unknown browser"
    return f"{browser} on {system}" if system else browser


def time_ago(moment: datetime, now: datetime | None = None) -> str:
    """How long ago ``moment`` was, in words: "just now", "2 minutes ago"."""
    seconds = ((now or datetime.now(timezone.utc)) - moment).total_seconds()
    if seconds < 60:
        return "just now"
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            count = int(seconds // size)
            return f"{count} {unit}{'' if count == 1 else 's'} ago"
    raise AssertionError("unreachable")  # pragma: no cover


def utc(moment: datetime) -> str:
    """The exact time, such as "2026-05-03 17:40:11 UTC"."""
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


CSRF_ERROR = (
    "This form has expired or did not come from this shop: reload the page and try again."
)


def csrf_token() -> str:
    """This session's token for its forms; created on first use."""
    token: str = session.setdefault("csrf", secrets.token_urlsafe(32))
    return token


def check_csrf() -> None:
    """Refuse a form that does not carry this session's token (400)."""
    token = session.get("csrf")
    sent = request.form.get("csrf", "")
    if not token or not hmac.compare_digest(token, sent):
        abort(400, CSRF_ERROR)


def logged_in_user() -> str:
    """The logged-in user's name; anyone else is sent to the login page."""
    user: str | None = session.get("user")
    if user is None:
        abort(redirect(url_for("login")))
    return user


def create_app(
    test_config: dict[str, t.Any] | None = None, *, instance_path: str | None = None
) -> Flask:
    """Build the shop.

    :param test_config: Config values applied after the defaults (tests).
    :param instance_path: Where the sessions live; ``examples/shop/instance``
        by default. Tests pass a temporary directory.
    """
    app = Flask(
        __name__,
        root_path=HERE,
        instance_path=instance_path or os.path.join(HERE, "instance"),
    )
    # The session itself does not need the key (the cookie holds only a
    # random ID), but set one anyway, as every Flask app should.
    app.config["SECRET_KEY"] = os.environ.get("SECRET_KEY", "dev-only-not-secret")
    if test_config:
        app.config.from_mapping(test_config)
    # The default store: one file per session in <instance_path>/sessions.
    ServerSide(app)

    @app.context_processor
    def shop_globals() -> dict[str, t.Any]:
        return {
            "user": session.get("user"),
            "cart_count": len(session.get("cart", [])),
        }

    app.add_template_global(csrf_token)
    app.add_template_filter(time_ago, "ago")
    app.add_template_filter(utc, "utc")
    app.add_template_filter(browser_name, "browser")

    @app.errorhandler(400)
    @app.errorhandler(404)
    def error(exc: HTTPException) -> tuple[str, int]:
        return render_template("error.html", error=exc), exc.code or 500

    @app.template_filter("money")
    def money(cents: int) -> str:
        return f"€{cents / 100:.2f}"

    @app.get("/")
    def home() -> str:
        return render_template("home.html")

    @app.route("/login", methods=["GET", "POST"])
    def login() -> t.Any:
        error = None
        if request.method == "POST":
            username = request.form.get("username", "").strip()
            if 1 <= len(username) <= 40:
                session["user"] = username
                # Bind the session to the user, so it shows on their devices
                # page and can be ended from another. Binding gives the
                # session a new ID, same data (the cart is kept): an ID
                # someone planted before the login is worthless afterwards.
                session.bind_user(username)
                return redirect(url_for("home"))
            error = "Pick a name of 1 to 40 characters."
        return render_template("login.html", error=error), 400 if error else 200

    @app.post("/logout")
    def logout() -> t.Any:
        # Removes the data, the stored file and the cookie.
        session.destroy()
        return redirect(url_for("home"))

    @app.get("/products")
    def products() -> str:
        return render_template("products.html", products=PRODUCTS)

    @app.post("/cart/add")
    def cart_add() -> t.Any:
        item = request.form.get("product", "")
        if item not in PRODUCTS:
            abort(400)
        # A change inside a nested value, without `session.modified = True`:
        # flask_serverside finds it and saves it anyway.
        session.setdefault("cart", []).append(item)
        return redirect(url_for("products"))

    @app.get("/cart")
    def cart() -> str:
        items = [(i, item, *PRODUCTS[item]) for i, item in enumerate(session.get("cart", []))]
        total = sum(price for *_, price in items)
        return render_template("cart.html", items=items, total=total)

    @app.post("/cart/remove")
    def cart_remove() -> t.Any:
        cart = session.get("cart", [])
        index = request.form.get("index", type=int)
        if index is None or not 0 <= index < len(cart):
            abort(400)
        cart.pop(index)
        if not cart:
            # Drop the key: a session left empty loses its record and cookie.
            del session["cart"]
        return redirect(url_for("cart"))

    @app.get("/session")
    def session_info() -> str:
        # Read the data first: if the cookie's session has expired, this is
        # where it gets a fresh ID.
        info: dict[str, t.Any] = {"permanent": session.permanent, "contents": dict(session)}
        if info["contents"]:
            sid = session.sid
            store = current_app.session_interface.store
            key = store.key(sid)
            record = store.backend.load(key)  # a Record(data, expires), or None
            info.update(sid=f"{sid[:8]}…{sid[-4:]}", key=f"{key[:16]}…")
            if record is not None:
                expires = datetime.fromtimestamp(record.expires, timezone.utc)
                info.update(
                    expires=expires.strftime("%Y-%m-%d %H:%M:%S UTC"), size=len(record.data)
                )
        return render_template("session.html", **info)

    @app.get("/devices")
    def devices() -> str:
        user = logged_in_user()
        sessions = current_app.extensions["serverside"].sessions_of(user)
        # This device first, then the others, most recently active first.
        sessions.sort(key=lambda info: not info.current)
        return render_template("devices.html", sessions=sessions)

    @app.post("/devices/end")
    def end_device() -> t.Any:
        user = logged_in_user()
        check_csrf()
        handle = request.form.get("handle", "")
        ext = current_app.extensions["serverside"]
        # revoke() ends any session whose handle it gets: end only the
        # logged-in user's own.
        mine: dict[str, SessionInfo] = {s.handle: s for s in ext.sessions_of(user)}
        if handle not in mine or not ext.revoke(handle):
            abort(404, "That session is not one of yours, or it has already ended.")
        flash(f"Ended the session of {browser_name(mine[handle].user_agent)}.")
        return redirect(url_for("devices"))

    @app.post("/devices/end-others")
    def end_other_devices() -> t.Any:
        user = logged_in_user()
        check_csrf()
        count = current_app.extensions["serverside"].revoke_user(user, except_current=True)
        flash(f"Logged out everywhere else: ended {count} session{'' if count == 1 else 's'}.")
        return redirect(url_for("devices"))

    return app
