"""Mailgun tracking webhooks via django-anymail: signed as Mailgun signs them, bad signatures
refused, hard bounces and complaints suppress the address in every school, and the next
broadcast records that address as skipped with the reason."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time

import pytest
from django.utils import timezone

from notifications import batch, dispatch
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


def post(client, data: dict, *, key: str = SIGNING_KEY, auth: str | None = BASIC):
    """POST as Mailgun does: JSON with an HMAC-SHA256 over timestamp + token."""
    timestamp, token = str(int(time.time())), secrets.token_hex(25)
    signature = hmac.new(key.encode(), f"{timestamp}{token}".encode(), hashlib.sha256).hexdigest()
    body = {
        "signature": {"timestamp": timestamp, "token": token, "signature": signature},
        "event-data": data,
    }
    headers = {}
    if auth is not None:
        headers["HTTP_AUTHORIZATION"] = "Basic " + base64.b64encode(auth.encode()).decode()
    return client.post(
        URL, data=json.dumps(body), content_type="application/json", secure=True, **headers
    )


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
