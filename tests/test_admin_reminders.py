"""Reminders in the admin: staff schedule, see, cancel and send reminder rounds of a slip.

Through Django's test client as staff of the school; the reminder sent "now" goes through the
real dispatcher and a batch to the test SMTP server.
"""

from __future__ import annotations

import datetime as dt
import zoneinfo

import pytest
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from notifications import batch, dispatch, sweep
from notifications.models import Delivery, Mailing
from slips.models import ReminderRound, SendStatus
from slips.responses import response_record
from slips.services import message_schedule
from tests import factories
from tests.invariants import assert_exactly_once

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("web_settings")]


def _url(slip, view: str = "reminders", *args: object) -> str:
    return reverse(f"admin:slips_slip_{view}", args=[slip.pk, *args])


def _staff(school, **kwargs) -> Client:
    client = Client()
    client.force_login(factories.make_staff(school=school, **kwargs))
    return client


def _messages(response) -> list[str]:
    return [str(m) for m in response.context["messages"]] if response.context else []


def _scheduled_slip(school, *, due_in_days: float = 5):
    factories.make_family(school=school)
    slip = factories.make_slip(
        school=school, due_at=timezone.now() + dt.timedelta(days=due_in_days)
    )
    message_schedule(message=slip, send_at=timezone.now() + dt.timedelta(hours=1))
    slip.refresh_from_db()
    return slip


def test_staff_schedule_reminders_days_before_the_due_date_or_at_a_time(school):
    school.time_zone = "Australia/Sydney"
    school.save()
    slip = _scheduled_slip(school)
    client = _staff(school)
    page = client.post(
        _url(slip), {"when": "days_before", "days_before": "2", "send_at": ""}, follow=True
    )
    assert "Reminder 1 scheduled" in " ".join(_messages(page))
    first = ReminderRound.objects.get(slip=slip, number=1)
    assert first.send_at == slip.due_at - dt.timedelta(days=2)

    sydney = zoneinfo.ZoneInfo("Australia/Sydney")
    local = (slip.due_at - dt.timedelta(days=1)).astimezone(sydney).replace(second=0, microsecond=0)
    client.post(_url(slip), {"when": "at", "send_at": local.strftime("%Y-%m-%dT%H:%M")})
    second = ReminderRound.objects.get(slip=slip, number=2)
    assert second.send_at == local  # typed in the school's time, stored as that moment

    listing = client.get(_url(slip))
    assert listing.status_code == 200
    rows = {row.reminder.number: row for row in listing.context["rows"]}
    assert set(rows) == {1, 2} and rows[1].reach == "not sent yet"
    assert (
        reverse("admin:slips_slip_reminders", args=[slip.pk])
        in client.get(reverse("admin:slips_slip_change", args=[slip.pk])).content.decode()
    )


@pytest.mark.parametrize(
    ("data", "error"),
    [
        ({"when": "at", "send_at": "2020-01-01T09:00"}, "is in the past"),
        ({"when": "days_before", "days_before": "30"}, "is in the past"),
        ({"when": "days_before", "days_before": "0"}, "greater than or equal to 1"),
        ({"when": "at", "send_at": ""}, "When should it go?"),
        ({"when": "days_before", "days_before": ""}, "How many days"),
    ],
)
def test_a_bad_time_is_refused_with_a_clear_message_and_nothing_scheduled(school, data, error):
    slip = _scheduled_slip(school)
    page = _staff(school).post(_url(slip), data)
    assert page.status_code == 200 and error in page.content.decode()
    assert not ReminderRound.objects.filter(slip=slip).exists()


def test_a_reminder_after_the_due_date_or_of_a_draft_is_refused(school):
    slip = _scheduled_slip(school, due_in_days=1)
    client = _staff(school)
    local = zoneinfo.ZoneInfo(school.time_zone)
    late = (slip.due_at + dt.timedelta(hours=2)).astimezone(local).strftime("%Y-%m-%dT%H:%M")
    page = client.post(_url(slip), {"when": "at", "send_at": late})
    assert "a reminder must come before that" in page.content.decode()
    draft = factories.make_slip(school=school, due_at=timezone.now() + dt.timedelta(days=3))
    page = client.post(_url(draft, "remind_now"), follow=True)
    assert any("draft slip gets no reminders: schedule it first" in m for m in _messages(page))
    # Paused by staff to stop mail: a reminder is mail.
    type(slip).objects.filter(pk=slip.pk).update(status=SendStatus.PAUSED)
    page = client.post(_url(slip, "remind_now"), follow=True)
    assert any("paused slip gets no reminders." in m for m in _messages(page))
    assert "A paused slip gets no reminders." in client.get(_url(slip)).content.decode()
    assert not ReminderRound.objects.exists()


