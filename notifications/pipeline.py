"""The only code that moves a delivery: dispatch, fan-out, claim, send, record, sweep.

Read ../shared/DESIGN.md first. The rules this module keeps:
- every transition is one conditional UPDATE fenced by ``attempt``, committed before the next
  call to the mail server; zero rows updated means someone else owns the row;
- no transaction and no row lock is held across network I/O;
- Redis and Celery only carry nudges: a lost or duplicated task changes nothing, because the
  sweeper re-enqueues work from the database and a duplicate finds nothing left to claim.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import random
import time
import zoneinfo
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import psycopg
from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.mail import EmailMultiAlternatives, get_connection
from django.core.mail.backends.smtp import EmailBackend as SMTPBackend
from django.core.validators import validate_email
from django.db import connection, transaction
from django.db.models import Exists, OuterRef, Q
from django.utils import timezone

from notifications import log_context, nudges
from notifications.mailer import Outcome, RawEmail, SendResult, message_id_for, send_one
from notifications.models import (
    TERMINAL_STATUSES,
    Delivery,
    DeliveryEvent,
    DeliveryStatus,
    Mailing,
    SendingSwitch,
    sender_of,
)
from notifications.stencil import EmailInputs, StencilBook, full_email
from slips.audiences import (
    Recipient,
    audience_recipients,
    audience_students,
    recipients_for_students,
)
from slips.models import (
    Broadcast,
    ReminderRound,
    Response,
    School,
    SendStatus,
    Slip,
    Student,
)

log = logging.getLogger("edsmart.pipeline")

S = DeliveryStatus
D = Delivery._meta.db_table
E = DeliveryEvent._meta.db_table
M = Mailing._meta.db_table
SC = School._meta.db_table
SW = SendingSwitch._meta.db_table

# The condition under which a delivery may be claimed or started: its mailing is sending, its
# school is not paused, and the global switch is not off. Evaluated inside the same UPDATE as
# the transition, so a pause takes effect before the next delivery of a batch in flight.
# Reminder rounds also wait out the school's quiet hours, in the school's own time zone.
QUIET_HOURS_SQL = """
    CASE WHEN s.quiet_hours_start = s.quiet_hours_end THEN false
         WHEN s.quiet_hours_start > s.quiet_hours_end THEN
              (statement_timestamp() AT TIME ZONE s.time_zone)::time >= s.quiet_hours_start
           OR (statement_timestamp() AT TIME ZONE s.time_zone)::time < s.quiet_hours_end
         ELSE (statement_timestamp() AT TIME ZONE s.time_zone)::time >= s.quiet_hours_start
          AND (statement_timestamp() AT TIME ZONE s.time_zone)::time < s.quiet_hours_end
    END
"""


def _allowed_sql(mailing_id_sql: str) -> str:
    return f"""
    EXISTS (SELECT 1 FROM {M} m JOIN {SC} s ON s.id = m.school_id
            WHERE m.id = {mailing_id_sql} AND m.status = 'sending' AND NOT s.sending_paused
              AND (m.kind <> 'reminder' OR NOT ({QUIET_HOURS_SQL})))
    AND NOT EXISTS (SELECT 1 FROM {SW} w WHERE w.paused)
