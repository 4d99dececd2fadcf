"""What staff, ops and parents' answers do to sending: pause, resume, cancel, resolve.

Lock order, for every transaction that takes more than one of these rows: the source (slip
or broadcast; the slip for a reminder round), then its reminder round, then its mailings, then
their deliveries. The sweeper's completion keeps the same order, so a staff action racing it
waits for it instead of deadlocking.

The doors (admin actions, management commands, the ops page) call these; none of them
writes a status itself. Parents' answers reach ``reminders_cancel_answered`` through the
``answers_recorded`` signal, inside the answer's own transaction: the domain announces, the
sending side reacts, and the domain needs no import of the pipeline for it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TypeVar

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import Q
from django.dispatch import receiver
from django.utils import timezone

from notifications import nudges, summaries, transitions
from notifications.models import Delivery, DeliveryStatus, Mailing, SendingSwitch
from slips.models import (
    Broadcast,
    Guardian,
    ReminderRound,
    Response,
    School,
    SendStatus,
    Slip,
)
from slips.responses import answers_recorded

log = logging.getLogger("edsmart.pipeline")

S = DeliveryStatus
Message = TypeVar("Message", Slip, Broadcast)


# --- a slip or broadcast as staff see it ---------------------------------------------------------


def message_pause(*, message: Message) -> Message:
    """scheduled/sending → paused. Workers stop before their next delivery of it."""
    with transaction.atomic():
        updated = (
            type(message)
            .objects.filter(pk=message.pk, status__in=[SendStatus.SCHEDULED, SendStatus.SENDING])
            .update(status=SendStatus.PAUSED, updated_at=timezone.now())
        )
        if not updated:
            raise ValidationError("Only a scheduled or sending message can be paused.")
        mailings_pause(source=message)
    message.refresh_from_db()
    return message


def message_resume(*, message: Message) -> Message:
    """paused → sending (already fanned out) or scheduled (not yet due or not yet dispatched)."""
    with transaction.atomic():
        model = type(message)
        updated = model.objects.filter(
            pk=message.pk, status=SendStatus.PAUSED, dispatched_at__isnull=False
        ).update(status=SendStatus.SENDING, updated_at=timezone.now())
        if updated:
            mailings_resume(source=message)
        else:
            updated = model.objects.filter(
                pk=message.pk, status=SendStatus.PAUSED, dispatched_at__isnull=True
            ).update(status=SendStatus.SCHEDULED, updated_at=timezone.now())
        if not updated:
            raise ValidationError("Only a paused message can be resumed.")
    message.refresh_from_db()
    return message


def message_cancel(*, message: Message) -> Message:
    """Stop for good. Deliveries not yet submitted are cancelled; sent ones stay sent."""
    with transaction.atomic():
        updated = (
            type(message)
            .objects.filter(
                pk=message.pk,
                status__in=[
                    SendStatus.DRAFT,
                    SendStatus.SCHEDULED,
                    SendStatus.SENDING,
                    SendStatus.PAUSED,
                ],
            )
            .update(status=SendStatus.CANCELLED, updated_at=timezone.now())
        )
        if not updated:
            raise ValidationError("This message has already finished or been cancelled.")
        mailings_cancel(source=message)
        if isinstance(message, Slip):
            ReminderRound.objects.filter(
                slip=message, status=ReminderRound.Status.SCHEDULED
            ).update(status=ReminderRound.Status.CANCELLED)
    message.refresh_from_db()
    return message


# --- the mailings behind them --------------------------------------------------------------


def _source_filter(source: Slip | Broadcast) -> Q:
    return Q(slip=source) if isinstance(source, Slip) else Q(broadcast=source)


def mailings_pause(*, source: Slip | Broadcast) -> int:
    return Mailing.objects.filter(_source_filter(source), status=Mailing.Status.SENDING).update(
        status=Mailing.Status.PAUSED
    )


def mailings_resume(*, source: Slip | Broadcast) -> int:
    ids = list(
        Mailing.objects.filter(_source_filter(source), status=Mailing.Status.PAUSED).values_list(
            "pk", flat=True
        )
    )
    updated = Mailing.objects.filter(pk__in=ids, status=Mailing.Status.PAUSED).update(
        status=Mailing.Status.SENDING
    )
    for mailing_id in ids:
        transaction.on_commit(lambda m=mailing_id: nudges.enqueue_batches(m, None))
    return updated


def mailings_cancel(*, source: Slip | Broadcast, actor: str = "") -> int:
    """Cancel what is not yet submitted. Rows already submitting finish and are recorded.

    The mailings are locked as they are chosen, and only those still sending or paused are
    cancelled: a mailing the sweeper completes meanwhile stays completed.
    """
    cancellable = [Mailing.Status.SENDING, Mailing.Status.PAUSED]
    with transaction.atomic():
        ids = list(
            Mailing.objects.select_for_update()
            .filter(_source_filter(source), status__in=cancellable)
            .values_list("pk", flat=True)
        )
        Mailing.objects.filter(pk__in=ids, status__in=cancellable).update(
            status=Mailing.Status.CANCELLED
        )
        return transitions.deliveries_cancel(mailing_ids=ids, actor=actor)


def reminders_cancel_answered(*, slip: Slip, student_ids: Iterable[int]) -> int:
    """After an answer: cancel reminder deliveries whose every child has now been answered.

    Called inside the transaction that records the answer, so the answer and the
    cancellation commit together. A delivery already submitting is past stopping.
    """
    answered = set(Response.objects.filter(slip=slip).values_list("student_id", flat=True))
    candidates = Delivery.objects.filter(
        mailing__slip=slip,
        mailing__kind=Mailing.Kind.REMINDER,
        status__in=list(transitions.CANCELLABLE),
    )
    ids: list[int] = []
    for sid in set(student_ids):
        for pk, kids in candidates.filter(student_ids__contains=[sid]).values_list(
            "pk", "student_ids"
        ):
            if set(kids) <= answered:
                ids.append(pk)
    return transitions.deliveries_cancel(
        delivery_ids=ids, detail="answered before the reminder went out"
    )


@receiver(answers_recorded)
def _cancel_reminders_on_answer(*, slip: Slip, student_ids: list[int], **_: object) -> None:
    reminders_cancel_answered(slip=slip, student_ids=student_ids)


def sending_set_paused(
    *, paused: bool, actor: str, school: School | None = None, reason: str = ""
) -> None:
    """The global switch (school=None) or one school's. Resuming nudges the waiting work."""
    with transaction.atomic():
        if school is None:
            SendingSwitch.objects.update_or_create(
                pk=1, defaults={"paused": paused, "changed_by": actor, "reason": reason}
            )
        else:
            School.objects.filter(pk=school.pk).update(sending_paused=paused)
        log.warning(
            "sending %s %s by %s",
            "paused" if paused else "resumed",
            f"for {school.slug}" if school else "globally",
            actor,
            extra={"school_id": school.pk if school else None, "reason": reason},
        )
        if not paused:
            transaction.on_commit(lambda: nudges.nudge_stalled(force=True))


