"""The provider's events on our deliveries: recorded payloads of Mailgun and Postmark posted
through the real webhook views (Mailgun signed, both behind basic auth), against real
PostgreSQL, Redis and the test SMTP server.

Bounces, complaints and deliveries are recorded on the delivery they belong to (found by
anymail metadata, by our Message-ID or by the provider's message id, never against the
event's recipient), counted in the message's reach, and settle ``unknown`` deliveries with the
actor "provider event": delivered -> sent, bounced -> failed, rejected -> retried under the
normal rules and then really sent once. A redelivered event does nothing twice.

The payloads are the shapes Mailgun's and Postmark's documentation publish for their webhooks
(Mailgun's "delivered", "failed" and "rejected" event-data; Postmark's Bounce, Delivery and
SpamComplaint records), with our ids and addresses put in.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import secrets
import time
import uuid

import pytest
from anymail.backends.test import EmailBackend as AnymailTestBackend
from django.contrib.admin.models import LogEntry
from django.core import mail
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from notifications import batch, controls, provider_events, retention, selectors, sweep
from notifications.models import (
    Delivery,
    DeliveryEvent,
    DeliveryStatus,
    Mailing,
    MailingSummary,
    ProviderEvent,
)
from notifications.rendering import message_id_for
from slips.models import Guardian, Membership
from tests import factories
from tests.test_webhooks import BASIC, SIGNING_KEY, signed

pytestmark = pytest.mark.django_db(transaction=True)
S = DeliveryStatus
K = ProviderEvent.Kind
R = Membership.Role
MAILGUN_URL = "/webhooks/anymail/mailgun/tracking/"
POSTMARK_URL = "/webhooks/anymail/postmark/tracking/"


@pytest.fixture
def providers(settings):
    settings.ANYMAIL = {"MAILGUN_WEBHOOK_SIGNING_KEY": SIGNING_KEY, "WEBHOOK_SECRET": BASIC}


def _auth(auth: str | None) -> dict:
    if auth is None:
        return {}
    return {"HTTP_AUTHORIZATION": "Basic " + base64.b64encode(auth.encode()).decode()}


def post_mailgun(client, data: dict, *, auth: str | None = BASIC):
    body = json.dumps(signed(data))
    return client.generic(
        "POST", MAILGUN_URL, body, content_type="application/json", secure=True, **_auth(auth)
    )


def post_postmark(client, payload: object, *, auth: str | None = BASIC, raw: bytes | None = None):
    body = raw if raw is not None else json.dumps(payload)
    return client.generic(
        "POST", POSTMARK_URL, body, content_type="application/json", secure=True, **_auth(auth)
    )


# --- recorded payload shapes -----------------------------------------------------------------


def _bare(message_id: str) -> str:
    """Mailgun reports the Message-ID header without its angle brackets."""
    return message_id.strip("<>")


def mailgun_event(kind: str, d: Delivery, **fields: object) -> dict:
    """Mailgun's event-data as its docs show it, for delivery ``d``."""
    return {
        "tags": [],
        "timestamp": time.time(),
        "storage": {"url": "https://se.api.mailgun.net/v3/domains/x/messages/k", "key": "k"},
        "envelope": {
            "transport": "smtp",
            "sender": "noreply@edsmart.localhost",
            "sending-ip": "209.61.154.250",
            "targets": d.email,
        },
        "recipient-domain": d.email.rpartition("@")[2],
        "id": secrets.token_urlsafe(16),
        "campaigns": [],
        "user-variables": {},
        "flags": {"is-routed": False, "is-authenticated": True, "is-test-mode": False},
        "log-level": "info",
        "message": {
            "headers": {
                "to": d.email,
                "message-id": _bare(message_id_for(d.pk)),
                "from": "Northside <noreply@edsmart.localhost>",
                "subject": "A broadcast",
            },
            "attachments": [],
            "size": 2211,
        },
        "recipient": d.email,
        "event": kind,
        **fields,
    }


def mailgun_delivered(d: Delivery, **fields: object) -> dict:
    return mailgun_event(
        "delivered",
        d,
        **{
            "delivery-status": {
                "tls": True,
                "mx-host": "smtp-in.example.org",
                "code": 250,
                "description": "",
                "session-seconds": 0.43,
                "utf8": True,
                "attempt-no": 1,
                "message": "OK",
                "certificate-verified": True,
            }
        },
        **fields,
    )