"""


SENDING_ALLOWED_SQL = _allowed_sql("d.mailing_id")


def in_quiet_hours(*, school: School, at: dt.datetime | None = None) -> bool:
    """The Python twin of QUIET_HOURS_SQL, for pages and decisions outside a claim."""
    local = (at or timezone.now()).astimezone(zoneinfo.ZoneInfo(school.time_zone)).time()
    start, end = school.quiet_hours_start, school.quiet_hours_end
    if start == end:
        return False
    if start > end:
        return local >= start or local < end
    return start <= local < end


def _log_transition(delivery_id: int, mailing_id: int | None, to: str, **extra: object) -> None:
    log.info(
        "delivery %s -> %s",
        delivery_id,
        to,
        extra={"delivery_id": delivery_id, "mailing_id": mailing_id, "status": to, **extra},
    )


# --- dispatch and fan-out ------------------------------------------------------------------


def dispatch_due(*, limit: int = 50) -> list[int]:
    """Move every due slip and broadcast to ``sending`` and fan it out. Returns mailing ids.

    Safe to run twice at once (two beat schedulers): the conditional UPDATE on the source row
    lets exactly one transaction win; the loser updates zero rows and moves on.
    """
    now = timezone.now()
    created: list[int] = []
    for model in (Slip, Broadcast):
        due = (
            model.objects.filter(status=SendStatus.SCHEDULED, send_at__lte=now)
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
    # One INSERT ... SELECT FROM unnest(arrays) per chunk: the ORM's bulk_create spent about
    # 0.2 ms of Python per row building and quoting model instances, which for a large
    # broadcast held up its first email by seconds.
    sql = f"""
        INSERT INTO {D} (mailing_id, school_id, email, email_normalized, recipient_name,
            guardian_ids, student_ids, status, last_error, attempt, tries, message_id_header,
            provider_id, created_at, updated_at)
        SELECT %(mailing)s, %(school)s, r.email, r.norm, r.name, r.guardians::jsonb,
            r.students::jsonb, r.status, r.error, 0, 0, '', '', statement_timestamp(),
            statement_timestamp()
        FROM unnest(%(email)s::text[], %(norm)s::text[], %(name)s::text[],
            %(guardians)s::text[], %(students)s::text[], %(status)s::text[], %(error)s::text[])
            AS r(email, norm, name, guardians, students, status, error)
        ON CONFLICT DO NOTHING
    """
    chunk = 5000
    with _prepared_cursor() as cur:
        for start in range(0, len(columns["email"]), chunk):
            params = {k: v[start : start + chunk] for k, v in columns.items()}
            cur.execute(
                sql, {**params, "mailing": mailing.pk, "school": mailing.school_id}, binary=True
            )
    count = Delivery.objects.filter(mailing=mailing).count()
    Mailing.objects.filter(pk=mailing.pk).update(recipient_count=count)
    return count


# --- claim, send, record ---------------------------------------------------------------------


@dataclass
class Claimed:
    id: int
    attempt: int
    tries: int
    mailing_id: int
    email: str
    recipient_name: str
    student_ids: list[int]


def deliveries_claim(*, limit: int, mailing_id: int | None = None) -> list[Claimed]:
    """Claim up to ``limit`` due deliveries in one statement (SKIP LOCKED, bumps ``attempt``)."""
    only_mailing = "AND d.mailing_id = %(mailing_id)s" if mailing_id is not None else ""
    sql = f"""
        WITH picked AS (
            SELECT d.id FROM {D} d
            WHERE d.status IN ('pending', 'retry_wait')
              AND (d.next_attempt_at IS NULL OR d.next_attempt_at <= statement_timestamp())
              {only_mailing}
              AND {SENDING_ALLOWED_SQL}
            ORDER BY d.id
            LIMIT %(limit)s
            FOR UPDATE OF d SKIP LOCKED
        )
        UPDATE {D} d SET status = 'claimed', attempt = d.attempt + 1,
            lease_until = statement_timestamp() + make_interval(secs => %(lease)s),
                updated_at = statement_timestamp()
        FROM picked WHERE d.id = picked.id
        RETURNING d.id, d.attempt, d.tries, d.mailing_id, d.email, d.recipient_name,
            d.student_ids
    """
    params = {
        "limit": limit,
        "mailing_id": mailing_id,
        "lease": settings.EDSMART_CLAIM_LEASE_SECONDS,
    }
    with _prepared_cursor() as cur:
        cur.execute(sql, params, prepare=True)
        rows = cur.fetchall()
    # Django leaves jsonb as text on raw cursors.
    claimed = [
        Claimed(*row[:6], json.loads(row[6]) if isinstance(row[6], str) else row[6]) for row in rows
    ]
    claimed.sort(key=lambda c: c.id)
    for c in claimed:
        _log_transition(c.id, c.mailing_id, S.CLAIMED, attempt=c.attempt)
    return claimed


# Each transition is written as CTEs ("parts") so that the hot path can put the previous
# delivery's outcome and the next delivery's start into ONE statement: one round trip and one
# commit (one fsync) per email, with both durable before the next email goes out.
Part = tuple[str, dict]


def _start_part(claimed: Claimed) -> Part:
    sql = f"""
        started AS (
            UPDATE {D} d SET status = 'submitting', tries = d.tries + 1,
                submitted_at = statement_timestamp(),
                lease_until = statement_timestamp() + make_interval(secs => %(s_lease)s),
                message_id_header = %(s_mid)s, updated_at = statement_timestamp()
            WHERE d.id = %(s_id)s AND d.status = 'claimed' AND d.attempt = %(s_attempt)s
              AND {SENDING_ALLOWED_SQL}
            RETURNING d.id
        )
    """
    params = {
        "s_id": claimed.id,
        "s_attempt": claimed.attempt,
        "s_lease": settings.EDSMART_SUBMIT_LEASE_SECONDS,
        "s_mid": message_id_for(claimed.id),
    }
    return sql, params


def _transition_part(
    *,
    delivery_id: int,
    attempt: int | None,
    from_statuses: Iterable[str],
    to: str,
    detail: str = "",
    actor: str = "",
    sets: str = "",
    params: dict | None = None,
) -> Part:
    """A fenced UPDATE of one row plus its audit event."""
    fence = "AND d.attempt = %(attempt)s" if attempt is not None else ""
    extra_sets = f", {sets}" if sets else ""
    sql = f"""
        old AS (
            SELECT id, status FROM {D} WHERE id = %(id)s FOR UPDATE
        ), moved AS (
            UPDATE {D} d SET status = %(to)s, updated_at = statement_timestamp(){extra_sets}
            FROM old
            WHERE d.id = old.id AND d.status = ANY(%(from)s) {fence}
            RETURNING d.id, d.attempt, old.status AS from_status
        ), logged AS (
            INSERT INTO {E} (delivery_id, attempt, from_status, to_status, detail, actor, at)
            SELECT id, attempt, from_status, %(to)s, %(detail)s, %(actor)s,
                statement_timestamp() FROM moved
            RETURNING delivery_id
        )
    """
    all_params = {
        "id": delivery_id,
        "attempt": attempt,
        "from": list(from_statuses),
        "to": to,
        "detail": detail[:4000],
        "actor": actor[:150],
        **(params or {}),
    }
    return sql, all_params


def _run(*, transition: Part | None = None, start: Part | None = None) -> tuple[bool, bool]:
    """Run the parts as one statement. Returns (transition happened, start happened)."""
    parts = [p for p in (transition, start) if p is not None]
    counts = [
        "(SELECT count(*) FROM logged)" if transition else "0",
        "(SELECT count(*) FROM started)" if start else "0",
    ]
    sql = "WITH " + ", ".join(p[0] for p in parts) + " SELECT " + ", ".join(counts)
    params: dict = {}
    for p in parts:
        params.update(p[1])
    with _prepared_cursor() as cur:
        cur.execute(sql, params, prepare=True)
        moved, started = cur.fetchone()
    return moved == 1, started == 1


def _prepared_cursor() -> psycopg.Cursor:
    """A server-side-binding cursor on Django's own connection, for the per-email statements.

    Django binds parameters client-side, so PostgreSQL plans every statement afresh; for the
    CTEs of the hot path planning cost more than executing (about 1 ms against 0.4 ms).
    Prepared once per connection, they are planned once. Same connection, same transaction
    state: inside an ``atomic`` block this still runs in that transaction.
    """
    connection.ensure_connection()
    return psycopg.Cursor(connection.connection)


def _transition(**kwargs: Any) -> bool:
    return _run(transition=_transition_part(**kwargs))[0]


def delivery_start(*, claimed: Claimed) -> bool:
    """claimed -> submitting, only if we still hold the claim and sending is allowed.

    Committed before the mail server is contacted: from here on a crash leaves a
    ``submitting`` row that the sweeper turns into ``unknown``, never a silent resend.
    """
    started = _run(start=_start_part(claimed))[1]
    if started:
        _log_transition(claimed.id, claimed.mailing_id, S.SUBMITTING, attempt=claimed.attempt)
    return started


def retry_delay_seconds(tries: int) -> float:
    """Exponential backoff with full jitter in [delay/2, delay]."""
    base = settings.EDSMART_RETRY_BASE_SECONDS * (2 ** max(tries - 1, 0))
    delay = min(settings.EDSMART_RETRY_MAX_SECONDS, base)
    return delay * random.uniform(0.5, 1.0)


def _record_part(claimed: Claimed, result: SendResult) -> tuple[str, Part]:
    """The transition that records one send's outcome, and the status it leads to."""
    tries = claimed.tries + 1
    outcome = result.outcome
    common = {"delivery_id": claimed.id, "attempt": claimed.attempt}
    # Definite answers are also taken from ``unknown``: the sweeper may have given up on us
    # while the server was slow; a late reply for the same attempt is the truth and settles it.
    definite_from = [S.SUBMITTING, S.UNKNOWN]
    if outcome is Outcome.ACCEPTED:
        return S.SENT, _transition_part(
            **common,
            from_statuses=definite_from,
            to=S.SENT,
            detail=result.provider_id,
            sets="sent_at = statement_timestamp(), provider_id = %(provider_id)s, "
            "lease_until = NULL, last_error = ''",
            params={"provider_id": result.provider_id},
        )
    if outcome is Outcome.RETRY and tries < settings.EDSMART_MAX_ATTEMPTS:
        return S.RETRY_WAIT, _transition_part(
            **common,
            from_statuses=definite_from,
            to=S.RETRY_WAIT,
            detail=result.detail,
            sets="next_attempt_at = statement_timestamp() + make_interval(secs => %(delay)s), "
            "lease_until = NULL, last_error = %(detail)s",
            params={"delay": retry_delay_seconds(tries)},
        )
    if outcome in (Outcome.RETRY, Outcome.FAILED):
        detail = result.detail
        if outcome is Outcome.RETRY:
            detail = f"gave up after {tries} attempts: {detail}"
        return S.FAILED, _transition_part(
            **common,
            from_statuses=definite_from,
            to=S.FAILED,
            detail=detail,
            sets="lease_until = NULL, last_error = %(detail)s",
        )
    return S.UNKNOWN, _transition_part(
        **common,
        from_statuses=[S.SUBMITTING],
        to=S.UNKNOWN,
        detail=result.detail,
        sets="lease_until = NULL, last_error = %(detail)s",
    )


