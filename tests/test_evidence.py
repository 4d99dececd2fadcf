"""Evidence per recipient: each try, its time, Message-ID, provider id, the server's reply and
the provider's later reports, on an admin page and as CSV (and from ``delivery_evidence``).

The tries are made by the real pipeline in-process against the test SMTP server: a refusal
then an acceptance, a timeout after DATA settled by a person, a suppressed address skipped at
fan-out.
"""

from __future__ import annotations

import csv
import datetime as dt
import io

import pytest
from django.core.management import call_command
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from notifications import batch, controls, dispatch, sweep
from notifications.models import Delivery, DeliveryStatus, Mailing, ProviderEvent
from slips.services import message_schedule
from tests import factories

S = DeliveryStatus
pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("web_settings")]


def _drain(rounds: int = 10) -> None:
    for _ in range(rounds):
        if not batch.batch_send().claimed:
            break


def _broadcast(school, families: int) -> tuple[object, int]:
    for _ in range(families):
        factories.make_family(school=school)
    broadcast = factories.make_broadcast(school=school)
    message_schedule(message=broadcast, send_at=timezone.now())
    [mailing_id] = dispatch.dispatch_due()
    return broadcast, mailing_id


def _staff(school, **kwargs) -> Client:
    client = Client()
    client.force_login(factories.make_staff(school=school, **kwargs))
    return client


def _csv(response) -> list[dict[str, str]]:
    body = b"".join(response.streaming_content).decode("utf-8").lstrip("\ufeff")
    return list(csv.DictReader(io.StringIO(body)))


def _settle_three_ways(school, smtp, settings) -> tuple[int, list[Delivery]]:
    settings.EMAIL_TIMEOUT = 0.5
    _, mailing_id = _broadcast(school, families=3)
    busy, lost, plain = Delivery.objects.filter(mailing_id=mailing_id).order_by("pk")
    # ``busy`` is refused once, then accepted on its retry.
    smtp.behaviour.fail_first = 1
    Delivery.objects.filter(pk__in=[lost.pk, plain.pk]).update(
        next_attempt_at=timezone.now() + dt.timedelta(hours=1)
    )
    _drain()
    busy.refresh_from_db()
    assert busy.status == S.RETRY_WAIT
    Delivery.objects.filter(pk=busy.pk).update(next_attempt_at=timezone.now())
    _drain()
    # ``lost``: the server takes the body and never answers; a person then settles it.
    Delivery.objects.filter(pk=lost.pk).update(next_attempt_at=None)
    smtp.behaviour.stall = 1.5
    _drain()
    smtp.behaviour.stall = 0
    assert Delivery.objects.get(pk=lost.pk).status == S.UNKNOWN
    assert controls.unknowns_resolve(delivery_ids=[lost.pk], resolution="sent", actor="office@x")
    # ``plain`` goes through at once.
    Delivery.objects.filter(pk=plain.pk).update(next_attempt_at=None)
    _drain()
    sweep.sweep()
    rows = list(Delivery.objects.filter(mailing_id=mailing_id).order_by("pk"))
    assert [d.status for d in rows] == [S.SENT, S.SENT, S.SENT]
    return mailing_id, rows


def test_the_csv_tells_each_recipients_story_in_order(school, smtp, settings, redis_client):
    mailing_id, (busy, lost, plain) = _settle_three_ways(school, smtp, settings)
    client = _staff(school)
    got = _csv(client.get(reverse("admin:notifications_mailing_evidence_csv", args=[mailing_id])))
    by = {}
    for row in got:
        by.setdefault(row["recipient"], []).append(row)
    assert set(by) == {busy.email, lost.email, plain.email}

    steps = [r["step"] for r in by[busy.email]]
    assert steps[0].startswith("refused for now")
    assert "450" in by[busy.email][0]["reply_or_reason"]
    assert steps[-1] == "accepted by the mail server"
    accepted = by[busy.email][-1]
    assert accepted["message_id"] == busy.message_id_header
    assert accepted["message_id"].startswith(f"<edsmart.delivery.{busy.pk}@")
    assert accepted["provider_id"] == busy.provider_id != ""
    assert accepted["time_utc"] == busy.sent_at.astimezone(dt.UTC).isoformat(timespec="seconds")
    times = [r["time_utc"] for r in by[busy.email]]
    assert times == sorted(times)

    lost_steps = by[lost.email]
    assert any(
        "outcome unknown" in r["step"] and "after DATA" in r["reply_or_reason"] for r in lost_steps
    )
    settled = [r for r in lost_steps if r["step"].startswith("settled as sent")]
    assert len(settled) == 1 and settled[0]["by"] == "office@x"
    # The person's settling is the only acceptance: no plain "accepted" step is invented.
    assert not any(r["step"].startswith("accepted") for r in lost_steps)

    assert [r["step"] for r in by[plain.email] if r["step"].startswith("accepted")] == [
        "accepted by the mail server"
    ]