def mailgun_hard_bounce(d: Delivery, **fields: object) -> dict:
    return mailgun_event(
        "failed",
        d,
        severity="permanent",
        reason="bounce",
        **{
            "log-level": "error",
            "delivery-status": {
                "attempt-no": 1,
                "message": "550 5.1.1 The email account that you tried to reach does not exist",
                "code": 550,
                "description": "No such mailbox",
                "session-seconds": 0.1,
            },
        },
        **fields,
    )


def mailgun_rejected(d: Delivery) -> dict:
    """Mailgun's "rejected": refused before sending; no recipient field, the To header."""
    data = mailgun_event(
        "rejected",
        d,
        reject={"reason": "Sandbox subdomains are for test purposes only", "description": ""},
        **{"log-level": "warn"},
    )
    del data["recipient"]
    return data


def postmark_bounce(d: Delivery, *, type_: str = "HardBounce", **fields: object) -> dict:
    """Postmark's Bounce webhook as its docs show it."""
    codes = {"HardBounce": 1, "SoftBounce": 4096, "SpamComplaint": 512}
    return {
        "RecordType": "Bounce",
        "MessageStream": "outbound",
        "ID": secrets.randbelow(10**15),
        "Type": type_,
        "TypeCode": codes[type_],
        "Name": "Hard bounce" if type_ == "HardBounce" else "Soft bounce",
        "Tag": "broadcast",
        "MessageID": d.provider_id or str(uuid.uuid4()),
        "Metadata": {"edsmart_delivery": str(d.pk)},
        "ServerID": 23,
        "Description": "The server was unable to deliver your message (ex: unknown user, "
        "mailbox not found).",
        "Details": "smtp;550 5.1.1 The email account that you tried to reach does not exist.",
        "Email": d.email,
        "From": "noreply@edsmart.localhost",
        "BouncedAt": "2026-11-30T16:33:54.9070259Z",
        "DumpAvailable": True,
        "Inactive": type_ == "HardBounce",
        "CanActivate": True,
        "Subject": "A broadcast",
        "Content": "<Full dump of bounce>",
        **fields,
    }


def postmark_complaint(d: Delivery, **fields: object) -> dict:
    return postmark_bounce(
        d,
        type_="SpamComplaint",
        RecordType="SpamComplaint",
        Name="Spam complaint",
        Description="",
        Details="Test spam complaint details",
        **fields,
    )


def postmark_delivery(d: Delivery, **fields: object) -> dict:
    return {
        "RecordType": "Delivery",
        "ServerID": 23,
        "MessageStream": "outbound",
        "MessageID": d.provider_id or str(uuid.uuid4()),
        "Recipient": d.email,
        "Tag": "broadcast",
        "DeliveredAt": "2026-11-30T16:34:52Z",
        "Details": "smtp;250 2.0.0 OK  1606410892 a1si13459125qkh.63 - gsmtp",
        "Metadata": {"edsmart_delivery": str(d.pk)},
        **fields,
    }


# --- deliveries in the states the events find them in ------------------------------------------


def drain(mailing_id: int) -> None:
    for _ in range(20):
        if not batch.batch_send(mailing_id=mailing_id).claimed:
            break


def sent_broadcast(school, families: int = 2):
    """A broadcast sent through the pipeline to the test SMTP server: (broadcast, rows)."""
    broadcast, mailing_id = factories.broadcast_dispatched(school=school, families=families)
    drain(mailing_id)
    rows = list(Delivery.objects.filter(mailing_id=mailing_id).order_by("pk"))
    assert {r.status for r in rows} == {S.SENT}
    return broadcast, rows


def as_unknown(d: Delivery, *, tries: int = 1) -> Delivery:
    """As the sweeper leaves a send whose reply never came (its only acceptance unheard)."""
    Delivery.objects.filter(pk=d.pk).update(
        status=S.UNKNOWN,
        attempt=max(d.attempt, 1),
        tries=tries,
        accepted=0,
        sent_at=None,
        lease_until=None,
        message_id_header=message_id_for(d.pk),
        last_error="no reply after DATA",
    )
    d.refresh_from_db()
    return d


def guardian_of(d: Delivery) -> Guardian:
    return Guardian.objects.get(pk=d.guardian_ids[0])


def only_event(**filters: object) -> ProviderEvent:
    [event] = ProviderEvent.objects.filter(**filters)
    return event


