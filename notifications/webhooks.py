"""Bounces and complaints from the mail provider: suppress the address everywhere.

Mailgun's tracking webhook (through django-anymail) is wired at
``/webhooks/anymail/mailgun/tracking/``. Anymail checks Mailgun's HMAC-SHA256 signature with
``ANYMAIL["MAILGUN_WEBHOOK_SIGNING_KEY"]`` (and HTTP basic auth too when
``ANYMAIL["WEBHOOK_SECRET"]`` is set) before any event reaches us; a bad signature is a 400.
Without a signing key the endpoint answers 404 rather than accepting unsigned posts.

A guardian row belongs to one school, but an address is one mailbox: a hard bounce or a
complaint means nobody should mail it again, so every guardian with that normalized address,
in every school, is suppressed. The fan-out then records them as ``skipped`` with the reason.
Staff reactivate an address by clearing ``suppressed_at`` on the guardian.
"""

from __future__ import annotations

import logging

from anymail.exceptions import AnymailConfigurationError
from anymail.signals import AnymailTrackingEvent, EventType, RejectReason, tracking
from anymail.utils import get_anymail_setting
from anymail.webhooks.mailgun import MailgunTrackingWebhookView
from django.dispatch import receiver
from django.http import Http404, HttpRequest, HttpResponse
from django.utils import timezone
from django.views.decorators.csrf import csrf_exempt

from slips.models import Guardian, normalize_email

log = logging.getLogger("edsmart.webhooks")

# Permanent bounces only: a full mailbox or a greylisting server is not a reason to stop.
HARD_BOUNCE_REASONS = frozenset({RejectReason.BOUNCED, RejectReason.INVALID})
# Rejected by the provider itself because of an earlier bounce or complaint.
REJECT_REASONS = frozenset({RejectReason.BOUNCED, RejectReason.INVALID, RejectReason.SPAM})


def suppression_reason(event: AnymailTrackingEvent) -> str | None:
    """Why this event should stop mail to its recipient, or None if it should not."""
    kind = event.event_type
    if kind == EventType.COMPLAINED:
        return "complaint (marked as spam)"
    if kind == EventType.BOUNCED and event.reject_reason in HARD_BOUNCE_REASONS:
        return f"hard bounce: {event.description or event.mta_response or event.reject_reason}"
    if kind == EventType.REJECTED and event.reject_reason in REJECT_REASONS:
        return f"rejected by provider: {event.description or event.reject_reason}"
    return None


def guardians_suppress(*, email: str, reason: str) -> int:
    """Suppress every guardian with this address. The first reason is kept on redelivery."""
    normalized = normalize_email(email)
    if not normalized:
        return 0
    return Guardian.objects.filter(email_normalized=normalized, suppressed_at__isnull=True).update(
        suppressed_at=timezone.now(), suppressed_reason=reason[:200]
    )


@receiver(tracking, dispatch_uid="edsmart-suppress-on-bounce")
def on_tracking(
    sender: object, event: AnymailTrackingEvent, esp_name: str, **kwargs: object
) -> None:
    reason = suppression_reason(event)
    if reason is None or not event.recipient:
        return
    reason = f"{reason} ({esp_name}, {timezone.now():%Y-%m-%d})"
    count = guardians_suppress(email=event.recipient, reason=reason)
    log.warning(
        "suppressed %s guardian(s) after %s",
        count,
        event.event_type,
        extra={"event_type": event.event_type, "provider_message_id": event.message_id},
    )


def _mailgun_configured() -> bool:
    for name in ("webhook_signing_key", "api_key"):
        try:
            if get_anymail_setting(name, esp_name="Mailgun", default=None, allow_bare=True):
                return True
        except AnymailConfigurationError:
            continue
    return False


_mailgun_view = MailgunTrackingWebhookView.as_view()


@csrf_exempt
def mailgun_tracking(request: HttpRequest) -> HttpResponse:
    """Anymail's Mailgun tracking view, refused outright until a signing key is configured."""
    if not _mailgun_configured():
        raise Http404("webhook not configured")
    return _mailgun_view(request)
