"""Slips and broadcasts through the staff admin: transitions, validation messages, recipient
counts, delivery counts and log, and the resolution of unknown deliveries.

Everything goes through the Django test client against real PostgreSQL, so what is checked is
what staff would see: the status in the database afterwards and the message on the page.

Over 400 lines on purpose: one file per admin (slips and broadcasts, their transitions
and delivery pages), as tests/ keeps one file per unit.
"""

from __future__ import annotations

import datetime as dt

import pytest
from django.conf import settings as django_settings
from django.contrib.auth import get_user_model
from django.contrib.messages import get_messages
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from notifications.models import (
    Delivery,
    DeliveryEvent,
    DeliveryStatus,
    Mailing,
    SendingSwitch,
)
from slips.models import Broadcast, Guardian, SendStatus, Slip
from tests import factories

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("web_settings")]


@pytest.fixture
def staff(school):
    return factories.make_staff(school=school, username="ms_frizzle")


@pytest.fixture
def client(staff) -> Client:
    client = Client()
    client.force_login(staff)
    return client


@pytest.fixture
def audience(school):
    """Three families, two of which share one address: three distinct recipients."""
    group = factories.make_group(school=school, name="3B")
    factories.make_family(school=school, group=group)
    kids, _ = factories.make_family(school=school, children=2, group=group)
    factories.make_guardian(school=school, students=kids, email="SHARED@example.net")
    other_kid = factories.make_student(school=school)
    factories.make_guardian(school=school, students=[other_kid], email="shared@example.net")
    group.students.add(other_kid)
    return factories.make_audience(school=school, whole_school=False, groups=[group])


@pytest.fixture
def empty_audience(school):
    """Students whose only guardian does not receive email."""
    kid = factories.make_student(school=school)
    factories.make_guardian(school=school, students=[kid], receives_email=False)
    return factories.make_audience(school=school, whole_school=False, students=[kid])


def _messages(response) -> list[str]:
    return [str(m) for m in get_messages(response.wsgi_request)]


def _change_url(obj) -> str:
    return reverse(f"admin:slips_{obj._meta.model_name}_change", args=[obj.pk])


def _transition(client: Client, obj, name: str):
    url = reverse(f"admin:slips_{obj._meta.model_name}_transition", args=[obj.pk, name])
    return client.post(url, follow=True)


def _action(client: Client, model, name: str, ids: list[int]):
    url = reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_changelist")
    return client.post(url, {"action": name, "_selected_action": ids, "index": 0}, follow=True)


def _split(value: dt.datetime | None, name: str) -> dict[str, str]:
    if value is None:
        return {f"{name}_0": "", f"{name}_1": ""}
    value = value.astimezone(dt.UTC)
    return {f"{name}_0": value.strftime("%Y-%m-%d"), f"{name}_1": value.strftime("%H:%M:%S")}


def _slip_form(slip: Slip, **changes: object) -> dict[str, object]:
    data = {
        "title": slip.title,
        "body": slip.body,
        "consent_question": slip.consent_question,
        "free_text_question": slip.free_text_question,
        "audience": slip.audience_id or "",
        "send_at": slip.send_at,
        "due_at": slip.due_at,
    }
    data.update(changes)
    post = {k: v for k, v in data.items() if k not in ("send_at", "due_at")}
    post.update(_split(data["send_at"], "send_at"))
    post.update(_split(data["due_at"], "due_at"))
    return post


def _soon(hours: float = 1) -> dt.datetime:
    return (timezone.now() + dt.timedelta(hours=hours)).replace(microsecond=0)


# --- transitions -----------------------------------------------------------------------------