def _after_record(claimed: Claimed, result: SendResult, to: str, ok: bool) -> str | None:
    if not ok:
        log.warning(
            "delivery %s: outcome %s not recorded, row moved on (attempt %s)",
            claimed.id,
            result.outcome.value,
            claimed.attempt,
            extra={"delivery_id": claimed.id, "mailing_id": claimed.mailing_id},
        )
        return None
    if to == S.RETRY_WAIT:
        # Coming from ``unknown``, the mailing may have completed meanwhile; reopen it so
        # the retry is claimed and the mailing completes again after it.
        Mailing.objects.filter(pk=claimed.mailing_id, status=Mailing.Status.COMPLETED).update(
            status=Mailing.Status.SENDING, completed_at=None
        )
    elif to == S.UNKNOWN:
        log.error(
            "delivery %s outcome unknown: %s",
            claimed.id,
            result.detail,
            extra={"delivery_id": claimed.id, "mailing_id": claimed.mailing_id},
        )
    _log_transition(claimed.id, claimed.mailing_id, to, attempt=claimed.attempt)
    return to


def delivery_record(*, claimed: Claimed, result: SendResult) -> str | None:
    """Record the outcome of one send. Returns the new status, or None if the fence lost."""
    to, part = _record_part(claimed, result)
    ok, _ = _run(transition=part)
    return _after_record(claimed, result, to, ok)


