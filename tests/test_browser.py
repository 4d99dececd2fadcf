"""A parent answers a slip in a real browser, starting from the email the SMTP server caught.

Headless Chromium (Debian's chromium and chromedriver, driven by Selenium) against
pytest-django's live server (see ``site``): the slip goes through the real pipeline
in-process, the link is taken from the email's text part, both children are answered on the
page, and the staff admin then shows both answers.
"""

from __future__ import annotations

import email
import re

import pytest
from django.contrib.auth import get_user_model
from django.utils import timezone

from notifications import batch, dispatch
from slips.models import Response
from slips.services import message_schedule
from slips.views import THANK_YOU
from tests import factories
from tests.browser_support import BROWSER_MARKS, WAIT_SECONDS, chromium, live_site

pytestmark = BROWSER_MARKS


@pytest.fixture
def browser(tmp_path):
    # A phone-sized window: the parents' page must work there.
    with chromium(tmp_path / "chromium-profile", size=(412, 915)) as driver:
        yield driver


@pytest.fixture
def site(settings, transactional_db):
    with live_site(settings) as server:
        yield server


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


@pytest.mark.django_db(transaction=True)
def test_staff_schedule_a_reminder_then_import_a_roster_after_fixing_its_error(
    site, redis_client, browser, tmp_path
):
    """Staff (a school admin, not ops) in the admin: a slip's Reminders page schedules a round;
    then the students list's "Import roster" takes a file with an error (shown by its line),
    the fixed file, its preview and the confirmation."""
    import datetime as dt

    from selenium.webdriver.common.by import By

    from slips.models import Group, ReminderRound, Student

    school = factories.make_school(slug="browser-roster", name="Hillside Primary")
    factories.make_family(school=school)
    slip = factories.make_slip(
        school=school, title="Zoo excursion", due_at=timezone.now() + dt.timedelta(days=5)
    )
    message_schedule(message=slip, send_at=timezone.now() + dt.timedelta(hours=1))
    Group.objects.create(school=school, name="3A", kind=Group.Kind.CLASS)
    factories.make_staff(school=school, username="office-admin")

    browser.get(f"{site.url}/admin/login/?next=/admin/slips/slip/{slip.pk}/reminders/")
    browser.find_element(By.ID, "id_username").send_keys("office-admin")
    browser.find_element(By.ID, "id_password").send_keys("pw-for-tests-only")
    browser.find_element(By.CSS_SELECTOR, "input[type=submit]").click()
    _wait_for_text(browser, "Schedule a reminder")
    days = browser.find_element(By.ID, "id_days_before")
    days.clear()
    days.send_keys("2")
    browser.find_element(By.CSS_SELECTOR, "#reminder-form input[type=submit]").click()
    _wait_for_text(browser, "Reminder 1 scheduled")
    [reminder] = ReminderRound.objects.filter(slip=slip)
    slip.refresh_from_db()
    assert reminder.send_at == slip.due_at - dt.timedelta(days=2)

    header = "student_external_id,student_first_name,student_last_name,groups,guardian_name,"
    header += "guardian_email"
    wrong = tmp_path / "roster.csv"
    wrong.write_text(
        f"{header}\nB1,Ava,Lee,3A,Kim Lee,kim@example.org\nB2,Ben,Lee,3B,Kim Lee,kim@example.org\n",
        encoding="utf-8",
    )
    browser.get(f"{site.url}/admin/slips/student/")
    browser.find_element(By.ID, "roster-import-link").click()
    _wait_for_text(browser, "Roster CSV")
    browser.find_element(By.ID, "id_file").send_keys(str(wrong))
    browser.find_element(By.ID, "roster-upload").click()
    _wait_for_text(browser, "line 3: unknown group '3B'")
    assert "Nothing will be imported until you fix these." in browser.page_source
    assert not Student.objects.filter(school=school, external_id__startswith="B").exists()

    fixed = tmp_path / "roster-fixed.csv"
    fixed.write_text(wrong.read_text().replace(",3B,", ",3A,"), encoding="utf-8")
    browser.find_element(By.ID, "upload-again").click()
    _wait_for_text(browser, "Roster CSV")
    browser.find_element(By.ID, "id_file").send_keys(str(fixed))
    browser.find_element(By.ID, "roster-upload").click()
    _wait_for_text(browser, "Students: 2 to add")
    assert "Kim Lee" in browser.find_element(By.ID, "roster-guardians-added").text
    browser.find_element(By.CSS_SELECTOR, "#roster-confirm input[type=submit]").click()
    _wait_for_text(browser, "The roster was imported.")

    imported = Student.objects.filter(school=school, external_id__startswith="B")
    assert {(s.first_name, s.last_name) for s in imported} == {("Ava", "Lee"), ("Ben", "Lee")}
    assert {g.name for s in imported for g in s.guardians.all()} == {"Kim Lee"}
