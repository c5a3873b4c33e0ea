"""The example shop's "Your devices" page in a real browser.

Two independent headless Chromium instances (two cookie jars) log in as one
user; the first ends the second's session from its devices page, and the
second is logged out on its next click. Every page is saved as a PNG under
the test's ``tmp_path``; a failure lists their paths.

Needs Debian's ``chromium`` and ``chromium-driver`` and the ``selenium``
package (the ``test`` extra). Without them the test skips, or fails under
``CI=true`` / ``--require-servers``. Selenium Manager is never used: the
driver and the browser are the installed ones, so nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import threading
import typing as t
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask
from werkzeug.serving import make_server

if t.TYPE_CHECKING:
    from selenium.webdriver.remote.webdriver import WebDriver
    from selenium.webdriver.remote.webelement import WebElement

SHOP = Path(__file__).parent.parent / "examples" / "shop" / "app.py"
#: Seconds a page may take to load; a wait, never an assertion on timing.
PAGE_TIMEOUT = 20


def _missing(request: pytest.FixtureRequest, reason: str) -> t.NoReturn:
    if request.config.getoption("--require-servers"):
        pytest.fail(f"{reason} (required under CI or --require-servers)")
    pytest.skip(reason)


def _load_shop() -> t.Any:
    spec = importlib.util.spec_from_file_location("flask_serverside_example_shop_browser", SHOP)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture()
def shop_url(tmp_path: Path) -> Iterator[str]:
    """The shop, served by Werkzeug on a random loopback port."""
    app: Flask = _load_shop().create_app(instance_path=str(tmp_path / "instance"))
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join()
        server.server_close()


@pytest.fixture()
def browsers(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[t.Any]:
    """A factory of headless Chromium instances, each with its own profile."""
    chromium = shutil.which("chromium")
    chromedriver = shutil.which("chromedriver")
    if chromium is None or chromedriver is None:
        _missing(request, "chromium or chromedriver is missing (apt install chromium-driver)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _missing(request, "selenium is not installed (pip install -e '.[test]')")

    drivers: list[WebDriver] = []

    def start(name: str) -> WebDriver:
        options = webdriver.ChromeOptions()
        options.binary_location = chromium
        for argument in (
            "--headless=new",
            "--no-sandbox",
            "--disable-dev-shm-usage",
            "--disable-gpu",
            "--window-size=1000,720",
            f"--user-data-dir={tmp_path / ('profile-' + name)}",
        ):
            options.add_argument(argument)
        service = Service(executable_path=chromedriver, log_output=os.devnull)
        driver = webdriver.Chrome(service=service, options=options)
        driver.set_page_load_timeout(PAGE_TIMEOUT)
        drivers.append(driver)
        return driver

    try:
        yield start
    finally:
        for driver in drivers:
            driver.quit()


class Pages:
    """Screenshots of every page visited, to look at and to attach to a failure."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.paths: list[Path] = []

    def shoot(self, driver: WebDriver, name: str) -> None:
        path = self.folder / f"{len(self.paths) + 1:02d}-{name}.png"
        driver.save_screenshot(str(path))
        self.paths.append(path)

    def listing(self) -> str:
        return "Screenshots:\n" + "\n".join(f"  {path}" for path in self.paths)


def click_and_wait(driver: WebDriver, element: WebElement) -> None:
    """Click a link or button and wait until the next page has loaded."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    page = driver.find_element(By.TAG_NAME, "html")
    element.click()
    WebDriverWait(driver, PAGE_TIMEOUT).until(expected_conditions.staleness_of(page))


def log_in(driver: WebDriver, url: str, name: str) -> None:
    from selenium.webdriver.common.by import By

    driver.get(url + "/login")
    driver.find_element(By.NAME, "username").send_keys(name)
    click_and_wait(driver, driver.find_element(By.CSS_SELECTOR, "main form button"))


def test_ending_a_session_from_the_devices_page_logs_the_other_browser_out(
    shop_url: str, browsers: t.Any, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By

    pages = Pages(tmp_path)
    first: WebDriver = browsers("first")
    second: WebDriver = browsers("second")
    try:
        log_in(first, shop_url, "ada")
        pages.shoot(first, "first-logged-in")
        log_in(second, shop_url, "ada")
        pages.shoot(second, "second-logged-in")
        assert "Hi, ada" in second.find_element(By.TAG_NAME, "header").text

        # The first browser opens its devices page from the nav: both sessions.
        click_and_wait(first, first.find_element(By.LINK_TEXT, "Devices"))
        pages.shoot(first, "first-devices-both")
        rows = first.find_elements(By.CSS_SELECTOR, "tr.device")
        assert len(rows) == 2
        current = first.find_elements(By.CSS_SELECTOR, "tr.device.current")
        assert len(current) == 1
        assert "this device" in current[0].text
        (other,) = first.find_elements(By.CSS_SELECTOR, "tr.device:not(.current)")
        assert "this device" not in other.text
        assert "Chrome on Linux" in other.text
        assert "127.0.0.1" in other.text
        assert "Log out everywhere else" in first.page_source

        # It ends the second's session.
        click_and_wait(first, other.find_element(By.TAG_NAME, "button"))
        pages.shoot(first, "first-devices-ended")
        assert "Ended the session of" in first.find_element(By.CLASS_NAME, "notice").text
        assert len(first.find_elements(By.CSS_SELECTOR, "tr.device")) == 1
        assert "You are logged in on this device only." in first.page_source

        # The second browser is logged out on its next click.
        click_and_wait(second, second.find_element(By.LINK_TEXT, "Products"))
        pages.shoot(second, "second-logged-out")
        header = second.find_element(By.TAG_NAME, "header")
        assert "Hi, ada" not in header.text
        assert header.find_elements(By.LINK_TEXT, "Log in")
        assert not header.find_elements(By.LINK_TEXT, "Devices")
        assert second.get_cookie("session") is None

        # The first is still logged in.
        click_and_wait(first, first.find_element(By.LINK_TEXT, "Shop"))
        pages.shoot(first, "first-still-logged-in")
        assert "You are logged in as ada" in first.find_element(By.TAG_NAME, "main").text
    except Exception as exc:
        # The page each browser was on when it failed, then every page.
        pages.shoot(first, "first-at-failure")
        pages.shoot(second, "second-at-failure")
        raise AssertionError(f"{type(exc).__name__}: {exc}\n{pages.listing()}") from exc
