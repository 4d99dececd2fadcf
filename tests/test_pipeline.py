"""The send pipeline, step by step in-process, against real PostgreSQL and a real SMTP server."""

from __future__ import annotations

import datetime as dt
import email
import threading

import pytest
from django.conf import settings
from django.db import connection, connections, transaction
from django.utils import timezone

from notifications import batch, controls, dispatch, sweep, transitions
from notifications.controls import message_cancel, message_pause, message_resume
from notifications.models import Delivery, DeliveryEvent, DeliveryStatus, Mailing, SendingSwitch
from notifications.rendering import message_id_for
from slips.models import SendStatus
from slips.services import message_schedule
from tests import factories
from tests.invariants import assert_exactly_once

S = DeliveryStatus
pytestmark = pytest.mark.django_db(transaction=True)


def _scheduled_broadcast(school, families=5, **kw):
    for _ in range(families):
        factories.make_family(school=school)
    b = factories.make_broadcast(school=school, **kw)
    return message_schedule(message=b, send_at=timezone.now())


def _drain(mailing_id=None, rounds=20):
    for _ in range(rounds):
        if not batch.batch_send(mailing_id=mailing_id).claimed:
            break


def test_broadcast_reaches_each_recipient_once(school, smtp, redis_client):
    b = _scheduled_broadcast(school, families=7)
    [mailing_id] = dispatch.dispatch_due()
    assert dispatch.dispatch_due() == []  # a second dispatcher finds nothing to do
    _drain(mailing_id)
    sweep.sweep()
    counts = assert_exactly_once(smtp.accepted)
    assert counts == {S.SENT: 7}, list(Delivery.objects.values_list("last_error", flat=True))
    b.refresh_from_db()
    assert b.status == SendStatus.SENT
    assert Mailing.objects.get(pk=mailing_id).status == Mailing.Status.COMPLETED
    d = Delivery.objects.filter(mailing_id=mailing_id).first()
    assert d.message_id_header == message_id_for(d.pk)
    assert {m.mail_from for m in smtp.accepted} == {settings.DEFAULT_FROM_EMAIL}


def test_unusual_addresses_take_the_full_rendering_in_the_same_batch(school, smtp, redis_client):
    """Stencils only fill in plain ASCII addresses; an internationalized domain is rendered in
    full (and punycoded for the envelope) in the same batch, and both emails say the same."""
    for address in ("plain@example.org", "parent@bücher.example"):
        factories.make_guardian(
            school=school, students=[factories.make_student(school=school)], email=address
        )
    _scheduled_broadcast(school, families=0)
    dispatch.dispatch_due()
    _drain()
    assert sorted(m.rcpt for m in smtp.accepted) == [
        "parent@xn--bcher-kva.example",
        "plain@example.org",
    ]
    bodies = []
    for accepted in smtp.accepted:
        msg = email.message_from_bytes(accepted.raw)
        assert msg["Message-ID"] == message_id_for(accepted.delivery_id)
        text = msg.get_payload()[0].get_payload(decode=True).decode()
        bodies.append(text.split("\n", 1)[1].split("Read online:")[0])  # after "Dear <name>"
    assert bodies[0] == bodies[1]


def test_siblings_sharing_an_address_get_one_email_naming_both(school, smtp, redis_client):
    kids = [factories.make_student(school=school, first_name=n) for n in ("Ava", "Ben")]
    factories.make_guardian(school=school, students=kids[:1], email="Home@Example.org")
    factories.make_guardian(school=school, students=kids[1:], email="home@example.org")
    slip = factories.make_slip(school=school, body="<script>alert(1)</script> Excursion")
    message_schedule(message=slip, send_at=timezone.now())
    dispatch.dispatch_due()
    _drain()
    assert len(smtp.accepted) == 1
    msg = email.message_from_bytes(smtp.accepted[0].raw)
    parts = {
        p.get_content_type(): p.get_payload(decode=True).decode()
        for p in msg.walk()
        if not p.is_multipart()
    }
    assert "Ava Tester" in parts["text/plain"] and "Ben Tester" in parts["text/plain"]
    assert "<script>" not in parts["text/html"] and "&lt;script&gt;" in parts["text/html"]
    assert msg["From"].startswith(school.name)


