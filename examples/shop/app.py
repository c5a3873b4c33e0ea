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

    return app
