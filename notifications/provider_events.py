"""The mail provider's events about our deliveries: recorded on the delivery, and settling
``unknown`` ones.

Every provider anymail supports reaches this through anymail's normalized tracking signal
(``webhooks.on_tracking`` calls ``event_record``): a delivery, a deferral, a hard or soft
bounce, a complaint, or the provider's own rejection becomes one ``ProviderEvent`` row. Opens
and clicks are not stored.

Which delivery an event is about, in this order (the first id found decides):

1. anymail's ``metadata["edsmart_delivery"]``, which ``mailer`` sets on every ESP send and
   providers echo in their events;
2. our Message-ID, ``<edsmart.delivery.N@our domain>``, as the event's message id (Mailgun
   reports the Message-ID header) or in the raw event's headers;
3. the provider's message id, as ``Delivery.provider_id`` (Postmark, SES, ...), with the same
   recipient. There is no index on ``provider_id`` (every index costs each email an insert on
   the hot path), so the lookup probes the unique (school, mailing, address) index with the
   last ``PROVIDER_ID_WINDOW_DAYS`` days' mailings of the schools where the address is a
   guardian's, and the partial index of ``unknown`` rows for older ones.

Whatever the route, an event that carries a recipient must agree with the row's normalized
address, or it is recorded as unmatched and settles nothing: a forged or mistaken id must not
move someone else's delivery.

What an event does to the row (``controls.unknown_settle_by_provider``): only an ``unknown``
row moves (delivered -> sent, bounced -> failed, rejected -> retry or failed, with actor
"provider event"); on any other row the event is only recorded. Each event is recorded once
per provider event id (for providers without one, a digest of the event's identifying fields),
in the same transaction as its move, so a redelivered event changes nothing twice.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import re
from dataclasses import dataclass
from typing import Any

from anymail.signals import AnymailTrackingEvent, EventType, RejectReason
from django.db import IntegrityError, transaction
from django.utils import timezone

from notifications import controls
from notifications.models import Delivery, DeliveryStatus, Mailing, ProviderEvent
from notifications.rendering import message_id_for
from slips.models import Guardian, normalize_email

log = logging.getLogger("edsmart.webhooks")

K = ProviderEvent.Kind
METADATA_KEY = "edsmart_delivery"
# Provider ids are looked up among mailings this recent (and among unknown rows of any age).
PROVIDER_ID_WINDOW_DAYS = 45

# Permanent bounces: the address is gone (the webhook suppresses it).
HARD_BOUNCE_REASONS = frozenset({RejectReason.BOUNCED, RejectReason.INVALID})
# Postmark's soft bounce is normalized by anymail as a bounce with reason "bounced", the same
# as a hard one; only the raw event's Type tells them apart.
_SOFT_BOUNCE_TYPES = frozenset({"SoftBounce"})

_MESSAGE_ID = re.compile(r"<?\s*edsmart\.delivery\.([0-9]{1,18})@([^>\s]{1,255})\s*>?")
_DIGITS = re.compile(r"[0-9]{1,18}")

_SETTLES = {
    K.DELIVERED: controls.ProviderVerdict.DELIVERED,
    K.HARD_BOUNCE: controls.ProviderVerdict.BOUNCED,
    K.SOFT_BOUNCE: controls.ProviderVerdict.BOUNCED,
    K.REJECTED: controls.ProviderVerdict.REJECTED,
}


def is_soft_bounce(event: AnymailTrackingEvent) -> bool:
    """A bounce that anymail reports like a hard one but the provider calls temporary."""
    raw = event.esp_event
    return isinstance(raw, dict) and raw.get("Type") in _SOFT_BOUNCE_TYPES


def event_kind(event: AnymailTrackingEvent) -> str | None:
    """The kind stored for this event, or None for events not stored (opens, clicks...)."""
    kind = event.event_type
    if kind == EventType.DELIVERED:
        return K.DELIVERED
    if kind == EventType.DEFERRED:
        return K.DEFERRED
    if kind == EventType.COMPLAINED:
        return K.COMPLAINT
    if kind == EventType.REJECTED:
        return K.REJECTED
    if kind == EventType.BOUNCED:
        if event.reject_reason in HARD_BOUNCE_REASONS and not is_soft_bounce(event):
            return K.HARD_BOUNCE
        # Mailgun's permanent failure for another reason (gave up retrying, a policy), or a
        # provider's explicit soft bounce: it did not arrive, but the address may be fine.
        return K.SOFT_BOUNCE
    return None


def storable(value: object, limit: int) -> str:
    """Text PostgreSQL will take, whatever the provider (or an attacker) sent: a string, no
    NUL, no lone surrogate, at most ``limit`` characters."""
    if value is None:
        return ""
    text = value if isinstance(value, str) else str(value)
    text = text[: limit * 2].encode("utf-8", "replace").decode("utf-8").replace("\x00", "")
    return text[:limit]


def event_reason(event: AnymailTrackingEvent) -> str:
    """The provider's own words: its description and the remote server's response."""
    parts: list[str] = []
    for value in (event.description, event.mta_response):
        text = storable(value, 2000).strip()
        if text and text not in parts:
            parts.append(text)
    if not parts and event.reject_reason:
        parts.append(storable(event.reject_reason, 100))
    return " | ".join(parts)[:4000]


# --- matching -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Match:
    delivery: Delivery | None
    how: str  # "metadata", "message-id", "provider id"; or why there is none


def _raw_message_ids(raw: object) -> list[object]:
    """Message-IDs in the raw event where providers put the message's headers."""
    found: list[object] = []
    if not isinstance(raw, dict):
        return found
    data = raw.get("event-data")  # Mailgun
    if isinstance(data, dict):
        message = data.get("message")
        headers = message.get("headers") if isinstance(message, dict) else None
        if isinstance(headers, dict):
            found.append(headers.get("message-id"))
    mail = raw.get("mail")  # Amazon SES
    if isinstance(mail, dict):
        common = mail.get("commonHeaders")
        if isinstance(common, dict):
            found.append(common.get("messageId"))
    return found