def delivery_record_and_start(
    *, done: tuple[Claimed, SendResult], claimed: Claimed
) -> tuple[str | None, bool]:
    """Record the previous outcome and start the next delivery in one statement."""
    to, part = _record_part(*done)
    ok, started = _run(transition=part, start=_start_part(claimed))
    if started:
        _log_transition(claimed.id, claimed.mailing_id, S.SUBMITTING, attempt=claimed.attempt)
    return _after_record(*done, to, ok), started


def claims_release(*, claims: Iterable[Claimed], delay_seconds: float = 0) -> int:
    """Give unused claims back (claimed -> pending), e.g. on pause or at the end of a budget."""
    pairs = [(c.id, c.attempt) for c in claims]
    if not pairs:
        return 0
    sql = f"""
        UPDATE {D} d SET status = 'pending', lease_until = NULL, updated_at = statement_timestamp(),
            next_attempt_at = CASE WHEN %(delay)s > 0
                THEN statement_timestamp() + make_interval(secs => %(delay)s) ELSE
                    d.next_attempt_at END
        FROM unnest(%(ids)s::bigint[], %(attempts)s::int[]) AS c(id, attempt)
        WHERE d.id = c.id AND d.attempt = c.attempt AND d.status = 'claimed'
        RETURNING d.id, d.mailing_id
    """
    with connection.cursor() as cur:
        cur.execute(
            sql,
            {
                "ids": [p[0] for p in pairs],
                "attempts": [p[1] for p in pairs],
                "delay": delay_seconds,
            },
        )
        released = cur.fetchall()
    for delivery_id, mailing_id in released:
        _log_transition(delivery_id, mailing_id, S.PENDING, reason="claim given back")
    return len(released)


