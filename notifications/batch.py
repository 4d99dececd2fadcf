"""Claim a batch of deliveries, send each email, record each outcome: the send loop.

The order of every email, which is what makes a crash safe at any point:
1. claim (committed): the row is ours, fenced by its new ``attempt``;
2. start (committed, together with the previous email's outcome): ``submitting`` is durable
   before any byte reaches the mail server, so a crash from here on is an ``unknown``,
   never a silent resend;
3. send over the batch's one connection, outside any transaction;
4. record the reply (in the next email's statement, or alone at the end).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from django.conf import settings
from django.core.mail import get_connection
from django.core.mail.backends.smtp import EmailBackend as SMTPBackend
from django.db import connection

from notifications import log_context, nudges, selectors, transitions
from notifications.compose import Composer
from notifications.mailer import Outcome, SendResult, send_one
from notifications.models import DeliveryStatus
from notifications.transitions import Claimed

log = logging.getLogger("edsmart.pipeline")

S = DeliveryStatus


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
    stopped: str = ""


def batch_send(*, mailing_id: int | None = None, limit: int | None = None) -> BatchReport:
    """Claim a batch and send it over one reused connection, recording each outcome at once.

    Stops before its next delivery when sending is paused, the claim lease is about to run
    out, or the task's soft time limit fires; claims it did not use go back to ``pending``.
    Refuses to run inside a transaction: each start must be committed before its email goes
    out, and inside an ``atomic`` block nothing commits until the caller's block ends.
    """
    if connection.in_atomic_block:
        raise CommitBeforeSendError(
            "batch_send must run outside any transaction: a start has to be durable before "
            "the mail server is contacted"
        )
    limit = limit or settings.EDSMART_BATCH_SIZE
    report = BatchReport()
    if mailing_id is not None:
        nudges.mark_alive(mailing_id)
    claims = transitions.deliveries_claim(limit=limit, mailing_id=mailing_id)
    report.claimed = len(claims)
    if not claims:
        return report
    # Leave a margin so a delivery is never started on a claim that may expire mid-send.
    deadline = time.monotonic() + settings.EDSMART_CLAIM_LEASE_SECONDS * 0.8
    composer = Composer(claims)
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
            email = composer.email_for(claimed, raw_ok=raw_ok)
            # One statement per email: the previous outcome and this start commit together,
            # both durable before this email goes out (a commit costs an fsync).
            if unrecorded is None:
                started = transitions.delivery_start(claimed=claimed)
            else:
                status, started = transitions.delivery_record_and_start(
                    done=unrecorded, claimed=claimed
                )
                _count(report, status)
            unrecorded = None
            if not started:
                if not selectors.sending_allowed(mailing_id=claimed.mailing_id):
                    report.stopped = "paused or cancelled"
                    break
                report.lost += 1
                pending.pop(0)
                continue
            pending.pop(0)
            with log_context.ids(
                school_id=composer.school_id(claimed),
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
                report.released += transitions.claims_release(
                    claims=pending, delay_seconds=transitions.retry_delay_seconds(1)
                )
                pending = []
                break
    finally:
        if unrecorded is not None:
            _count(report, transitions.delivery_record(claimed=unrecorded[0], result=unrecorded[1]))
        report.released += transitions.claims_release(claims=pending)
        try:
            backend.close()
        except Exception:
            log.debug("closing the mail connection failed", exc_info=True)
    if interrupted is not None:
        raise interrupted
    if report.claimed == limit and not report.stopped:
        # A full batch suggests more work: chain the next one rather than waiting for a sweep.
        nudges.enqueue_batches(mailing_id, 1)
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