# Who paused sending when the provider refused our credentials; ``alerts`` raises a critical
# alert while the switch is off by this actor's hand.
CREDENTIALS_ACTOR = "edsmart: credentials refused"


def sending_pause_for_credentials(*, detail: str) -> None:
    """The provider refused our credentials (SMTP 535, API 401/403): every email would be
    refused the same way, and no recipient is at fault, so everything stops until a person
    fixes the credentials and resumes (each waiting delivery then goes out once)."""
    switch = SendingSwitch.objects.filter(pk=1).first()
    if switch is not None and switch.paused:
        return  # already off (another batch was first, or a person paused it)
    log.critical(
        "sending paused globally: the mail provider refused our credentials: %s",
        detail,
        extra={"reason": detail},
    )
    sending_set_paused(paused=True, actor=CREDENTIALS_ACTOR, reason=detail[:300])


def mailing_set_paused(*, mailing: Mailing, paused: bool) -> bool:
    """Pause or resume one mailing (a reminder round, say) without touching its source."""
    frm, to = (
        (Mailing.Status.SENDING, Mailing.Status.PAUSED)
        if paused
        else (Mailing.Status.PAUSED, Mailing.Status.SENDING)
    )
    with transaction.atomic():
        changed = Mailing.objects.filter(pk=mailing.pk, status=frm).update(status=to)
        if changed and not paused:
            transaction.on_commit(lambda: nudges.enqueue_batches(mailing.pk, None))
    return bool(changed)


class Resolution:
    SENT = "sent"
    FAILED = "failed"
    RESEND = "resend"
    CHOICES = (SENT, FAILED, RESEND)


def unknowns_resolve(*, delivery_ids: Iterable[int], resolution: str, actor: str) -> int:
    """A person decides what an ``unknown`` delivery was. Every decision is an event row.

    ``resend`` returns it to ``pending`` (same Message-ID, so the copy is recognisable);
    the caller has accepted the risk of a duplicate by choosing it.
    """
    if resolution not in Resolution.CHOICES:
        raise ValueError(f"resolution must be one of {Resolution.CHOICES}, got {resolution!r}")
    to = {
        Resolution.SENT: S.SENT,
        Resolution.FAILED: S.FAILED,
        Resolution.RESEND: S.PENDING,
    }[resolution]
    sets = {
        Resolution.SENT: "sent_at = statement_timestamp(), accepted = d.accepted + 1",
        Resolution.FAILED: "last_error = %(detail)s",
        Resolution.RESEND: "next_attempt_at = NULL",
    }[resolution]
    detail = f"resolved by {actor}: {resolution}"
    moved = 0
    touched_mailings: set[int] = set()
    for delivery_id, mailing_id, school_id in Delivery.objects.filter(
        pk__in=list(delivery_ids), status=S.UNKNOWN
    ).values_list("pk", "mailing_id", "school_id"):
        with transaction.atomic():
            # A closed mailing's summary counted this row as unknown: it is counted from its
            # rows again (until the sweep summarises it anew) in the move's own transaction.
            summaries.mailing_hold(mailing_id)
            done = transitions.delivery_move(
                delivery_id=delivery_id,
                school_id=school_id,
                attempt=None,
                from_statuses=[S.UNKNOWN],
                to=to,
                detail=detail,
                actor=actor,
                sets=sets,
            )
            if done:
                summaries.mailings_unsummarise([mailing_id])
        if done:
            moved += 1
            touched_mailings.add(mailing_id)
            transitions.log_transition(delivery_id, mailing_id, to, actor=actor)
    if resolution == Resolution.RESEND:
        # The mailing may already be completed; reopen it so the resend is sent and tracked.
        transitions.mailings_reopen(mailing_ids=touched_mailings)
        for mailing_id in touched_mailings:
            transaction.on_commit(lambda m=mailing_id: nudges.enqueue_batches(m, 1))
    return moved