def sending_allowed(*, mailing_id: int) -> bool:
    """The claim condition for one mailing (pauses, cancellation, quiet hours), on its own."""
    with connection.cursor() as cur:
        cur.execute(f"SELECT {_allowed_sql('%(mailing_id)s')}", {"mailing_id": mailing_id})
        return bool(cur.fetchone()[0])


@dataclass
class BatchReport:
    claimed: int = 0
    sent: int = 0
    retry: int = 0
    failed: int = 0
    unknown: int = 0
    lost: int = 0
    released: int = 0
    stopped: str = ""


# Stencils outlive a batch: a large broadcast is sent in many batches by the same processes.
STENCILS = StencilBook()


class _MailingCache:
    """Per-batch cache of the mailing, school and students a batch renders with."""

    def __init__(self, claims: list[Claimed]) -> None:
        mailing_ids = {c.mailing_id for c in claims}
        self.mailings = {
            m.pk: m for m in Mailing.objects.select_related("school").filter(pk__in=mailing_ids)
        }
        student_ids = {sid for c in claims for sid in (c.student_ids or [])}
        self.students = {
            s["pk"]: f"{s['first_name']} {s['last_name']}"
            for s in Student.objects.filter(pk__in=student_ids).values(
                "pk", "first_name", "last_name"
            )
        }
        self.senders = {
            m.pk: {
                "school_name": m.school.display_sender_name,
                "from_email": sender_of(m.school),
                "reply_to": m.school.sender_email,
            }
            for m in self.mailings.values()
        }

    def _inputs(self, claimed: Claimed) -> EmailInputs:
        mailing = self.mailings[claimed.mailing_id]
        children = [] if mailing.kind == Mailing.Kind.BROADCAST else claimed.student_ids or []
        return EmailInputs(
            mailing=mailing,
            **self.senders[claimed.mailing_id],
            delivery_id=claimed.id,
            to=claimed.email,
            recipient_name=claimed.recipient_name,
            children=[self.students[s] for s in children if s in self.students],
        )

    def outgoing_for(self, claimed: Claimed, *, raw_ok: bool) -> EmailMultiAlternatives | RawEmail:
        """The email to send: filled in from the mailing's stencil when the backend takes raw
        bytes (SMTP) and the recipient's values allow it, rendered in full otherwise."""
        inputs = self._inputs(claimed)
        if raw_ok:
            raw = STENCILS.email_for(inputs)
            if raw is not None:
                return raw
        return full_email(inputs)


