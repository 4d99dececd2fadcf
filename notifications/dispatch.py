"""Due message -> mailing -> fan-out: the start of every delivery's life.

Safe to run twice at once (two beat schedulers): the conditional UPDATE on the source row
lets exactly one transaction win; the loser updates zero rows and moves on. The fan-out's
unique (school, mailing, address) constraint makes a repeated fan-out add nothing. Batches are
nudged on commit; the sweeper is what guarantees they run.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable

import redis
from django.core.exceptions import ValidationError
from django.core.validators import validate_email
from django.db import transaction
from django.utils import timezone
from redis.exceptions import LockError
from redis.lock import Lock

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
from slips.models import Audience, Broadcast, ReminderRound, Response, SendStatus, Slip

log = logging.getLogger("edsmart.pipeline")

S = DeliveryStatus


# Fanning out 50,000 families takes seconds of CPU. When every worker process was fanning out a
# big school's broadcasts at once, nothing was sent for 12 s and other schools' slips waited to
# be dispatched at all. So a large message (more students than QUICK_FAN_OUT) is fanned out by
# one dispatcher at a time across the fleet (a Redis lock, renewed after each message) while
# the other processes keep sending; small messages go at once, from any dispatcher, before any
# large one. Every pass re-reads the due list after each message, so a slip or an urgent
# broadcast that falls due while a big fan-out runs goes next. Without Redis every pass takes
# large ones too (each message is still fanned out once: the conditional UPDATE decides).
QUICK_FAN_OUT = 2000
DISPATCH_LOCK = "edsmart:dispatching"
DISPATCH_LOCK_SECONDS = 30


def dispatch_due(*, limit: int = 50) -> list[int]:
    """Move due slips, broadcasts and reminder rounds to ``sending`` and fan them out, one at
    a time: small messages before large ones, and within each, urgent broadcasts, then slips,
    then reminders, then other broadcasts, each by send time. Returns the mailing ids this
    pass created (a large message another pass is fanning out is not waited for).

    Safe to run twice at once (two beat schedulers, a lock lost with Redis): the conditional
    UPDATE on the source row lets exactly one transaction win; the loser updates zero rows and
    moves on.
    """
    created: list[int] = []
    bulk: _BulkLock | None = None
    try:
        for _ in range(limit):
            due = _next_due(large=False)
            if due is None:
                if bulk is None:
                    bulk = _BulkLock.take()
                if not bulk.held:
                    break
                due = _next_due(large=True)
                if due is None:
                    break
                bulk.extend()
            mailing_id = _dispatch(*due)
            if mailing_id is not None:
                created.append(mailing_id)
    finally:
        if bulk is not None:
            bulk.release()
    return created


class _BulkLock:
    """The right to fan out large messages: one holder in the fleet at a time."""

    def __init__(self, lock: Lock | None, held: bool) -> None:
        self._lock = lock
        self.held = held

    @classmethod
    def take(cls) -> _BulkLock:
        try:
            lock = redis_client().lock(
                DISPATCH_LOCK, timeout=DISPATCH_LOCK_SECONDS, blocking=False, thread_local=False
            )
            return cls(lock, bool(lock.acquire()))
        except redis.RedisError:
            log.warning("Redis unreachable: fanning out large messages without the lock")
            return cls(None, True)

    def extend(self) -> None:
        if self._lock is not None:
            with contextlib.suppress(redis.RedisError, LockError):
                self._lock.extend(DISPATCH_LOCK_SECONDS, replace_ttl=True)

    def release(self) -> None:
        if self._lock is not None and self.held:
            with contextlib.suppress(redis.RedisError, LockError):
                self._lock.release()


def _next_due(*, large: bool) -> tuple[str, int] | None:
    """The most pressing due message of that size: (kind, id). ``large`` takes any size."""
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
        if kind == "reminder":
            rows = due.select_related("slip__audience").order_by("send_at", "pk")
            candidates = ((r.pk, r.slip.audience) for r in rows[:QUICK_SCAN])
        else:
            rows = due.select_related("audience").order_by("send_at", "pk")
            candidates = ((m.pk, m.audience) for m in rows[:QUICK_SCAN])
        for pk, audience in candidates:
            if large or _students(audience) <= QUICK_FAN_OUT:
                return kind, pk
    return None


# How many due messages of a lane are looked at for a small one; more due at once than this
# and the rest wait for the next pass.
QUICK_SCAN = 50


# Audience sizes this process counted lately, by audience id: a due large broadcast waiting for
# the bulk dispatcher would otherwise be counted again by every dispatch pass, twice a second,
# at tens of milliseconds each. A stale size only puts a message in the other lane.
_SIZES: dict[int, tuple[float, int]] = {}
SIZE_TTL_SECONDS = 60.0


def _students(audience: Audience | None) -> int:
    """Students the audience covers: an upper bound on the fan-out."""
    if audience is None:
        return 0
    now = time.monotonic()
    known = _SIZES.get(audience.pk)
    if known is not None and now - known[0] < SIZE_TTL_SECONDS:
        return known[1]
    size = audience_students(audience).count()
    if len(_SIZES) > 1000:
        _SIZES.clear()
    _SIZES[audience.pk] = (now, size)
    return size


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
    rows = []
    for r in recipients:
        status, error = S.PENDING, ""
        if r.suppressed_reason:
            status, error = S.SKIPPED, f"address suppressed: {r.suppressed_reason}"
        else:
            try:
                validate_email(r.email.strip())
            except ValidationError:
                status, error = S.FAILED, f"invalid email address: {r.email!r}"
        rows.append(
            {
                "email": r.email.strip(),
                "norm": r.email_normalized,
                "name": r.name[:200],
                "guardians": list(r.guardian_ids),
                "students": list(r.student_ids),
                "status": status,
                "error": error,
            }
        )
    count = transitions.deliveries_insert(mailing=mailing, rows=rows)
    Mailing.objects.filter(pk=mailing.pk).update(recipient_count=count)
    return count