# --- recording: bounces, complaints, deliveries on the delivery ---------------------------------


def test_hard_bounce_on_a_sent_delivery_is_recorded_counted_and_suppresses(
    client, providers, school, smtp, redis_client
):
    broadcast, [d, other] = sent_broadcast(school)
    data = mailgun_hard_bounce(d, timestamp=1764520434.5)
    assert post_mailgun(client, data).status_code == 200

    event = only_event(delivery=d)
    assert (event.kind, event.esp, event.event_type, event.school_id) == (
        K.HARD_BOUNCE,
        "Mailgun",
        "bounced",
        school.pk,
    )
    assert "No such mailbox" in event.reason and "5.1.1" in event.reason
    assert event.occurred_at == dt.datetime.fromtimestamp(1764520434.5, tz=dt.UTC)
    assert event.email == d.email and event.provider_message_id == message_id_for(d.pk)
    assert event.event_id == data["id"] and event.outcome == "recorded"
    d.refresh_from_db()
    assert d.status == S.SENT  # a bounce after a send changes no status
    assert guardian_of(d).suppressed_at is not None
    assert guardian_of(other).suppressed_at is None
    reach = selectors.broadcast_reach(broadcast=broadcast)
    assert (reach.sent, reach.bounced, reach.complaints) == (2, 1, 0)
    assert selectors.source_provider_counts(broadcast) == {"bounced": 1, "complaints": 0}


def test_postmark_soft_bounce_is_recorded_and_does_not_suppress(
    client, providers, school, smtp, redis_client
):
    broadcast, [d, _] = sent_broadcast(school)
    assert post_postmark(client, postmark_bounce(d, type_="SoftBounce")).status_code == 200
    event = only_event(delivery=d)
    assert (event.kind, event.esp, event.outcome) == (K.SOFT_BOUNCE, "Postmark", "recorded")
    assert event.occurred_at == dt.datetime(2026, 11, 30, 16, 33, 54, 907025, tzinfo=dt.UTC)
    assert "unable to deliver" in event.reason and "550 5.1.1" in event.reason
    assert guardian_of(d).suppressed_at is None
    assert selectors.broadcast_reach(broadcast=broadcast).bounced == 1


def test_mailgun_temporary_failure_is_a_deferral_not_a_bounce(
    client, providers, school, smtp, redis_client
):
    broadcast, [d, _] = sent_broadcast(school)
    soft = mailgun_event(
        "failed",
        d,
        severity="temporary",
        reason="generic",
        **{"delivery-status": {"code": 452, "message": "4.2.2 Mailbox full"}},
    )
    assert post_mailgun(client, soft).status_code == 200
    assert only_event(delivery=d).kind == K.DEFERRED
    assert guardian_of(d).suppressed_at is None
    assert selectors.broadcast_reach(broadcast=broadcast).bounced == 0


def test_complaint_is_recorded_counted_and_suppresses(
    client, providers, school, smtp, redis_client
):
    broadcast, [d, _] = sent_broadcast(school)
    assert post_postmark(client, postmark_complaint(d)).status_code == 200
    event = only_event(delivery=d)
    assert event.kind == K.COMPLAINT and event.school_id == school.pk
    assert "complaint" in guardian_of(d).suppressed_reason
    reach = selectors.broadcast_reach(broadcast=broadcast)
    assert (reach.bounced, reach.complaints) == (0, 1)


def test_opens_and_clicks_are_not_stored(client, providers, school, smtp, redis_client):
    _, [d, _] = sent_broadcast(school)
    assert post_mailgun(client, mailgun_event("opened", d)).status_code == 200
    assert post_postmark(client, {**postmark_delivery(d), "RecordType": "Open"}).status_code == 200
    assert not ProviderEvent.objects.exists()


# --- matching --------------------------------------------------------------------------------


def test_matched_by_metadata_alone(client, providers, school, smtp, redis_client):
    _, [d, _] = sent_broadcast(school)
    payload = postmark_bounce(d)  # a MessageID we never stored: only the metadata names it
    assert post_postmark(client, payload).status_code == 200
    assert only_event().delivery_id == d.pk
    assert provider_events.delivery_match(_parsed_postmark(payload)).how == "metadata"


def test_matched_by_message_id_alone(client, providers, school, smtp, redis_client):
    _, [d, _] = sent_broadcast(school)
    data = mailgun_hard_bounce(d)
    assert data["user-variables"] == {}
    assert post_mailgun(client, data).status_code == 200
    assert only_event().delivery_id == d.pk