def test_schedule_pause_resume_cancel_with_the_change_page_buttons(school, audience, client):
    slip = factories.make_slip(school=school, audience=audience, send_at=_soon())

    page = client.get(_change_url(slip))
    assert b'data-transition="schedule"' in page.content
    assert b'data-transition="pause"' not in page.content

    response = _transition(client, slip, "schedule")
    slip.refresh_from_db()
    assert slip.status == SendStatus.SCHEDULED
    assert any("Scheduled" in m and "to 3 addresses" in m for m in _messages(response))
    assert b'data-transition="pause"' in response.content

    _transition(client, slip, "pause")
    slip.refresh_from_db()
    assert slip.status == SendStatus.PAUSED

    response = _transition(client, slip, "resume")
    slip.refresh_from_db()
    assert slip.status == SendStatus.SCHEDULED  # not yet dispatched, so back to scheduled
    assert any("Resumed" in m for m in _messages(response))

    _transition(client, slip, "unschedule")
    slip.refresh_from_db()
    assert slip.status == SendStatus.DRAFT

    response = _transition(client, slip, "cancel")
    slip.refresh_from_db()
    assert slip.status == SendStatus.CANCELLED
    assert b'class="historylink" data-transition=' not in response.content  # nothing left


def test_transitions_as_changelist_actions_on_broadcasts(school, audience, client):
    first = factories.make_broadcast(school=school, audience=audience, send_at=_soon())
    second = factories.make_broadcast(school=school, audience=audience, send_at=_soon(2))
    ids = [first.pk, second.pk]

    _action(client, Broadcast, "schedule", ids)
    assert set(Broadcast.objects.values_list("status", flat=True)) == {SendStatus.SCHEDULED}
    _action(client, Broadcast, "pause", ids)
    assert set(Broadcast.objects.values_list("status", flat=True)) == {SendStatus.PAUSED}
    _action(client, Broadcast, "resume", ids)
    assert set(Broadcast.objects.values_list("status", flat=True)) == {SendStatus.SCHEDULED}
    response = _action(client, Broadcast, "cancel", ids)
    assert set(Broadcast.objects.values_list("status", flat=True)) == {SendStatus.CANCELLED}
    assert sum("Cancelled" in m for m in _messages(response)) == 2


def test_pause_and_resume_of_a_message_already_sending_moves_its_mailing(school, audience, client):
    slip = factories.make_slip(
        school=school, audience=audience, status=SendStatus.SENDING, dispatched_at=timezone.now()
    )
    mailing = factories.make_mailing(slip)
    _transition(client, slip, "pause")
    mailing.refresh_from_db()
    assert mailing.status == Mailing.Status.PAUSED
    _transition(client, slip, "resume")
    slip.refresh_from_db()
    mailing.refresh_from_db()
    assert (slip.status, mailing.status) == (SendStatus.SENDING, Mailing.Status.SENDING)


def test_save_and_schedule_button(school, audience, client):
    slip = factories.make_slip(school=school, audience=audience)
    post = _slip_form(slip, send_at=_soon(3), title="Zoo trip")
    response = client.post(_change_url(slip), {**post, "_schedule": "1"}, follow=True)
    slip.refresh_from_db()
    assert (slip.title, slip.status) == ("Zoo trip", SendStatus.SCHEDULED)
    assert any("Scheduled “Zoo trip”" in m for m in _messages(response))


def test_a_refused_transition_is_a_message_naming_the_message_not_a_500(
    school, empty_audience, client
):
    slip = factories.make_slip(school=school, audience=empty_audience, title="Swimming")
    response = _transition(client, slip, "schedule")
    assert response.status_code == 200
    assert (
        "Could not schedule “Swimming”: This audience has no guardian who receives email."
        in _messages(response)
    )
    slip.refresh_from_db()
    assert slip.status == SendStatus.DRAFT

    response = _action(client, Slip, "pause", [slip.pk])
    assert any(
        m.startswith("Could not pause “Swimming”") and "Only a scheduled or sending" in m
        for m in _messages(response)
    )


def test_transition_needs_post_and_the_own_school(school, other_school, audience, client):
    slip = factories.make_slip(school=school, audience=audience)
    url = reverse("admin:slips_slip_transition", args=[slip.pk, "cancel"])
    assert client.get(url).status_code == 405
    foreign = factories.make_slip(school=other_school)
    foreign_url = reverse("admin:slips_slip_transition", args=[foreign.pk, "cancel"])
    assert client.post(foreign_url).status_code == 404
    foreign.refresh_from_db()
    assert foreign.status == SendStatus.DRAFT


