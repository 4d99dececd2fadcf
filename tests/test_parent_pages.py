"""Parents' pages through the real views: answering per child, idempotence, history, the due
date, CSRF, reminders and broadcasts. Real database, real services, Django's test client."""

from __future__ import annotations

import datetime as dt
import re
import zoneinfo

import pytest
from django.test import Client
from django.utils import timezone

from notifications import dispatch
from notifications.models import Delivery, DeliveryStatus, Mailing
from slips.models import ReminderRound, Response, ResponseChange, Slip
from slips.services import slip_reminders_set
from slips.tokens import delivery_token
from slips.views import THANK_YOU
from tests import factories

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("web_settings")]


def _url(delivery: Delivery) -> str:
    return f"/p/{delivery_token(delivery_id=delivery.pk)}/"


def _checked(page: str, student_id: int) -> str | None:
    """Which radio ("yes"/"no") is preselected for a student, if any."""
    for tag in re.findall(rf"<input[^>]*name=\"consent_{student_id}\"[^>]*>", page):
        if "checked" in tag:
            return re.search(r'value="(\w+)"', tag).group(1)
    return None


def test_one_page_answers_for_both_children(school, client):
    [delivery], (ava, ben), [parent], slip = factories.family_slip_dispatched(
        school=school, free_text_question="Any allergies?"
    )
    url = _url(delivery)
    page = client.get(url).content.decode()
    assert slip.consent_question in page and "Any allergies?" in page
    assert page.count('name="consent_') == 4  # yes and no, for each child
    response = client.post(
        url,
        {
            f"consent_{ava.pk}": "yes",
            f"answer_{ava.pk}": "  Peanuts  ",
            f"consent_{ben.pk}": "no",
            f"answer_{ben.pk}": "",
        },
    )
    assert response.status_code == 302 and response["Location"] == url  # Post/Redirect/Get
    follow = client.get(url).content.decode()
    assert THANK_YOU in follow
    rows = {r.student_id: r for r in Response.objects.filter(slip=slip)}
    assert rows[ava.pk].consent is True and rows[ava.pk].answer == "Peanuts"
    assert rows[ben.pk].consent is False
    assert {r.guardian_id for r in rows.values()} == {parent.pk}
    assert parent.pk in delivery.guardian_ids
    assert _checked(follow, ava.pk) == "yes" and _checked(follow, ben.pk) == "no"
    assert "Peanuts" in follow
    # The thank-you is shown once, not on every later visit.
    assert THANK_YOU not in client.get(url).content.decode()


def test_answering_one_child_now_and_the_other_later(school, client):
    [delivery], (ava, ben), *_ = factories.family_slip_dispatched(school=school)
    url = _url(delivery)
    assert client.post(url, {f"consent_{ava.pk}": "yes"}).status_code == 302
    assert list(Response.objects.values_list("student_id", flat=True)) == [ava.pk]
    page = client.get(url).content.decode()
    assert _checked(page, ava.pk) == "yes" and _checked(page, ben.pk) is None


def test_an_empty_submission_records_nothing_and_says_why(school, client):
    [delivery], (ava, _), _, _ = factories.family_slip_dispatched(
        school=school, free_text_question="Notes?"
    )
    url = _url(delivery)
    response = client.post(url, {})
    assert response.status_code == 400
    assert "choose yes or no for at least one child" in response.content.decode()
    response = client.post(url, {f"answer_{ava.pk}": "a note but no yes or no"})
    assert response.status_code == 400
    assert f"Please choose yes or no for {ava.full_name}" in response.content.decode()
    assert not Response.objects.exists()


def test_double_submit_two_tabs_and_two_guardians_make_one_response_each(school):
    deliveries, (ava, ben), _, slip = factories.family_slip_dispatched(school=school, guardians=2)
    assert len(deliveries) == 2  # two addresses, two deliveries, the same two children
    form = {f"consent_{ava.pk}": "yes", f"consent_{ben.pk}": "yes"}
    tab1, tab2, other_parent = Client(), Client(), Client()
    for browser in (tab1, tab1, tab2):  # a double click, then a second tab
        assert browser.post(_url(deliveries[0]), form).status_code == 302
    assert other_parent.post(_url(deliveries[1]), form).status_code == 302
    assert Response.objects.filter(slip=slip).count() == 2
    assert ResponseChange.objects.count() == 2  # identical repeats add no history
    assert set(Response.objects.values_list("student_id", flat=True)) == {ava.pk, ben.pk}


def test_change_of_mind_before_the_due_date_keeps_history(school, client):
    deliveries, (ava, _), (mum, dad), slip = factories.family_slip_dispatched(
        school=school, guardians=2
    )
    client.post(_url(deliveries[0]), {f"consent_{ava.pk}": "yes"})
    Client().post(_url(deliveries[1]), {f"consent_{ava.pk}": "no"})
    response = Response.objects.get(slip=slip, student=ava)
    assert response.consent is False
    history = list(response.changes.order_by("answered_at", "pk"))
    assert [c.consent for c in history] == [True, False]
    # Each answer is recorded under the guardian whose link was used.
    answered_by = [c.guardian_id for c in history]
    assert answered_by == [deliveries[0].guardian_ids[0], deliveries[1].guardian_ids[0]]
    assert set(answered_by) == {mum.pk, dad.pk}
    assert _checked(client.get(_url(deliveries[0])).content.decode(), ava.pk) == "no"


