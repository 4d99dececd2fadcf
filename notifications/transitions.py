"""Every write of a delivery's status, and nothing else: the state machine's arrows as SQL.

Read ../shared/DESIGN.md first; ``notifications/models.py`` carries the diagram. The rules
kept here, for every arrow:
- one conditional UPDATE fenced by status and, where a worker owns the row, by ``attempt``
  (the fencing token); zero rows updated means someone else owns the row, and the caller
  stops;
- settling moves (outcomes, expiries, cancels, resolutions) insert their DeliveryEvent in the
  same statement, through ``_event_sql``; the hot-path moves (claim, start, release) are only
  logged, because an event row per claim and per start would double the writes per email;
- callers commit each move before the next call to the mail server; ``batch`` enforces it.

Over ~400 lines on purpose: splitting the arrows across modules would hide that they are one
machine, and the SQL fragments they share (the fence, the event, the claim condition).
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import psycopg
from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, connection, connections, transaction

from notifications import selectors, summaries
from notifications.mailer import Outcome, SendResult
from notifications.models import Delivery, DeliveryEvent, DeliveryStatus, Mailing
from notifications.rendering import message_id_for
from notifications.selectors import CLAIMABLE_SQL, SENDING_ALLOWED_SQL

log = logging.getLogger("edsmart.pipeline")

S = DeliveryStatus
D = Delivery._meta.db_table
E = DeliveryEvent._meta.db_table
# Rows that a cancel may still stop: nothing of theirs has reached the mail server.
CANCELLABLE = (S.PENDING, S.CLAIMED, S.RETRY_WAIT)
# The hot path's statements are prepared on the server from their first run, unless
# DB_PREPARED_STATEMENTS is off (behind a transaction-mode pooler, where the next transaction
# may land on a server connection that never saw the statement): then never, whatever psycopg's
# threshold says. Read once: it is a deployment's property, not something that changes live.
PREPARE = bool(settings.DB_PREPARED_STATEMENTS)


def log_transition(
    delivery_id: int, mailing_id: int | None, to: str, level: int = logging.INFO, **extra: object
) -> None:
    log.log(
        level,
        "delivery %s -> %s",
        delivery_id,
        to,
        extra={"delivery_id": delivery_id, "mailing_id": mailing_id, "status": to, **extra},
    )


def _event_sql(*, source: str, from_status: str, to: str, detail: str, actor: str) -> str:
    """The audit part of a move: one DeliveryEvent per row the move's CTE ``source`` returned
    (its ``id``, ``school_id``, ``mailing_id`` and ``attempt`` columns). The other arguments
    are SQL expressions."""
    return f"""
        INSERT INTO {E} (delivery_id, school_id, mailing_id, attempt, from_status, to_status,
            detail, actor, at)
        SELECT id, school_id, mailing_id, attempt, {from_status}, {to}, {detail}, {actor},
            statement_timestamp()
        FROM {source}
    """


@contextmanager
def prepared_cursor() -> Iterator[psycopg.Cursor]:
    """A server-side-binding cursor on Django's own connection, for the per-email statements.

    Django binds parameters client-side, so PostgreSQL plans every statement afresh; for the
    CTEs of the hot path planning cost more than executing (about 1 ms against 0.4 ms).
    Prepared once per connection, they are planned once (``PREPARE``; never with
    DB_PREPARED_STATEMENTS off). Same connection, same transaction state: inside an ``atomic``
    block this still runs in that transaction.

    Errors go through Django's wrapper as they would on a Django cursor: they come out as
    ``django.db`` errors and mark the connection, so that ``close_old_connections`` (around
    every task) drops it once the server has gone away instead of reusing it forever.
    """
    db = connections[DEFAULT_DB_ALIAS]  # once: each ``connection.x`` looks the alias up again
    db.close_if_health_check_failed()
    db.ensure_connection()
    with db.wrap_database_errors, psycopg.Cursor(db.connection) as cur:
        yield cur


# --- fan-out: the rows are born ------------------------------------------------------------------


def deliveries_insert(*, mailing: Mailing, rows: list[dict]) -> int:
    """Insert the fan-out's rows (``pending``, or already ``skipped``/``failed``), ignoring
    pairs that exist. Returns how many rows the mailing has.

    Each row is a dict (email, norm, name, guardians, students, status, error); a chunk goes
    as one JSON document that PostgreSQL unpacks (``jsonb_to_recordset``). The ORM's
    bulk_create spent about 0.2 ms of Python per row, and seven parallel arrays still cost
    about 40 microseconds a row to adapt and serialize; one ``json.dumps`` per chunk does it
    in C.
    """
    sql = f"""
        INSERT INTO {D} (mailing_id, school_id, email, email_normalized, recipient_name,
            guardian_ids, student_ids, status, last_error, attempt, tries, message_id_header,
            provider_id, created_at, updated_at)
        SELECT %(mailing)s, %(school)s, r.email, r.norm, r.name, r.guardians, r.students,
            r.status, r.error, 0, 0, '', '', statement_timestamp(), statement_timestamp()
        FROM jsonb_to_recordset(%(rows)s::jsonb) AS r(email text, norm text, name text,
            guardians jsonb, students jsonb, status text, error text)
        ON CONFLICT DO NOTHING
    """
    chunk = 5000
    with prepared_cursor() as cur:
        for start in range(0, len(rows), chunk):
            cur.execute(
                sql,
                {
                    "rows": json.dumps(rows[start : start + chunk]),
                    "mailing": mailing.pk,
                    "school": mailing.school_id,
                },
            )
    return Delivery.objects.filter(mailing=mailing).count()


# --- claim ---------------------------------------------------------------------------------------


@dataclass
class Claimed:
    id: int
    attempt: int
    tries: int
    mailing_id: int
    # Every per-email statement names the row's school as well as its id: free on one
    # database, and what routes the statement to one shard on a database sharded by school
    # (docs/scaling.md, "Citus: the distribution").
    school_id: int
    email: str
    recipient_name: str
    student_ids: list[int]
    throttles: int = 0


def deliveries_claim(*, limit: int, mailing_id: int | None = None) -> list[Claimed]:
    """pending/retry_wait -> claimed for up to ``limit`` due rows, in one statement
    (SKIP LOCKED, bumps ``attempt``)."""
    only_mailing = "AND d.mailing_id = %(mailing_id)s" if mailing_id is not None else ""
    sql = f"""
        WITH picked AS (
            SELECT d.id FROM {D} d
            WHERE {CLAIMABLE_SQL}
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
        RETURNING d.id, d.attempt, d.tries, d.mailing_id, d.school_id, d.email,
            d.recipient_name, d.student_ids, d.throttles
    """
    params = {
        "limit": limit,
        "mailing_id": mailing_id,
        "lease": settings.EDSMART_CLAIM_LEASE_SECONDS,
    }
    with prepared_cursor() as cur:
        cur.execute(sql, params, prepare=PREPARE)
        rows = cur.fetchall()
    # Django leaves jsonb as text on raw cursors.
    claimed = [
        Claimed(*row[:7], json.loads(row[7]) if isinstance(row[7], str) else row[7], row[8])
        for row in rows
    ]
    claimed.sort(key=lambda c: c.id)
    # One line per claim, not per row (a chunk's accepted sends are one line too, in batch).
    if claimed and log.isEnabledFor(logging.INFO):
        mailings = {c.mailing_id for c in claimed}
        log.info(
            "claimed %s deliveries (ids %s..%s)",
            len(claimed),
            claimed[0].id,
            claimed[-1].id,
            extra={
                "mailing_id": mailings.pop() if len(mailings) == 1 else None,
                "status": S.CLAIMED,
                "delivery_ids": [c.id for c in claimed],
            },
        )
    return claimed


# Every move of one row by its id tests the row's status as ``(d.status = ...) IS TRUE``: the
# same test (status is never NULL), in a form PostgreSQL cannot match to the partial indexes on
# status (claimable, leased, unknown). At a year of history their statistics say they hold
# almost nothing, so the planner preferred scanning one of them, dead entries and all, to the
# primary key: the start of each email read 650 buffers instead of 4, and a new send took half
# as long again as on an empty database.

# The rows of a batch's claims that it still holds: same id, same attempt, still claimed.
_HELD_CLAIMS_SQL = """
    FROM unnest(%(ids)s::bigint[], %(attempts)s::int[]) AS c(id, attempt)
    WHERE d.id = c.id AND d.attempt = c.attempt AND (d.status = 'claimed') IS TRUE
"""


def _held_claims_params(claims: Iterable[Claimed]) -> dict[str, list[int]]:
    claims = list(claims)
    return {"ids": [c.id for c in claims], "attempts": [c.attempt for c in claims]}


def claims_release(*, claims: Iterable[Claimed], delay_seconds: float = 0) -> int:
    """claimed -> pending for claims a batch did not use (pause, end of its budget)."""
    held = _held_claims_params(claims)
    if not held["ids"]:
        return 0
    sql = f"""
        UPDATE {D} d SET status = 'pending', lease_until = NULL, updated_at = statement_timestamp(),
            next_attempt_at = CASE WHEN %(delay)s > 0
                THEN statement_timestamp() + make_interval(secs => %(delay)s) ELSE
                    d.next_attempt_at END
        {_HELD_CLAIMS_SQL}
        RETURNING d.id, d.mailing_id
    """
    with connection.cursor() as cur:
        cur.execute(sql, {**held, "delay": delay_seconds})
        released = cur.fetchall()
    for delivery_id, mailing_id in released:
        log_transition(delivery_id, mailing_id, S.PENDING, reason="claim given back")
    return len(released)


def claims_renew(*, claims: Iterable[Claimed]) -> int:
    """Extend the lease of claims still held (fenced by ``attempt``): a live batch keeps its
    rows, and a dead one's come back within one short lease."""
    held = _held_claims_params(claims)
    if not held["ids"]:
        return 0
    sql = f"""
        UPDATE {D} d SET lease_until = statement_timestamp() + make_interval(secs => %(lease)s)
        {_HELD_CLAIMS_SQL}
    """
    with prepared_cursor() as cur:
        cur.execute(sql, {**held, "lease": settings.EDSMART_CLAIM_LEASE_SECONDS})
        return cur.rowcount


def claim_unbuildable(*, claimed: Claimed, detail: str) -> bool:
    """claimed -> failed: this delivery's email cannot be built (a value no header can carry,
    a template error). Nothing was sent; trying again would fail the same way."""
    moved = delivery_move(
        delivery_id=claimed.id,
        school_id=claimed.school_id,
        attempt=claimed.attempt,
        from_statuses=[S.CLAIMED],
        to=S.FAILED,
        detail=f"the email could not be built: {detail}",
        actor="batch",
        sets="lease_until = NULL, last_error = %(detail)s",
    )
    if moved:
        log.error(
            "delivery %s failed: its email could not be built: %s",
            claimed.id,
            detail,
            extra={"delivery_id": claimed.id, "mailing_id": claimed.mailing_id},
        )
    return moved


def claim_setback(*, claimed: Claimed, detail: str) -> str | None:
    """An error before this claim's send started: counted as a try (nothing was sent), so
    claimed -> retry_wait with back-off, or -> failed once the tries are used up. Without the
    count an error that recurs would cycle claim -> release forever."""
    tries = claimed.tries + 1
    if tries < settings.EDSMART_MAX_ATTEMPTS:
        to, sets = (
            S.RETRY_WAIT,
            "tries = d.tries + 1, lease_until = NULL, last_error = %(detail)s, "
            "next_attempt_at = statement_timestamp() + make_interval(secs => %(delay)s)",
        )
        text = f"error before sending: {detail}"
    else:
        to, sets = S.FAILED, "tries = d.tries + 1, lease_until = NULL, last_error = %(detail)s"
        text = f"gave up after {tries} attempts: error before sending: {detail}"
    moved = delivery_move(
        delivery_id=claimed.id,
        school_id=claimed.school_id,
        attempt=claimed.attempt,
        from_statuses=[S.CLAIMED],
        to=to,
        detail=text,
        actor="batch",
        sets=sets,
        params={"delay": retry_delay_seconds(tries)},
    )
    if not moved:
        return None
    log_transition(claimed.id, claimed.mailing_id, to, attempt=claimed.attempt, reason=text)
    return to


# --- start and record: the per-email statements --------------------------------------------------

# Each move is written as CTEs ("parts") so that the hot path can put the previous
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
            WHERE d.id = %(s_id)s AND d.school_id = %(s_school)s
              AND (d.status = 'claimed') IS TRUE AND d.attempt = %(s_attempt)s
              AND {SENDING_ALLOWED_SQL}
            RETURNING d.id
        )
    """
    params = {
        "s_id": claimed.id,
        "s_school": claimed.school_id,
        "s_attempt": claimed.attempt,
        "s_lease": settings.EDSMART_SUBMIT_LEASE_SECONDS,
        "s_mid": message_id_for(claimed.id),
    }
    return sql, params


def _transition_part(
    *,
    delivery_id: int,
    school_id: int | None = None,
    attempt: int | None,
    from_statuses: Iterable[str],
    to: str,
    detail: str = "",
    actor: str = "",
    sets: str = "",
    params: dict | None = None,
) -> Part:
    """A fenced UPDATE of one row plus its audit event; ``school_id``, when the caller knows
    it, is named too (the hot path always does)."""
    fence = "AND d.attempt = %(attempt)s" if attempt is not None else ""
    same_school = "AND school_id = %(school)s" if school_id is not None else ""
    extra_sets = f", {sets}" if sets else ""
    event = _event_sql(
        source="moved",
        from_status="from_status",
        to="%(to)s",
        detail="%(detail)s",
        actor="%(actor)s",
    )
    sql = f"""
        old AS (
            SELECT id, status FROM {D} WHERE id = %(id)s {same_school} FOR UPDATE
        ), moved AS (
            UPDATE {D} d SET status = %(to)s, updated_at = statement_timestamp(){extra_sets}
            FROM old
            WHERE d.id = old.id AND (d.status = ANY(%(from)s)) IS TRUE {fence}
            RETURNING d.id, d.school_id, d.mailing_id, d.attempt, old.status AS from_status
        ), logged AS (
            {event}
            RETURNING delivery_id
        )
    """
    all_params = {
        "id": delivery_id,
        "school": school_id,
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
    with prepared_cursor() as cur:
        cur.execute(sql, params, prepare=PREPARE)
        moved, started = cur.fetchone()
    return moved == 1, started == 1


def delivery_move(
    *,
    delivery_id: int,
    school_id: int | None = None,
    attempt: int | None,
    from_statuses: Iterable[str],
    to: str,
    detail: str = "",
    actor: str = "",
    sets: str = "",
    params: dict | None = None,
) -> bool:
    """One fenced move with its event, for moves outside the hot path (a person's resolution,
    an error before a send). ``sets`` may use ``%(detail)s`` and the keys of ``params``."""
    part = _transition_part(
        delivery_id=delivery_id,
        school_id=school_id,
        attempt=attempt,
        from_statuses=from_statuses,
        to=to,
        detail=detail,
        actor=actor,
        sets=sets,
        params=params,
    )
    return _run(transition=part)[0]


def delivery_start(*, claimed: Claimed) -> bool:
    """claimed -> submitting, only if we still hold the claim and sending is allowed.

    Committed before the mail server is contacted: from here on a crash leaves a
    ``submitting`` row that the sweeper turns into ``unknown``, never a silent resend.
    """
    started = _run(start=_start_part(claimed))[1]
    if started:
        _log_start(claimed)
    return started


def _log_start(claimed: Claimed) -> None:
    # DEBUG: the outcome's line follows within a second; a send that never ends is found by
    # the sweeper, which logs the row it turns ``unknown``.
    if log.isEnabledFor(logging.DEBUG):
        log_transition(
            claimed.id, claimed.mailing_id, S.SUBMITTING, logging.DEBUG, attempt=claimed.attempt
        )


def retry_delay_seconds(tries: int) -> float:
    """Exponential backoff with full jitter in [delay/2, delay]."""
    base = settings.EDSMART_RETRY_BASE_SECONDS * (2 ** max(tries - 1, 0))
    delay = min(settings.EDSMART_RETRY_MAX_SECONDS, base)
    return delay * random.uniform(0.5, 1.0)


def throttle_delay_seconds(throttles: int) -> float:
    """A throttled delivery is due again soon (the shared rate, not this row, does the slowing
    down): 0.5-1 s after the first throttle, doubling to at most 15-30 s."""
    return min(30.0, 2.0 ** min(throttles - 1, 5)) * random.uniform(0.5, 1.0)


# What an accepted send sets, on either path.
_ACCEPTED_SETS = (
    "accepted = d.accepted + 1, sent_at = statement_timestamp(), provider_id = %(provider_id)s, "
    "lease_until = NULL, last_error = ''"
)


def _accepted_part(claimed: Claimed, result: SendResult) -> Part:
    """submitting -> sent: the move of nearly every email, so it writes no event row.

    The row itself is the record: ``sent_at``, ``provider_id`` and ``accepted`` (how many
    acceptances were recorded for it; more than one is a duplicate). An event per accepted
    send was about a third of the database's work per email. The rarer acceptance of a row
    the sweeper already turned ``unknown`` is a settling move with its event (see
    ``delivery_record``)."""
    sql = f"""
        logged AS (
            UPDATE {D} d SET status = 'sent', updated_at = statement_timestamp(),
                {_ACCEPTED_SETS}
            WHERE d.id = %(id)s AND d.school_id = %(school)s AND d.attempt = %(attempt)s
              AND (d.status = 'submitting') IS TRUE
            RETURNING d.id
        )
    """
    params = {"id": claimed.id, "school": claimed.school_id, "attempt": claimed.attempt}
    return sql, {**params, "provider_id": result.provider_id}


def _accepted_late_part(claimed: Claimed, result: SendResult) -> Part:
    """unknown -> sent: a late acceptance of the same attempt, with its event."""
    return _transition_part(
        delivery_id=claimed.id,
        school_id=claimed.school_id,
        attempt=claimed.attempt,
        from_statuses=[S.UNKNOWN],
        to=S.SENT,
        detail=f"late acceptance: {result.provider_id}",
        sets=_ACCEPTED_SETS,
        params={"provider_id": result.provider_id},
    )


def _record_part(claimed: Claimed, result: SendResult) -> tuple[str, Part]:
    """The move that records one send's outcome, and the status it leads to."""
    tries = claimed.tries + 1
    outcome = result.outcome
    common = {"delivery_id": claimed.id, "school_id": claimed.school_id, "attempt": claimed.attempt}
    # Definite answers are also taken from ``unknown``: the sweeper may have given up on us
    # while the server was slow; a late reply for the same attempt is the truth and settles it.
    definite_from = [S.SUBMITTING, S.UNKNOWN]
    if result.credentials_refused:
        # Not this recipient's doing and not a try: the start's count is taken back, and the
        # row is due again at once; sending is paused globally until the credentials work.
        return S.RETRY_WAIT, _transition_part(
            **common,
            from_statuses=definite_from,
            to=S.RETRY_WAIT,
            detail=result.detail,
            sets="tries = greatest(d.tries - 1, 0), next_attempt_at = statement_timestamp(), "
            "lease_until = NULL, last_error = %(detail)s",
        )
    if result.throttled and claimed.throttles < settings.EDSMART_MAX_THROTTLES:
        # The provider said "slower": the start's count is taken back and the row is due
        # again soon; the shared rate has backed off meanwhile.
        return S.RETRY_WAIT, _transition_part(
            **common,
            from_statuses=definite_from,
            to=S.RETRY_WAIT,
            detail=f"throttled by the provider: {result.detail}",
            sets="tries = greatest(d.tries - 1, 0), throttles = d.throttles + 1, "
            "next_attempt_at = statement_timestamp() + make_interval(secs => %(delay)s), "
            "lease_until = NULL, last_error = %(detail)s",
            params={"delay": throttle_delay_seconds(claimed.throttles + 1)},
        )
    if outcome is Outcome.ACCEPTED:
        return S.SENT, _accepted_part(claimed, result)
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
    if not ok and to == S.SENT:
        # Not ``submitting`` any more: the sweeper may have turned it ``unknown`` while the
        # server was slow, and this acceptance of the same attempt settles it.
        with transaction.atomic():
            # The mailing may have been closed and summarised with this row ``unknown``.
            summaries.mailing_hold(claimed.mailing_id)
            ok = _run(transition=_accepted_late_part(claimed, result))[0]
            if ok:
                summaries.mailings_unsummarise([claimed.mailing_id])
        if ok:
            log.warning(
                "delivery %s: a late acceptance settled its unknown outcome (attempt %s)",
                claimed.id,
                claimed.attempt,
                extra={"delivery_id": claimed.id, "mailing_id": claimed.mailing_id},
            )
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
        mailings_reopen(mailing_ids=[claimed.mailing_id])
    elif to == S.FAILED:
        # Coming from ``unknown``, the mailing may have closed and been summarised with this
        # row as unknown: count it from its rows again until the sweep summarises it anew.
        summaries.mailings_unsummarise([claimed.mailing_id])
    elif to == S.UNKNOWN:
        log.error(
            "delivery %s outcome unknown: %s",
            claimed.id,
            result.detail,
            extra={"delivery_id": claimed.id, "mailing_id": claimed.mailing_id},
        )
    # Accepted sends are logged a chunk at a time, with their ids, by the batch.
    level = logging.DEBUG if to == S.SENT else logging.INFO
    if log.isEnabledFor(level):
        log_transition(claimed.id, claimed.mailing_id, to, level, attempt=claimed.attempt)
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
        _log_start(claimed)
    return _after_record(*done, to, ok), started