# --- validation messages -------------------------------------------------------------------------


def _form_errors(response) -> str:
    assert response.status_code == 200, "the form should be shown again with errors"
    form = response.context["adminform"].form
    return str(form.errors)


def test_send_time_in_the_past(school, audience, client):
    slip = factories.make_slip(school=school, audience=audience)
    past = timezone.now() - dt.timedelta(days=1)
    errors = _form_errors(client.post(_change_url(slip), _slip_form(slip, send_at=past)))
    assert "The send time is in the past." in errors


def test_due_date_before_send_time(school, audience, client):
    slip = factories.make_slip(school=school, audience=audience)
    post = _slip_form(slip, send_at=_soon(48), due_at=_soon(24))
    errors = _form_errors(client.post(_change_url(slip), post))
    assert "The due date must be after the send time." in errors


def test_title_with_a_line_break(school, audience, client):
    slip = factories.make_slip(school=school, audience=audience)
    errors = _form_errors(client.post(_change_url(slip), _slip_form(slip, title="Zoo\ntrip")))
    assert "Must be a single line (no line breaks)." in errors


def test_body_over_the_limit(school, audience, client):
    broadcast = factories.make_broadcast(school=school, audience=audience)
    body = "x" * (django_settings.EDSMART_MAX_BODY_BYTES + 1)
    post = {"title": broadcast.title, "body": body, "audience": audience.pk}
    post.update(_split(None, "send_at"))
    errors = _form_errors(client.post(_change_url(broadcast), post))
    assert "the limit is 100 KB" in errors


def _draft_without_audience(school) -> Slip:
    slip = factories.make_slip(school=school)
    Slip.objects.filter(pk=slip.pk).update(audience=None)
    slip.refresh_from_db()
    return slip


def test_empty_audience(school, empty_audience, client):
    slip = _draft_without_audience(school)
    errors = _form_errors(
        client.post(_change_url(slip), _slip_form(slip, audience=empty_audience.pk))
    )
    assert "This audience has no guardian who receives email." in errors
    slip.refresh_from_db()
    assert slip.audience_id is None


def test_a_valid_draft_saves_and_a_draft_may_wait_for_its_audience(school, audience, client):
    slip = _draft_without_audience(school)
    response = client.post(_change_url(slip), _slip_form(slip, title="Later"))
    assert response.status_code == 302
    slip.refresh_from_db()
    response = client.post(
        _change_url(slip), _slip_form(slip, audience=audience.pk, send_at=_soon())
    )
    assert response.status_code == 302
    slip.refresh_from_db()
    assert (slip.title, slip.audience_id, slip.status) == ("Later", audience.pk, SendStatus.DRAFT)


def test_add_sets_school_and_author(school, audience, client, staff):
    post = {
        "school": school.pk,
        "title": "New one",
        "body": "Hi",
        "consent_question": "OK?",
        "free_text_question": "",
        "audience": audience.pk,
        **_split(_soon(), "send_at"),
        **_split(_soon(72), "due_at"),
    }
    response = client.post(reverse("admin:slips_slip_add"), post)
    assert response.status_code == 302
    slip = Slip.objects.get(title="New one")
    assert (slip.school, slip.created_by, slip.status) == (school, staff, SendStatus.DRAFT)


def test_content_is_read_only_outside_draft(school, audience, client):
    slip = factories.make_slip(
        school=school, audience=audience, status=SendStatus.SCHEDULED, send_at=_soon()
    )
    page = client.get(_change_url(slip))
    assert "title" not in page.context["adminform"].form.fields
    client.post(_change_url(slip), _slip_form(slip, title="Changed after scheduling"))
    slip.refresh_from_db()
    assert slip.title != "Changed after scheduling"


# --- what staff see on the change page -----------------------------------------------------------