def test_fan_out_twice_adds_no_rows(school):
    factories.make_family(school=school, guardians=2)
    b = _scheduled_broadcast(school, families=3)
    [mailing_id] = dispatch.dispatch_due()
    mailing = Mailing.objects.get(pk=mailing_id)
    from slips.audiences import audience_recipients

    before = Delivery.objects.filter(mailing=mailing).count()
    dispatch.deliveries_fan_out(mailing=mailing, recipients=audience_recipients(b.audience))
    assert before == 5
    assert Delivery.objects.filter(mailing=mailing).count() == before


def test_concurrent_dispatch_and_fan_out_make_one_mailing(school):
    _scheduled_broadcast(school, families=30)
    barrier = threading.Barrier(4)
    results = []

    def run():
        barrier.wait()
        try:
            results.append(dispatch.dispatch_due())
        finally:
            connections.close_all()

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(len(r) for r in results) == [0, 0, 0, 1]
    assert Mailing.objects.count() == 1
    assert Delivery.objects.count() == 30


def test_4xx_waits_and_retries_then_sends(school, smtp, settings, redis_client):
    settings.EDSMART_RETRY_BASE_SECONDS = 60
    _scheduled_broadcast(school, families=1)
    smtp.behaviour.fail_first = 1
    dispatch.dispatch_due()
    _drain()
    d = Delivery.objects.get()
    assert d.status == S.RETRY_WAIT and "450" in d.last_error
    assert d.next_attempt_at > timezone.now() + dt.timedelta(seconds=25)
    assert batch.batch_send().claimed == 0  # not due yet
    Delivery.objects.update(next_attempt_at=timezone.now())
    _drain()
    d.refresh_from_db()
    assert (d.status, d.tries) == (S.SENT, 2)
    assert_exactly_once(smtp.accepted)


def test_attempts_are_bounded(school, smtp, settings, redis_client):
    settings.EDSMART_MAX_ATTEMPTS = 3
    _scheduled_broadcast(school, families=1)
    smtp.behaviour.rcpt_reply = "450 4.2.2 Mailbox full"
    dispatch.dispatch_due()
    for _ in range(5):
        Delivery.objects.filter(status=S.RETRY_WAIT).update(next_attempt_at=timezone.now())
        _drain()
    d = Delivery.objects.get()
    assert d.status == S.FAILED and "gave up after 3 attempts" in d.last_error
    assert smtp.handler.rcpt_refusals == 3


def test_5xx_fails_at_once_with_reason(school, smtp, redis_client):
    _scheduled_broadcast(school, families=2)
    smtp.behaviour.rcpt_reply = "550 5.1.1 No such user"
    dispatch.dispatch_due()
    _drain()
    assert set(Delivery.objects.values_list("status", flat=True)) == {S.FAILED}
    assert all("550" in e for e in Delivery.objects.values_list("last_error", flat=True))
    assert_exactly_once(smtp.accepted)


def test_invalid_address_fails_at_fan_out_and_does_not_block_others(school, smtp, redis_client):
    factories.make_family(school=school)
    kid = factories.make_student(school=school)
    factories.make_guardian(school=school, students=[kid], email="not an address")
    b = factories.make_broadcast(school=school)
    message_schedule(message=b, send_at=timezone.now())
    dispatch.dispatch_due()
    _drain()
    statuses = dict(Delivery.objects.values_list("email", "status"))
    assert statuses["not an address"] == S.FAILED
    assert list(statuses.values()).count(S.SENT) == 1


def test_timeout_after_data_is_unknown_and_never_resent(school, smtp, settings, redis_client):
    settings.EMAIL_TIMEOUT = 0.5
    _scheduled_broadcast(school, families=1)
    smtp.behaviour.stall = 1.5
    dispatch.dispatch_due()
    _drain()
    d = Delivery.objects.get()
    assert d.status == S.UNKNOWN and "after DATA" in d.last_error
    smtp.behaviour.stall = 0
    for _ in range(3):
        sweep.sweep()
        _drain()
    d.refresh_from_db()
    assert d.status == S.UNKNOWN
    assert smtp.handler.received_data == 1
    moved = controls.unknowns_resolve(delivery_ids=[d.pk], resolution="sent", actor="ops@x")
    assert moved == 1
    d.refresh_from_db()
    assert d.status == S.SENT
    assert DeliveryEvent.objects.filter(delivery=d, actor="ops@x", to_status=S.SENT).exists()


