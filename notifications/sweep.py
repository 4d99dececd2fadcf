"""Repair what crashes, restarts and lost messages leave behind, and finish what is done.

Runs every few seconds from beat and is safe to run twice at once: every repair is a fenced
move in ``transitions`` or a conditional UPDATE of a mailing. It is what makes Redis and
Celery mere carriers: a lost nudge, a killed worker or a flushed queue leaves rows that the
next sweep finds in the database and puts back in motion.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from django.conf import settings
from django.db import transaction
from django.db.models import Exists, OuterRef
from django.utils import timezone

from notifications import nudges, selectors, summaries, transitions
from notifications.models import Delivery, DeliveryStatus, Mailing
from slips.models import Broadcast, ReminderRound, SendStatus, Slip

log = logging.getLogger("edsmart.pipeline")

S = DeliveryStatus


@dataclass
class SweepReport:
    claims_expired: int = 0
    submits_expired: int = 0
    orphans_cancelled: int = 0
    reopened: int = 0
    nudged: int = 0
    completed: int = 0
    summarised: int = 0


def sweep() -> SweepReport:
    """Repair whatever crashes, restarts and lost messages left behind. Safe to run twice."""
    report = SweepReport()
    expired_claims = transitions.claims_expire()
    report.claims_expired = len(expired_claims)
    for delivery_id, mailing_id, to in expired_claims:
        transitions.log_transition(delivery_id, mailing_id, to, reason="claim lease expired")
        if to == S.FAILED:
            log.error(
                "delivery %s failed: its worker vanished %s times while holding it",
                delivery_id,
                settings.EDSMART_MAX_LOST_CLAIMS,
                extra={"delivery_id": delivery_id, "mailing_id": mailing_id},
            )
    expired_submits = transitions.submits_expire()
    report.submits_expired = len(expired_submits)
    for delivery_id, mailing_id in expired_submits:
        log.error(
            "delivery %s outcome unknown after lease expiry",
            delivery_id,
            extra={"delivery_id": delivery_id, "mailing_id": mailing_id, "status": S.UNKNOWN},
        )
    report.orphans_cancelled = deliveries_cancel_orphaned()
    report.reopened = transitions.mailings_reopen()
    report.nudged = nudges.nudge_stalled()
    report.completed = mailings_complete()
    # Completed and cancelled mailings with no open row: their counts are read from a summary
    # from now on, not from their rows.
    report.summarised = len(summaries.mailings_summarise())
    return report


def deliveries_cancel_orphaned() -> int:
    """Open rows of cancelled mailings, which nothing will ever claim.

    A cancel skips rows already submitting; such a row can still come back with a 4xx
    (retry_wait), an unknown can get a late 4xx, or a person can choose to resend one.
    """
    open_rows = Delivery.objects.filter(
        mailing=OuterRef("pk"), status__in=list(transitions.CANCELLABLE)
    )
    ids = list(
        # A summarised mailing has no open row, so a year of cancelled ones is not probed.
        Mailing.objects.filter(status=Mailing.Status.CANCELLED, summarised=False)
        .filter(Exists(open_rows))
        .values_list("pk", flat=True)
    )
    return transitions.deliveries_cancel(
        mailing_ids=ids, actor="sweep", detail="message cancelled while this delivery was in flight"
    )


def mailings_complete() -> int:
    """sending -> completed once no delivery can change any more; the source becomes sent.

    Locks in the order every staff action does (see ``controls``): the source row first (the
    slip for a reminder round), then the round, then the mailing.
    """
    open_rows = selectors.mailing_has_open_rows()
    done = 0
    candidates = Mailing.objects.filter(status=Mailing.Status.SENDING).filter(~open_rows)
    for mailing in candidates.only("pk", "slip_id", "broadcast_id", "round"):
        source_model = Slip if mailing.slip_id else Broadcast
        source_id = mailing.slip_id or mailing.broadcast_id
        with transaction.atomic():
            list(source_model.objects.select_for_update().filter(pk=source_id).values("pk"))
            rounds = ReminderRound.objects.filter(slip_id=mailing.slip_id, number=mailing.round)
            if mailing.round:
                list(rounds.select_for_update().values("pk"))
            won = (
                Mailing.objects.filter(pk=mailing.pk, status=Mailing.Status.SENDING)
                .filter(~open_rows)
                .update(status=Mailing.Status.COMPLETED, completed_at=timezone.now())
            )
            if not won:
                continue
            done += 1
            if mailing.round == 0:
                source_model.objects.filter(pk=source_id, status=SendStatus.SENDING).update(
                    status=SendStatus.SENT, completed_at=timezone.now()
                )
            else:
                rounds.filter(status=ReminderRound.Status.SENDING).update(
                    status=ReminderRound.Status.SENT
                )
    return done