def test_a_message_id_of_another_domain_is_not_ours(client, providers, school, smtp, redis_client):
    _, [d, _] = sent_broadcast(school)
    data = mailgun_hard_bounce(d)
    data["message"]["headers"]["message-id"] = f"edsmart.delivery.{d.pk}@elsewhere.example"
    assert post_mailgun(client, data).status_code == 200
    assert only_event().delivery_id is None


class UuidAnymailBackend(AnymailTestBackend):
    """anymail's test ESP, answering with a provider message id as Postmark's look."""

    def get_esp_message_id(self, message):
        return str(uuid.uuid4())


def test_sent_through_an_esp_matched_by_provider_id(
    client, providers, school, settings, redis_client
):
    """Sent through an anymail ESP backend: the metadata goes with each message, the provider
    id is stored, and an event carrying neither metadata nor our Message-ID still finds it by
    the provider id and the recipient."""
    settings.EMAIL_BACKEND = "tests.test_provider_events.UuidAnymailBackend"
    mail.outbox = []
    _, mailing_id = factories.broadcast_dispatched(school=school, families=2)
    drain(mailing_id)
    rows = list(Delivery.objects.filter(mailing_id=mailing_id).order_by("pk"))
    assert {r.status for r in rows} == {S.SENT}
    by_to = {m.to[0]: m for m in mail.outbox}
    for row in rows:
        assert row.provider_id
        assert by_to[row.email].metadata == {"edsmart_delivery": str(row.pk)}
    d = rows[0]
    payload = postmark_bounce(d)
    del payload["Metadata"]
    assert payload["MessageID"] == d.provider_id
    assert post_postmark(client, payload).status_code == 200
    event = only_event()
    assert event.delivery_id == d.pk and event.kind == K.HARD_BOUNCE
    assert provider_events.delivery_match(_parsed_postmark(payload)).how == "provider id"
    # The same provider id with another recipient matches nothing.
    stray = postmark_bounce(d, Email=rows[1].email)
    del stray["Metadata"]
    assert post_postmark(client, stray).status_code == 200
    assert ProviderEvent.objects.get(email=rows[1].email).delivery_id is None


def test_a_recipient_that_disagrees_is_unmatched_and_settles_nothing(
    client, providers, school, smtp, redis_client
):
    _, [d, other] = sent_broadcast(school)
    d = as_unknown(d)
    # Our Message-ID for d, but another address: an attacker's or a bug's event.
    data = mailgun_delivered(d, recipient=other.email)
    assert post_mailgun(client, data).status_code == 200
    payload = postmark_bounce(d, Email=other.email)  # metadata naming d, another address
    assert post_postmark(client, payload).status_code == 200
    assert (
        list(ProviderEvent.objects.values_list("delivery_id", "school_id", "outcome"))
        == [(None, None, "unmatched: recipient differs")] * 2
    )
    d.refresh_from_db()
    assert d.status == S.UNKNOWN
    assert not DeliveryEvent.objects.filter(delivery=d, actor=controls.PROVIDER_ACTOR).exists()


# --- settling unknowns --------------------------------------------------------------------------


def test_unknown_then_delivered_is_sent_by_the_provider_event(
    client, providers, school, smtp, redis_client
):
    broadcast, [d, _] = sent_broadcast(school)
    d = as_unknown(d)
    sweep.sweep()  # completes and summarises the mailing, with d unknown
    mailing = Mailing.objects.get(pk=d.mailing_id)
    assert mailing.status == Mailing.Status.COMPLETED and mailing.summarised
    assert MailingSummary.objects.get(mailing=mailing).unknown == 1

    assert post_mailgun(client, mailgun_delivered(d)).status_code == 200
    d.refresh_from_db()
    assert (d.status, d.accepted) == (S.SENT, 1) and d.sent_at is not None
    [move] = DeliveryEvent.objects.filter(delivery=d)
    assert (move.from_status, move.to_status, move.actor) == (S.UNKNOWN, S.SENT, "provider event")
    assert "delivered (Mailgun event)" in move.detail
    assert only_event().outcome == "settled unknown → sent"
    # The stale summary is gone, the counts come from the rows, and the sweep summarises again.
    mailing.refresh_from_db()
    assert not mailing.summarised
    assert not MailingSummary.objects.filter(mailing=mailing).exists()
    assert selectors.source_counts(broadcast)[S.SENT] == 2
    sweep.sweep()
    summary = MailingSummary.objects.get(mailing=mailing)
    assert (summary.sent, summary.unknown, summary.accepted) == (2, 0, 2)


