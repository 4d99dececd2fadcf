"""Mailgun tracking webhooks via django-anymail: signed as Mailgun signs them, bad signatures
refused, hard bounces and complaints suppress the address in every school, and the next
broadcast records that address as skipped with the reason. Replays (a used token, a stale or
future timestamp) are refused, basic auth is required with DEBUG off, malformed bodies are a
400, and a Redis that is away is a 503. tests/test_webhook_fuzz.py throws arbitrary input."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import secrets
import time

import pytest
from django.utils import timezone

from notifications import batch, dispatch, webhooks
from notifications.models import Delivery, DeliveryStatus
from slips.models import Guardian
from slips.services import message_schedule
from tests import factories

pytestmark = pytest.mark.django_db
S = DeliveryStatus
URL = "/webhooks/anymail/mailgun/tracking/"
SIGNING_KEY = "key-for-tests-0123456789abcdef"
BASIC = "mailgun:basic-auth-for-tests"


@pytest.fixture
def mailgun(settings):
    settings.ANYMAIL = {"MAILGUN_WEBHOOK_SIGNING_KEY": SIGNING_KEY, "WEBHOOK_SECRET": BASIC}


def event(kind: str, recipient: str, **fields: object) -> dict:
    data = {
        "event": kind,
        "recipient": recipient,
        "timestamp": time.time(),
        "id": secrets.token_hex(8),
        "message": {"headers": {"message-id": "20261128.1@edsmart.localhost"}},
        **fields,
    }
    return data


def hard_bounce(recipient: str) -> dict:
    return event(
        "failed",
        recipient,
        severity="permanent",
        reason="bounce",
        **{"delivery-status": {"code": 550, "description": "No such mailbox", "message": "5.1.1"}},
    )


def signed(
    data: object,
    *,
    key: str = SIGNING_KEY,
    timestamp: str | int | None = None,
    token: str | None = None,
) -> dict:
    """Mailgun's JSON body: the event with an HMAC-SHA256 over timestamp + token."""
    timestamp = str(int(time.time())) if timestamp is None else timestamp
    token = secrets.token_hex(25) if token is None else token
    signature = hmac.new(key.encode(), f"{timestamp}{token}".encode(), hashlib.sha256).hexdigest()
    return {
        "signature": {"timestamp": timestamp, "token": token, "signature": signature},
        "event-data": data,
    }


def post_body(
    client,
    body: bytes | str,
    *,
    auth: str | None = BASIC,
    content_type: str = "application/json",
):
    headers = {}
    if auth is not None:
        headers["HTTP_AUTHORIZATION"] = "Basic " + base64.b64encode(auth.encode()).decode()
    # generic(), not post(): post() would re-encode bytes to a charset named in content_type.
    return client.generic("POST", URL, body, content_type=content_type, secure=True, **headers)


def post(
    client,
    data: dict,
    *,
    key: str = SIGNING_KEY,
    auth: str | None = BASIC,
    timestamp: str | int | None = None,
    token: str | None = None,
):
    """POST as Mailgun does: JSON with an HMAC-SHA256 over timestamp + token."""
    body = signed(data, key=key, timestamp=timestamp, token=token)
    return post_body(client, json.dumps(body), auth=auth)


def suppressed(guardian: Guardian) -> str | None:
    guardian.refresh_from_db()
    return guardian.suppressed_reason if guardian.suppressed_at else None


def test_hard_bounce_suppresses_the_address_in_every_school(client, mailgun, school, other_school):
    here = factories.make_guardian(school=school, email="Gone@Example.org")
    there = factories.make_guardian(school=other_school, email="gone@example.org")
    bystander = factories.make_guardian(school=school, email="still@example.org")
    response = post(client, hard_bounce("gone@example.org"))
    assert response.status_code == 200
    assert "hard bounce" in suppressed(here) and "Mailgun" in suppressed(here)
    assert suppressed(there) is not None
    assert suppressed(bystander) is None


def test_complaint_suppresses(client, mailgun, school):
    g = factories.make_guardian(school=school, email="angry@example.org")
    assert post(client, event("complained", "angry@example.org")).status_code == 200
    assert "complaint" in suppressed(g)