def test_recipient_count_is_shown_before_scheduling(school, audience, client):
    slip = factories.make_slip(school=school, audience=audience)
    page = client.get(_change_url(slip)).content.decode()
    # Four guardians, two sharing an address: three distinct addresses.
    assert "3 email addresses would receive it" in page


def _deliveries(mailing: Mailing, statuses: list[str]) -> list[Delivery]:
    return Delivery.objects.bulk_create(
        Delivery(
            mailing=mailing,
            school=mailing.school,
            email=f"p{i}@example.net",
            email_normalized=f"p{i}@example.net",
            status=status,
            tries=1,
            last_error="server said 550 no such user" if status == DeliveryStatus.FAILED else "",
        )
        for i, status in enumerate(statuses)
    )


def test_delivery_counts_and_log_on_the_change_page(school, audience, client):
    slip = factories.make_slip(
        school=school, audience=audience, status=SendStatus.SENDING, dispatched_at=timezone.now()
    )
    mailing = factories.make_mailing(slip)
    _deliveries(
        mailing,
        [DeliveryStatus.SENT] * 3
        + [DeliveryStatus.FAILED, DeliveryStatus.UNKNOWN]
        + [DeliveryStatus.PENDING] * 2,
    )
    page = client.get(_change_url(slip)).content.decode()
    for status, count in (("sent", 3), ("failed", 1), ("unknown-outcome", 1), ("pending", 2)):
        cell = page.split(f'data-status="{status}">', 1)[1].split("</td>", 1)[0]
        assert f">{count}</a>" in cell, (status, cell)
    assert 'data-status="total"' in page
    assert "p3@example.net" in page
    assert "server said 550 no such user" in page
    # Links go to the delivery changelist filtered to this slip, which works.
    link = (
        reverse("admin:notifications_delivery_changelist") + f"?mailing__slip__id__exact={slip.pk}"
    )
    assert link in page
    listing = client.get(link)
    assert listing.status_code == 200
    assert len(listing.context["cl"].result_list) == 7


def test_delivery_log_is_capped(school, audience, client):
    broadcast = factories.make_broadcast(
        school=school, audience=audience, status=SendStatus.SENDING, dispatched_at=timezone.now()
    )
    mailing = factories.make_mailing(broadcast)
    _deliveries(mailing, [DeliveryStatus.PENDING] * 501)
    page = client.get(_change_url(broadcast)).content.decode()
    assert "Showing the first 500 of 501" in page
    assert "p499@example.net" in page
    assert "p500@example.net" not in page


def test_mailing_changelist_counts_per_status(school, audience, client):
    slip = factories.make_slip(school=school, audience=audience)
    mailing = factories.make_mailing(slip, subject="Counting", body="x")
    _deliveries(mailing, [DeliveryStatus.SENT] * 2 + [DeliveryStatus.UNKNOWN])
    response = client.get(reverse("admin:notifications_mailing_changelist"))
    row = response.context["cl"].result_list[0]
    assert (row.columns["n_sent"], row.columns["n_unknown"], row.columns["n_failed"]) == (2, 1, 0)
    html = response.content.decode()
    assert (
        '<td class="field-n_sent">2</td>' in html and '<td class="field-n_unknown">1</td>' in html
    )


# --- unknowns, suppressions and switches ---------------------------------------------------------


@pytest.fixture
def unknowns(school, audience):
    slip = factories.make_slip(
        school=school, audience=audience, status=SendStatus.SENT, dispatched_at=timezone.now()
    )
    mailing = factories.make_mailing(slip, status=Mailing.Status.COMPLETED)
    return _deliveries(mailing, [DeliveryStatus.UNKNOWN] * 3 + [DeliveryStatus.SENT])