def batch_send(*, mailing_id: int | None = None, limit: int | None = None) -> BatchReport:
    """Claim a batch and send it over one reused connection, recording each outcome at once.

    Stops before its next delivery when sending is paused, the claim lease is about to run
    out, or the task's soft time limit fires; claims it did not use go back to ``pending``.
    """
    limit = limit or settings.EDSMART_BATCH_SIZE
    report = BatchReport()
    if mailing_id is not None:
        nudges.mark_alive(mailing_id)
    claims = deliveries_claim(limit=limit, mailing_id=mailing_id)
    report.claimed = len(claims)
    if not claims:
        return report
    # Leave a margin so a delivery is never started on a claim that may expire mid-send.
    deadline = time.monotonic() + settings.EDSMART_CLAIM_LEASE_SECONDS * 0.8
    cache = _MailingCache(claims)
    backend = get_connection(fail_silently=False)
    raw_ok = isinstance(backend, SMTPBackend)
    pending = list(claims)
    interrupted: BaseException | None = None
    unrecorded: tuple[Claimed, SendResult] | None = None
    try:
        while pending:
            claimed = pending[0]
            if time.monotonic() > deadline:
                report.stopped = "claim lease budget used up"
                break
            email = cache.outgoing_for(claimed, raw_ok=raw_ok)
            # One statement per email: the previous outcome and this start commit together,
            # both durable before this email goes out (a commit costs an fsync).
            if unrecorded is None:
                started = delivery_start(claimed=claimed)
            else:
                status, started = delivery_record_and_start(done=unrecorded, claimed=claimed)
                _count(report, status)
            unrecorded = None
            if not started:
                if not sending_allowed(mailing_id=claimed.mailing_id):
                    report.stopped = "paused or cancelled"
                    break
                report.lost += 1
                pending.pop(0)
                continue
            pending.pop(0)
            with log_context.ids(
                school_id=cache.mailings[claimed.mailing_id].school_id,
                mailing_id=claimed.mailing_id,
                delivery_id=claimed.id,
            ):
                result = send_one(connection=backend, message=email)
            unrecorded = (claimed, result)
            if result.interrupted_by is not None:
                interrupted = result.interrupted_by
                report.stopped = f"interrupted: {interrupted!r}"
                break
            if result.connection_lost and result.outcome is Outcome.RETRY:
                # The server is unreachable: the rest of the batch would fail the same way.
                report.stopped = "mail server unreachable"
                report.released += claims_release(
                    claims=pending, delay_seconds=retry_delay_seconds(1)
                )
                pending = []
                break
    finally:
        if unrecorded is not None:
            _count(report, delivery_record(claimed=unrecorded[0], result=unrecorded[1]))
        report.released += claims_release(claims=pending)
        try:
            backend.close()
        except Exception:
            log.debug("closing the mail connection failed", exc_info=True)
    if interrupted is not None:
        raise interrupted
    if report.claimed == limit and not report.stopped:
        # A full batch suggests more work: chain the next one rather than waiting for a sweep.
        nudges.enqueue_batches(mailing_id, 1, force=True)
    return report


def _count(report: BatchReport, status: str | None) -> None:
    field = {
        S.SENT: "sent",
        S.RETRY_WAIT: "retry",
        S.FAILED: "failed",
        S.UNKNOWN: "unknown",
        None: "lost",
    }[status]
    setattr(report, field, getattr(report, field) + 1)


# --- sweep -------------------------------------------------------------------------------------


@dataclass
class SweepReport:
    claims_expired: int = 0
    submits_expired: int = 0
    auto_resent: int = 0
    orphans_cancelled: int = 0
    reopened: int = 0
    nudged: int = 0
    completed: int = 0


def _expire(*, from_status: str, to: str, detail: str) -> list[tuple[int, int]]:
    sql = f"""
        WITH moved AS (
            UPDATE {D} d SET status = %(to)s, lease_until = NULL,
                updated_at = statement_timestamp(),
                last_error = CASE WHEN %(to)s = 'unknown' THEN %(detail)s ELSE d.last_error END
            WHERE d.id IN (
                SELECT id FROM {D} WHERE status = %(from)s AND lease_until < statement_timestamp()
                ORDER BY id LIMIT 5000 FOR UPDATE SKIP LOCKED
            ) AND d.status = %(from)s AND d.lease_until < statement_timestamp()
            RETURNING d.id, d.attempt, d.mailing_id
        ), logged AS (
            INSERT INTO {E} (delivery_id, attempt, from_status, to_status, detail, actor, at)
            SELECT id, attempt, %(from)s, %(to)s, %(detail)s, 'sweep',
                statement_timestamp() FROM moved
        )
        SELECT id, mailing_id FROM moved
    """
    with connection.cursor() as cur:
        cur.execute(sql, {"from": from_status, "to": to, "detail": detail})
        return cur.fetchall()


def sweep() -> SweepReport:
    """Repair whatever crashes, restarts and lost messages left behind. Safe to run twice."""
    report = SweepReport()
    expired_claims = _expire(
        from_status=S.CLAIMED, to=S.PENDING, detail="claim lease expired before the send started"
    )
    report.claims_expired = len(expired_claims)
    for delivery_id, mailing_id in expired_claims:
        _log_transition(delivery_id, mailing_id, S.PENDING, reason="claim lease expired")
    expired_submits = _expire(
        from_status=S.SUBMITTING,
        to=S.UNKNOWN,
        detail="worker vanished while submitting; the mail server may have accepted it",
    )
    report.submits_expired = len(expired_submits)
    for delivery_id, mailing_id in expired_submits:
        log.error(
            "delivery %s outcome unknown after lease expiry",
            delivery_id,
            extra={"delivery_id": delivery_id, "mailing_id": mailing_id, "status": S.UNKNOWN},
        )
    report.auto_resent = unknowns_auto_resend()
    report.orphans_cancelled = deliveries_cancel_orphaned()
    report.reopened = mailings_reopen()
    report.nudged = nudges.nudge_stalled()
    report.completed = mailings_complete()
    return report