def test_temporary_failure_and_delivery_do_not_suppress(client, mailgun, school):
    g = factories.make_guardian(school=school, email="full@example.org")
    soft = event("failed", "full@example.org", severity="temporary", reason="generic")
    assert post(client, soft).status_code == 200
    assert post(client, event("delivered", "full@example.org")).status_code == 200
    assert suppressed(g) is None


def test_redelivered_webhook_keeps_the_first_reason(client, mailgun, school):
    g = factories.make_guardian(school=school, email="gone@example.org")
    post(client, hard_bounce("gone@example.org"))
    first = suppressed(g)
    g.refresh_from_db()
    at = g.suppressed_at
    post(client, event("complained", "gone@example.org"))
    g.refresh_from_db()
    assert g.suppressed_reason == first and g.suppressed_at == at


def test_bad_signature_is_rejected(client, mailgun, school):
    g = factories.make_guardian(school=school, email="gone@example.org")
    response = post(client, hard_bounce("gone@example.org"), key="not-the-signing-key")
    assert response.status_code == 400
    assert suppressed(g) is None


def test_missing_basic_auth_is_rejected_when_configured(client, mailgun, school):
    g = factories.make_guardian(school=school, email="gone@example.org")
    assert post(client, hard_bounce("gone@example.org"), auth=None).status_code == 400
    assert post(client, hard_bounce("gone@example.org"), auth="mailgun:wrong").status_code == 400
    assert suppressed(g) is None


def test_unconfigured_webhook_does_not_exist(client, settings, school):
    settings.ANYMAIL = {}
    g = factories.make_guardian(school=school, email="gone@example.org")
    assert post(client, hard_bounce("gone@example.org")).status_code == 404
    assert suppressed(g) is None


@pytest.mark.django_db(transaction=True)
def test_bounce_then_next_broadcast_skips_that_address(client, mailgun, school, smtp, redis_client):
    kid = factories.make_student(school=school)
    bounced = factories.make_guardian(school=school, students=[kid], email="gone@example.org")
    fine = factories.make_guardian(school=school, students=[kid], email="fine@example.org")
    assert post(client, hard_bounce("gone@example.org")).status_code == 200

    b = factories.make_broadcast(school=school)
    message_schedule(message=b, send_at=timezone.now())
    [mailing_id] = dispatch.dispatch_due()
    skipped = Delivery.objects.get(mailing_id=mailing_id, email_normalized="gone@example.org")
    assert skipped.status == S.SKIPPED
    assert skipped.last_error.startswith("address suppressed: hard bounce")
    assert skipped.guardian_ids == [bounced.pk]
    while batch.batch_send(mailing_id=mailing_id).claimed:
        pass
    assert [m.rcpt for m in smtp.accepted] == [fine.email]
    assert Delivery.objects.get(mailing_id=mailing_id, email_normalized=fine.email).status == S.SENT


# --- Replays, stale signatures, basic auth, malformed bodies, Redis away ---


def test_replayed_request_with_another_recipient_is_refused(client, mailgun, school, other_school):
    """The review's attack: Mailgun signs only timestamp + token, so one genuine request can be
    resent with any event in it. Each token is accepted once."""
    genuine = factories.make_guardian(school=school, email="gone@example.org")
    victims = [
        factories.make_guardian(school=school, email="victim@example.org"),
        factories.make_guardian(school=other_school, email="victim@example.org"),
    ]
    body = signed(hard_bounce("gone@example.org"))
    assert post_body(client, json.dumps(body)).status_code == 200
    assert suppressed(genuine) is not None

    body["event-data"] = hard_bounce("victim@example.org")
    assert post_body(client, json.dumps(body)).status_code == 400
    body["event-data"] = event("complained", "victim@example.org")
    assert post_body(client, json.dumps(body)).status_code == 400
    assert [suppressed(v) for v in victims] == [None, None]


