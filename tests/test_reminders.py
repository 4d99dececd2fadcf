"""Reminder rounds: who they target, cancellation by an answer, and quiet hours."""

from __future__ import annotations

import datetime as dt
import zoneinfo

import pytest
from django.utils import timezone

from notifications import batch, dispatch, selectors, sweep
from notifications.controls import message_cancel
from notifications.models import Delivery, DeliveryStatus, Mailing
from slips.models import ReminderRound, SendStatus
from slips.responses import response_record
from slips.services import message_schedule, slip_reminders_set
from tests import factories
from tests.invariants import assert_exactly_once

pytestmark = pytest.mark.django_db(transaction=True)
S = DeliveryStatus


def _sent_slip(school, smtp):
    fam_a = factories.make_family(school=school, children=2)  # answers for one child only
    fam_b = factories.make_family(school=school)  # answers
    fam_c = factories.make_family(school=school)  # never answers
    slip = factories.make_slip(school=school, due_at=timezone.now() + dt.timedelta(days=5))
    message_schedule(message=slip, send_at=timezone.now())
    dispatch.dispatch_due()
    batch.batch_send()
    slip.refresh_from_db()
    return slip, fam_a, fam_b, fam_c


def _make_round_due(slip):
    [rr] = slip_reminders_set(slip=slip, days_before_due=[2])
    ReminderRound.objects.filter(pk=rr.pk).update(send_at=timezone.now())
    return rr


def _no_quiet_hours(school):
    school.quiet_hours_start = school.quiet_hours_end = dt.time(0, 0)
    school.save()


def test_round_targets_only_unanswered_children(school, smtp, redis_client):
    _no_quiet_hours(school)
    slip, (kids_a, _), (kids_b, _), (kids_c, _) = _sent_slip(school, smtp)
    response_record(slip=slip, student=kids_a[0], consent=True)
    response_record(slip=slip, student=kids_b[0], consent=False)
    rr = _make_round_due(slip)
    [mailing_id] = dispatch.dispatch_due()
    rows = {tuple(sorted(d.student_ids)) for d in Delivery.objects.filter(mailing_id=mailing_id)}
    assert rows == {(kids_a[1].pk,), (kids_c[0].pk,)}
    batch.batch_send()
    sweep.sweep()
    rr.refresh_from_db()
    assert rr.status == ReminderRound.Status.SENT
    reminders = [a for a in smtp.accepted if a.subject.startswith("Reminder:")]
    assert len(reminders) == 2
    assert_exactly_once(smtp.accepted)


def test_answer_cancels_the_familys_pending_reminder_in_the_same_transaction(
    school, smtp, redis_client
):
    _no_quiet_hours(school)
    slip, (kids_a, _), _, (kids_c, _) = _sent_slip(school, smtp)
    _make_round_due(slip)
    [mailing_id] = dispatch.dispatch_due()
    response_record(slip=slip, student=kids_c[0], consent=True)
    d_c = Delivery.objects.get(mailing_id=mailing_id, student_ids__contains=[kids_c[0].pk])
    assert d_c.status == S.CANCELLED
    # A family with two children still gets the reminder until both are answered.
    response_record(slip=slip, student=kids_a[0], consent=True)
    d_a = Delivery.objects.get(mailing_id=mailing_id, student_ids__contains=[kids_a[0].pk])
    assert d_a.status == S.PENDING
    response_record(slip=slip, student=kids_a[1], consent=False)
    d_a.refresh_from_db()
    assert d_a.status == S.CANCELLED


def test_quiet_hours_hold_a_round_until_morning(school, smtp, redis_client):
    slip, *_ = _sent_slip(school, smtp)
    local_now = timezone.now().astimezone(zoneinfo.ZoneInfo(school.time_zone))
    # A quiet window around the school's current local time: it is "night" there now.
    school.quiet_hours_start = (local_now - dt.timedelta(hours=1)).time()
    school.quiet_hours_end = (local_now + dt.timedelta(hours=1)).time()
    school.save()
    assert selectors.in_quiet_hours(school=school)
    _make_round_due(slip)
    [mailing_id] = dispatch.dispatch_due()
    before = len(smtp.accepted)
    assert batch.batch_send(mailing_id=mailing_id).claimed == 0
    assert len(smtp.accepted) == before
    # Morning comes: the window no longer covers now.
    school.quiet_hours_start = (local_now + dt.timedelta(hours=2)).time()
    school.quiet_hours_end = (local_now + dt.timedelta(hours=3)).time()
    school.save()
    assert not selectors.in_quiet_hours(school=school)
    assert batch.batch_send(mailing_id=mailing_id).sent == 3
    # The first send of a slip ignores quiet hours; only reminder rounds wait.
    assert Mailing.objects.get(slip=slip, round=0).kind == Mailing.Kind.SLIP


def test_round_after_due_date_or_cancel_sends_nothing(school, smtp, redis_client):
    _no_quiet_hours(school)
    slip, *_ = _sent_slip(school, smtp)
    rr = _make_round_due(slip)
    message_cancel(message=slip)
    rr.refresh_from_db()
    assert rr.status == ReminderRound.Status.CANCELLED
    assert dispatch.dispatch_due() == []
    slip2, *_ = _sent_slip(school, smtp)
    rr2 = _make_round_due(slip2)
    type(slip2).objects.filter(pk=slip2.pk).update(due_at=timezone.now())
    assert dispatch.dispatch_due() == []
    rr2.refresh_from_db()
    assert rr2.status == ReminderRound.Status.CANCELLED
    assert slip2.status in (SendStatus.SENDING, SendStatus.SENT)


def test_reminders_need_future_times(school):
    slip = factories.make_slip(school=school, due_at=timezone.now() + dt.timedelta(days=1))
    from django.core.exceptions import ValidationError

    with pytest.raises(ValidationError):
        slip_reminders_set(slip=slip, days_before_due=[3])
    rounds = slip_reminders_set(slip=slip, days_before_due=[0])
    assert [r.number for r in rounds] == [1]
