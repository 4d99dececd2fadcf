"""Staff's first screen in a real browser: a 2,000-recipient broadcast's progress on the home
page, a slip's preview, a test sent to oneself with the keyboard, and axe-core on each page.

Headless Chromium (Debian's chromium and chromedriver, driven by Selenium) against a live
server, as in tests/test_browser.py. The broadcast really goes through the pipeline: dispatched
(2,000 delivery rows), then claimed and sent batch after batch to the test SMTP server by a
thread while the page polls. axe-core 4.4 comes with axe-core-python (its bundled axe.min.js,
no download); a page passes with no "critical" or "serious" violation.

``EDSMART_SCREENSHOTS=1`` saves docs/staff-home.png (during the send) and docs/preview.png.
"""

from __future__ import annotations

import datetime as dt
import email
import json
import os
import threading
import time
from pathlib import Path

import pytest
from django.contrib.auth import get_user_model
from django.db import connection
from django.utils import timezone

from notifications import batch, dispatch
from notifications.models import Delivery, Mailing
from notifications.sweep import mailings_complete
from slips.models import Guardian, Membership, Student
from slips.responses import response_record
from slips.services import message_schedule
from tests import factories
from tests.browser_support import BROWSER_MARKS, WAIT_SECONDS, chromium, live_site

FAMILIES = 2000
DOCS = Path(__file__).resolve().parent.parent / "docs"
PASSWORD = "staff-browser-pw-1"

pytestmark = BROWSER_MARKS


@pytest.fixture
def browser(tmp_path):
    # A laptop: the lists must fit without sideways scrolling.
    with chromium(tmp_path / "chromium-profile", size=(1366, 768), scrollbars=False) as driver:
        yield driver


@pytest.fixture
def site(settings, transactional_db):
    """A live server of its own (see ``tests.browser_support.live_site``), with parents' and
    preview links pointing at it; MD5 passwords so that logging in costs nothing."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    with live_site(settings) as server:
        yield server


def _families(school, n: int) -> None:
    """``n`` families of one child and one guardian each, in three statements."""
    students = Student.objects.bulk_create(
        Student(school=school, first_name=f"Kid{i}", last_name="Browser", year_level="4")
        for i in range(n)
    )
    guardians = Guardian.objects.bulk_create(
        Guardian(
            school=school,
            name=f"Parent {i}",
            email=f"family{i}@example.net",
            email_normalized=f"family{i}@example.net",
        )
        for i in range(n)
    )
    Guardian.students.through.objects.bulk_create(
        Guardian.students.through(guardian_id=g.pk, student_id=s.pk)
        for g, s in zip(guardians, students, strict=True)
    )


def _wait(driver, condition, what: str, timeout: float = WAIT_SECONDS):
    from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(
            driver, timeout, ignored_exceptions=(StaleElementReferenceException,)
        ).until(condition)
    except TimeoutException:
        raise AssertionError(f"timed out waiting for {what} at {driver.current_url}") from None


def _body(driver) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.TAG_NAME, "body").text


def _axe_serious(driver, *, iframes: bool = True) -> list[str]:
    """axe-core's critical and serious violations on the current page."""
    from axe_core_python.base import AXE_SCRIPT  # axe.min.js, read from the package

    driver.execute_script(AXE_SCRIPT)
    results = driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "axe.run(document, JSON.parse(arguments[0])).then(done);",
        json.dumps({"iframes": iframes}),
    )
    return [
        f"{v['id']} ({v['impact']}): {v['help']} at {[n['target'] for n in v['nodes']][:3]}"
        for v in results["violations"]
        if v["impact"] in ("critical", "serious")
    ]


def _overflow(driver) -> int:
    """How many pixels the page is wider than the window (0: no sideways scrolling)."""
    return driver.execute_script("return document.documentElement.scrollWidth - window.innerWidth;")


def _screenshot(driver, name: str) -> None:
    if os.environ.get("EDSMART_SCREENSHOTS") == "1":
        driver.save_screenshot(str(DOCS / name))