def test_identical_redelivery_is_refused(client, mailgun, school):
    factories.make_guardian(school=school, email="gone@example.org")
    body = json.dumps(signed(hard_bounce("gone@example.org")))
    assert post_body(client, body).status_code == 200
    assert post_body(client, body).status_code == 400


def test_token_is_remembered_in_redis_beyond_the_window(client, mailgun, redis_client):
    token = secrets.token_hex(25)
    assert post(client, event("delivered", "x@example.org"), token=token).status_code == 200
    ttl = redis_client.ttl(f"edsmart:webhook:mailgun:token:{token}")
    assert ttl > webhooks.MAX_AGE_SECONDS + webhooks.MAX_FUTURE_SECONDS


@pytest.mark.parametrize(
    "age",
    [
        webhooks.MAX_AGE_SECONDS + 5,  # just too old
        time.time() - 1_000_000_000,  # signed in 2001, as in the review
        -(webhooks.MAX_FUTURE_SECONDS + 5),  # just too far ahead
        -10 * 365 * 86400,  # far future
    ],
    # Named, so that both test processes collect the same ids (one age depends on the clock).
    ids=["just-too-old", "signed-in-2001", "just-too-far-ahead", "far-future"],
)
def test_stale_or_future_timestamp_is_refused(client, mailgun, school, age):
    g = factories.make_guardian(school=school, email="gone@example.org")
    timestamp = str(int(time.time() - age))
    assert post(client, hard_bounce("gone@example.org"), timestamp=timestamp).status_code == 400
    assert suppressed(g) is None


@pytest.mark.parametrize(
    "age", [webhooks.MAX_AGE_SECONDS - 30, -(webhooks.MAX_FUTURE_SECONDS - 30)]
)
def test_timestamp_inside_the_window_is_accepted(client, mailgun, school, age):
    g = factories.make_guardian(school=school, email="gone@example.org")
    timestamp = str(int(time.time() - age))
    assert post(client, hard_bounce("gone@example.org"), timestamp=timestamp).status_code == 200
    assert suppressed(g) is not None


def test_integer_timestamp_is_accepted(client, mailgun, school):
    """Mailgun's docs show the timestamp as a string but type it as an int: take both."""
    g = factories.make_guardian(school=school, email="gone@example.org")
    timestamp = int(time.time())
    assert post(client, hard_bounce("gone@example.org"), timestamp=timestamp).status_code == 200
    assert suppressed(g) is not None


def test_without_basic_auth_configured_and_debug_off_the_webhook_is_refused(
    client, settings, school, caplog
):
    settings.DEBUG = False
    settings.ANYMAIL = {"MAILGUN_WEBHOOK_SIGNING_KEY": SIGNING_KEY}
    g = factories.make_guardian(school=school, email="gone@example.org")
    with caplog.at_level(logging.ERROR, logger="edsmart.webhooks"):
        response = post(client, hard_bounce("gone@example.org"), auth=None)
    assert response.status_code == 404
    assert suppressed(g) is None
    assert any("WEBHOOK_SECRET" in r.getMessage() for r in caplog.records)


def test_with_debug_on_basic_auth_stays_optional(client, settings, school):
    settings.DEBUG = True
    settings.ANYMAIL = {"MAILGUN_WEBHOOK_SIGNING_KEY": SIGNING_KEY}
    g = factories.make_guardian(school=school, email="gone@example.org")
    assert post(client, hard_bounce("gone@example.org"), auth=None).status_code == 200
    assert suppressed(g) is not None


def _non_ascii_token() -> bytes:
    return json.dumps(signed(hard_bounce("gone@example.org"), token="tök€n-ünïcødé")).encode()


def _signed(data: object) -> bytes:
    return json.dumps(signed(data)).encode()