# --- moves of many rows: expiry and cancel -------------------------------------------------------


def _lapsed_leases_sql(status: str) -> str:
    """The rows in ``status`` whose lease ran out, at most 5,000, skipping any a live
    transaction holds; for the WHERE of an UPDATE aliased ``d``."""
    return f"""
        d.id IN (
            SELECT id FROM {D} WHERE status = '{status}' AND lease_until < statement_timestamp()
            ORDER BY id LIMIT 5000 FOR UPDATE SKIP LOCKED
        ) AND d.status = '{status}' AND d.lease_until < statement_timestamp()
    """


def claims_expire() -> list[tuple[int, int, str]]:
    """Claims whose worker vanished (the lease ran out before the send started; a live batch
    renews its leases): claimed -> pending, or -> failed once a delivery has lost
    EDSMART_MAX_LOST_CLAIMS claims this way. Returns (delivery, mailing, new status), at most
    5,000 a call."""
    event = _event_sql(
        source="moved",
        from_status="'claimed'",
        to="to_status",
        detail="detail",
        actor="'sweep'",
    )
    sql = f"""
        WITH moved AS (
            UPDATE {D} d SET lost_claims = d.lost_claims + 1, lease_until = NULL,
                updated_at = statement_timestamp(),
                status = CASE WHEN d.lost_claims + 1 >= %(max)s THEN 'failed' ELSE 'pending' END,
                last_error = CASE WHEN d.lost_claims + 1 >= %(max)s THEN %(failed)s
                    ELSE d.last_error END
            WHERE {_lapsed_leases_sql(S.CLAIMED.value)}
            RETURNING d.id, d.school_id, d.mailing_id, d.attempt, d.status AS to_status,
                CASE WHEN d.status = 'failed' THEN d.last_error
                    ELSE 'claim lease expired before the send started' END AS detail
        ), logged AS (
            {event}
        )
        SELECT id, mailing_id, to_status FROM moved
    """
    limit = settings.EDSMART_MAX_LOST_CLAIMS
    failed = (
        f"its worker vanished {limit} times while holding it (claim lease expired before "
        "the send started); never sent"
    )
    with connection.cursor() as cur:
        cur.execute(sql, {"max": limit, "failed": failed})
        return cur.fetchall()