def deliveries_cancel_orphaned() -> int:
    """Open rows of cancelled mailings, which nothing will ever claim.

    A cancel skips rows already submitting; such a row can still come back with a 4xx
    (retry_wait), an unknown can get a late 4xx, or a person can choose to resend one.
    """
    open_rows = Delivery.objects.filter(
        mailing=OuterRef("pk"), status__in=[S.PENDING, S.CLAIMED, S.RETRY_WAIT]
    )
    ids = list(
        Mailing.objects.filter(status=Mailing.Status.CANCELLED)
        .filter(Exists(open_rows))
        .values_list("pk", flat=True)
    )
    return deliveries_cancel(
        mailing_ids=ids, actor="sweep", detail="message cancelled while this delivery was in flight"
    )


def mailings_reopen() -> int:
    """completed -> sending for a mailing that has open rows again (a late 4xx on an unknown
    that raced the completion), so the retry is claimed and the mailing completes after it."""
    open_rows = Delivery.objects.filter(mailing=OuterRef("pk")).exclude(
        status__in=list(TERMINAL_STATUSES)
    )
    return (
        Mailing.objects.filter(status=Mailing.Status.COMPLETED)
        .filter(Exists(open_rows))
        .update(status=Mailing.Status.SENDING, completed_at=None)
    )


def unknowns_auto_resend() -> int:
    """Under the ``resend`` policy, requeue unknowns that an idempotent backend will dedupe."""
    if settings.EDSMART_UNKNOWN_POLICY != "resend":
        return 0
    if settings.EMAIL_BACKEND not in settings.EDSMART_IDEMPOTENT_BACKENDS:
        return 0
    window_start = timezone.now() - timezone.timedelta(
        seconds=settings.EDSMART_IDEMPOTENCY_WINDOW_SECONDS
    )
    ids = Delivery.objects.filter(status=S.UNKNOWN, submitted_at__gte=window_start).values_list(
        "pk", "attempt"
    )
    moved = 0
    for delivery_id, attempt in ids:
        moved += _transition(
            delivery_id=delivery_id,
            attempt=attempt,
            from_statuses=[S.UNKNOWN],
            to=S.PENDING,
            detail="automatic resend: the backend honours the idempotency key",
            actor="policy",
        )
    return moved


def mailings_complete() -> int:
    """sending -> completed once no delivery can change any more; the source becomes sent."""
    open_rows = Delivery.objects.filter(mailing=OuterRef("pk")).exclude(
        status__in=list(TERMINAL_STATUSES)
    )
    done = 0
    candidates = Mailing.objects.filter(status=Mailing.Status.SENDING).filter(~Exists(open_rows))
    for mailing in candidates.only("pk", "slip_id", "broadcast_id", "round"):
        with transaction.atomic():
            won = (
                Mailing.objects.filter(pk=mailing.pk, status=Mailing.Status.SENDING)
                .filter(~Exists(open_rows))
                .update(status=Mailing.Status.COMPLETED, completed_at=timezone.now())
            )
            if not won:
                continue
            done += 1
            if mailing.round == 0:
                model = Slip if mailing.slip_id else Broadcast
                model.objects.filter(
                    pk=mailing.slip_id or mailing.broadcast_id, status=SendStatus.SENDING
                ).update(status=SendStatus.SENT, completed_at=timezone.now())
            else:
                ReminderRound.objects.filter(
                    slip_id=mailing.slip_id,
                    number=mailing.round,
                    status=ReminderRound.Status.SENDING,
                ).update(status=ReminderRound.Status.SENT)
    return done


# --- pause, resume, cancel, resolve -------------------------------------------------------------


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
        transaction.on_commit(lambda m=mailing_id: nudges.enqueue_batches(m, None, force=True))
    return updated