def test_global_pause_stops_a_batch_before_its_next_delivery(school, smtp, redis_client):
    _scheduled_broadcast(school, families=6)
    [mailing_id] = dispatch.dispatch_due()
    claims = transitions.deliveries_claim(limit=10, mailing_id=mailing_id)
    assert len(claims) == 6
    controls.sending_set_paused(paused=True, actor="ops")
    # The claimed rows can no longer be started, and nothing new can be claimed.
    assert not transitions.delivery_start(claimed=claims[0])
    assert transitions.deliveries_claim(limit=10) == []
    transitions.claims_release(claims=claims)
    report = batch.batch_send(mailing_id=mailing_id)
    assert report.claimed == 0 and not smtp.accepted
    controls.sending_set_paused(paused=False, actor="ops")
    _drain()
    assert assert_exactly_once(smtp.accepted) == {S.SENT: 6}


def test_school_pause_affects_only_that_school(school, other_school, smtp, redis_client):
    _scheduled_broadcast(school, families=2)
    _scheduled_broadcast(other_school, families=3)
    dispatch.dispatch_due()
    controls.sending_set_paused(paused=True, actor="ops", school=school)
    _drain()
    assert {a.delivery_id for a in smtp.accepted} == set(
        Delivery.objects.filter(school=other_school).values_list("pk", flat=True)
    )
    controls.sending_set_paused(paused=False, actor="ops", school=school)
    _drain()
    assert assert_exactly_once(smtp.accepted) == {S.SENT: 5}


def test_message_pause_resume_and_cancel(school, smtp, redis_client):
    b = _scheduled_broadcast(school, families=4)
    dispatch.dispatch_due()
    b.refresh_from_db()
    message_pause(message=b)
    assert batch.batch_send().claimed == 0
    message_resume(message=b)
    batch.batch_send(limit=2)
    assert len(smtp.accepted) == 2
    message_cancel(message=b)
    _drain()
    sweep.sweep()
    counts = assert_exactly_once(smtp.accepted)
    assert counts == {S.SENT: 2, S.CANCELLED: 2}


def test_stale_claim_cannot_start_after_reclaim(school, smtp, redis_client):
    _scheduled_broadcast(school, families=1)
    dispatch.dispatch_due()
    [old] = transitions.deliveries_claim(limit=1)
    Delivery.objects.update(lease_until=timezone.now() - dt.timedelta(seconds=1))
    assert sweep.sweep().claims_expired == 1
    [new] = transitions.deliveries_claim(limit=1)
    assert new.attempt == old.attempt + 1
    assert not transitions.delivery_start(claimed=old)  # the fencing token lost
    assert transitions.delivery_start(claimed=new)


def test_expired_submit_becomes_unknown_and_late_confirmation_settles_it(school, redis_client):
    _scheduled_broadcast(school, families=1)
    dispatch.dispatch_due()
    [claim] = transitions.deliveries_claim(limit=1)
    assert transitions.delivery_start(claimed=claim)
    Delivery.objects.update(lease_until=timezone.now() - dt.timedelta(seconds=1))
    assert sweep.sweep().submits_expired == 1
    assert Delivery.objects.get().status == S.UNKNOWN
    from notifications.mailer import Outcome, SendResult

    status = transitions.delivery_record(
        claimed=claim, result=SendResult(Outcome.ACCEPTED, "", "q1")
    )
    assert status == S.SENT
    stale = transitions.Claimed(
        claim.id, claim.attempt - 1, 0, claim.mailing_id, claim.school_id, "", "", []
    )
    assert transitions.delivery_record(claimed=stale, result=SendResult(Outcome.FAILED)) is None


def test_refused_connection_retries_later_and_releases_the_rest(school, settings, redis_client):
    from tests.smtp_server import free_port

    settings.EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    settings.EMAIL_HOST, settings.EMAIL_PORT = "127.0.0.1", free_port()
    _scheduled_broadcast(school, families=3)
    dispatch.dispatch_due()
    report = batch.batch_send()
    assert report.retry == 1 and report.released == 2
    rows = Delivery.objects.order_by("pk")
    assert [r.status for r in rows] == [S.RETRY_WAIT, S.PENDING, S.PENDING]
    assert all(r.next_attempt_at > timezone.now() for r in rows)
    assert [r.tries for r in rows] == [1, 0, 0]


def test_connection_is_reused_across_a_batch(school, smtp, redis_client):
    _scheduled_broadcast(school, families=5)
    dispatch.dispatch_due()
    with connection.cursor():
        pass
    batch.batch_send()
    assert len(smtp.accepted) == 5