def test_a_duplicate_is_called_one(school, smtp, redis_client):
    _, mailing_id = _broadcast(school, families=1)
    _drain()
    d = Delivery.objects.get(mailing_id=mailing_id)
    Delivery.objects.filter(pk=d.pk).update(accepted=2)  # as the duplicate check would see it
    out = io.StringIO()
    call_command("delivery_evidence", f"mailing:{mailing_id}", stdout=out)
    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert any("2 acceptances" in r["step"] and "DUPLICATE" in r["step"] for r in rows)


def test_a_suppressed_address_says_why_it_was_not_sent(school, smtp, redis_client):
    _, [parent] = factories.make_family(school=school)
    parent.suppressed_at = timezone.now()
    parent.suppressed_reason = "hard bounce: mailbox does not exist"
    parent.save()
    factories.make_family(school=school)
    _, mailing_id = _broadcast(school, families=0)
    _drain()
    out = io.StringIO()
    call_command("delivery_evidence", f"mailing:{mailing_id}", "--email", parent.email, stdout=out)
    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert len(rows) == 1
    assert rows[0]["status_now"] == S.SKIPPED
    assert rows[0]["step"].startswith("not sent")
    assert "hard bounce" in rows[0]["reply_or_reason"]


def test_the_providers_later_reports_are_in_the_story(school, smtp, redis_client):
    _, mailing_id = _broadcast(school, families=2)
    _drain()
    bounced, fine = Delivery.objects.filter(mailing_id=mailing_id).order_by("pk")
    ProviderEvent.objects.create(
        delivery=bounced,
        school=school,
        esp="Postmark",
        event_type="bounced",
        kind=ProviderEvent.Kind.HARD_BOUNCE,
        reason="550 5.1.1 =cmd|' /C calc'!A0 user unknown",
        email=bounced.email,
        provider_message_id="pm-123",
        occurred_at=timezone.now(),
        outcome="recorded",
    )
    client = _staff(school)
    page = client.get(
        reverse("admin:notifications_mailing_evidence", args=[mailing_id]), {"q": bounced.email}
    )
    assert page.status_code == 200
    html = page.content.decode()
    assert bounced.email in html and fine.email not in html
    assert "provider reported" in html and "pm-123" in html
    assert page.context["items"][0].steps[-1].by == "provider event (Postmark)"
    csv_url = page.context["csv_url"]
    rows = _csv(client.get(csv_url))
    assert {r["recipient"] for r in rows} == {bounced.email}
    [report] = [r for r in rows if r["step"].startswith("provider reported")]
    # A provider's text that a spreadsheet would run as a formula is quoted as text.
    assert report["reply_or_reason"].startswith("550")
    rows = _csv(client.get(reverse("admin:notifications_mailing_evidence_csv", args=[mailing_id])))
    assert {r["recipient"] for r in rows} == {bounced.email, fine.email}


def test_formula_cells_are_quoted(school, smtp, redis_client):
    kid = factories.make_student(school=school)
    factories.make_guardian(school=school, students=[kid], email="=cmd@example.org")
    _, mailing_id = _broadcast(school, families=0)
    _drain()
    rows = _csv(
        _staff(school).get(reverse("admin:notifications_mailing_evidence_csv", args=[mailing_id]))
    )
    assert rows and all(r["recipient"] == "'=cmd@example.org" for r in rows)


def test_another_schools_evidence_is_404_and_a_teacher_may_read_their_own(
    school, other_school, smtp, redis_client
):
    _, mailing_id = _broadcast(school, families=1)
    _drain()
    for name in ("notifications_mailing_evidence", "notifications_mailing_evidence_csv"):
        url = reverse(f"admin:{name}", args=[mailing_id])
        assert _staff(other_school).get(url).status_code == 404
        assert _staff(school, role="teacher").get(url).status_code == 200
        assert _staff(school).post(url).status_code == 405


def test_the_page_reads_a_fixed_number_of_queries_for_any_page_size(school, smtp, redis_client):
    """Events and provider reports are read once per page, not once per recipient."""
    _, small = _broadcast(school, families=2)
    _, large = _broadcast(school, families=40)
    _drain(rounds=20)
    client = _staff(school)

    def queries(mailing_id: int) -> int:
        with CaptureQueriesContext(connection) as ctx:
            page = client.get(reverse("admin:notifications_mailing_evidence", args=[mailing_id]))
            assert page.status_code == 200
        return len(ctx)

    assert queries(large) == queries(small)


def test_the_command_takes_a_slip_with_its_reminder_rounds(school, smtp, redis_client):
    deliveries, _, [parent], slip = factories.family_slip_dispatched(school=school)
    _drain()
    second = Mailing.objects.create(
        school=school, kind=Mailing.Kind.REMINDER, slip=slip, round=1, subject="r", body="r"
    )
    Delivery.objects.create(
        mailing=second, school=school, email=parent.email, email_normalized=parent.email.lower()
    )
    out = io.StringIO()
    call_command("delivery_evidence", f"slip:{slip.pk}", stdout=out)
    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert {r["mailing"] for r in rows} == {
        f"mailing:{deliveries[0].mailing_id}",
        f"mailing:{second.pk}",
    }
    waiting = [r for r in rows if r["mailing"] == f"mailing:{second.pk}"]
    assert waiting[0]["step"] == "nothing yet: waiting to be sent"