def test_unknown_then_postmark_delivery_is_sent(client, providers, school, smtp, redis_client):
    _, [d, _] = sent_broadcast(school)
    d = as_unknown(d)
    assert post_postmark(client, postmark_delivery(d)).status_code == 200
    d.refresh_from_db()
    assert d.status == S.SENT
    assert DeliveryEvent.objects.get(delivery=d).actor == "provider event"


def test_unknown_then_hard_bounce_is_failed_with_the_reason(
    client, providers, school, smtp, redis_client
):
    _, [d, _] = sent_broadcast(school)
    d = as_unknown(d)
    assert post_postmark(client, postmark_bounce(d)).status_code == 200
    d.refresh_from_db()
    assert (d.status, d.accepted) == (S.FAILED, 0)
    assert "unable to deliver" in d.last_error
    move = DeliveryEvent.objects.get(delivery=d)
    assert (move.to_status, move.actor) == (S.FAILED, "provider event")
    assert only_event().outcome == "settled unknown → failed"


def test_unknown_then_rejected_is_retried_and_sent_once(
    client, providers, school, smtp, redis_client
):
    """Rejected by the provider before it accepted anything: back under the retry rules; the
    completed mailing reopens, and the pipeline sends it, once."""
    _, mailing_id = factories.broadcast_dispatched(school=school, families=3)
    rows = list(Delivery.objects.filter(mailing_id=mailing_id).order_by("pk"))
    d = as_unknown(rows[0])  # its send never reached the server
    drain(mailing_id)
    sweep.sweep()
    assert Mailing.objects.get(pk=mailing_id).status == Mailing.Status.COMPLETED
    assert d.email not in [m.rcpt for m in smtp.accepted]

    before = timezone.now()
    assert post_mailgun(client, mailgun_rejected(d)).status_code == 200
    d.refresh_from_db()
    assert d.status == S.RETRY_WAIT and d.next_attempt_at > before
    assert "Sandbox subdomains" in d.last_error
    move = DeliveryEvent.objects.get(delivery=d)
    assert (move.to_status, move.actor) == (S.RETRY_WAIT, "provider event")
    assert only_event().outcome == "settled unknown → retry_wait"
    assert Mailing.objects.get(pk=mailing_id).status == Mailing.Status.SENDING

    Delivery.objects.filter(pk=d.pk).update(next_attempt_at=timezone.now())  # the wait passes
    drain(mailing_id)
    sweep.sweep()
    d.refresh_from_db()
    assert (d.status, d.accepted) == (S.SENT, 1)
    assert [m.rcpt for m in smtp.accepted].count(d.email) == 1
    assert Mailing.objects.get(pk=mailing_id).status == Mailing.Status.COMPLETED


def test_unknown_then_rejected_with_no_tries_left_fails(
    client, providers, school, smtp, redis_client, settings
):
    _, [d, _] = sent_broadcast(school)
    d = as_unknown(d, tries=settings.EDSMART_MAX_ATTEMPTS)
    assert post_mailgun(client, mailgun_rejected(d)).status_code == 200
    d.refresh_from_db()
    assert d.status == S.FAILED and "tries used" in d.last_error


def test_unknown_then_rejected_for_a_suppressed_address_fails(
    client, providers, school, smtp, redis_client
):
    _, [d, _] = sent_broadcast(school)
    d = as_unknown(d)
    # Postmark's "ManuallyDeactivated": rejected because the address was deactivated.
    payload = postmark_bounce(d, Type="ManuallyDeactivated", TypeCode=16)
    Guardian.objects.filter(pk=d.guardian_ids[0]).update(
        suppressed_at=timezone.now(), suppressed_reason="hard bounce"
    )
    assert post_postmark(client, payload).status_code == 200
    d.refresh_from_db()
    assert d.status == S.FAILED and "address suppressed" in d.last_error