def test_empty_audience_at_send_time_completes(school, redis_client):
    b = _scheduled_broadcast(school, families=1)
    from slips.models import Guardian

    Guardian.objects.update(receives_email=False)
    dispatch.dispatch_due()
    b.refresh_from_db()
    assert b.status == SendStatus.SENT
    assert not SendingSwitch.objects.filter(paused=True).exists()


def test_late_definite_refusal_settles_an_unknown_for_the_same_attempt(school, redis_client):
    from notifications.mailer import Outcome, SendResult

    _scheduled_broadcast(school, families=1)
    dispatch.dispatch_due()
    [claim] = transitions.deliveries_claim(limit=1)
    assert transitions.delivery_start(claimed=claim)
    Delivery.objects.update(lease_until=timezone.now() - dt.timedelta(seconds=1))
    sweep.sweep()
    refused = SendResult(Outcome.FAILED, "550 5.1.1 no such user")
    assert transitions.delivery_record(claimed=claim, result=refused) == S.FAILED
    assert Delivery.objects.get().last_error == "550 5.1.1 no such user"


def test_late_temporary_refusal_after_completion_reopens_the_mailing(school, smtp, redis_client):
    from notifications.mailer import Outcome, SendResult

    _scheduled_broadcast(school, families=1)
    [mailing_id] = dispatch.dispatch_due()
    [claim] = transitions.deliveries_claim(limit=1)
    assert transitions.delivery_start(claimed=claim)
    Delivery.objects.update(lease_until=timezone.now() - dt.timedelta(seconds=1))
    sweep.sweep()  # unknown, and the mailing completes with it
    assert Mailing.objects.get(pk=mailing_id).status == Mailing.Status.COMPLETED
    late = SendResult(Outcome.RETRY, "450 4.2.0 mailbox busy")
    assert transitions.delivery_record(claimed=claim, result=late) == S.RETRY_WAIT
    assert Mailing.objects.get(pk=mailing_id).status == Mailing.Status.SENDING
    Delivery.objects.update(next_attempt_at=timezone.now())
    _drain()
    sweep.sweep()
    assert assert_exactly_once(smtp.accepted) == {S.SENT: 1}
    assert Mailing.objects.get(pk=mailing_id).status == Mailing.Status.COMPLETED


def test_every_state_change_is_logged_with_its_ids(school, smtp, redis_client, caplog):
    """At INFO a delivery's claim and its acceptance are each in one line per chunk, with the
    ids; its start (and the acceptance again, alone) only at DEBUG. A line per email per move
    was a seventh of a worker's CPU."""
    import json
    import logging

    from edsmart.json_logs import JsonLineFormatter

    _scheduled_broadcast(school, families=2)
    [mailing_id] = dispatch.dispatch_due()
    caplog.set_level(logging.DEBUG, logger="edsmart.pipeline")
    batch.batch_send()
    ids = set(Delivery.objects.filter(mailing_id=mailing_id).values_list("pk", flat=True))
    lines = [json.loads(JsonLineFormatter().format(r)) for r in caplog.records]
    info = [line for line in lines if line["levelname"] == "INFO" and "delivery_ids" in line]
    assert [(line["status"], set(line["delivery_ids"])) for line in info] == [
        ("claimed", ids),
        ("sent", ids),
    ]
    assert all(line["mailing_id"] == mailing_id for line in info)
    assert info[1]["message"] == f"sent 2 deliveries (ids {min(ids)}..{max(ids)})"
    d = min(ids)
    debug = [line for line in lines if line.get("delivery_id") == d]
    assert [line["status"] for line in debug] == ["submitting", "sent"]
    assert all(line["levelname"] == "DEBUG" for line in debug)
    assert debug[0]["message"] == f"delivery {d} -> submitting"
    assert {"asctime", "levelname", "name"} <= info[0].keys()
    assert "args" not in info[0] and "msg" not in info[0]


def test_batch_refuses_to_run_inside_a_transaction(school, smtp, redis_client):
    """A start must be committed before its email goes out; inside an atomic block nothing
    commits until the caller's block ends, so the batch refuses before claiming anything."""
    mailing_id = factories.broadcast_dispatched(school=school, families=2)[1]
    with transaction.atomic(), pytest.raises(batch.CommitBeforeSendError):
        batch.batch_send(mailing_id=mailing_id)
    assert set(Delivery.objects.values_list("status", flat=True)) == {S.PENDING}
    assert not smtp.accepted
    assert batch.batch_send(mailing_id=mailing_id).sent == 2
