"""Faults a batch meets between the database and the mail server, each created for real: an
email that cannot be built, an error before a send starts, a provider that hangs up every N
messages, credentials refused, and a staff action racing the sweeper's completion."""

from __future__ import annotations

import datetime as dt
import threading
import time

import pytest
from django.db import connection, transaction
from django.utils import timezone

from notifications import batch, controls, selectors, sweep, transitions
from notifications.models import Delivery, DeliveryEvent, DeliveryStatus, Mailing, SendingSwitch
from slips.models import Broadcast, School, SendStatus
from tests import factories
from tests.invariants import assert_exactly_once

S = DeliveryStatus

pytestmark = pytest.mark.django_db(transaction=True)


def _due_now() -> None:
    Delivery.objects.filter(status=S.RETRY_WAIT).update(
        next_attempt_at=timezone.now() - dt.timedelta(seconds=1)
    )


# --- an email that cannot be built --------------------------------------------------------------


@pytest.mark.parametrize(
    "backend", ["django.core.mail.backends.smtp.EmailBackend", "locmem"], ids=["smtp", "api"]
)
def test_an_email_that_cannot_be_built_fails_alone_at_once(
    school, other_school, smtp, settings, redis_client, backend
):
    """A school name with a line break (saved before names were validated) cannot be a From
    header: that school's deliveries fail at once with the reason and its message completes;
    the other school's message in the same batch goes out."""
    if backend == "locmem":
        settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    School.objects.filter(pk=school.pk).update(name="Northside\nBcc: everyone@example.org")
    school.refresh_from_db()
    bad_source, bad = factories.broadcast_dispatched(school=school, families=2)
    _, good = factories.broadcast_dispatched(school=other_school, families=2)

    report = batch.batch_send()
    assert report.claimed == 4 and report.failed == 2 and report.sent == 2

    rows = Delivery.objects.filter(mailing_id=bad)
    assert {d.status for d in rows} == {S.FAILED}
    for d in rows:
        assert d.last_error.startswith("the email could not be built:"), d.last_error
        assert d.tries == 0  # nothing was started, nothing went out
    assert {d.status for d in Delivery.objects.filter(mailing_id=good)} == {S.SENT}
    sweep.sweep()
    assert Mailing.objects.get(pk=bad).status == Mailing.Status.COMPLETED
    bad_source.refresh_from_db()
    assert bad_source.status == SendStatus.SENT
    if backend != "locmem":
        assert {a.rcpt for a in smtp.accepted} == set(
            Delivery.objects.filter(mailing_id=good).values_list("email_normalized", flat=True)
        )


def test_names_that_would_break_a_header_are_refused_where_they_are_entered(school):
    from django.core.exceptions import ValidationError

    for value in ["Northside\nBcc: x@example.org", "North\rside", "North\u2028side", "A\x0bB"]:
        school.name = value
        with pytest.raises(ValidationError):
            school.full_clean()
        school.sender_name = value
        school.name = "Northside"
        with pytest.raises(ValidationError):
            school.full_clean()
        school.sender_name = ""


# --- errors before a send starts ---------------------------------------------------------------


def test_an_error_before_the_send_is_counted_and_ends_in_failed(
    school, smtp, settings, redis_client, monkeypatch
):
    """An error while a delivery is being prepared (here: its start statement raises for one
    row, as a bug would) is charged to that row with back-off and the batch goes on; the
    others go out. After EDSMART_MAX_ATTEMPTS such errors the row fails with the reason: no
    endless claim loop."""
    settings.EDSMART_MAX_ATTEMPTS = 3
    mailing_id = factories.broadcast_dispatched(school=school, families=3)[1]
    target = Delivery.objects.filter(mailing_id=mailing_id).order_by("pk").first().pk
    real_start = transitions.delivery_start
    real_record_and_start = transitions.delivery_record_and_start

    def start(*, claimed):
        if claimed.id == target:
            raise RuntimeError("injected: a bug before the send")
        return real_start(claimed=claimed)

    def record_and_start(*, done, claimed):
        if claimed.id == target:
            raise RuntimeError("injected: a bug before the send")
        return real_record_and_start(done=done, claimed=claimed)

    monkeypatch.setattr(transitions, "delivery_start", start)
    monkeypatch.setattr(transitions, "delivery_record_and_start", record_and_start)

    for round_no in range(1, 10):
        report = batch.batch_send(mailing_id=mailing_id)
        assert report.claimed == (3 if round_no == 1 else 1)
        row = Delivery.objects.get(pk=target)
        if row.status == S.FAILED:
            break
        assert row.status == S.RETRY_WAIT and row.tries == round_no
        assert row.next_attempt_at > timezone.now()  # backing off
        _due_now()
    assert row.status == S.FAILED and round_no == 3
    assert row.last_error.startswith("gave up after 3 attempts: error before sending:")
    assert "injected" in row.last_error
    others = Delivery.objects.filter(mailing_id=mailing_id).exclude(pk=target)
    assert {d.status for d in others} == {S.SENT}
    assert_exactly_once(smtp.accepted)


# --- leases ---------------------------------------------------------------------------------