def test_a_scheduled_reminder_is_cancelled_and_one_already_sending_is_not(school):
    slip = _scheduled_slip(school)
    client = _staff(school)
    for days in ("3", "2"):
        client.post(_url(slip), {"when": "days_before", "days_before": days})
    ReminderRound.objects.filter(slip=slip, number=2).update(status=ReminderRound.Status.SENDING)
    page = client.post(_url(slip, "reminder_cancel", 1), follow=True)
    assert "Reminder 1 cancelled." in _messages(page)
    page = client.post(_url(slip, "reminder_cancel", 2), follow=True)
    assert any("only a scheduled one can be cancelled" in m for m in _messages(page))
    statuses = dict(ReminderRound.objects.filter(slip=slip).values_list("number", "status"))
    assert statuses == {1: ReminderRound.Status.CANCELLED, 2: ReminderRound.Status.SENDING}


def test_remind_now_reaches_each_family_without_an_answer_once(school, smtp, redis_client):
    school.quiet_hours_start = school.quiet_hours_end = dt.time(0, 0)  # no quiet hours
    school.save()
    kids_a, _ = factories.make_family(school=school)
    kids_b, _ = factories.make_family(school=school)
    _, guardians_c = factories.make_family(school=school)
    slip = factories.make_slip(school=school, due_at=timezone.now() + dt.timedelta(days=5))
    message_schedule(message=slip, send_at=timezone.now())
    dispatch.dispatch_due()
    batch.batch_send()
    slip.refresh_from_db()
    response_record(slip=slip, student=kids_a[0], consent=True)
    response_record(slip=slip, student=kids_b[0], consent=False)

    client = _staff(school)
    page = client.post(_url(slip, "remind_now"), follow=True)
    assert any("Reminder 1 of" in m and "goes now" in m for m in _messages(page))
    [mailing_id] = dispatch.dispatch_due()
    assert Mailing.objects.get(pk=mailing_id).kind == Mailing.Kind.REMINDER
    batch.batch_send()
    sweep.sweep()
    reminders = [a for a in smtp.accepted if a.subject.startswith("Reminder:")]
    assert [a.rcpt for a in reminders] == [guardians_c[0].email_normalized]
    assert_exactly_once(smtp.accepted)
    listing = client.get(_url(slip))
    [row] = listing.context["rows"]
    assert row.reminder.status == ReminderRound.Status.SENT and row.reach == "1 sent"
    # The changelist action does the same for every selected slip.
    client.post(
        reverse("admin:slips_slip_changelist"),
        {"action": "remind_now", "_selected_action": [slip.pk]},
    )
    assert ReminderRound.objects.filter(slip=slip).count() == 2
    assert Delivery.objects.filter(mailing_id=mailing_id).count() == 1


def test_another_schools_staff_reach_no_reminder_page_or_action(school, other_school):
    slip = _scheduled_slip(school)
    client = _staff(school)
    client.post(_url(slip), {"when": "days_before", "days_before": "2"})
    stranger = _staff(other_school)
    assert stranger.get(_url(slip)).status_code == 404
    assert stranger.post(_url(slip), {"when": "days_before", "days_before": "1"}).status_code == 404
    assert stranger.post(_url(slip, "remind_now")).status_code == 404
    assert stranger.post(_url(slip, "reminder_cancel", 1)).status_code == 404
    stranger.post(
        reverse("admin:slips_slip_changelist"),
        {"action": "remind_now", "_selected_action": [slip.pk]},
    )
    statuses = list(ReminderRound.objects.filter(slip=slip).values_list("number", "status"))
    assert statuses == [(1, ReminderRound.Status.SCHEDULED)]
    assert slip.status == SendStatus.SCHEDULED
