"""The ops commands: sending, delivery_report, resolve_unknown (their interface is a contract)."""

from __future__ import annotations

import json
from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from notifications import batch
from notifications.models import Delivery, DeliveryEvent, DeliveryStatus, Mailing, SendingSwitch
from slips.models import School, SendStatus
from tests import factories

pytestmark = pytest.mark.django_db
S = DeliveryStatus


def run(*args: str) -> str:
    out = StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


def _dispatched(school, families=3):
    b, mailing_id = factories.broadcast_dispatched(school=school, families=families)
    return b, Mailing.objects.get(pk=mailing_id)


def test_global_pause_and_resume(redis_client):
    assert "paused globally" in run("sending", "pause", "--reason", "incident 42")
    assert SendingSwitch.objects.get(pk=1).paused
    status = json.loads(run("sending", "status", "--json"))
    assert status["global_paused"] and status["global_reason"] == "incident 42"
    run("sending", "resume")
    assert not SendingSwitch.objects.get(pk=1).paused


def test_school_pause(school, redis_client):
    run("sending", "pause", "--school", school.slug)
    assert School.objects.get(pk=school.pk).sending_paused
    assert school.slug in run("sending", "status")
    run("sending", "resume", "--school", school.slug)
    assert not School.objects.get(pk=school.pk).sending_paused
    with pytest.raises(CommandError, match="No school"):
        run("sending", "pause", "--school", "nope")


def test_message_pause_by_mailing_or_source_ref(school, redis_client):
    b, mailing = _dispatched(school)
    assert f"broadcast:{b.pk} paused" in run(
        "sending", "pause", "--message", f"mailing:{mailing.pk}"
    )
    b.refresh_from_db()
    mailing.refresh_from_db()
    assert (b.status, mailing.status) == (SendStatus.PAUSED, Mailing.Status.PAUSED)
    run("sending", "resume", "--message", f"broadcast:{b.pk}")
    mailing.refresh_from_db()
    assert mailing.status == Mailing.Status.SENDING
    with pytest.raises(CommandError, match="no mailing with id"):
        run("sending", "pause", "--message", "mailing:999999")


@pytest.mark.django_db(transaction=True)
def test_delivery_report_counts(school, smtp, redis_client):
    _, mailing = _dispatched(school, families=4)
    batch.batch_send(limit=3)
    report = json.loads(run("delivery_report", "--message", f"mailing:{mailing.pk}", "--json"))
    assert report["totals"][S.SENT] == 3 and report["totals"][S.PENDING] == 1
    [row] = report["mailings"]
    assert (row["mailing"], row["handle"]) == (mailing.pk, f"mailing:{mailing.pk}")
    assert row["message"] == f"broadcast:{mailing.broadcast_id}"
    text = run("delivery_report")
    [line] = [line for line in text.splitlines() if line.startswith(f"mailing:{mailing.pk} ")]
    assert f"broadcast:{mailing.broadcast_id}" in line and "total" in text


def test_resolve_unknown_records_who_decided(school, redis_client):
    _, mailing = _dispatched(school, families=2)
    Delivery.objects.filter(mailing=mailing).update(status=S.UNKNOWN, last_error="stalled")
    handle = f"mailing:{mailing.pk}"
    out = run("resolve_unknown", "--message", handle, "--mark-failed", "--actor", "amy")
    assert "Resolved 2" in out
    assert set(Delivery.objects.values_list("status", flat=True)) == {S.FAILED}
    assert DeliveryEvent.objects.filter(actor="amy", to_status=S.FAILED).count() == 2
    assert "No unknown" in run("resolve_unknown", "--message", handle, "--mark-sent")


@pytest.mark.django_db(transaction=True)
def test_resolve_unknown_resend_goes_out_again_with_same_message_id(school, smtp, redis_client):
    _, mailing = _dispatched(school, families=1)
    batch.batch_send()
    d = Delivery.objects.get()
    Delivery.objects.filter(pk=d.pk).update(status=S.UNKNOWN, last_error="stalled")
    smtp.handler.reset()
    run("resolve_unknown", "--message", f"mailing:{mailing.pk}", "--resend")
    batch.batch_send()
    d.refresh_from_db()
    assert d.status == S.SENT
    assert [a.message_id for a in smtp.accepted] == [d.message_id_header]