def test_events_for_settled_deliveries_change_no_status(
    client, providers, school, smtp, redis_client
):
    _, [d, other] = sent_broadcast(school)
    assert post_mailgun(client, mailgun_delivered(d)).status_code == 200
    assert post_mailgun(client, mailgun_rejected(other)).status_code == 200
    outcomes = dict(ProviderEvent.objects.values_list("delivery_id", "outcome"))
    assert outcomes == {
        d.pk: "late: delivery already sent",
        other.pk: "late: delivery already sent",
    }
    assert set(Delivery.objects.values_list("status", flat=True)) == {S.SENT}
    assert not DeliveryEvent.objects.exists()


# --- redelivery ---------------------------------------------------------------------------------


def test_a_redelivered_event_is_recorded_and_acts_once(
    client, providers, school, smtp, redis_client
):
    _, [d, other] = sent_broadcast(school)
    d = as_unknown(d)
    # Mailgun: the same event again, in a new signed request (a retry, a second webhook).
    data = mailgun_delivered(d)
    assert post_mailgun(client, data).status_code == 200
    Delivery.objects.filter(pk=d.pk).update(status=S.UNKNOWN)  # even if it were unknown again
    assert post_mailgun(client, data).status_code == 200
    assert ProviderEvent.objects.filter(delivery=d).count() == 1
    assert DeliveryEvent.objects.filter(delivery=d).count() == 1
    # Postmark: the same bounce record twice (Postmark retries what is not answered 200).
    payload = postmark_bounce(other)
    assert post_postmark(client, payload).status_code == 200
    assert post_postmark(client, payload).status_code == 200
    assert ProviderEvent.objects.filter(delivery=other).count() == 1
    # Postmark's Delivery records carry no ID: the same record is still recognised.
    delivered = postmark_delivery(other)
    for _ in range(2):
        assert post_postmark(client, delivered).status_code == 200
    assert ProviderEvent.objects.filter(delivery=other, kind=K.DELIVERED).count() == 1


def test_a_failure_while_recording_is_a_500_and_the_retry_records_it(
    client, providers, school, smtp, redis_client, monkeypatch
):
    _, [d, _] = sent_broadcast(school)
    d = as_unknown(d)
    real = controls.unknown_settle_by_provider

    def database_away(**kwargs):
        monkeypatch.setattr(controls, "unknown_settle_by_provider", real)
        raise RuntimeError("database away")

    monkeypatch.setattr(controls, "unknown_settle_by_provider", database_away)
    client.raise_request_exception = False
    payload = postmark_delivery(d)
    assert post_postmark(client, payload).status_code == 500
    assert not ProviderEvent.objects.exists()
    assert post_postmark(client, payload).status_code == 200
    d.refresh_from_db()
    assert d.status == S.SENT and only_event().delivery_id == d.pk


# --- the Postmark endpoint ----------------------------------------------------------------------


@pytest.mark.parametrize("debug", [False, True])
def test_postmark_without_basic_auth_configured_does_not_exist(
    client, settings, school, smtp, redis_client, caplog, debug
):
    settings.DEBUG = debug
    settings.ANYMAIL = {"MAILGUN_WEBHOOK_SIGNING_KEY": SIGNING_KEY}
    _, [d, _] = sent_broadcast(school)
    assert post_postmark(client, postmark_bounce(d), auth=None).status_code == 404
    assert any("WEBHOOK_SECRET" in r.getMessage() for r in caplog.records)
    assert not ProviderEvent.objects.exists()
    assert guardian_of(d).suppressed_at is None


def test_postmark_wrong_or_missing_basic_auth_is_refused(
    client, providers, school, smtp, redis_client
):
    _, [d, _] = sent_broadcast(school)
    assert post_postmark(client, postmark_bounce(d), auth=None).status_code == 400
    assert post_postmark(client, postmark_bounce(d), auth="mailgun:wrong").status_code == 400
    assert not ProviderEvent.objects.exists()
    assert guardian_of(d).suppressed_at is None