class Sender(threading.Thread):
    """Sends the broadcast in batches, as workers do, a little slower than it could, so that
    the page sees it move. Each batch claims, sends and records through the real pipeline."""

    def __init__(self, mailing_id: int) -> None:
        super().__init__(daemon=True)
        self.mailing_id = mailing_id
        self.error: BaseException | None = None
        self.go = threading.Event()

    def run(self) -> None:
        try:
            self.go.wait(WAIT_SECONDS)
            while batch.batch_send(mailing_id=self.mailing_id, limit=100).claimed:
                time.sleep(0.2)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc
        finally:
            connection.close()


@pytest.mark.django_db(transaction=True)
def test_staff_watch_a_broadcast_send_preview_a_slip_and_test_it_to_themselves(
    site, smtp, redis_client, browser
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    school = factories.make_school(slug="hillside", name="Hillside Primary")
    _families(school, FAMILIES)
    staff = get_user_model().objects.create_user(
        "ms.lee", "lee@hillside.example", PASSWORD, is_staff=True
    )
    Membership.objects.create(user=staff, school=school, role=Membership.Role.TEACHER)
    # Yesterday's slip to a class of three (answered by one family), and next week's.
    class_3b = list(Student.objects.filter(school=school).order_by("pk")[10:13])
    sent_slip = factories.make_slip(
        school=school,
        audience=factories.make_audience(school=school, whole_school=False, students=class_3b),
        title="Library visit",
    )
    slip_mailing = factories.dispatch_now(sent_slip)
    batch.batch_send(mailing_id=slip_mailing)
    mailings_complete()
    sent_slip.refresh_from_db()
    response_record(
        slip=sent_slip,
        student=class_3b[0],
        consent=True,
        answer="",
        guardian=class_3b[0].guardians.get(),
    )
    message_schedule(
        message=factories.make_slip(school=school, title="Athletics carnival"),
        send_at=timezone.now() + dt.timedelta(days=6),
    )
    broadcast = factories.make_broadcast(school=school, title="Swimming carnival moved")
    message_schedule(message=broadcast, send_at=timezone.now())
    [mailing_id] = dispatch.dispatch_due()
    assert Delivery.objects.filter(mailing_id=mailing_id).count() == FAMILIES

    # Log in: the home page is the first screen.
    browser.get(f"{site.url}/admin/login/")
    browser.find_element(By.ID, "id_username").send_keys("ms.lee")
    browser.find_element(By.ID, "id_password").send_keys(PASSWORD)
    browser.find_element(By.CSS_SELECTOR, "input[type=submit]").click()
    _wait(browser, lambda d: "Sending now" in _body(d), "the home page")
    assert "EdSmart · Hillside Primary" in _body(browser)
    assert "Django administration" not in browser.page_source
    bar = browser.find_element(By.CSS_SELECTOR, f"article[data-mailing='{mailing_id}'] progress")
    assert int(bar.get_attribute("value")) == 0
    assert int(bar.get_attribute("max")) == FAMILIES

    # The pipeline sends while the page polls; the bar moves by itself up to done.
    sender = Sender(mailing_id)
    sender.start()
    sender.go.set()
    seen: list[int] = []
    shot = False
    deadline = time.monotonic() + 45
    while time.monotonic() < deadline:
        value = int(
            browser.find_element(
                By.CSS_SELECTOR, f"article[data-mailing='{mailing_id}'] progress"
            ).get_attribute("value")
        )
        if not seen or value != seen[-1]:
            seen.append(value)
        if not shot and FAMILIES * 0.2 < value < FAMILIES * 0.9:
            eta = browser.find_element(
                By.CSS_SELECTOR, f"article[data-mailing='{mailing_id}'] .edsmart-eta"
            )
            assert "a minute" in eta.text and "left" in eta.text, eta.text
            _screenshot(browser, "staff-home.png")
            shot = True
        if value == FAMILIES:
            break
        time.sleep(0.3)
    sender.join(WAIT_SECONDS)
    assert sender.error is None, sender.error
    assert seen[0] == 0 and seen[-1] == FAMILIES, seen
    assert len([v for v in seen if 0 < v < FAMILIES]) >= 2, f"the bar jumped: {seen}"
    mailings_complete()
    article = f"article[data-mailing='{mailing_id}']"
    _wait(
        browser,
        lambda d: "Finished." in d.find_element(By.CSS_SELECTOR, article).text,
        "the broadcast to show as finished",
        timeout=45,
    )
    assert (
        f"{FAMILIES:,} of {FAMILIES:,} sent" in browser.find_element(By.CSS_SELECTOR, article).text
    )

    # The home page: accessible, no sideways scrolling at laptop width nor at 200 % zoom.
    home = _body(browser)
    assert "Library visit · 33% answered (1 yes, 0 no, 2 not yet, of 3)" in home
    assert "Athletics carnival · Slip" in home
    assert _axe_serious(browser) == []
    assert _overflow(browser) <= 0
    # The mailing and delivery lists fit the laptop screen too.
    for path in (
        "/admin/notifications/mailing/",
        f"/admin/notifications/delivery/?mailing__id__exact={mailing_id}",
    ):
        browser.get(f"{site.url}{path}")
        _wait(browser, lambda d: d.find_elements(By.ID, "result_list"), f"the list {path}")
        assert _overflow(browser) <= 0, path
    browser.set_window_size(683, 768)  # 1366 px at 200 % zoom
    browser.get(f"{site.url}/admin/")
    _wait(browser, lambda d: "Sending now" in _body(d), "the home page, zoomed")
    assert _overflow(browser) <= 0
    browser.set_window_size(1366, 768)

    # A draft slip: its preview, from its page, before it is scheduled.
    kids = list(Student.objects.filter(school=school).order_by("pk")[:1])
    audience = factories.make_audience(school=school, whole_school=False, students=kids)
    slip = factories.make_slip(
        school=school,
        audience=audience,
        title="Museum excursion",
        body="We visit the museum on Friday.",
        consent_question="May your child come to the museum?",
    )
    browser.get(f"{site.url}/admin/slips/slip/{slip.pk}/change/")
    browser.find_element(By.ID, "edsmart-preview-link").click()
    _wait(browser, lambda d: "Send a test to me" in _body(d), "the preview")
    assert browser.find_element(By.ID, "edsmart-subject").text == "Museum excursion"
    assert (
        "This slip is for: Kid0 Browser." in browser.find_element(By.ID, "edsmart-email-text").text
    )
    browser.switch_to.frame(browser.find_element(By.ID, "edsmart-answer-frame"))
    _wait(browser, lambda d: "May your child come to the museum?" in _body(d), "the answer page")
    assert "Preview." in _body(browser)
    browser.switch_to.default_content()
    _screenshot(browser, "preview.png")
    assert _axe_serious(browser, iframes=False) == []
    assert _overflow(browser) <= 0
    browser.set_window_size(683, 768)
    assert _overflow(browser) <= 0
    browser.set_window_size(1366, 768)

    # "Send a test to me", with the keyboard alone: Tab to the button, Enter.
    browser.find_element(By.TAG_NAME, "body").click()
    for _ in range(80):
        browser.switch_to.active_element.send_keys(Keys.TAB)
        if browser.switch_to.active_element.get_attribute("id") == "edsmart-send-test":
            break
    else:
        raise AssertionError("the test button cannot be reached with Tab")
    sent_before = len(smtp.accepted)
    browser.switch_to.active_element.send_keys(Keys.ENTER)
    _wait(browser, lambda d: "accepted by the mail server" in _body(d), "the test's outcome")
    [test_copy] = smtp.accepted[sent_before:]
    assert test_copy.rcpt == "lee@hillside.example"
    msg = email.message_from_bytes(test_copy.raw)
    assert msg["Subject"] == "[TEST] Museum excursion"
    # Not one of the slip's sends (it has none yet), nor of the broadcast's.
    assert not Mailing.objects.filter(slip=slip).exists()
    assert Delivery.objects.filter(mailing__broadcast=broadcast).count() == FAMILIES
    assert not Delivery.objects.filter(email="lee@hillside.example").exists()
    assert sorted(a.rcpt for a in smtp.accepted[:sent_before]) == sorted(
        [f"family{i}@example.net" for i in range(FAMILIES)]
        + [f"family{i}@example.net" for i in range(10, 13)]
    )