def test_a_live_batch_renews_its_claims_while_a_slow_send_blocks(
    school, smtp, settings, redis_client
):
    """Claim leases are short; the batch's keeper renews them, so a slow server does not hand
    the batch's other rows to the sweeper."""
    settings.EDSMART_CLAIM_LEASE_SECONDS = 1.5
    smtp.handler.behaviour.delay = 2.0  # each send takes longer than a lease
    mailing_id = factories.broadcast_dispatched(school=school, families=3)[1]
    done = threading.Event()
    result = {}

    def run():
        try:
            result["report"] = batch.batch_send(mailing_id=mailing_id)
        finally:
            connection.close()
            done.set()

    threading.Thread(target=run).start()
    expired = 0
    while not done.wait(0.5):
        expired += sweep.sweep().claims_expired
    assert expired == 0
    assert result["report"].sent == 3 and result["report"].lost == 0


# --- the connection -------------------------------------------------------------------------


@pytest.mark.parametrize("silently", [False, True], ids=["421-then-close", "silent-close"])
@pytest.mark.parametrize("pipelining", [False, True], ids=["plain", "pipelined"])
def test_a_connection_closed_between_messages_is_reopened_without_charging_anyone(
    school, smtp, redis_client, silently, pipelining
):
    smtp.handler.behaviour.close_every = 3
    smtp.handler.behaviour.close_silently = silently
    smtp.handler.behaviour.pipelining = pipelining
    mailing_id = factories.broadcast_dispatched(school=school, families=10)[1]
    report = batch.batch_send(mailing_id=mailing_id)
    assert report.sent == 10 and report.retry == 0 and not report.stopped
    assert smtp.handler.closed_connections == 3
    assert set(Delivery.objects.values_list("status", "tries")) == {(S.SENT, 1)}
    assert_exactly_once(smtp.accepted)


@pytest.mark.parametrize("pipelining", [False, True], ids=["plain", "pipelined"])
def test_a_start_that_fails_after_its_envelope_went_ahead_sends_nothing(
    school, smtp, redis_client, monkeypatch, pipelining
):
    """With PIPELINING the envelope (MAIL, RCPT, DATA) is written before the start commits.
    When the start then fails (the delivery was cancelled after its claim), the exchange is
    abandoned by closing the connection: the server, left in its data phase, gets no
    message, and the rest of the batch goes on over a new connection."""
    smtp.handler.behaviour.pipelining = pipelining
    mailing_id = factories.broadcast_dispatched(school=school, families=6)[1]
    claim = transitions.deliveries_claim
    victims: list[int] = []

    def claim_then_cancel_one(**kwargs):
        claimed = claim(**kwargs)
        if claimed:
            victims.append(claimed[3].id)
            transitions.deliveries_cancel(delivery_ids=victims, detail="test: cancelled")
        return claimed

    monkeypatch.setattr(transitions, "deliveries_claim", claim_then_cancel_one)
    ehlos = smtp.handler.ehlos
    report = batch.batch_send(mailing_id=mailing_id)

    assert report.sent == 5 and report.lost == 1 and not report.stopped
    statuses = dict(Delivery.objects.values_list("pk", "status"))
    assert statuses.pop(victims[0]) == S.CANCELLED
    assert set(statuses.values()) == {S.SENT}
    assert victims[0] not in {a.delivery_id for a in smtp.accepted}
    assert smtp.handler.received_data == 5
    # Ahead of time only when pipelining: then the abandoned exchange cost one reconnect.
    assert smtp.handler.ehlos - ehlos == (2 if pipelining else 1)
    assert_exactly_once(smtp.accepted)


@pytest.mark.parametrize("reply", ["550 5.7.1 rejected", "450 4.2.0 mailbox busy"])
def test_a_refusal_after_data_is_recorded_from_the_reply_read_after_the_next_envelope(
    school, smtp, redis_client, reply
):
    """The final reply to a body is read after the next email is composed and its envelope
    written; a refusal there is still that delivery's outcome, and the next is unaffected."""
    smtp.handler.behaviour.pipelining = True
    smtp.handler.behaviour.data_reply = reply
    mailing_id = factories.broadcast_dispatched(school=school, families=4)[1]
    ehlos = smtp.handler.ehlos
    report = batch.batch_send(mailing_id=mailing_id)
    expected = S.FAILED if reply.startswith("5") else S.RETRY_WAIT
    assert (report.failed, report.retry, report.sent) == (
        (4, 0, 0) if expected == S.FAILED else (0, 4, 0)
    )
    rows = list(Delivery.objects.filter(mailing_id=mailing_id))
    assert {(d.status, d.tries, d.accepted) for d in rows} == {(expected, 1, 0)}
    assert all(reply.split()[0] in d.last_error for d in rows)
    assert smtp.handler.ehlos - ehlos == 1 and not smtp.accepted


