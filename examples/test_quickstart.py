"""The quickstart (``examples/quickstart.py``, shown in docs/quickstart.rst)
runs as written: the test copies the file, as a user would, and uses it."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import typing as t
from pathlib import Path

import pytest
from flask import Flask

HERE = Path(__file__).parent
QUICKSTART = HERE / "quickstart.py"
DOCS = HERE.parent / "docs"


@pytest.fixture()
def app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Flask:
    """The quickstart saved as ``app.py`` in an empty project folder."""
    shutil.copy(QUICKSTART, tmp_path / "app.py")
    spec = importlib.util.spec_from_file_location("quickstart_app", tmp_path / "app.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # Flask finds the instance folder through the module, as with `flask run`.
    monkeypatch.setitem(sys.modules, "quickstart_app", module)
    spec.loader.exec_module(module)
    app: Flask = module.app
    return app


def session_files(app: Flask) -> list[str]:
    root = os.path.join(app.instance_path, "sessions")
    return [n for _, _, names in os.walk(root) for n in names if not n.startswith(".")]


def test_quickstart_login_and_logout(app: Flask, tmp_path: Path) -> None:
    assert app.instance_path == str(tmp_path / "instance")
    client = app.test_client()

    page = client.get("/")
    assert "You are not logged in." in page.text
    assert "Set-Cookie" not in page.headers  # an empty session is not stored
    assert session_files(app) == []

    response = client.post("/login", data={"name": "<Ada>"})
    assert response.status_code == 302
    first = client.get_cookie("session")
    assert first is not None
    assert "Logged in as &lt;Ada&gt;." in client.get("/").text
    assert len(session_files(app)) == 1
    with app.app_context():
        assert app.extensions["serverside"].get(first.value) == {"name": "<Ada>"}

    response = client.post("/logout")
    assert response.status_code == 302
    assert client.get_cookie("session") is None
    assert session_files(app) == []
    assert "You are not logged in." in client.get("/").text


def test_login_regenerates_the_id(app: Flask) -> None:
    client = app.test_client()
    client.post("/login", data={"name": "ada"})
    cookie = client.get_cookie("session")
    assert cookie is not None
    client.post("/login", data={"name": "grace"})
    again = client.get_cookie("session")
    assert again is not None and again.value != cookie.value
    with app.app_context():
        assert app.extensions["serverside"].get(cookie.value) is None


def _blocks(rst: str, language: str) -> t.Iterator[list[str]]:
    """The lines of each ``.. code-block:: <language>`` in ``rst``."""
    lines = rst.splitlines()
    for i, line in enumerate(lines):
        if line.strip() == f".. code-block:: {language}":
            directive = len(line) - len(line.lstrip())
            block = []
            for body in lines[i + 1 :]:
                if body.strip() and len(body) - len(body.lstrip()) <= directive:
                    break
                block.append(body)
            yield block


#: Characters of a code line that the docs' theme shows without scrolling.
CODE_WIDTH = 66


@pytest.mark.parametrize(
    "page",
    ["index", "quickstart", "installation", "testing", "troubleshooting", "comparison"],
)
@pytest.mark.parametrize("language", ["python", "text"])
def test_docs_code_fits_without_scrolling(page: str, language: str) -> None:
    rst = (DOCS / f"{page}.rst").read_text(encoding="utf-8")
    for block in _blocks(rst, language):
        indent = min(len(line) - len(line.lstrip()) for line in block if line.strip())
        for line in block:
            assert len(line.rstrip()) - indent <= CODE_WIDTH, line


def test_quickstart_lines_are_short() -> None:
    for line in QUICKSTART.read_text(encoding="utf-8").splitlines():
        assert len(line) <= CODE_WIDTH, line


def test_the_docs_show_this_file() -> None:
    rst = (DOCS / "quickstart.rst").read_text(encoding="utf-8")
    assert ".. literalinclude:: ../examples/quickstart.py" in rst
