"""Due message -> mailing -> fan-out: the start of every delivery's life.

Safe to run twice at once (two beat schedulers): the conditional UPDATE on the source row
lets exactly one transaction win; the loser updates zero rows and moves on. The fan-out's
unique (mailing, address) constraint makes a repeated fan-out add nothing. Batches are
nudged on commit; the sweeper is what guarantees they run.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterable

import redis
from django.core.exceptions import ValidationError
from django.core.validators import validate_email
from django.db import transaction
from django.utils import timezone
from redis.exceptions import LockError

from edsmart.redis_client import redis_client
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


# One dispatcher at a time across the fleet (a Redis lock, renewed after each message): a
# fan-out of 50,000 families takes seconds of CPU, and when every worker process was fanning
# out a big school's broadcasts at once, nothing was sent for 12 s and the other schools' slips
# waited to be dispatched at all. One pass fans out, the other processes keep sending, and the
# pass re-reads the due list after each message, so a slip or an urgent broadcast that falls
# due while a big fan-out runs goes next. Without Redis every pass runs (each message is still
# fanned out once: the conditional UPDATE decides).
DISPATCH_LOCK = "edsmart:dispatching"
DISPATCH_LOCK_SECONDS = 30


def dispatch_due(*, limit: int = 50) -> list[int]:
    """Move due slips, broadcasts and reminder rounds to ``sending`` and fan them out, one at
    a time, most pressing first: urgent broadcasts, then slips, then reminders, then other
    broadcasts, each lane by send time. Returns the mailing ids this pass created ([] when
    another pass is running: it will take them).

    Safe to run twice at once (two beat schedulers, a lock lost with Redis): the conditional
    UPDATE on the source row lets exactly one transaction win; the loser updates zero rows and
    moves on.
    """
    lock = None
    try:
        lock = redis_client().lock(
            DISPATCH_LOCK, timeout=DISPATCH_LOCK_SECONDS, blocking=False, thread_local=False
        )
        if not lock.acquire():
            return []
    except redis.RedisError:
        log.warning("Redis unreachable: dispatching without the one-dispatcher lock")
        lock = None
    created: list[int] = []
    try:
        for _ in range(limit):
            due = _next_due()
            if due is None:
                break
            mailing_id = _dispatch(*due)
            if mailing_id is not None:
                created.append(mailing_id)
            if lock is not None:
                with contextlib.suppress(redis.RedisError, LockError):
                    lock.extend(DISPATCH_LOCK_SECONDS, replace_ttl=True)
    finally:
        if lock is not None:
            with contextlib.suppress(redis.RedisError, LockError):
                lock.release()
    return created


def _next_due() -> tuple[str, int] | None:
    """The most pressing due message: (kind, id)."""
    now = timezone.now()
    scheduled = {"status": SendStatus.SCHEDULED, "send_at__lte": now}
    lanes = (
        ("broadcast", Broadcast.objects.filter(urgent=True, **scheduled)),
        ("slip", Slip.objects.filter(**scheduled)),
        (
            "reminder",
            ReminderRound.objects.filter(
                status=ReminderRound.Status.SCHEDULED,
                send_at__lte=now,
                slip__status__in=[SendStatus.SENDING, SendStatus.SENT],
            ),
        ),
        ("broadcast", Broadcast.objects.filter(urgent=False, **scheduled)),
    )
    for kind, due in lanes:
        pk = due.order_by("send_at", "pk").values_list("pk", flat=True).first()
        if pk is not None:
            return kind, pk
    return None


def _dispatch(kind: str, pk: int) -> int | None:
    if kind == "reminder":
        return _dispatch_reminder(pk)
    return _dispatch_one(Slip if kind == "slip" else Broadcast, pk)


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