def test_after_the_due_date_the_page_is_read_only_and_post_is_refused(school, client):
    [delivery], (ava, ben), _, slip = factories.family_slip_dispatched(
        school=school, free_text_question="Notes?"
    )
    url = _url(delivery)
    client.post(url, {f"consent_{ava.pk}": "yes", f"answer_{ava.pk}": "Bring a hat"})
    Slip.objects.filter(pk=slip.pk).update(due_at=timezone.now() - dt.timedelta(hours=1))
    page = client.get(url)
    assert page.status_code == 200
    text = page.content.decode()
    assert "<form" not in text and "csrfmiddlewaretoken" not in text
    assert "due date for this slip has passed" in text
    assert "Recorded answer: <strong>Yes</strong>" in text and "Bring a hat" in text
    assert "No answer was recorded." in text  # Ben
    refused = client.post(url, {f"consent_{ava.pk}": "no", f"consent_{ben.pk}": "no"})
    assert refused.status_code == 409
    assert "due date for this slip has passed" in refused.content.decode()
    response = Response.objects.get(slip=slip, student=ava)
    assert response.consent is True and response.changes.count() == 1
    assert not Response.objects.filter(student=ben).exists()


def test_post_needs_the_csrf_token(school):
    [delivery], (ava, _), _, _ = factories.family_slip_dispatched(school=school)
    url = _url(delivery)
    browser = Client(enforce_csrf_checks=True)
    page = browser.get(url).content.decode()
    assert browser.post(url, {f"consent_{ava.pk}": "yes"}).status_code == 403
    assert not Response.objects.exists()
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page).group(1)
    response = browser.post(url, {f"consent_{ava.pk}": "yes", "csrfmiddlewaretoken": token})
    assert response.status_code == 302
    assert Response.objects.filter(student=ava, consent=True).exists()


def _no_quiet_hours(school) -> None:
    school.quiet_hours_start = school.quiet_hours_end = dt.time(0, 0)
    school.save()


def _reminder_round(slip) -> list[Delivery]:
    [rr] = slip_reminders_set(slip=slip, days_before_due=[2])
    ReminderRound.objects.filter(pk=rr.pk).update(send_at=timezone.now())
    [mailing_id] = dispatch.dispatch_due()
    assert Mailing.objects.get(pk=mailing_id).kind == Mailing.Kind.REMINDER
    return list(Delivery.objects.filter(mailing_id=mailing_id).order_by("pk"))


def test_a_reminder_link_opens_the_same_slip_and_answers_it(school, client):
    _no_quiet_hours(school)
    [first], (ava, ben), _, slip = factories.family_slip_dispatched(
        school=school, due_at=timezone.now() + dt.timedelta(5)
    )
    client.post(_url(first), {f"consent_{ava.pk}": "yes"})
    [reminder] = _reminder_round(slip)
    assert reminder.student_ids == [ben.pk]  # only the unanswered child is reminded about
    page = client.get(_url(reminder)).content.decode()
    assert slip.title in page and slip.consent_question in page
    assert ben.full_name in page and ava.full_name not in page
    assert client.post(_url(reminder), {f"consent_{ben.pk}": "no"}).status_code == 302
    assert Response.objects.get(slip=slip, student=ben).consent is False
    reminder.refresh_from_db()
    assert reminder.opened_at is not None


def test_an_answer_cancels_that_familys_pending_reminder(school, client):
    _no_quiet_hours(school)
    kids_a, _ = factories.make_family(school=school, children=2)
    kids_b, _ = factories.make_family(school=school)
    audience = factories.make_audience(school=school, whole_school=False, students=kids_a + kids_b)
    slip = factories.make_slip(
        school=school, audience=audience, due_at=timezone.now() + dt.timedelta(days=5)
    )
    first = {tuple(d.student_ids): d for d in factories.dispatched_deliveries(slip)}
    reminders = {tuple(sorted(d.student_ids)): d for d in _reminder_round(slip)}
    rem_a = reminders[tuple(sorted(k.pk for k in kids_a))]
    rem_b = reminders[(kids_b[0].pk,)]
    link_a = _url(first[tuple(sorted(k.pk for k in kids_a))])
    client.post(link_a, {f"consent_{kids_a[0].pk}": "yes"})
    rem_a.refresh_from_db()
    assert rem_a.status == DeliveryStatus.PENDING  # one child still unanswered
    client.post(link_a, {f"consent_{kids_a[1].pk}": "yes"})
    rem_a.refresh_from_db()
    rem_b.refresh_from_db()
    assert rem_a.status == DeliveryStatus.CANCELLED
    assert rem_b.status == DeliveryStatus.PENDING  # another family's reminder is untouched


def test_due_date_is_shown_in_the_schools_time_zone(school, client):
    due = dt.datetime(2031, 3, 14, 4, 0, tzinfo=dt.UTC)  # 3 pm in Sydney (daylight time)
    [delivery], *_ = factories.family_slip_dispatched(school=school, due_at=due)
    page = client.get(_url(delivery)).content.decode()
    local = due.astimezone(zoneinfo.ZoneInfo("Australia/Sydney"))
    assert local.hour == 15
    assert f"{local:%A} 14 March 2031, 3:00 PM" in page
    assert "Australia/Sydney" in page


def test_broadcast_page_shows_school_title_and_escaped_body(school, client):
    factories.make_family(school=school)
    broadcast = factories.make_broadcast(
        school=school,
        title="Sports day",
        body="First paragraph <script>alert(1)</script>\nsame paragraph\n\nSecond paragraph",
    )
    [delivery] = factories.dispatched_deliveries(broadcast)
    response = client.get(_url(delivery))
    page = response.content.decode()
    assert response.status_code == 200
    assert school.name in page and "Sports day" in page
    assert "<p>First paragraph &lt;script&gt;alert(1)&lt;/script&gt;<br>same paragraph</p>" in page
    assert "<p>Second paragraph</p>" in page
    assert "<script" not in page and "<form" not in page
    assert client.post(_url(delivery), {}).status_code == 405
    delivery.refresh_from_db()
    assert delivery.opened_at is not None