def delivery_id_from_message_id(value: object) -> int | None:
    """N from our ``<edsmart.delivery.N@domain>``, only when it is exactly ours."""
    if not isinstance(value, str) or len(value) > 600:
        return None
    m = _MESSAGE_ID.fullmatch(value.strip())
    if m is None:
        return None
    delivery_id = int(m.group(1))
    if (
        f"<edsmart.delivery.{delivery_id}@{m.group(2)}>".lower()
        != message_id_for(delivery_id).lower()
    ):
        return None  # another domain's: not a message of ours
    return delivery_id


def _named_delivery_id(event: AnymailTrackingEvent) -> tuple[int | None, str]:
    metadata = event.metadata
    if isinstance(metadata, dict):
        value = metadata.get(METADATA_KEY)
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if isinstance(value, str) and _DIGITS.fullmatch(value):
            return int(value), "metadata"
    for value in (event.message_id, *_raw_message_ids(event.esp_event)):
        delivery_id = delivery_id_from_message_id(value)
        if delivery_id is not None:
            return delivery_id, "message-id"
    return None, ""


def _by_provider_id(provider_id: str, recipient: str, now: dt.datetime) -> Delivery | None:
    """The delivery with this provider id and address, without an index on provider_id.

    Only the mailings of schools where the address is a guardian's are probed: a delivery is
    made from a guardian's address, and probing every school's last 45 days (12,000 mailings
    at a year of history for 1,000 schools) took 250 ms an event, where a parent's one or two
    schools take a few (``bench/history.py``).
    """
    schools = set(
        Guardian.objects.filter(email_normalized=recipient).values_list("school_id", flat=True)
    )
    recent = list(
        Mailing.objects.filter(
            school_id__in=schools,
            created_at__gte=now - dt.timedelta(days=PROVIDER_ID_WINDOW_DAYS),
        ).values_list("pk", flat=True)
    )
    found = list(
        Delivery.objects.filter(
            school_id__in=schools,
            mailing_id__in=recent,
            email_normalized=recipient,
            provider_id=provider_id,
        ).order_by("-id")[:1]
    )
    if found:
        return found[0]
    # ``unknown`` rows may sit in a mailing completed long ago; the partial index lists them.
    return (
        Delivery.objects.filter(
            status=DeliveryStatus.UNKNOWN, email_normalized=recipient, provider_id=provider_id
        )
        .order_by("-id")
        .first()
    )


