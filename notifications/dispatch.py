"""Due message -> mailing -> fan-out: the start of every delivery's life.

Safe to run twice at once (two beat schedulers): the conditional UPDATE on the source row
lets exactly one transaction win; the loser updates zero rows and moves on. The fan-out's
unique (mailing, address) constraint makes a repeated fan-out add nothing. Batches are
nudged on commit; the sweeper is what guarantees they run.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable

from django.core.exceptions import ValidationError
from django.core.validators import validate_email
from django.db import transaction
from django.utils import timezone

from notifications import nudges, transitions
from notifications.models import DeliveryStatus, Mailing
from notifications.sweep import mailings_complete
from slips.audiences import (
    Recipient,
    audience_recipients,
    audience_students,
    recipients_for_students,
)
from slips.models import Broadcast, ReminderRound, Response, SendStatus, Slip

log = logging.getLogger("edsmart.pipeline")

S = DeliveryStatus


def dispatch_due(*, limit: int = 50) -> list[int]:
    """Move every due slip and broadcast to ``sending`` and fan it out. Returns mailing ids.

    Safe to run twice at once (two beat schedulers): the conditional UPDATE on the source row
    lets exactly one transaction win; the loser updates zero rows and moves on.
    """
    now = timezone.now()
    created: list[int] = []
    # Urgent broadcasts first: at a busy minute their fan-out should not wait behind others'.
    lanes: list[tuple[type[Slip] | type[Broadcast], dict]] = [
        (Broadcast, {"urgent": True}),
        (Slip, {}),
        (Broadcast, {"urgent": False}),
    ]
    for model, lane in lanes:
        due = (
            model.objects.filter(status=SendStatus.SCHEDULED, send_at__lte=now, **lane)
            .order_by("send_at")
            .values_list("pk", flat=True)[:limit]
        )
        for pk in list(due):
            mailing_id = _dispatch_one(model, pk)
            if mailing_id is not None:
                created.append(mailing_id)
    rounds = (
        ReminderRound.objects.filter(
            status=ReminderRound.Status.SCHEDULED,
            send_at__lte=now,
            slip__status__in=[SendStatus.SENDING, SendStatus.SENT],
        )
        .order_by("send_at")
        .values_list("pk", flat=True)[:limit]
    )
    for pk in list(rounds):
        mailing_id = _dispatch_reminder(pk)
        if mailing_id is not None:
            created.append(mailing_id)
    return created


def _dispatch_reminder(pk: int) -> int | None:
    """A reminder round goes to guardians of students with no response at this moment."""
    now = timezone.now()
    with transaction.atomic():
        won = ReminderRound.objects.filter(pk=pk, status=ReminderRound.Status.SCHEDULED).update(
            status=ReminderRound.Status.SENDING
        )
        if not won:
            return None
        rr = ReminderRound.objects.select_related("slip", "slip__school").get(pk=pk)
        slip = rr.slip
        if slip.due_at is not None and slip.due_at <= now:
            ReminderRound.objects.filter(pk=pk).update(status=ReminderRound.Status.CANCELLED)
            return None
        answered = Response.objects.filter(slip=slip).values("student_id")
        students = audience_students(slip.audience).exclude(pk__in=answered).values("pk")
        mailing = Mailing.objects.create(
            school=slip.school,
            kind=Mailing.Kind.REMINDER,
            slip=slip,
            round=rr.number,
            subject=slip.title,
            body=slip.body,
        )
        total = deliveries_fan_out(
            mailing=mailing, recipients=recipients_for_students(slip.school_id, students)
        )
        log.info(
            "dispatched reminder %s of slip %s as mailing %s to %s recipients",
            rr.number,
            slip.pk,
            mailing.pk,
            total,
            extra={"mailing_id": mailing.pk, "school_id": slip.school_id},
        )
        transaction.on_commit(lambda: nudges.enqueue_batches(mailing.pk, total))
    if total == 0:
        mailings_complete()
    return mailing.pk


def _dispatch_one(model: type[Slip] | type[Broadcast], pk: int) -> int | None:
    with transaction.atomic():
        won = model.objects.filter(
            pk=pk, status=SendStatus.SCHEDULED, send_at__lte=timezone.now()
        ).update(status=SendStatus.SENDING, dispatched_at=timezone.now())
        if not won:
            return None
        source = model.objects.select_related("school", "audience").get(pk=pk)
        kind = Mailing.Kind.SLIP if model is Slip else Mailing.Kind.BROADCAST
        mailing = Mailing.objects.create(
            school=source.school,
            kind=kind,
            slip=source if model is Slip else None,
            broadcast=source if model is Broadcast else None,
            round=0,
            subject=source.title,
            body=source.body,
            urgent=getattr(source, "urgent", False),
        )
        recipients = audience_recipients(source.audience) if source.audience_id else []
        total = deliveries_fan_out(mailing=mailing, recipients=recipients)
        log.info(
            "dispatched %s %s as mailing %s to %s recipients",
            kind,
            pk,
            mailing.pk,
            total,
            extra={"mailing_id": mailing.pk, "school_id": source.school_id},
        )
        transaction.on_commit(lambda: nudges.enqueue_batches(mailing.pk, total))
    if total == 0:
        # An audience can empty between scheduling and sending; the message is then done.
        mailings_complete()
    return mailing.pk


def deliveries_fan_out(*, mailing: Mailing, recipients: Iterable[Recipient]) -> int:
    """One delivery row per recipient address. Running this twice, or concurrently, adds none.

    Suppressed and invalid addresses get a row too, already terminal, so that staff see who
    was left out and why instead of a silently shorter list.
    """
    columns: dict[str, list[str]] = {
        k: [] for k in ("email", "norm", "name", "guardians", "students", "status", "error")
    }
    for r in recipients:
        status, error = S.PENDING, ""
        if r.suppressed_reason:
            status, error = S.SKIPPED, f"address suppressed: {r.suppressed_reason}"
        else:
            try:
                validate_email(r.email.strip())
            except ValidationError:
                status, error = S.FAILED, f"invalid email address: {r.email!r}"
        columns["email"].append(r.email.strip())
        columns["norm"].append(r.email_normalized)
        columns["name"].append(r.name[:200])
        columns["guardians"].append(json.dumps(list(r.guardian_ids)))
        columns["students"].append(json.dumps(list(r.student_ids)))
        columns["status"].append(status)
        columns["error"].append(error)
    count = transitions.deliveries_insert(mailing=mailing, columns=columns)
    Mailing.objects.filter(pk=mailing.pk).update(recipient_count=count)
    return count