@pytest.mark.parametrize(
    ("action", "to_status", "word"),
    [
        ("mark_unknown_sent", DeliveryStatus.SENT, "marked as sent"),
        ("mark_unknown_failed", DeliveryStatus.FAILED, "marked as failed"),
        ("resend_unknown", DeliveryStatus.PENDING, "queued to be sent again"),
    ],
)
def test_unknown_resolution_records_the_staff_username(
    unknowns, client, redis_client, action, to_status, word
):
    first, second, untouched, already_sent = unknowns
    response = _action(client, Delivery, action, [first.pk, second.pk, already_sent.pk])
    assert (
        f"2 unknown deliveries {word}. 1 selected were not in the unknown state and were left "
        "alone." in _messages(response)
    )
    statuses = dict(Delivery.objects.values_list("pk", "status"))
    assert statuses[first.pk] == statuses[second.pk] == to_status
    assert statuses[untouched.pk] == DeliveryStatus.UNKNOWN
    assert statuses[already_sent.pk] == DeliveryStatus.SENT
    events = DeliveryEvent.objects.filter(delivery__in=[first, second])
    assert sorted(events.values_list("delivery_id", "actor", "to_status")) == sorted(
        [(first.pk, "ms_frizzle", to_status), (second.pk, "ms_frizzle", to_status)]
    )
    assert not DeliveryEvent.objects.filter(delivery__in=[untouched, already_sent]).exists()


def test_delivery_admin_is_read_only(unknowns, client):
    delivery = unknowns[0]
    url = reverse("admin:notifications_delivery_change", args=[delivery.pk])
    assert client.get(url).status_code == 200
    client.post(url, {"status": DeliveryStatus.SENT, "email": "x@example.net"})
    delivery.refresh_from_db()
    assert delivery.status == DeliveryStatus.UNKNOWN
    assert client.get(reverse("admin:notifications_delivery_add")).status_code == 403


def test_reactivate_a_suppressed_guardian(school, client):
    guardian = factories.make_guardian(
        school=school, suppressed_at=timezone.now(), suppressed_reason="hard bounce"
    )
    response = _action(client, Guardian, "reactivate", [guardian.pk])
    guardian.refresh_from_db()
    assert (guardian.suppressed_at, guardian.suppressed_reason) == (None, "")
    assert "Reactivated 1 suppressed addresses." in _messages(response)


def test_school_admin_pauses_their_school_through_the_pipeline(school, client):
    from slips.models import School

    _action(client, School, "pause_sending", [school.pk])
    school.refresh_from_db()
    assert school.sending_paused
    _action(client, School, "resume_sending", [school.pk])
    school.refresh_from_db()
    assert not school.sending_paused


def test_global_switch_goes_through_the_pipeline(db, redis_client):
    ops = get_user_model().objects.create_superuser("ops_anna", "ops@example.org", "pw")
    client = Client()
    client.force_login(ops)
    listing = client.get(reverse("admin:notifications_sendingswitch_changelist"))
    assert listing.status_code == 200
    url = reverse("admin:notifications_sendingswitch_change", args=[1])
    response = client.post(url, {"paused": "on", "reason": "provider incident"})
    assert response.status_code == 302
    switch = SendingSwitch.current()
    # changed_by is not a form field: only sending_set_paused sets it.
    assert (switch.paused, switch.changed_by, switch.reason) == (
        True,
        "ops_anna",
        "provider incident",
    )
    _action(client, SendingSwitch, "resume_all", [1])
    assert not SendingSwitch.current().paused


def test_staff_mark_a_broadcast_urgent_and_it_shows_in_the_list(school, audience, client):
    broadcast = factories.make_broadcast(school=school, audience=audience)
    post = {"title": broadcast.title, "body": broadcast.body, "audience": audience.pk}
    post.update(_split(_soon(3), "send_at"))
    response = client.post(_change_url(broadcast), {**post, "urgent": "on", "_schedule": "1"})
    assert response.status_code == 302, _form_errors(response)
    broadcast.refresh_from_db()
    assert broadcast.urgent and broadcast.status == SendStatus.SCHEDULED
    listing = client.get(reverse("admin:slips_broadcast_changelist") + "?urgent__exact=1")
    assert broadcast.title in listing.content.decode()
