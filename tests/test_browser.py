"""A parent answers a slip in a real browser, starting from the email the SMTP server caught.

Headless Chromium (Debian's chromium and chromedriver, driven by Selenium) against
pytest-django's live server (see ``site``): the slip goes through the real pipeline
in-process, the link is taken from the email's text part, both children are answered on the
page, and the staff admin then shows both answers.
"""

from __future__ import annotations

import email
import re
from pathlib import Path

import pytest
from django.contrib.auth import get_user_model
from django.utils import timezone

from notifications import batch, dispatch
from slips.models import Response
from slips.services import message_schedule
from slips.views import THANK_YOU
from tests import factories

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
WAIT_SECONDS = 20

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
        reason="needs Debian's chromium and chromium-driver (/usr/bin/chromium, "
        "/usr/bin/chromedriver): apt-get install chromium chromium-driver",
    ),
]


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--window-size=412,915",  # a phone-sized window: the page must work there
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(WAIT_SECONDS)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def site(settings, transactional_db):
    """pytest-django's live server, started after the settings it serves are in place.

    Django's SecurityMiddleware reads SECURE_SSL_REDIRECT once, when the server builds its
    handler; the session-wide ``live_server`` may already have been built with production's
    HTTPS redirect, which a plain-HTTP browser cannot follow. So this test starts its own
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


def _link_from_email(raw: bytes) -> str:
    msg = email.message_from_bytes(raw)
    [text] = [p for p in msg.walk() if p.get_content_type() == "text/plain"]
    [link] = re.findall(r"https?://\S+/p/\S+/", text.get_payload(decode=True).decode())
    return link


def _wait_for_text(driver, text: str) -> None:
    from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        # A submit navigates: the body found before the new page loads goes stale under us.
        WebDriverWait(
            driver, WAIT_SECONDS, ignored_exceptions=(StaleElementReferenceException,)
        ).until(lambda d: text in d.find_element(By.TAG_NAME, "body").text)
    except TimeoutException:
        body = driver.find_element(By.TAG_NAME, "body").text
        raise AssertionError(f"{text!r} not shown at {driver.current_url}:\n{body}") from None


@pytest.mark.django_db(transaction=True)
def test_parent_answers_for_two_children_from_the_email_and_admin_shows_it(
    site, smtp, redis_client, browser
):
    from selenium.webdriver.common.by import By

    school = factories.make_school(slug="browser-school", name="Hillside Primary")
    ava = factories.make_student(school=school, first_name="Ava", last_name="Nguyen")
    ben = factories.make_student(school=school, first_name="Ben", last_name="Nguyen")
    factories.make_guardian(school=school, students=[ava, ben], email="family@example.net")
    slip = factories.make_slip(
        school=school,
        title="Aquarium excursion",
        body="We are visiting the aquarium.\n\nPlease answer for each child.",
        consent_question="May your child come to the aquarium?",
        free_text_question="Anything we should know?",
    )
    message_schedule(message=slip, send_at=timezone.now())
    dispatch.dispatch_due()
    batch.batch_send()
    [accepted] = smtp.accepted
    assert accepted.rcpt == "family@example.net"
    link = _link_from_email(accepted.raw)
    assert link.startswith(site.url + "/p/")

    browser.get(link)
    _wait_for_text(browser, "May your child come to the aquarium?")
    assert "Aquarium excursion" in browser.title
    assert Response.objects.count() == 0  # opening the page recorded nothing
    browser.find_element(By.ID, f"id_consent_{ava.pk}_0").click()  # yes
    browser.find_element(By.ID, f"id_answer_{ava.pk}").send_keys("Asthma puffer in her bag")
    browser.find_element(By.ID, f"id_consent_{ben.pk}_1").click()  # no
    browser.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    _wait_for_text(browser, THANK_YOU)
    assert browser.current_url == link  # Post/Redirect/Get: back on the page itself
    assert browser.find_element(By.ID, f"id_consent_{ava.pk}_0").is_selected()
    assert browser.find_element(By.ID, f"id_consent_{ben.pk}_1").is_selected()

    answers = {r.student_id: (r.consent, r.answer) for r in Response.objects.all()}
    assert answers == {ava.pk: (True, "Asthma puffer in her bag"), ben.pk: (False, "")}

    get_user_model().objects.create_superuser("ops", "ops@example.org", "browser-test-pw-1")
    browser.get(f"{site.url}/admin/login/?next=/admin/slips/response/")
    browser.find_element(By.ID, "id_username").send_keys("ops")
    browser.find_element(By.ID, "id_password").send_keys("browser-test-pw-1")
    browser.find_element(By.CSS_SELECTOR, "input[type=submit]").click()
    _wait_for_text(browser, "Asthma puffer in her bag")
    rows = {
        row.find_element(By.CSS_SELECTOR, "td.field-student, th.field-student").text: row
        for row in browser.find_elements(By.CSS_SELECTOR, "#result_list tbody tr")
    }
    assert set(rows) == {"Ava Nguyen", "Ben Nguyen"}
    consent = {
        name: row.find_element(By.CSS_SELECTOR, ".field-consent img").get_attribute("alt")
        for name, row in rows.items()
    }
    assert consent == {"Ava Nguyen": "True", "Ben Nguyen": "False"}
    assert "Aquarium excursion" in rows["Ava Nguyen"].text