def submits_expire() -> list[tuple[int, int]]:
    """submitting -> unknown for sends whose worker vanished mid-exchange: the server may have
    accepted the message, so it is never resent silently. At most 5,000 a call."""
    detail = "worker vanished while submitting; the mail server may have accepted it"
    event = _event_sql(
        source="moved",
        from_status="'submitting'",
        to="'unknown'",
        detail="%(detail)s",
        actor="'sweep'",
    )
    sql = f"""
        WITH moved AS (
            UPDATE {D} d SET status = 'unknown', lease_until = NULL,
                updated_at = statement_timestamp(), last_error = %(detail)s
            WHERE {_lapsed_leases_sql(S.SUBMITTING.value)}
            RETURNING d.id, d.school_id, d.mailing_id, d.attempt
        ), logged AS (
            {event}
        )
        SELECT id, mailing_id FROM moved
    """
    with connection.cursor() as cur:
        cur.execute(sql, {"detail": detail})
        return cur.fetchall()


def deliveries_cancel(
    *,
    mailing_ids: list[int] | None = None,
    delivery_ids: list[int] | None = None,
    actor: str = "",
    detail: str = "",
) -> int:
    """pending/claimed/retry_wait -> cancelled. A row already submitting is past stopping:
    it finishes and is recorded."""
    if not mailing_ids and not delivery_ids:
        return 0
    event = _event_sql(
        source="moved",
        from_status="from_status",
        to="'cancelled'",
        detail="%(detail)s",
        actor="%(actor)s",
    )
    sql = f"""
        WITH old AS (
            SELECT id, status FROM {D}
            WHERE (mailing_id = ANY(%(ids)s) OR id = ANY(%(dids)s))
              AND status = ANY(%(cancellable)s)
            FOR UPDATE
        ), moved AS (
            UPDATE {D} d SET status = 'cancelled', lease_until = NULL,
                updated_at = statement_timestamp()
            FROM old
            WHERE d.id = old.id AND (d.status = ANY(%(cancellable)s)) IS TRUE
            RETURNING d.id, d.school_id, d.mailing_id, d.attempt, old.status AS from_status
        )
        {event}
        RETURNING delivery_id
    """
    with connection.cursor() as cur:
        cur.execute(
            sql,
            {
                "ids": mailing_ids or [],
                "dids": delivery_ids or [],
                "cancellable": [s.value for s in CANCELLABLE],
                "actor": actor,
                "detail": detail or "cancelled",
            },
        )
        cancelled = [row[0] for row in cur.fetchall()]
    for delivery_id in cancelled:
        log_transition(delivery_id, None, S.CANCELLED, reason=detail or "cancelled")
    return len(cancelled)


def mailings_reopen(*, mailing_ids: Iterable[int] | None = None) -> int:
    """completed -> sending for mailings that have open rows again (a late 4xx on an unknown
    that raced the completion, a person's resend), so the open rows are claimed and the
    mailing completes after them. Every such row comes from a move here, hence its place."""
    # A summarised mailing has no open row (whatever reopens one unsummarises it first), so
    # the sweep's pass probes only the few unsummarised ones, not a year of completed mailings.
    mailings = Mailing.objects.filter(status=Mailing.Status.COMPLETED, summarised=False)
    if mailing_ids is not None:
        given = list(mailing_ids)
        # A row of these moved back to open: no summary of theirs may stand, a cancelled
        # mailing's included (its orphaned rows are then found and cancelled).
        summaries.mailings_unsummarise(given)
        mailings = mailings.filter(pk__in=given)
    return mailings.filter(selectors.mailing_has_open_rows()).update(
        status=Mailing.Status.SENDING, completed_at=None
    )
