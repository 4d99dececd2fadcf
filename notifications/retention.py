"""Retention: deliveries and events of mailings closed long ago are removed; a summary stays.

``EDSMART_DELIVERY_RETENTION_DAYS`` (default 400) after a mailing was summarised (closed with
no open row), its final counts are written to its ``MailingSummary`` (``archived_at``), then
its events and deliveries are deleted in small batches (``rows_removed_at`` once none is
left), each batch with its rows' provider events (bounces and the like, so the bounce log
forgets them too). The mailing row, its summary and the slip's Responses (who answered) stay.

Why archive-and-delete and not monthly partitions: the fan-out's exactly-once guard is the
unique index on (school, mailing, email_normalized), and on a partitioned table every unique index
must include the partition key, so the guard would hold within a month only (a mailing fanned
out across midnight at a month's end, or a resend, could get a second row in the next month).
A partition is also dropped by when its rows were created, not by whether their mailing can
still change; deleting mailing by mailing can check that, and does.

What is never removed: anything of a mailing that is not summarised (a row of it is open or
moved since, see ``summaries``), or whose summary still counts an ``unknown`` (a person must
decide it, from its row). Removal never blocks sending: the rows are terminal and no sender
touches them, each batch is one short transaction, and a lock that does not come at once
(``lock_timeout``) leaves the batch for the next run.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from dataclasses import dataclass, field

from django.conf import settings
from django.db import OperationalError, connection, transaction
from django.db.models import Q
from django.utils import timezone

from notifications.models import Delivery, DeliveryEvent, Mailing, MailingSummary, ProviderEvent

log = logging.getLogger("edsmart.retention")

D = Delivery._meta.db_table
E = DeliveryEvent._meta.db_table
M = Mailing._meta.db_table
MS = MailingSummary._meta.db_table
PE = ProviderEvent._meta.db_table

BATCH_ROWS = 2000
MAILINGS_PER_PASS = 200
LOCK_TIMEOUT = "2s"


def retention_days() -> int:
    return int(settings.EDSMART_DELIVERY_RETENTION_DAYS)


# Final counts (parents may have opened the email since the summary was written) and the
# mark, for mailings that are still summarised, with no unknown, closed before the cutoff.
# ``FOR UPDATE OF m`` waits for a concurrent unsummarise, which then finds the summary
# archived and leaves it, or goes first, and this finds the mailing unsummarised.
ARCHIVE_SQL = f"""
    WITH target AS (
        SELECT m.id FROM {M} m JOIN {MS} s ON s.mailing_id = m.id
        WHERE m.id = ANY(%(ids)s) AND m.summarised AND s.archived_at IS NULL
          AND s.unknown = 0 AND s.summarised_at < %(cutoff)s
        FOR UPDATE OF m, s
    ), counted AS (
        SELECT t.id, count(d.opened_at) AS opened,
               count(d.id) FILTER (WHERE d.status NOT IN
                   ('sent', 'failed', 'cancelled', 'skipped')) AS unsettled
        FROM target t LEFT JOIN {D} d ON d.mailing_id = t.id
        GROUP BY t.id
    )
    UPDATE {MS} s SET opened = c.opened, archived_at = statement_timestamp()
    FROM counted c WHERE s.mailing_id = c.id AND c.unsettled = 0
    RETURNING s.mailing_id
"""  # noqa: S608 - table names come from model _meta; values are parameters

REMOVE_SQL = f"""
    WITH batch AS (
        SELECT id FROM {D} WHERE mailing_id = %(mailing_id)s LIMIT %(limit)s
    ), events AS (
        DELETE FROM {E} e USING batch WHERE e.delivery_id = batch.id
    ), provider_events AS (
        DELETE FROM {PE} p USING batch WHERE p.delivery_id = batch.id
    )
    DELETE FROM {D} d USING batch WHERE d.id = batch.id