def mailings_cancel(*, source: Slip | Broadcast, actor: str = "") -> int:
    """Cancel what is not yet submitted. Rows already submitting finish and are recorded."""
    ids = list(
        Mailing.objects.filter(
            _source_filter(source), status__in=[Mailing.Status.SENDING, Mailing.Status.PAUSED]
        ).values_list("pk", flat=True)
    )
    Mailing.objects.filter(pk__in=ids).update(status=Mailing.Status.CANCELLED)
    return deliveries_cancel(mailing_ids=ids, actor=actor)


def reminders_cancel_answered(*, slip: Slip, student_ids: Iterable[int]) -> int:
    """After an answer: cancel reminder deliveries whose every child has now been answered.

    Called inside the transaction that records the answer, so the answer and the
    cancellation commit together. A delivery already submitting is past stopping.
    """
    answered = set(Response.objects.filter(slip=slip).values_list("student_id", flat=True))
    candidates = Delivery.objects.filter(
        mailing__slip=slip,
        mailing__kind=Mailing.Kind.REMINDER,
        status__in=[S.PENDING, S.CLAIMED, S.RETRY_WAIT],
    )
    ids: list[int] = []
    for sid in set(student_ids):
        for pk, kids in candidates.filter(student_ids__contains=[sid]).values_list(
            "pk", "student_ids"
        ):
            if set(kids) <= answered:
                ids.append(pk)
    return deliveries_cancel(delivery_ids=ids, detail="answered before the reminder went out")


def deliveries_cancel(
    *,
    mailing_ids: list[int] | None = None,
    delivery_ids: list[int] | None = None,
    actor: str = "",
    detail: str = "",
) -> int:
    if not mailing_ids and not delivery_ids:
        return 0
    sql = f"""
        WITH old AS (
            SELECT id, status FROM {D}
            WHERE (mailing_id = ANY(%(ids)s) OR id = ANY(%(dids)s))
              AND status IN ('pending', 'claimed', 'retry_wait')
            FOR UPDATE
        ), moved AS (
            UPDATE {D} d SET status = 'cancelled', lease_until = NULL,
                updated_at = statement_timestamp()
            FROM old
            WHERE d.id = old.id AND d.status IN ('pending', 'claimed', 'retry_wait')
            RETURNING d.id, d.attempt, old.status AS from_status
        )
        INSERT INTO {E} (delivery_id, attempt, from_status, to_status, detail, actor, at)
        SELECT id, attempt, from_status, 'cancelled', %(detail)s, %(actor)s,
            statement_timestamp() FROM moved
        RETURNING delivery_id
    """
    with connection.cursor() as cur:
        cur.execute(
            sql,
            {
                "ids": mailing_ids or [],
                "dids": delivery_ids or [],
                "actor": actor,
                "detail": detail or "cancelled",
            },
        )
        cancelled = [row[0] for row in cur.fetchall()]
    for delivery_id in cancelled:
        _log_transition(delivery_id, None, S.CANCELLED, reason=detail or "cancelled")
    return len(cancelled)


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
            transaction.on_commit(lambda: nudges.enqueue_batches(mailing.pk, None, force=True))
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
        Resolution.SENT: "sent_at = statement_timestamp()",
        Resolution.FAILED: "last_error = %(detail)s",
        Resolution.RESEND: "next_attempt_at = NULL",
    }[resolution]
    detail = f"resolved by {actor}: {resolution}"
    moved = 0
    touched_mailings: set[int] = set()
    for delivery_id, mailing_id in Delivery.objects.filter(
        pk__in=list(delivery_ids), status=S.UNKNOWN
    ).values_list("pk", "mailing_id"):
        if _transition(
            delivery_id=delivery_id,
            attempt=None,
            from_statuses=[S.UNKNOWN],
            to=to,
            detail=detail,
            actor=actor,
            sets=sets,
        ):
            moved += 1
            touched_mailings.add(mailing_id)
            _log_transition(delivery_id, mailing_id, to, actor=actor)
    if resolution == Resolution.RESEND:
        # The mailing may already be completed; reopen it so the resend is sent and tracked.
        Mailing.objects.filter(pk__in=touched_mailings, status=Mailing.Status.COMPLETED).update(
            status=Mailing.Status.SENDING, completed_at=None
        )
        for mailing_id in touched_mailings:
            transaction.on_commit(lambda m=mailing_id: nudges.enqueue_batches(m, 1, force=True))
    return moved
