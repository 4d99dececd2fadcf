"""What happened to one message, recipient by recipient: the evidence behind a parent's
"I never got it" or "I got it three times".

Staff and ops answer such a complaint with facts, not with a status word: each try with its
time, the Message-ID the parent can search for, the provider's id for it, the server's reply,
and whatever the provider reported later (delivered, bounced, complained). Those facts are
spread over three places on purpose, and this module puts them back in time order:

- the delivery row: the last send's start (``submitted_at``), its acceptance (``sent_at``,
  ``provider_id``, the count ``accepted``), a first open of a link, and, for rows settled at
  fan-out (a suppressed or invalid address), the reason in ``last_error``. An accepted send
  writes no event row (an event per email was a third of the database's work per email), so
  the row is its only record; two acceptances of one row (a duplicate) leave the count and the
  last time, and the earlier time is in the worker's logs under the delivery id;
- the delivery's events: every recorded outcome but a plain acceptance (a refusal or timeout
  with the server's reply, an expired lease, a cancel, a person's or the provider's settling);
- the provider's events (``ProviderEvent``), matched to the delivery when they arrived.

Reads are batched per page of deliveries (three queries for any number of recipients), so the
CSV of a 50,000-recipient mailing streams in constant memory.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from django.db.models import QuerySet

from notifications.models import Delivery, DeliveryEvent, DeliveryStatus, Mailing, ProviderEvent

S = DeliveryStatus

# Deliveries read per round trip when streaming a whole mailing.
CHUNK = 1000

CSV_HEADER = (
    "mailing",
    "recipient",
    "recipient_name",
    "delivery_id",
    "status_now",
    "time_utc",
    "attempt",
    "step",
    "message_id",
    "provider_id",
    "reply_or_reason",
    "by",
)


@dataclass(frozen=True)
class Step:
    """One thing that happened to one delivery."""

    at: dt.datetime | None
    attempt: int | None
    what: str
    message_id: str = ""
    provider_id: str = ""
    reply: str = ""
    by: str = ""


@dataclass(frozen=True)
class RecipientEvidence:
    delivery: Delivery
    steps: list[Step]

    @property
    def accepted_times(self) -> int:
        return self.delivery.accepted


def _event_step(event: DeliveryEvent, delivery: Delivery) -> Step:
    labels = {
        S.RETRY_WAIT: "refused for now, to be tried again",
        S.FAILED: "failed",
        S.UNKNOWN: "outcome unknown (no reply from the server)",
        S.SENT: "settled as sent",
        S.PENDING: "queued to be sent again",
        S.CANCELLED: "cancelled",
        S.CLAIMED: "taken by a worker",
    }
    what = labels.get(event.to_status, event.to_status)
    if event.from_status in (S.CLAIMED, S.SUBMITTING) and event.to_status == S.PENDING:
        what = "worker lost before the send: given back"
    return Step(
        at=event.at,
        attempt=event.attempt,
        what=f"{what} ({event.from_status} → {event.to_status})",
        message_id=delivery.message_id_header,
        reply=event.detail,
        by=event.actor or "worker",
    )


def _provider_step(event: ProviderEvent, delivery: Delivery) -> Step:
    outcome = f"; {event.outcome}" if event.outcome else ""
    return Step(
        at=event.occurred_at or event.received_at,
        attempt=None,
        what=f"provider reported: {event.get_kind_display()}{outcome}",
        message_id=delivery.message_id_header,
        provider_id=event.provider_message_id,
        reply=event.reason,
        by=f"provider event ({event.esp})",
    )


def _row_steps(delivery: Delivery, events: Sequence[DeliveryEvent]) -> list[Step]:
    """What only the row itself records: the last start, plain acceptances, a first open, and
    why a row settled at fan-out has no send at all."""
    steps: list[Step] = []
    mid = delivery.message_id_header
    if delivery.submitted_at is not None:
        steps.append(
            Step(
                at=delivery.submitted_at,
                attempt=delivery.attempt,
                what=f"last send started (try {delivery.tries} of this delivery)",
                message_id=mid,
            )
        )
    # Settling moves into ``sent`` (a late reply, a person, the provider) have their own event
    # and also count in ``accepted``; what is left were plain acceptances on the hot path.
    settled = sum(1 for e in events if e.to_status == S.SENT)
    plain = delivery.accepted - settled
    if plain > 0 and delivery.sent_at is not None:
        what = "accepted by the mail server"
        if plain > 1:
            what += (
                f" ({plain} acceptances of this one delivery: a DUPLICATE; this is the last, "
                "the earlier times are in the worker logs under this delivery id)"
            )
        steps.append(
            Step(
                at=delivery.sent_at,
                attempt=delivery.attempt,
                what=what,
                message_id=mid,
                provider_id=delivery.provider_id,
                reply=delivery.provider_id,
            )
        )
    if not events and delivery.status in (S.SKIPPED, S.FAILED) and delivery.tries == 0:
        steps.append(
            Step(
                at=delivery.created_at,
                attempt=None,
                what=f"not sent: {delivery.get_status_display().lower()} when the message went out",
                reply=delivery.last_error,
                by="fan-out",
            )
        )
    if delivery.opened_at is not None:
        steps.append(
            Step(
                at=delivery.opened_at,
                attempt=None,
                what="a link in it was first opened (a mail scanner also counts)",
                message_id=mid,
                by="parent's link",
            )
        )
    return steps


def _sort_key(step: Step) -> tuple[dt.datetime, int]:
    at = step.at or dt.datetime.min.replace(tzinfo=dt.UTC)
    return (at, step.attempt or 0)


def evidence_for(deliveries: Sequence[Delivery]) -> list[RecipientEvidence]:
    """Each delivery with its steps in time order: one query for their events and one for
    the provider's, whatever the number of deliveries."""
    ids = [d.pk for d in deliveries]
    events: dict[int, list[DeliveryEvent]] = {pk: [] for pk in ids}
    for event in DeliveryEvent.objects.filter(delivery_id__in=ids).order_by("at", "id"):
        events[event.delivery_id].append(event)
    reported: dict[int, list[ProviderEvent]] = {pk: [] for pk in ids}
    for event in ProviderEvent.objects.filter(delivery_id__in=ids).order_by("received_at", "id"):
        reported[event.delivery_id].append(event)
    found = []
    for delivery in deliveries:
        own = events[delivery.pk]
        steps = [
            *_row_steps(delivery, own),
            *(_event_step(e, delivery) for e in own),
            *(_provider_step(e, delivery) for e in reported[delivery.pk]),
        ]
        found.append(RecipientEvidence(delivery=delivery, steps=sorted(steps, key=_sort_key)))
    return found


