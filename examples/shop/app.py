"""A tiny shop that keeps its session on the server with flask_serverside.

Run it from the repository root::

    flask --app examples/shop/app.py run --host 127.0.0.1 --port 5000

Sessions are files under ``examples/shop/instance/sessions``; the browser
only holds a random session ID, so a restart of the server keeps the carts.
"""

from __future__ import annotations

import os
import typing as t
from datetime import datetime
from datetime import timezone

from flask import abort
from flask import current_app
from flask import Flask
from flask import redirect
from flask import render_template
from flask import request
from flask import session
from flask import url_for

from flask_serverside import ServerSide

HERE = os.path.dirname(os.path.abspath(__file__))

#: The catalogue: product ID -> (name, price in cents).
PRODUCTS: dict[str, tuple[str, int]] = {
    "tea": ("Green tea, 100 g", 450),
    "mug": ("Enamel mug", 1200),
    "honey": ("Wildflower honey", 790),
    "biscuits": ("Oat biscuits", 320),
}


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
                # New ID, same data (the cart is kept): an ID someone planted
                # before the login is worthless afterwards.
                session.regenerate()
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
