"""Claim a batch of deliveries, send each email, record each outcome: the send loop.

The order of every email, which is what makes a crash safe at any point:
1. claim (committed): the row is ours, fenced by its new ``attempt``, on a short lease that a
   thread of the batch renews while the batch lives;
2. compose: an email that cannot be built fails its own delivery, nothing else;
3. start (committed, together with the previous email's outcome): ``submitting`` is durable
   before any byte reaches the mail server, so a crash from here on is an ``unknown``,
   never a silent resend;
4. send over the batch's one connection, outside any transaction;
5. record the reply (in the next email's statement, or alone at the end), retried for a while
   if the database is briefly away, since the reply is known only here.

A production batch (``turns_send``) works in turns: it asks ``fairshare`` whose turn it is,
claims a small chunk of that mailing (a few tenths of a second of sending), sends it, and asks
again, so schools take turns and an urgent message goes first. Before each start it takes a
slot of the shared send rate (``ratelimit``) when a cap or a throttle back-off is in force.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import redis
from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from django.core.mail import get_connection
from django.core.mail.backends.smtp import EmailBackend as SMTPBackend
from django.db import DatabaseError, InterfaceError, OperationalError, connection

from notifications import (
    controls,
    fairshare,
    log_context,
    mailer,
    nudges,
    ratelimit,
    selectors,
    transitions,
)
from notifications.compose import Composer
from notifications.mailer import Outcome, SendResult
from notifications.models import DeliveryStatus
from notifications.transitions import Claimed

log = logging.getLogger("edsmart.pipeline")

S = DeliveryStatus
# The database went away: nothing to do for the rows but let their leases lapse.
DATABASE_DOWN = (OperationalError, InterfaceError)


class CommitBeforeSendError(RuntimeError):
    """The batch was called inside a transaction, where its starts would not be durable."""


@dataclass
class BatchReport:
    claimed: int = 0
    sent: int = 0
    retry: int = 0
    failed: int = 0
    unknown: int = 0
    lost: int = 0
    released: int = 0
    throttled: int = 0
    stopped: str = ""
    # Ids sent in the current chunk, for its one log line.
    sent_ids: list[int] = field(default_factory=list)


class _LeaseKeeper:
    """Renews the batch's claims every third of a lease, from a thread of its own.

    A claim lease is short so that a killed worker's rows come back in seconds; the thread
    keeps a live batch's rows its own while one slow send blocks the loop. It uses its own
    database connection (Django's are per thread) and closes it when the batch ends.
    """

    def __init__(self, claims: list[Claimed], mailing_id: int | None) -> None:
        self._claims = claims
        self._mailing_id = mailing_id
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edsmart-lease", daemon=True)

    def __enter__(self) -> _LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def hold(self, claims: list[Claimed], mailing_id: int | None) -> None:
        """The claims of the batch's current turn (the list the loop works through)."""
        with self._lock:
            self._claims, self._mailing_id = claims, mailing_id

    def _run(self) -> None:
        interval = settings.EDSMART_CLAIM_LEASE_SECONDS / 3
        try:
            while not self._stop.wait(interval):
                with self._lock:
                    claims, mailing_id = list(self._claims), self._mailing_id
                try:
                    transitions.claims_renew(claims=claims)
                except DatabaseError:
                    log.warning("could not renew the batch's claim leases", exc_info=True)
                    connection.close()
                if mailing_id is not None:
                    nudges.mark_alive(mailing_id)
        finally:
            connection.close()


def _refuse_inside_atomic() -> None:
    if connection.in_atomic_block:
        raise CommitBeforeSendError(
            "batch_send must run outside any transaction: a start has to be durable before "
            "the mail server is contacted"
        )


def batch_send(*, mailing_id: int | None = None, limit: int | None = None) -> BatchReport:
    """Claim one batch (of one mailing, or of any) and send it over one reused connection,
    recording each outcome at once. ``turns_send`` is what workers run; this single claim is
    for callers that want one mailing's rows now (tests, tools).

    Stops before its next delivery when sending is paused, its time (EDSMART_BATCH_SECONDS)
    is used up, the provider refuses our credentials, or the task's soft time limit fires;
    claims it did not use go back to ``pending``. Refuses to run inside a transaction: each
    start must be committed before its email goes out, and inside an ``atomic`` block nothing
    commits until the caller's block ends.
    """
    _refuse_inside_atomic()
    limit = limit or settings.EDSMART_BATCH_SIZE
    report = BatchReport()
    deadline = time.monotonic() + settings.EDSMART_BATCH_SECONDS
    try:
        claims = transitions.deliveries_claim(limit=limit, mailing_id=mailing_id)
        report.claimed = len(claims)
        if not claims:
            return report
        if mailing_id is not None:
            nudges.mark_alive(mailing_id)
        backend = get_connection(fail_silently=False)
        try:
            with _LeaseKeeper(claims, mailing_id):
                _send_claims(claims, report, backend=backend, deadline=deadline, pace=_Pace())
        finally:
            _close(backend)
    except DATABASE_DOWN:
        # No chained batch follows a batch that died; the sweeper must not wait for markers.
        nudges.forget(mailing_id)
        raise
    if report.claimed == limit and not report.stopped:
        # A full batch suggests more work: chain the next one rather than waiting for a sweep.
        nudges.enqueue_batches(mailing_id, 1)
    return report


# Under a rate cap a turn claims this much of the fleet's rate, so that a newly due slip or
# urgent message waits about that long for a batch to ask whose turn it is. (Peak bench at
# 500/s: chunks of a twentieth of a second of the rate made every small school's slip slower,
# p50 13.7 s against 10.7 s, and the achieved rate fell from 0.98 to 0.94 of the cap.)
TURN_SHARE_SECONDS = 0.25


def chunk_size() -> int:
    """Deliveries claimed per turn: a batch's worth uncapped (a tenth of a second or so at
    the pipeline's speed), or TURN_SHARE_SECONDS of the capped rate."""
    rate = settings.EDSMART_SEND_RATE
    if rate <= 0:
        return settings.EDSMART_BATCH_SIZE
    return max(1, min(settings.EDSMART_BATCH_SIZE, int(rate * TURN_SHARE_SECONDS)))


# A turn when Redis is away: claim from any mailing, in id order (fair share lost, nothing else).
_ANY = fairshare.Turn(mailing_id=0, school_id=0, urgent=False)


def _next_turn() -> fairshare.Turn | None:
    try:
        return fairshare.next_turn()
    except redis.RedisError:
        log.warning("Redis unreachable: taking work in id order instead of by turns")
        return _ANY


def turns_send(
    *, hint: int | None = None, between_turns: Callable[[], None] | None = None
) -> BatchReport:
    """What a worker's send task runs: turn after turn until nothing is listed, sending is
    stopped, or EDSMART_BATCH_SECONDS are used up (then the next batch is chained).

    ``hint`` is the mailing whose nudge started this batch: listed again first, in case Redis
    lost the list between the nudge and now. ``between_turns`` runs before each turn (the
    task passes beat's duties, which would otherwise queue behind busy batches at peak).
    """
    _refuse_inside_atomic()
    if hint is not None:
        nudges.list_for_turns(hint)
    report = BatchReport()
    deadline = time.monotonic() + settings.EDSMART_BATCH_SECONDS
    backend = get_connection(fail_silently=False)
    pace = _Pace()
    known: dict = {}  # the mailings this batch has composed for, loaded once each
    current: int | None = None
    try:
        with _LeaseKeeper([], None) as keeper:
            while not report.stopped:
                if time.monotonic() > deadline:
                    report.stopped = "batch time used up"
                    break
                if between_turns is not None:
                    between_turns()
                turn = _next_turn()
                if turn is None:
                    break
                current = turn.mailing_id or None
                claims = transitions.deliveries_claim(limit=chunk_size(), mailing_id=current)
                if not claims:
                    if turn is _ANY:
                        break
                    fairshare.finished(turn)
                    continue
                report.claimed += len(claims)
                keeper.hold(claims, current)
                if current is not None:
                    nudges.mark_alive(current)
                _send_claims(
                    claims, report, backend=backend, deadline=deadline, pace=pace, known=known
                )
                keeper.hold([], None)
                if report.stopped == STOPPED_PAUSED:
                    # That mailing (or school) was paused mid-turn: the others go on.
                    report.stopped = ""
    except DATABASE_DOWN:
        nudges.forget(current)
        raise
    finally:
        _close(backend)
    if report.stopped in (STOPPED_TIME, STOPPED_RATE):
        nudges.enqueue_batches(None, 1)
    return report


STOPPED_PAUSED = "paused or cancelled"
STOPPED_TIME = "batch time used up"
STOPPED_RATE = "waited out the batch time for a send slot"


class _Pace:
    """The batch's side of the shared send rate. With a cap, every start takes a slot; with
    none, the batch reports each chunk's count and learns whether a throttle engaged a limit."""

    def __init__(self) -> None:
        self.limited = ratelimit.capped()

    def before_start(self, deadline: float) -> None:
        if self.limited:
            ratelimit.acquire(deadline=deadline)

    def after_chunk(self, sent: int) -> None:
        if not ratelimit.capped() and sent:
            self.limited = ratelimit.note_sent(sent)

    def throttled(self, detail: str) -> None:
        ratelimit.backoff(detail=detail)
        self.limited = True


def _close(backend: object) -> None:
    try:
        backend.close()  # type: ignore[attr-defined]
    except Exception:
        log.debug("closing the mail connection failed", exc_info=True)


def _send_claims(
    claims: list[Claimed],
    report: BatchReport,
    *,
    backend: object,
    deadline: float,
    pace: _Pace,
    known: dict | None = None,
) -> None:
    """Send one chunk of claims, each email overlapping the previous one's last round trip.

    Per email, in this order: compose it (while the server takes in the previous body); write
    its envelope (``envelope_ahead``); read the previous email's reply; commit that outcome
    and this start in one statement; read the envelope's replies and write the body. The
    start is durable before the body leaves, and an outcome is recorded only once its reply
    is read: the crash cases are the same as one email at a time.
    """
    composer = Composer(claims, known=known)
    raw_ok = isinstance(backend, SMTPBackend)
    pending = list(claims)
    started_count = 0
    interrupted: BaseException | None = None
    unrecorded: tuple[Claimed, SendResult] | None = None
    ahead: mailer.Envelope | None = None
    # The email whose body went out last, its reply not read yet; while it is set,
    # ``unrecorded`` is None (its start carried the outcome before it).
    in_flight: tuple[Claimed, mailer.AwaitingReply] | None = None
    try:
        while pending:
            claimed = pending[0]
            if time.monotonic() > deadline:
                report.stopped = STOPPED_TIME
                break
            try:
                email = composer.email_for(claimed, raw_ok=raw_ok)
            except SoftTimeLimitExceeded:
                raise
            except Exception as exc:  # noqa: BLE001 - a poison email fails alone, at once
                unrecorded = _flush(report, unrecorded)
                if transitions.claim_unbuildable(claimed=claimed, detail=f"{exc!r}"[:1000]):
                    report.failed += 1
                pending.pop(0)
                continue
            try:
                pace.before_start(deadline)
            except ratelimit.RateWaitTimeout:
                report.stopped = STOPPED_RATE
                break
            # The envelope goes ahead of the start (the server answers it while the database
            # commits); the body only after. Any way out below without a send abandons it.
            ahead = mailer.envelope_ahead(connection=backend, message=email) if raw_ok else None
            if in_flight is not None:
                unrecorded, in_flight = (in_flight[0], mailer.await_reply(in_flight[1])), None
                if _after_send(unrecorded[1], report, pace):
                    interrupted = unrecorded[1].interrupted_by
                    break
            # One statement per email: the previous outcome and this start commit together,
            # both durable before this email goes out (a commit costs an fsync).
            try:
                if unrecorded is None:
                    started = transitions.delivery_start(claimed=claimed)
                else:
                    status, started = transitions.delivery_record_and_start(
                        done=unrecorded, claimed=claimed
                    )
                    _count(report, status, unrecorded[0])
                    unrecorded = None
            except (SoftTimeLimitExceeded, *DATABASE_DOWN):
                mailer.envelope_abandon(ahead)
                raise
            except Exception as exc:
                # Nothing was sent. Counted as a try with back-off, so an error that recurs
                # ends in ``failed`` with its reason instead of cycling claim -> release.
                mailer.envelope_abandon(ahead)
                log.exception("error before sending delivery %s", claimed.id)
                unrecorded = _flush(report, unrecorded)
                _count(report, transitions.claim_setback(claimed=claimed, detail=f"{exc!r}"))
                pending.pop(0)
                continue
            pending.pop(0)
            if not started:
                mailer.envelope_abandon(ahead)
                if not selectors.sending_allowed(mailing_id=claimed.mailing_id):
                    report.stopped = STOPPED_PAUSED
                    pending.insert(0, claimed)  # still ours if the fence held: give it back
                    break
                report.lost += 1
                continue
            started_count += 1
            with log_context.ids(
                school_id=composer.school_id(claimed),
                mailing_id=claimed.mailing_id,
                delivery_id=claimed.id,
            ):
                sent = mailer.send_body(connection=backend, message=email, ahead=ahead)
            ahead = None
            if isinstance(sent, mailer.AwaitingReply):
                in_flight = (claimed, sent)
                continue
            unrecorded = (claimed, sent)
            if _after_send(sent, report, pace):
                interrupted = sent.interrupted_by
                break
            if sent.throttled:
                continue  # the rate has backed off; the connection, if lost, reopens
            if sent.credentials_refused:
                report.stopped = "credentials refused"
                unrecorded = _flush(report, unrecorded)
                controls.sending_pause_for_credentials(detail=sent.detail)
                break
            if sent.connection_lost and sent.outcome is Outcome.RETRY:
                # The server is unreachable: the rest of the batch would fail the same way.
                report.stopped = "mail server unreachable"
                report.released += transitions.claims_release(
                    claims=pending, delay_seconds=transitions.retry_delay_seconds(1)
                )
                pending = []
                break
    finally:
        if in_flight is not None:
            # Read before anything closes the connection: the reply is the outcome.
            unrecorded = (in_flight[0], mailer.await_reply(in_flight[1]))
            if _after_send(unrecorded[1], report, pace) and interrupted is None:
                interrupted = unrecorded[1].interrupted_by
        mailer.envelope_abandon(ahead)  # whatever ended the loop, no exchange stays half-open
        _finish(report, pending, unrecorded)
        pace.after_chunk(started_count)
        _log_sent(report, claims)
    if interrupted is not None:
        raise interrupted


def _after_send(result: SendResult, report: BatchReport, pace: _Pace) -> bool:
    """Act on what a reply says beyond its outcome; True when the batch must stop at once
    (the send was interrupted: a soft time limit, re-raised once the outcome is recorded)."""
    if result.interrupted_by is not None:
        report.stopped = f"interrupted: {result.interrupted_by!r}"
        return True
    if result.throttled:
        report.throttled += 1
        pace.throttled(result.detail)
    return False


def _flush(report: BatchReport, unrecorded: tuple[Claimed, SendResult] | None) -> None:
    """Record a held outcome on its own (when no start follows to carry it)."""
    if unrecorded is not None:
        _count(report, _record_durably(*unrecorded), unrecorded[0])


def _finish(
    report: BatchReport, pending: list[Claimed], unrecorded: tuple[Claimed, SendResult] | None
) -> None:
    """Record the last outcome and give the unused claims back. With the database away this
    can only log: the leases lapse and the sweeper takes over."""
    try:
        _flush(report, unrecorded)
        report.released += transitions.claims_release(claims=pending)
    except DATABASE_DOWN:
        log.error("database unreachable at the end of a batch", exc_info=True)


# How long a batch keeps trying to record a reply while the database is away: an outage of
# a minute (a failover, a restart) is covered, and the batch still ends before its task's
# soft time limit (EDSMART_BATCH_SECONDS of sending plus this).
RECORD_RETRY_SECONDS = 120.0


def _record_durably(claimed: Claimed, result: SendResult) -> str | None:
    """Record an outcome, retrying while the database is away (a restart, a failover): the
    reply is known only here. If the sweeper meanwhile turned the row ``unknown`` (its submit
    lease ran out), the late definite reply of the same attempt still settles it; only if
    this too gives up does the row stay ``unknown`` for a person."""
    deadline = time.monotonic() + RECORD_RETRY_SECONDS
    delay = 0.2
    while True:
        try:
            return transitions.delivery_record(claimed=claimed, result=result)
        except DATABASE_DOWN:
            if time.monotonic() + delay > deadline:
                raise
            log.warning(
                "database unreachable while recording delivery %s; retrying",
                claimed.id,
                extra={"delivery_id": claimed.id, "mailing_id": claimed.mailing_id},
            )
            connection.close()
            time.sleep(delay)
            delay = min(delay * 2, 2.0)


def _log_sent(report: BatchReport, claims: list[Claimed]) -> None:
    """One INFO line per chunk for its accepted sends, with their ids: a line per email cost
    a seventh of a worker's CPU, and each row keeps its own record (``sent_at``,
    ``provider_id``). Every other outcome is logged per email (``transitions``)."""
    if report.sent_ids:
        mailings = {c.mailing_id for c in claims}
        mailing_id = mailings.pop() if len(mailings) == 1 else None
        log.info(
            "sent %s deliveries (ids %s..%s)",
            len(report.sent_ids),
            report.sent_ids[0],
            report.sent_ids[-1],
            extra={
                "mailing_id": mailing_id,
                "status": S.SENT,
                "delivery_ids": report.sent_ids,
            },
        )
        report.sent_ids = []


def _count(report: BatchReport, status: str | None, claimed: Claimed | None = None) -> None:
    name = {
        S.SENT: "sent",
        S.RETRY_WAIT: "retry",
        S.FAILED: "failed",
        S.UNKNOWN: "unknown",
        None: "lost",
    }[status]
    setattr(report, name, getattr(report, name) + 1)
    if status == S.SENT and claimed is not None:
        report.sent_ids.append(claimed.id)
