"""Closed mailings' counts, kept in one summary row each, so that no read grows with history.

A year of a few hundred schools is millions of delivery rows, nearly all of them in mailings
that finished long ago and will never change. Every watch pass, metrics scrape and staff page
needs per-status counts; counted from the rows each time, they grew with the history (a watch
pass took 2.5 s at two million rows). So a mailing none of whose rows can change is summarised
once, and every count is the sum of two parts that never overlap:

- summarised mailings: their ``MailingSummary`` row;
- the others (``Mailing.summarised`` false, a partial index lists them): their delivery rows,
  through the (mailing, status) index.

Both parts are read in one statement where a total must not move backwards (the
``edsmart_sends_total`` counter): one statement is one snapshot, and summarising a mailing
moves it from one part to the other in one transaction.

When a row of a summarised mailing moves after all (a person resolves an ``unknown``, or a
late reply settles one), the mover calls ``mailings_unsummarise`` and the sweep summarises the
mailing again once it is closed. Archived summaries (retention removed the rows) are final.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable

from django.db import connection, transaction
from django.db.models import Count, Sum

from notifications.models import (
    SUMMARY_STATUSES,
    TERMINAL_STATUSES,
    Delivery,
    DeliveryStatus,
    Mailing,
    MailingSummary,
)

D = Delivery._meta.db_table
M = Mailing._meta.db_table
MS = MailingSummary._meta.db_table

OPEN_STATUSES = tuple(s.value for s in DeliveryStatus if s not in TERMINAL_STATUSES)
CLOSED_MAILING_STATUSES = (Mailing.Status.COMPLETED.value, Mailing.Status.CANCELLED.value)

_COUNTS = ",\n".join(
    f"count(d.id) FILTER (WHERE d.status = '{status}') AS {status}" for status in SUMMARY_STATUSES
)
_COLUMNS = ", ".join(SUMMARY_STATUSES)
_UPDATES = ", ".join(f"{c} = EXCLUDED.{c}" for c in (*SUMMARY_STATUSES, "accepted", "opened"))

# Closed mailings with no open row get their counts written and their flag set, in one
# statement. ``FOR UPDATE OF m`` makes a concurrent ``mailings_unsummarise`` wait for this one
# and then undo it, so a row that moved meanwhile is never hidden behind a stale summary.
SUMMARISE_SQL = f"""
    WITH target AS (
        SELECT m.id, m.school_id FROM {M} m
        WHERE m.id = ANY(%(ids)s) AND NOT m.summarised AND m.status = ANY(%(closed)s)
          AND NOT EXISTS (SELECT 1 FROM {D} o
                          WHERE o.mailing_id = m.id AND o.status = ANY(%(open)s))
        FOR UPDATE OF m
    ), counted AS (
        SELECT t.id, t.school_id, {_COUNTS},
               coalesce(sum(d.accepted), 0) AS accepted, count(d.opened_at) AS opened
        FROM target t LEFT JOIN {D} d ON d.mailing_id = t.id
        GROUP BY t.id, t.school_id
    ), written AS (
        INSERT INTO {MS} (mailing_id, school_id, {_COLUMNS}, accepted, opened, summarised_at)
        SELECT id, school_id, {_COLUMNS}, accepted, opened, statement_timestamp() FROM counted
        ON CONFLICT (mailing_id) DO UPDATE SET {_UPDATES}, summarised_at = EXCLUDED.summarised_at
        WHERE {MS}.archived_at IS NULL
        RETURNING mailing_id
    )
    UPDATE {M} m SET summarised = true FROM written w WHERE m.id = w.mailing_id
    RETURNING m.id
"""  # noqa: S608 - table names come from model _meta; values are parameters

UNSUMMARISE_SQL = f"""
    WITH undone AS (
        UPDATE {M} m SET summarised = false
        WHERE m.id = ANY(%(ids)s) AND m.summarised
          AND NOT EXISTS (SELECT 1 FROM {MS} a
                          WHERE a.mailing_id = m.id AND a.archived_at IS NOT NULL)
        RETURNING m.id
    )
    DELETE FROM {MS} s USING undone WHERE s.mailing_id = undone.id
"""  # noqa: S608 - table names come from model _meta; values are parameters


LOCK_SQL = f"""
    SELECT id FROM {M} WHERE id = ANY(%(ids)s) AND NOT summarised AND status = ANY(%(closed)s)
    ORDER BY id FOR UPDATE