POSTMARK_MALFORMED = {
    "not JSON": b"{RecordType:",
    "not UTF-8": b'{"RecordType": "\xff"}',
    "a list": b"[]",
    "null": b"null",
    "deeply nested": b"[" * 100_000 + b"]" * 100_000,
    "RecordType a list": json.dumps({"RecordType": ["Bounce"]}).encode(),
    "Type an object": json.dumps({"RecordType": "Bounce", "Type": {}}).encode(),
    "BouncedAt a number": json.dumps({"RecordType": "Bounce", "BouncedAt": 7}).encode(),
    "BouncedAt impossible": json.dumps(
        {"RecordType": "Bounce", "BouncedAt": "2026-13-45T99:99:99Z"}
    ).encode(),
    "Metadata a string": json.dumps({"RecordType": "Bounce", "Metadata": "x"}).encode(),
    "Email a number": json.dumps({"RecordType": "Bounce", "Email": 42}).encode(),
    "Email with NUL": json.dumps({"RecordType": "Bounce", "Email": "a\x00@b.org"}).encode(),
    "Email huge": json.dumps({"RecordType": "Bounce", "Email": "a" * 100_000}).encode(),
    "inbound posted to tracking": json.dumps({"FromFull": {"Email": "x@y"}}).encode(),
}


@pytest.mark.parametrize("body", POSTMARK_MALFORMED.values(), ids=POSTMARK_MALFORMED.keys())
def test_postmark_malformed_body_is_a_400(client, providers, school, body):
    assert post_postmark(client, None, raw=body).status_code == 400
    assert not ProviderEvent.objects.exists()


def test_postmark_odd_text_is_stored_cleanly(client, providers, school, smtp, redis_client):
    _, [d, _] = sent_broadcast(school)
    payload = postmark_bounce(d, Description="No\x00such \ud800 mailbox", ID="weird\x00id")
    assert post_postmark(client, payload).status_code == 200
    event = only_event()
    assert event.reason.startswith("Nosuch ? mailbox") and event.event_id == "weirdid"


# --- retention ----------------------------------------------------------------------------------


def test_retention_removes_provider_events_with_their_deliveries(
    client, providers, school, smtp, redis_client, settings
):
    settings.EDSMART_DELIVERY_RETENTION_DAYS = 400
    _, [d, other] = sent_broadcast(school)
    _, [keep, *_] = sent_broadcast(school)  # the whole school: 4 recipients now
    for row in (d, other, keep):
        assert post_postmark(client, postmark_bounce(row, type_="SoftBounce")).status_code == 200
    unmatched = postmark_bounce(d, Email="nobody@example.org")
    assert post_postmark(client, unmatched).status_code == 200
    sweep.sweep()
    past = timezone.now() - dt.timedelta(days=401)
    MailingSummary.objects.filter(mailing_id=d.mailing_id).update(summarised_at=past)
    report = retention.history_prune(batch_rows=1)
    assert report.mailings_emptied == [d.mailing_id]
    assert set(ProviderEvent.objects.values_list("delivery_id", flat=True)) == {keep.pk, None}


# --- the slip's counts and the bounce log in the admin ----------------------------------------


def _admin_url(view: str, *args: object) -> str:
    return reverse(f"admin:notifications_providerevent_{view}", args=args)


def test_the_message_page_counts_bounces_and_complaints(
    client, providers, school, smtp, redis_client, web_settings
):
    kids, _ = factories.make_family(school=school)
    audience = factories.make_audience(school=school, whole_school=False, students=kids)
    slip = factories.make_slip(school=school, audience=audience)
    mailing_id = factories.dispatch_now(slip)
    drain(mailing_id)
    [d] = Delivery.objects.filter(mailing_id=mailing_id)
    assert post_mailgun(client, mailgun_hard_bounce(d)).status_code == 200
    assert post_postmark(client, postmark_complaint(d)).status_code == 200
    assert selectors.source_provider_counts(slip) == {"bounced": 1, "complaints": 1}
    staff = Client()
    staff.force_login(factories.make_staff(school=school, username="own_office", role=R.OFFICE))
    page = staff.get(reverse("admin:slips_slip_change", args=[slip.pk]))
    assert page.status_code == 200
    html = page.content.decode()
    assert '<span data-provider="bounced">1</span>' in html
    assert '<span data-provider="complaints">1</span>' in html


def test_the_broadcast_reach_shows_bounces_and_complaints(
    client, providers, school, smtp, redis_client, web_settings
):
    broadcast, [d, other] = sent_broadcast(school)
    assert post_postmark(client, postmark_bounce(d)).status_code == 200
    assert post_postmark(client, postmark_bounce(d, type_="SoftBounce")).status_code == 200
    assert post_mailgun(client, event_complaint(other)).status_code == 200
    staff = Client()
    staff.force_login(factories.make_staff(school=school, username="own_teacher", role=R.TEACHER))
    page = staff.get(reverse("admin:slips_broadcast_change", args=[broadcast.pk]))
    assert page.status_code == 200
    html = page.content.decode()
    assert '<td data-provider="bounced">1</td>' in html  # two bounces, one recipient
    assert '<td data-provider="complaints">1</td>' in html