MALFORMED = {
    "empty list": b"[]",
    "null": b"null",
    "a string": b'"signature"',
    "a number": b"1",
    "empty object": b"{}",
    "not JSON": b"{signature:",
    "not UTF-8": b'{"signature": "\xff"}',
    "deeply nested": b"[" * 100_000 + b"]" * 100_000,
    "signature not an object": b'{"signature": [], "event-data": {}}',
    "signature fields missing": b'{"signature": {}, "event-data": {}}',
    "signature fields not strings": json.dumps(
        {"signature": {"timestamp": [1], "token": {}, "signature": None}, "event-data": {}}
    ).encode(),
    "non-ASCII token": _non_ascii_token(),
    "signed, no event-data": json.dumps({"signature": signed({})["signature"]}).encode(),
    "signed, event-data a list": _signed([]),
    "signed, no event field": _signed({"recipient": "gone@example.org", "severity": "permanent"}),
    "signed, event a list": _signed({"event": ["failed"], "recipient": "gone@example.org"}),
    "signed, severity an object": _signed(
        {"event": "failed", "recipient": "gone@example.org", "severity": {}}
    ),
    "signed, reason a list": _signed({"event": "failed", "recipient": "x@y", "reason": []}),
    "signed, timestamp infinite": _signed({"event": "failed", "timestamp": 1e400}),
    "signed, timestamp a word": _signed({"event": "failed", "timestamp": "yesterday"}),
    "signed, message not an object": _signed({"event": "failed", "message": "hello"}),
    "signed, message-id a number": _signed(
        {"event": "failed", "message": {"headers": {"message-id": 7}}}
    ),
    "signed, client-info a list": _signed({"event": "clicked", "client-info": []}),
    "signed, reject a string": _signed({"event": "rejected", "reject": "spam"}),
    "signed, recipient a number": _signed({"event": "complained", "recipient": 42}),
    "signed, recipient with NUL": _signed({"event": "complained", "recipient": "a\x00@b.org"}),
    "signed, recipient a lone surrogate": _signed({"event": "complained", "recipient": "\ud800"}),
    "signed, recipient huge": _signed({"event": "complained", "recipient": "a" * 100_000}),
}


@pytest.mark.parametrize("body", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_body_is_a_400(client, mailgun, school, body):
    g = factories.make_guardian(school=school, email="gone@example.org")
    assert post_body(client, body).status_code == 400
    assert suppressed(g) is None


def test_form_encoded_legacy_webhook_is_a_400(client, mailgun):
    response = post_body(
        client,
        "event=complained&recipient=gone%40example.org&token=t&timestamp=1&signature=s",
        content_type="application/x-www-form-urlencoded",
    )
    assert response.status_code == 400


def test_unauthenticated_malformed_body_is_a_400(client, mailgun):
    for body in (b"[]", b"null", _non_ascii_token()):
        assert post_body(client, body, auth=None).status_code == 400


def test_odd_text_in_the_bounce_description_is_stored_cleanly(client, mailgun, school):
    """PostgreSQL refuses NUL and lone surrogates; the reason is cleaned, not a 500."""
    g = factories.make_guardian(school=school, email="gone@example.org")
    data = hard_bounce("gone@example.org")
    data["delivery-status"]["description"] = "No\x00such \ud800 mailbox"
    assert post(client, data).status_code == 200
    assert suppressed(g).startswith("hard bounce: Nosuch ? mailbox")


def test_redis_away_is_a_503_and_nothing_is_suppressed(client, mailgun, settings, school):
    settings.REDIS_URL = "redis://127.0.0.1:1/0"  # nothing listens there
    g = factories.make_guardian(school=school, email="gone@example.org")
    response = post(client, hard_bounce("gone@example.org"))
    assert response.status_code == 503
    assert suppressed(g) is None


def test_a_failure_while_suppressing_lets_the_same_request_be_redelivered(
    client, mailgun, school, monkeypatch
):
    g = factories.make_guardian(school=school, email="gone@example.org")
    body = json.dumps(signed(hard_bounce("gone@example.org")))
    real = webhooks.guardians_suppress

    def database_away(**kwargs):
        monkeypatch.setattr(webhooks, "guardians_suppress", real)
        raise RuntimeError("database away")

    monkeypatch.setattr(webhooks, "guardians_suppress", database_away)
    client.raise_request_exception = False
    assert post_body(client, body).status_code == 500
    assert suppressed(g) is None
    assert post_body(client, body).status_code == 200
    assert suppressed(g) is not None