"""  # noqa: S608 - the table name comes from model _meta; values are parameters


def mailings_summarise(mailing_ids: Iterable[int] | None = None) -> list[int]:
    """Summarise these closed mailings (or every closed, unsummarised one) that have no open
    row. Safe to run twice and concurrently: a summarised mailing is left alone.

    The mailings are locked first and counted by a second statement, whose snapshot is taken
    once every move that held one of them (``mailing_hold``) has committed: a summary never
    misses an acceptance that a scrape has already counted from the rows, so the send counter
    cannot step back.
    """
    if mailing_ids is None:
        mailing_ids = Mailing.objects.filter(
            summarised=False, status__in=CLOSED_MAILING_STATUSES
        ).values_list("pk", flat=True)
    ids = list(mailing_ids)
    if not ids:
        return []
    closed = list(CLOSED_MAILING_STATUSES)
    with transaction.atomic(), connection.cursor() as cur:
        cur.execute(LOCK_SQL, {"ids": ids, "closed": closed})
        locked = [row[0] for row in cur.fetchall()]
        if not locked:
            return []
        cur.execute(SUMMARISE_SQL, {"ids": locked, "closed": closed, "open": list(OPEN_STATUSES)})
        return [row[0] for row in cur.fetchall()]


def mailing_hold(mailing_id: int) -> None:
    """Inside the transaction of a move that changes a row's accepted sends after its mailing
    may have closed (a late acceptance, a person's "it was sent"): hold the mailing until the
    move and its ``mailings_unsummarise`` commit, so no summary is written in between."""
    with connection.cursor() as cur:
        cur.execute(f"SELECT 1 FROM {M} WHERE id = %s FOR SHARE", [mailing_id])  # noqa: S608


def mailings_unsummarise(mailing_ids: Iterable[int]) -> int:
    """A row of these mailings moved: count them from their rows again until the sweep
    summarises them anew. Archived mailings keep their summary (their rows are gone)."""
    ids = list(mailing_ids)
    if not ids:
        return 0
    with connection.cursor() as cur:
        cur.execute(UNSUMMARISE_SQL, {"ids": ids})
        return cur.rowcount


# --- reading counts -------------------------------------------------------------------------

# Counts by status across all time, and the accepted sends, as one snapshot. The live part
# reads only rows of unsummarised mailings: the partial index lists them, and the
# (mailing, status) index gives their rows.
TOTALS_SQL = f"""
    SELECT d.status, count(*), coalesce(sum(d.accepted), 0)
    FROM {D} d
    WHERE d.mailing_id IN (SELECT id FROM {M} WHERE NOT summarised)
    GROUP BY d.status
    UNION ALL
    SELECT x.status, x.n, x.accepted
    FROM (SELECT {", ".join(f"coalesce(sum({c}), 0) AS {c}" for c in SUMMARY_STATUSES)},
                 coalesce(sum(accepted), 0) AS accepted
          FROM {MS}) t,
         LATERAL (VALUES {", ".join(f"('{c}', t.{c}, 0)" for c in SUMMARY_STATUSES)},
                         ('', 0, t.accepted)) x(status, n, accepted)
"""  # noqa: S608 - table and column names come from the models; there are no values


def mailing_ids_open_since(since: dt.datetime) -> list[int]:
    """Mailings that may hold a row changed since ``since``: the unsummarised ones, and those
    summarised since (a row can only change while its mailing is unsummarised). What windowed
    reads (failure rate, send latency) restrict their rows to, through the (mailing, status)
    index, instead of a time index on the deliveries that every send would have to update."""
    open_ids = Mailing.objects.filter(summarised=False).values_list("pk", flat=True)
    closed = MailingSummary.objects.filter(summarised_at__gte=since).values_list(
        "mailing_id", flat=True
    )
    return [*open_ids, *closed]


def failed_per_school(*, since: dt.datetime) -> dict[int, int]:
    """Failed deliveries per school in mailings closed since ``since`` (their summaries) and
    in open ones (their rows, failed since then): a week's failures without reading a week's
    rows. A mailing closes minutes after its last failure, so the two windows agree."""
    found: dict[int, int] = {}
    closed = (
        MailingSummary.objects.filter(summarised_at__gte=since, failed__gt=0)
        .order_by()
        .values_list("school_id")
        .annotate(n=Sum("failed"))
    )
    live = (
        Delivery.objects.filter(
            mailing_id__in=Mailing.objects.filter(summarised=False).values("pk"),
            status=DeliveryStatus.FAILED,
            updated_at__gte=since,
        )
        .order_by()
        .values_list("school_id")
        .annotate(n=Count("id"))
    )
    for school_id, n in [*closed, *live]:
        found[school_id] = found.get(school_id, 0) + n
    return found


def status_totals() -> tuple[dict[str, int], int]:
    """(deliveries per status ever recorded, accepted sends ever recorded).

    Both only grow with time, archived mailings included (retention keeps their summary), so
    the accepted sends serve as a Prometheus counter.
    """
    counts = dict.fromkeys(DeliveryStatus.values, 0)
    accepted = 0
    with connection.cursor() as cur:
        cur.execute(TOTALS_SQL)
        for status, n, acc in cur.fetchall():
            if status:
                counts[status] += int(n)
            accepted += int(acc)
    return counts, accepted


def mailings_counts(mailing_ids: Iterable[int]) -> dict[int, dict[str, int]]:
    """Every status with its count, for each of these mailings: summaries where they exist,
    the (mailing, status) index for the others. Two queries whatever the number."""
    ids = list(mailing_ids)
    out: dict[int, dict[str, int]] = {}
    for summary in MailingSummary.objects.filter(mailing_id__in=ids):
        out[summary.mailing_id] = summary.counts()
    live = [pk for pk in ids if pk not in out]
    for pk in live:
        out[pk] = dict.fromkeys(DeliveryStatus.values, 0)
    if live:
        rows = (
            Delivery.objects.filter(mailing_id__in=live)
            .order_by()
            .values_list("mailing_id", "status")
            .annotate(n=Count("id"))
        )
        for mailing_id, status, n in rows:
            out[mailing_id][status] = n
    return out


def counts_sum(per_mailing: Iterable[dict[str, int]]) -> dict[str, int]:
    total = dict.fromkeys(DeliveryStatus.values, 0)
    for counts in per_mailing:
        for status, n in counts.items():
            total[status] += n
    return total
