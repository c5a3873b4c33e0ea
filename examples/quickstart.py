"""flask_serverside's quickstart: a complete app in one file.

Save it as ``app.py`` and run ``flask run``, or from the
repository root: ``flask --app examples/quickstart.py run``.
"""

from flask import Flask
from flask import redirect
from flask import request
from flask import session
from flask import url_for
from markupsafe import escape

from flask_serverside import ServerSide

app = Flask(__name__)
# Sessions are now files in app.instance_path/sessions.
ServerSide(app)

LOGIN_FORM = """
<form method="post" action="/login">
  <input name="name" placeholder="Your name" required>
  <button>Log in</button>
</form>
"""

LOGOUT_FORM = """
<form method="post" action="/logout">
  <button>Log out</button>
</form>
"""


@app.get("/")
def index():
    if "name" not in session:
        return "You are not logged in." + LOGIN_FORM
    name = escape(session["name"])  # user input: escape it
    return f"Logged in as {name}." + LOGOUT_FORM


@app.post("/login")
def login():
    session["name"] = request.form["name"]
    session.regenerate()  # a new ID on login: no session fixation
    return redirect(url_for("index"))


@app.post("/logout")
def logout():
    session.destroy()  # the data, its record and the cookie
    return redirect(url_for("index"))