def deliveries_of_mailing(mailing: Mailing, *, address: str = "") -> QuerySet[Delivery]:
    """The mailing's deliveries in address order, which the unique (school, mailing, address)
    index returns unsorted; ``address`` narrows to one parent."""
    found = Delivery.objects.filter(school_id=mailing.school_id, mailing_id=mailing.pk)
    if address:
        found = found.filter(email_normalized=address)
    return found.select_related("mailing").order_by("email_normalized")


def csv_rows(mailings: QuerySet[Mailing], *, address: str = "") -> Iterator[list[object]]:
    """One CSV row per step (a row with no steps yet still says where it stands), read
    ``CHUNK`` deliveries at a time by keyset on the unique (school, mailing, address) index,
    so memory stays flat for any mailing."""
    for mailing in mailings.order_by("pk").only("pk", "school_id"):
        rows = deliveries_of_mailing(mailing, address=address)
        last = None
        while True:
            page = rows if last is None else rows.filter(email_normalized__gt=last)
            chunk = list(page[:CHUNK])
            if not chunk:
                break
            for item in evidence_for(chunk):
                yield from _rows_of(item)
            last = chunk[-1].email_normalized


def _rows_of(item: RecipientEvidence) -> Iterable[list[object]]:
    d = item.delivery
    head = [f"mailing:{d.mailing_id}", d.email, d.recipient_name, d.pk, d.status]
    if not item.steps:
        yield [*head, "", "", "nothing yet: waiting to be sent", d.message_id_header, "", "", ""]
        return
    for step in item.steps:
        yield [
            *head,
            step.at.astimezone(dt.UTC).isoformat(timespec="seconds") if step.at else "",
            "" if step.attempt is None else step.attempt,
            step.what,
            step.message_id,
            step.provider_id,
            step.reply,
            step.by,
        ]
