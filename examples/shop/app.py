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
    # The browser sends the cookie on links from other sites, not on their
    # forms or scripts: another site cannot add to your cart or log you out
    # (docs/security.rst, "SameSite").
    app.config["SESSION_COOKIE_SAMESITE"] = "Lax"
    if test_config:
        app.config.from_mapping(test_config)
    # The default store: one file per session in <instance_path>/sessions.
    ServerSide(app)

    @app.context_processor
    def shop_globals() -> dict[str, t.Any]:
        return {"user": session.get("user"), "cart_count": sum(_cart().values())}

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
        if "user" in session:
            # Already logged in: say so, rather than log in over it.
            return render_template("login.html", already=session["user"])
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
        return render_template("products.html", products=PRODUCTS, cart=_cart())

    @app.post("/cart/add")
    def cart_add() -> t.Any:
        item = request.form.get("product", "")
        if item not in PRODUCTS:
            abort(400)
        # A change inside a nested value, without `session.modified = True`:
        # flask_serverside finds it and saves it anyway.
        cart = session.setdefault("cart", _cart())
        cart[item] = cart.get(item, 0) + 1
        back = "cart" if request.form.get("next") == "cart" else "products"
        return redirect(url_for(back))

    @app.get("/cart")
    def cart() -> str:
        items = [(item, *PRODUCTS[item], count) for item, count in _cart().items()]
        total = sum(price * count for _, _, price, count in items)
        return render_template("cart.html", items=items, total=total)

    @app.post("/cart/remove")
    def cart_remove() -> t.Any:
        cart = _cart()
        item = request.form.get("product", "")
        if item not in cart:
            abort(400)
        cart[item] -= 1
        if not cart[item]:
            del cart[item]
        if not cart:
            # Drop the key: a session left empty loses its record and cookie.
            del session["cart"]
        return redirect(url_for("cart"))

    @app.get("/session")
    def session_info() -> str:
        # Read the data first: if the cookie's session has expired, this is
        # where it gets a fresh ID.
        contents = dict(session)
        if not contents:
            return render_template("session.html", contents=contents)
        return render_template(
            "session.html",
            contents=contents,
            browser=_browser_side(),
            server=_server_side(session.sid),
        )

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


def _cart() -> dict[str, int]:
    """The cart in the session: product ID -> quantity.

    Sessions saved by an older version of the shop hold a list of product
    IDs; they are counted into the new form.
    """
    cart = session.get("cart", {})
    if isinstance(cart, list):
        cart = session["cart"] = {item: cart.count(item) for item in dict.fromkeys(cart)}
    return t.cast("dict[str, int]", cart)


def _short(value: str, head: int = 8, tail: int = 4) -> str:
    return f"{value[:head]}…{value[-tail:]}"


def _browser_side() -> dict[str, t.Any]:
    """What the browser holds: the cookie, and nothing but the ID in it."""
    app = current_app
    sid = session.sid
    expires = app.session_interface.get_expiration_time(app, session)
    return {
        "name": app.config["SESSION_COOKIE_NAME"],
        "value": _short(sid),
        "length": len(sid),
        "expires": _when(expires.timestamp()) if expires else "when the browser closes",
        "httponly": app.config["SESSION_COOKIE_HTTPONLY"],
        "samesite": app.config["SESSION_COOKIE_SAMESITE"],
        "secure": app.config["SESSION_COOKIE_SECURE"],
    }


def _server_side(sid: str) -> dict[str, t.Any]:
    """What the server holds for this ID: the record, where and how big."""
    extension = current_app.extensions["serverside"]
    store = extension.store  # the app's SessionStore: backend, prefix, limits
    key = store.key(sid)  # the prefix and the SHA-256 of the ID
    info: dict[str, t.Any] = {
        # The extension's public API: the stored data of a live session.
        "record": extension.get(sid),
        "key": f"{key[:-64]}{_short(key[-64:], 12, 4)}",
        "backend": type(store.backend).__name__,
    }
    record = store.backend.load(key)  # a Record(data, expires), or None
    if record is not None:
        info.update(expires=_when(record.expires), stored_bytes=len(record.data))
    directory = getattr(store.backend, "directory", None)
    if isinstance(directory, str):
        info.update(_file_of(directory, key))
    return info


def _file_of(directory: str, key: str) -> dict[str, t.Any]:
    """The record's file: in the shard named by the key's last two hex
    digits, its name ends with the key's hash (docs/filesystem.rst)."""
    shard = os.path.join(directory, key[-2:])
    try:
        names = [n for n in os.listdir(shard) if n.endswith(key[-64:])]
    except OSError:
        return {}
    if not names:
        return {}
    path = os.path.join(shard, names[0])
    stat = os.stat(path)
    shown = os.path.join(os.path.relpath(shard, directory), _short(names[0], 24, 4))
    relative = os.path.relpath(directory)  # to the current directory
    return {
        "file": os.path.join(directory if relative.startswith("..") else relative, shown),
        "file_path": path,
        "file_bytes": stat.st_size,
        "disk_bytes": stat.st_blocks * 512,
        "mode": f"0o{stat.st_mode & 0o777:o}",
    }


def _when(timestamp: float) -> str:
    moment = datetime.fromtimestamp(timestamp, timezone.utc)
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")