def delivery_match(event: AnymailTrackingEvent, *, now: dt.datetime | None = None) -> Match:
    """The delivery this event is about (see the module docstring), or why there is none."""
    recipient = normalize_email(event.recipient) if isinstance(event.recipient, str) else ""
    delivery_id, how = _named_delivery_id(event)
    if delivery_id is not None:
        delivery = Delivery.objects.filter(pk=delivery_id).first()
        if delivery is None:
            return Match(None, f"unmatched: no delivery {delivery_id}")
        if recipient and delivery.email_normalized != recipient:
            return Match(None, "unmatched: recipient differs")
        return Match(delivery, how)
    provider_id = event.message_id
    if isinstance(provider_id, str) and provider_id and len(provider_id) <= 250 and recipient:
        delivery = _by_provider_id(provider_id, recipient, now or timezone.now())
        if delivery is not None:
            return Match(delivery, "provider id")
    return Match(None, "unmatched")


# --- recording ------------------------------------------------------------------------------------


def _event_id(event: AnymailTrackingEvent, esp_name: str, kind: str, message_id: str) -> str:
    """The provider's own id of this event, or a digest of what identifies it."""
    raw = event.esp_event
    if esp_name == "Mailgun" and isinstance(raw, dict):
        # anymail takes the webhook request's token, which is new on each request; the
        # event's own id is what a redelivery of the same event repeats.
        data = raw.get("event-data")
        if isinstance(data, dict) and isinstance(data.get("id"), str) and data["id"]:
            return storable(data["id"], 250)
    if isinstance(event.event_id, str) and event.event_id:
        return storable(event.event_id, 250)
    when = event.timestamp.isoformat() if isinstance(event.timestamp, dt.datetime) else ""
    recipient = storable(event.recipient, 254)
    digest = hashlib.sha256(
        "\x1f".join([kind, str(event.event_type), message_id, recipient, when]).encode()
    ).hexdigest()
    return f"~{digest}"


def _occurred_at(event: AnymailTrackingEvent) -> dt.datetime | None:
    when = event.timestamp
    if not isinstance(when, dt.datetime):
        return None
    if timezone.is_naive(when):
        when = timezone.make_aware(when, dt.UTC)
    return when


def event_record(*, event: AnymailTrackingEvent, esp_name: str) -> ProviderEvent | None:
    """Record this event on its delivery and let it settle an ``unknown`` one.

    Returns the new row; None for an event not stored (an open, say) or already recorded.
    Raises on a database error, so the webhook answers 500 and the provider retries.
    """
    kind = event_kind(event)
    if kind is None:
        return None
    esp = storable(esp_name, 50)
    message_id = storable(event.message_id, 250)
    event_id = _event_id(event, esp, kind, message_id)
    if ProviderEvent.objects.filter(esp=esp, event_id=event_id).exists():
        log.info("provider event %s (%s) already recorded", event_id, esp)
        return None
    match = delivery_match(event)
    reason = event_reason(event)
    delivery = match.delivery
    try:
        with transaction.atomic():
            outcome = match.how if delivery is None else "recorded"
            verdict = _SETTLES.get(kind)
            if delivery is not None and verdict is not None:
                detail = f"{verdict} ({esp} event): {reason}" if reason else f"{verdict} ({esp})"
                to = controls.unknown_settle_by_provider(
                    delivery_id=delivery.pk, verdict=verdict, detail=detail
                )
                if to is not None:
                    outcome = f"settled unknown → {to}"
                elif kind in (K.DELIVERED, K.REJECTED):
                    status = Delivery.objects.filter(pk=delivery.pk).values_list(
                        "status", flat=True
                    )
                    outcome = f"late: delivery already {status.first() or 'gone'}"
            row = ProviderEvent.objects.create(
                delivery=delivery,
                school_id=delivery.school_id if delivery is not None else None,
                esp=esp,
                event_type=storable(event.event_type, 32),
                kind=kind,
                reason=reason,
                email=storable(event.recipient, 254),
                provider_message_id=message_id,
                event_id=event_id,
                occurred_at=_occurred_at(event),
                outcome=outcome[:100],
            )
    except IntegrityError:
        # The same event, recorded meanwhile by a concurrent delivery of it: its move (if
        # any) is rolled back with this insert.
        if ProviderEvent.objects.filter(esp=esp, event_id=event_id).exists():
            log.info("provider event %s (%s) already recorded", event_id, esp)
            return None
        raise
    log.info(
        "provider event %s for delivery %s: %s",
        kind,
        delivery.pk if delivery is not None else None,
        row.outcome,
        extra=_log_extra(row, match),
    )
    return row


def _log_extra(row: ProviderEvent, match: Match) -> dict[str, Any]:
    return {
        "delivery_id": row.delivery_id,
        "event_type": row.event_type,
        "provider_message_id": row.provider_message_id,
        "matched_by": match.how,
    }