def test_a_body_left_without_reply_is_unknown_and_the_next_goes_on_a_new_connection(
    school, smtp, redis_client, settings
):
    """Pipelined, the next envelope is written before the previous body's reply is read; when
    that reply never comes the connection is dropped with the envelope on it, and the next
    email goes over a new connection. Nothing is sent twice."""
    settings.EMAIL_TIMEOUT = 0.3
    smtp.handler.behaviour.pipelining = True
    smtp.handler.behaviour.stall = 0.8
    mailing_id = factories.broadcast_dispatched(school=school, families=3)[1]
    ehlos, bodies = smtp.handler.ehlos, smtp.handler.received_data
    report = batch.batch_send(mailing_id=mailing_id)
    assert report.unknown == 3 and report.sent == 0
    rows = list(Delivery.objects.filter(mailing_id=mailing_id))
    assert {(d.status, d.tries) for d in rows} == {(S.UNKNOWN, 1)}
    assert smtp.handler.ehlos - ehlos == 3  # a connection per email: each dropped unanswered
    time.sleep(1.0)  # past the stalls
    assert smtp.handler.received_data - bodies == 3  # each body reached the server once
    assert len({a.delivery_id for a in smtp.accepted}) == len(smtp.accepted)


def test_credentials_refused_pause_everything_and_charge_no_one(
    school, smtp, settings, redis_client
):
    """535 at AUTH: sending pauses globally with a critical alert naming the cause, no
    delivery is charged or failed; after the fix, resume sends each once."""
    from notifications import alerts, heartbeats

    settings.EMAIL_HOST_USER = "edsmart"
    settings.EMAIL_HOST_PASSWORD = "rotated-yesterday"
    smtp.handler.behaviour.refuse_auth = True
    mailing_id = factories.broadcast_dispatched(school=school, families=4)[1]

    report = batch.batch_send(mailing_id=mailing_id)
    assert report.stopped == "credentials refused" and report.sent == 0
    switch = SendingSwitch.objects.get(pk=1)
    assert switch.paused and switch.changed_by == controls.CREDENTIALS_ACTOR
    assert "535" in switch.reason
    rows = list(Delivery.objects.filter(mailing_id=mailing_id))
    assert {d.status for d in rows} <= {S.PENDING, S.RETRY_WAIT}
    assert {d.tries for d in rows} == {0}
    assert not batch.batch_send(mailing_id=mailing_id).claimed  # paused: nothing is claimed

    heartbeats.heartbeat_record(name=heartbeats.BEAT)
    heartbeats.worker_record(hostname="w1@test")
    watched = alerts.watch()
    assert "credentials_refused" in watched.raised
    alert = alerts.Alert.objects.get(key="credentials_refused", cleared_at__isnull=True)
    assert alert.severity == alerts.Alert.Severity.CRITICAL and "credentials" in alert.message

    smtp.handler.behaviour.refuse_auth = False  # the password is fixed
    controls.sending_set_paused(paused=False, actor="ops")
    for _ in range(3):
        batch.batch_send(mailing_id=mailing_id)
    assert {d.status for d in Delivery.objects.filter(mailing_id=mailing_id)} == {S.SENT}
    assert_exactly_once(smtp.accepted)
    assert "credentials_refused" in alerts.watch().cleared


# --- lock order ----------------------------------------------------------------------------


@pytest.mark.parametrize("action", ["pause", "cancel"])
def test_a_staff_action_racing_the_sweepers_completion_does_not_deadlock(
    school, smtp, redis_client, action
):
    """Staff lock the broadcast, then its mailing; the sweeper completing the same mailing
    locks in the same order, so it waits for the staff transaction instead of deadlocking."""
    source, mailing_id = factories.broadcast_dispatched(school=school, families=2)
    batch.batch_send(mailing_id=mailing_id)  # every row sent; the mailing awaits completion
    assert Mailing.objects.get(pk=mailing_id).status == Mailing.Status.SENDING
    staff_has_source = threading.Event()
    errors: list[BaseException] = []

    def staff():
        try:
            with transaction.atomic():
                Broadcast.objects.select_for_update().get(pk=source.pk)
                staff_has_source.set()
                time.sleep(0.5)  # the sweeper starts meanwhile
                if action == "pause":
                    controls.message_pause(message=source)
                else:
                    controls.message_cancel(message=source)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            connection.close()

    def sweeper():
        try:
            staff_has_source.wait(5)
            sweep.mailings_complete()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=staff), threading.Thread(target=sweeper)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    # Staff went first, so their action stands and the sweeper found nothing to complete.
    mailing = Mailing.objects.get(pk=mailing_id)
    expected = Mailing.Status.PAUSED if action == "pause" else Mailing.Status.CANCELLED
    assert mailing.status == expected


def test_cancel_leaves_a_mailing_the_sweeper_completed_alone(school, smtp, redis_client):
    source, mailing_id = factories.broadcast_dispatched(school=school, families=2)
    batch.batch_send(mailing_id=mailing_id)
    sweep.mailings_complete()
    assert controls.mailings_cancel(source=source) == 0
    assert Mailing.objects.get(pk=mailing_id).status == Mailing.Status.COMPLETED
    assert not DeliveryEvent.objects.filter(to_status=S.CANCELLED).exists()
    assert selectors.mailing_counts(mailing=Mailing.objects.get(pk=mailing_id))[S.SENT] == 2
