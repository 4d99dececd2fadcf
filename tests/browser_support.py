"""What the headless-Chromium tests share: the browser, and a live server serving plain HTTP.

Debian's chromium and chromedriver (apt-get install chromium chromium-driver; no browser
download works here), driven by Selenium, against pytest-django's live server helper.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
WAIT_SECONDS = 20

#: ``pytestmark`` of a browser test module: marked, and skipped where Chromium is missing.
BROWSER_MARKS = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
        reason="needs Debian's chromium and chromium-driver (/usr/bin/chromium, "
        "/usr/bin/chromedriver): apt-get install chromium chromium-driver",
    ),
]


@contextmanager
def chromium(profile: Path, *, size: tuple[int, int], scrollbars: bool = True) -> Iterator[Any]:
    """A headless Chromium of ``size`` (width, height) with its own profile directory."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    flags = [
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
        f"--window-size={size[0]},{size[1]}",
    ]
    if not scrollbars:
        flags.append("--hide-scrollbars")
    for flag in flags:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(WAIT_SECONDS)
    driver.set_script_timeout(WAIT_SECONDS * 3)
    try:
        yield driver
    finally:
        driver.quit()


@contextmanager
def live_site(settings: Any) -> Iterator[Any]:
    """pytest-django's live server, started after the settings it serves are in place.

    Django's SecurityMiddleware reads SECURE_SSL_REDIRECT once, when the server builds its
    handler; the session-wide ``live_server`` may already have been built with production's
    HTTPS redirect, which a plain-HTTP browser cannot follow. So each test starts its own
    instance of the same helper (transactional database, real threaded WSGI server), once
    plain HTTP, cookies without the Secure flag and static files without a collectstatic
    manifest are configured, and points the links in emails at it.
    """
    from pytest_django.live_server_helper import LiveServer

    settings.SECURE_SSL_REDIRECT = False
    settings.SESSION_COOKIE_SECURE = False
    settings.CSRF_COOKIE_SECURE = False
    settings.ALLOWED_HOSTS = [*settings.ALLOWED_HOSTS, "localhost"]
    settings.STORAGES = {
        **settings.STORAGES,
        "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
    }
    server = LiveServer("localhost")
    settings.SITE_URL = server.url
    try:
        yield server
    finally:
        server.stop()