"""  # noqa: S608 - table names come from model _meta; values are parameters


@dataclass
class PruneReport:
    archived: list[int] = field(default_factory=list)
    rows_removed: int = 0
    mailings_emptied: list[int] = field(default_factory=list)
    lock_waits: int = 0
    out_of_time: bool = False


def history_prune(
    *,
    now: dt.datetime | None = None,
    days: int | None = None,
    budget_seconds: float = 60.0,
    batch_rows: int = BATCH_ROWS,
) -> PruneReport:
    """Archive mailings closed more than ``days`` ago and remove their rows, batch by batch,
    until done or ``budget_seconds`` have passed. Safe to run twice and concurrently (a row
    is deleted once; a second run finds nothing left to do)."""
    now = now or timezone.now()
    cutoff = now - dt.timedelta(days=days if days is not None else retention_days())
    deadline = time.monotonic() + budget_seconds
    report = PruneReport()

    due = MailingSummary.objects.filter(
        archived_at__isnull=True, unknown=0, summarised_at__lt=cutoff, mailing__summarised=True
    ).order_by("summarised_at", "mailing_id")
    removing = MailingSummary.objects.filter(
        archived_at__isnull=False, rows_removed_at__isnull=True
    ).order_by("archived_at")
    # Pass after pass (archive a few hundred mailings, remove their rows) until nothing is
    # left or the budget is spent: a first run on years of history catches up within hours.
    after: tuple[dt.datetime, int] | None = None
    while not (report.out_of_time or report.lock_waits):
        # Onwards from the last one offered: a mailing the archive statement leaves (it moved
        # meanwhile) is not offered again in this run, so it cannot hold up the ones behind it.
        page = due
        if after is not None:
            page = due.filter(
                Q(summarised_at__gt=after[0]) | Q(summarised_at=after[0], mailing_id__gt=after[1])
            )
        offered = list(page.values_list("summarised_at", "mailing_id")[:MAILINGS_PER_PASS])
        ids = [mailing_id for _, mailing_id in offered]
        if offered:
            after = offered[-1]
            with transaction.atomic(), connection.cursor() as cur:
                cur.execute(ARCHIVE_SQL, {"ids": ids, "cutoff": cutoff})
                report.archived += [row[0] for row in cur.fetchall()]
        emptying = list(removing.values_list("mailing_id", flat=True)[:MAILINGS_PER_PASS])
        if not emptying:
            break
        for mailing_id in emptying:
            _remove_rows(mailing_id, report, deadline=deadline, batch_rows=batch_rows, now=now)
            if report.out_of_time or report.lock_waits:
                break
    if report.archived or report.rows_removed:
        log.info(
            "retention: %s mailings archived, %s delivery rows removed",
            len(report.archived),
            report.rows_removed,
            extra={"mailings_emptied": len(report.mailings_emptied)},
        )
    return report


def _remove_rows(
    mailing_id: int, report: PruneReport, *, deadline: float, batch_rows: int, now: dt.datetime
) -> None:
    """One archived mailing's events and deliveries, batch by batch, within the deadline."""
    while True:
        if time.monotonic() > deadline:
            report.out_of_time = True
            return
        try:
            removed = _remove_batch(mailing_id, batch_rows)
        except OperationalError:
            # A lock that did not come within LOCK_TIMEOUT: someone else is on these rows
            # (another prune); leave them for the next run.
            log.warning("retention: mailing %s busy, left for the next run", mailing_id)
            report.lock_waits += 1
            return
        report.rows_removed += removed
        # A short batch means none left, unless a concurrent run took some of this batch's
        # rows: then look before calling the mailing emptied.
        if removed < batch_rows and not Delivery.objects.filter(mailing_id=mailing_id).exists():
            MailingSummary.objects.filter(mailing_id=mailing_id).update(rows_removed_at=now)
            report.mailings_emptied.append(mailing_id)
            return


def _remove_batch(mailing_id: int, limit: int) -> int:
    with transaction.atomic(), connection.cursor() as cur:
        cur.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
        cur.execute(REMOVE_SQL, {"mailing_id": mailing_id, "limit": limit})
        return cur.rowcount