# --- the provider's word on an ``unknown`` ------------------------------------------------------

PROVIDER_ACTOR = "provider event"


class ProviderVerdict:
    """What a provider's event says about a send (``provider_events`` maps events to these)."""

    DELIVERED = "delivered"  # accepted, and handed to the recipient's server
    BOUNCED = "bounced"  # accepted, then bounced (hard or soft)
    REJECTED = "rejected"  # refused by the provider before it accepted anything
    CHOICES = (DELIVERED, BOUNCED, REJECTED)


def unknown_settle_by_provider(*, delivery_id: int, verdict: str, detail: str) -> str | None:
    """The provider's event settles an ``unknown`` delivery; the status it moved to, or None
    when the row is not ``unknown`` (any more): events change no other row's status.

    - delivered: the provider accepted it: ``sent``, ``accepted + 1`` (the acceptance we never
      heard the reply to).
    - bounced: the provider accepted it and the recipient's server then refused it: ``failed``
      with the provider's reason. ``accepted`` is not bumped: it counts our acceptances for
      the duplicate check, and a bounced send reached nobody, so a later resend by a person is
      not a duplicate of anything a parent saw.
    - rejected: the provider refused it before accepting (its own suppression list, a policy):
      nothing went out, so the normal retry rules apply: ``retry_wait`` with the usual backoff
      while tries remain and the address is not suppressed (the webhook suppresses first when
      the rejection is for a bounce or complaint), else ``failed``. The mailing may have
      completed meanwhile: it is reopened and nudged, as a person's resend does.

    Conditional like ``unknowns_resolve``: fenced by status and the attempt read here, with
    its event (actor ``provider event``) in the same statement, and the mailing held and
    unsummarised in the same transaction. Runs inside the caller's transaction when there is
    one (the webhook records the event in the same one), so a redelivered event that turns out
    to be a duplicate rolls the move back with it.
    """
    if verdict not in ProviderVerdict.CHOICES:
        raise ValueError(f"verdict must be one of {ProviderVerdict.CHOICES}, got {verdict!r}")
    with transaction.atomic():
        # By the primary key alone (see ``transitions``: a status test here could lead the
        # planner to the partial index on unknown rows); the move itself tests the status.
        row = (
            Delivery.objects.filter(pk=delivery_id)
            .values("status", "mailing_id", "attempt", "tries", "school_id", "email_normalized")
            .first()
        )
        if row is None or row["status"] != S.UNKNOWN:
            return None
        mailing_id = row["mailing_id"]
        params: dict = {}
        if verdict == ProviderVerdict.DELIVERED:
            to = S.SENT
            sets = "sent_at = statement_timestamp(), accepted = d.accepted + 1, last_error = ''"
        elif verdict == ProviderVerdict.BOUNCED:
            to = S.FAILED
            sets = "last_error = %(detail)s"
        else:
            suppressed = Guardian.objects.filter(
                school_id=row["school_id"],
                email_normalized=row["email_normalized"],
                suppressed_at__isnull=False,
            ).exists()
            if row["tries"] < settings.EDSMART_MAX_ATTEMPTS and not suppressed:
                to = S.RETRY_WAIT
                sets = (
                    "next_attempt_at = statement_timestamp() + make_interval(secs => %(delay)s), "
                    "lease_until = NULL, last_error = %(detail)s"
                )
                params = {"delay": transitions.retry_delay_seconds(row["tries"])}
            else:
                to = S.FAILED
                why = "address suppressed" if suppressed else f"{row['tries']} tries used"
                detail = f"{detail} ({why})"
                sets = "last_error = %(detail)s"
        summaries.mailing_hold(mailing_id)
        done = transitions.delivery_move(
            delivery_id=delivery_id,
            school_id=row["school_id"],
            attempt=row["attempt"],
            from_statuses=[S.UNKNOWN],
            to=to,
            detail=detail,
            actor=PROVIDER_ACTOR,
            sets=sets,
            params=params,
        )
        if not done:
            return None
        summaries.mailings_unsummarise([mailing_id])
        if to == S.RETRY_WAIT:
            transitions.mailings_reopen(mailing_ids=[mailing_id])
            transaction.on_commit(lambda: nudges.enqueue_batches(mailing_id, 1))
    transitions.log_transition(delivery_id, mailing_id, to, actor=PROVIDER_ACTOR)
    return to