def event_complaint(d: Delivery) -> dict:
    """Mailgun's "complained" event-data."""
    data = mailgun_event("complained", d, **{"log-level": "warn"})
    data.pop("delivery-status", None)
    return data


@pytest.fixture
def bounce_world(client, providers, school, other_school, smtp, redis_client, web_settings):
    """A hard bounce in each school, the same address also a guardian of the other school,
    and an event that matched nothing."""
    _, [d, _] = sent_broadcast(school)
    _, [theirs, _] = sent_broadcast(other_school)
    elsewhere = factories.make_guardian(school=other_school, email=d.email.upper())
    assert post_mailgun(client, mailgun_hard_bounce(d)).status_code == 200
    assert post_postmark(client, postmark_bounce(theirs)).status_code == 200
    stray = postmark_bounce(theirs, Email="stranger@example.org")
    del stray["Metadata"]
    assert post_postmark(client, stray).status_code == 200
    assert guardian_of(d).suppressed_at and Guardian.objects.get(pk=elsewhere.pk).suppressed_at
    users = {
        role: factories.make_staff(school=school, username=f"own_{role}", role=role)
        for role in (R.ADMIN, R.OFFICE, R.TEACHER)
    }
    return {
        "own": only_event(delivery=d),
        "theirs": only_event(delivery=theirs),
        "d": d,
        "their_delivery": theirs,
        "elsewhere": elsewhere,
        "users": users,
    }


def _staff(user) -> Client:
    c = Client()
    c.force_login(user)
    return c


@pytest.mark.parametrize("role", [R.ADMIN, R.OFFICE, R.TEACHER])
def test_the_bounce_log_lists_only_the_schools_events(bounce_world, role):
    staff = _staff(bounce_world["users"][role])
    page = staff.get(_admin_url("changelist"))
    assert page.status_code == 200
    assert [e.pk for e in page.context["cl"].result_list] == [bounce_world["own"].pk]
    assert page.context["cl"].result_list[0].suppressed_here is True
    assert staff.get(_admin_url("change", bounce_world["own"].pk)).status_code == 200
    assert staff.get(_admin_url("change", bounce_world["theirs"].pk)).status_code == 404


def test_a_school_admin_reactivates_the_address_in_their_school_only(bounce_world):
    admin_user = bounce_world["users"][R.ADMIN]
    staff = _staff(admin_user)
    response = staff.post(
        _admin_url("changelist"),
        {
            "action": "reactivate_address",
            "_selected_action": [bounce_world["own"].pk, bounce_world["theirs"].pk],
            "index": 0,
        },
        follow=True,
    )
    assert response.status_code == 200
    assert "Reactivated 1 address(es) (1 guardian record(s))" in response.content.decode()
    guardian = guardian_of(bounce_world["d"])
    assert guardian.suppressed_at is None and guardian.suppressed_reason == ""
    # The other school's guardian with the same address keeps its suppression.
    assert Guardian.objects.get(pk=bounce_world["elsewhere"].pk).suppressed_at is not None
    assert guardian_of(bounce_world["their_delivery"]).suppressed_at is not None
    entry = LogEntry.objects.get(object_id=str(guardian.pk))
    assert entry.user_id == admin_user.pk and "bounce log" in entry.get_change_message()


@pytest.mark.parametrize("role", [R.OFFICE, R.TEACHER])
def test_teachers_and_office_cannot_reactivate(bounce_world, role):
    staff = _staff(bounce_world["users"][role])
    page = staff.get(_admin_url("changelist"))
    form = page.context["action_form"]  # None when no action is offered at all
    offered = {name for name, _ in form.fields["action"].choices} if form else set()
    assert "reactivate_address" not in offered
    staff.post(
        _admin_url("changelist"),
        {"action": "reactivate_address", "_selected_action": [bounce_world["own"].pk]},
    )
    assert guardian_of(bounce_world["d"]).suppressed_at is not None
    assert not LogEntry.objects.exists()


# --- helpers ------------------------------------------------------------------------------------


def _parsed_postmark(payload: dict):
    from anymail.webhooks.postmark import PostmarkTrackingWebhookView

    return PostmarkTrackingWebhookView().esp_to_anymail_event(payload)
