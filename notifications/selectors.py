"""Every read of the send pipeline's state, each defined once.

Staff pages, ``/metrics``, the ops page, the alerts and the commands all ask the same few
questions: which deliveries are due, how large the backlog is and how long its oldest item
has waited, how many deliveries are in each status, whether a mailing may send. When each of
them wrote its own query the answers drifted apart (the metrics aged the backlog from
``created_at`` and counted rows still backing off; the alert did neither), so the
definitions live here, with the SQL twins the claim statement needs beside their ORM forms.

Writes never happen here; ``transitions`` owns every change of a delivery's status.
"""

from __future__ import annotations

import datetime as dt
import re
import zoneinfo
from dataclasses import dataclass

from django.db import connection
from django.db.models import Count, Exists, Min, OuterRef, Q, QuerySet, Sum
from django.db.models.functions import Coalesce
from django.utils import timezone

from notifications import summaries
from notifications.models import (
    TERMINAL_STATUSES,
    Delivery,
    DeliveryEvent,
    DeliveryStatus,
    Mailing,
    MailingSummary,
    ProviderEvent,
    SendingSwitch,
)
from slips.models import Broadcast, School, Slip

S = DeliveryStatus
M = Mailing._meta.db_table
SC = School._meta.db_table
SW = SendingSwitch._meta.db_table

# --- what may be claimed -----------------------------------------------------------------------

# Rows a worker may claim now: waiting, and past any back-off.
CLAIMABLE_STATUSES = (S.PENDING, S.RETRY_WAIT)
CLAIMABLE_SQL = """
    d.status IN ('pending', 'retry_wait')
    AND (d.next_attempt_at IS NULL OR d.next_attempt_at <= statement_timestamp())
"""

# Reminder rounds wait out the school's quiet hours, in the school's own time zone.
QUIET_HOURS_SQL = """
    CASE WHEN s.quiet_hours_start = s.quiet_hours_end THEN false
         WHEN s.quiet_hours_start > s.quiet_hours_end THEN
              (statement_timestamp() AT TIME ZONE s.time_zone)::time >= s.quiet_hours_start
           OR (statement_timestamp() AT TIME ZONE s.time_zone)::time < s.quiet_hours_end
         ELSE (statement_timestamp() AT TIME ZONE s.time_zone)::time >= s.quiet_hours_start
          AND (statement_timestamp() AT TIME ZONE s.time_zone)::time < s.quiet_hours_end
    END
"""


def allowed_sql(mailing_id_sql: str, school_id_sql: str | None = None) -> str:
    """The condition under which a mailing's deliveries may be claimed or started: the mailing
    is sending, its school is not paused, the global switch is not off, and a reminder is
    outside quiet hours. The claim and the start evaluate it inside their own UPDATE, so a
    pause takes effect before the next delivery of a batch already in flight. With
    ``school_id_sql`` the mailing is also matched by school: the same row (migration 0012's
    foreign key makes a delivery's school its mailing's), and on a database sharded by school
    a join within one shard."""
    same_school = f"AND m.school_id = {school_id_sql}" if school_id_sql else ""
    return f"""
    EXISTS (SELECT 1 FROM {M} m JOIN {SC} s ON s.id = m.school_id
            WHERE m.id = {mailing_id_sql} {same_school}
              AND m.status = 'sending' AND NOT s.sending_paused
              AND (m.kind <> 'reminder' OR NOT ({QUIET_HOURS_SQL})))
    AND NOT EXISTS (SELECT 1 FROM {SW} w WHERE w.paused)
"""


SENDING_ALLOWED_SQL = allowed_sql("d.mailing_id", "d.school_id")


def sending_allowed(*, mailing_id: int) -> bool:
    """The claim condition for one mailing (pauses, cancellation, quiet hours), on its own."""
    with connection.cursor() as cur:
        cur.execute(f"SELECT {allowed_sql('%(mailing_id)s')}", {"mailing_id": mailing_id})
        return bool(cur.fetchone()[0])


def in_quiet_hours(*, school: School, at: dt.datetime | None = None) -> bool:
    """The Python twin of QUIET_HOURS_SQL, for pages and decisions outside a claim."""
    local = (at or timezone.now()).astimezone(zoneinfo.ZoneInfo(school.time_zone)).time()
    start, end = school.quiet_hours_start, school.quiet_hours_end
    if start == end:
        return False
    if start > end:
        return local >= start or local < end
    return start <= local < end


def claimable_q(*, now: dt.datetime | None = None) -> Q:
    """The ORM twin of CLAIMABLE_SQL."""
    now = now or timezone.now()
    return Q(status__in=CLAIMABLE_STATUSES) & (
        Q(next_attempt_at__isnull=True) | Q(next_attempt_at__lte=now)
    )


def mailings_with_claimable_work() -> list[tuple[int, int, bool]]:
    """Sending mailings of unpaused schools with rows a batch could claim now, as
    (mailing id, school id, urgent)."""
    due = Delivery.objects.filter(claimable_q(), mailing=OuterRef("pk"))
    return list(
        Mailing.objects.filter(status=Mailing.Status.SENDING, school__sending_paused=False)
        .filter(Exists(due))
        .values_list("pk", "school_id", "urgent")
    )


def mailing_turn_keys(mailing_id: int) -> tuple[int, bool] | None:
    """(school id, urgent) of a mailing, for listing it in the fair-share turns."""
    return Mailing.objects.filter(pk=mailing_id).values_list("school_id", "urgent").first()


# --- backlog -------------------------------------------------------------------------------------

# The backlog: rows of sending mailings that are due and not yet started. A claimed row is
# still backlog (its send has not begun); a ``retry_wait`` row waiting out its back-off is
# not (it is not late), and a due row's wait counts from when it became due. Paused mailings
# are left out (staff paused them on purpose); a paused *school* is not: its parents are
# still not being told.
BACKLOG_STATUSES = (S.PENDING, S.RETRY_WAIT, S.CLAIMED)


def backlog_q(*, now: dt.datetime | None = None) -> Q:
    now = now or timezone.now()
    return Q(status__in=BACKLOG_STATUSES, mailing__status=Mailing.Status.SENDING) & (
        Q(next_attempt_at__isnull=True) | Q(next_attempt_at__lte=now)
    )


# When a backlog row became due: its back-off's end, or its creation.
DUE_SINCE = Coalesce("next_attempt_at", "created_at")


@dataclass(frozen=True)
class Backlog:
    deliveries: int
    oldest_due_seconds: float | None


def backlog() -> Backlog:
    """The whole backlog and the wait of its oldest item (``None`` when there is none)."""
    now = timezone.now()
    agg = Delivery.objects.filter(backlog_q(now=now)).aggregate(
        n=Count("id"), oldest=Min(DUE_SINCE)
    )
    oldest = agg["oldest"]
    return Backlog(
        deliveries=agg["n"],
        oldest_due_seconds=(now - oldest).total_seconds() if oldest else None,
    )


@dataclass(frozen=True)
class SchoolStats:
    school_id: int
    backlog: int = 0
    oldest_due_seconds: float | None = None
    unknown: int = 0
    failed_recent: int = 0


def school_stats(*, failed_since: dt.datetime | None = None) -> dict[int, SchoolStats]:
    """Per school: backlog and its oldest wait (as ``backlog``), unknowns, recent failures.

    Each read from what holds only what it counts: the backlog through the sending mailings,
    unknowns through their partial index, failures from the summaries of mailings closed since
    ``failed_since`` and the rows of open ones. None of them grows with the history.
    """
    now = timezone.now()
    failed_since = failed_since or now - dt.timedelta(days=7)
    found: dict[int, dict] = {}

    def row(school_id: int) -> dict:
        return found.setdefault(school_id, {"school_id": school_id})

    backlog_rows = (
        Delivery.objects.filter(backlog_q(now=now))
        .order_by()
        .values("school_id")
        .annotate(n=Count("id"), oldest=Min(DUE_SINCE))
    )
    for r in backlog_rows:
        row(r["school_id"]).update(
            backlog=r["n"], oldest_due_seconds=(now - r["oldest"]).total_seconds()
        )
    unknown_rows = (
        Delivery.objects.filter(status=S.UNKNOWN)
        .order_by()
        .values_list("school_id")
        .annotate(n=Count("id"))
    )
    for school_id, n in unknown_rows:
        row(school_id)["unknown"] = n
    for school_id, n in summaries.failed_per_school(since=failed_since).items():
        row(school_id)["failed_recent"] = n
    return {school_id: SchoolStats(**values) for school_id, values in found.items()}


# --- outcomes ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FailureRate:
    failed: int
    sent: int

    @property
    def rate(self) -> float:
        total = self.failed + self.sent
        return self.failed / total if total else 0.0


def failure_rate(*, since: dt.datetime) -> FailureRate:
    """Outcomes recorded by the pipeline since then: failures by their events (an index on
    their time), sends by the rows' ``sent_at`` among the mailings open since then (an
    accepted send writes no event). Fan-out rejects of bad and suppressed addresses are not
    sends and do not count."""
    failed = DeliveryEvent.objects.filter(to_status=S.FAILED, at__gte=since).count()
    sent = Delivery.objects.filter(
        mailing_id__in=summaries.mailing_ids_open_since(since), status=S.SENT, sent_at__gte=since
    ).count()
    return FailureRate(failed=failed, sent=sent)


def duplicate_sends() -> list[dict]:
    """(mailing, address) pairs with more than one accepted send. Must always be empty.

    A pair is one delivery row (the fan-out's unique constraint allows no second row for a
    pair), so a duplicate is a row whose ``accepted`` count is above one; a partial index
    holds exactly those rows, so this reads nothing else however long the history.
    """
    rows = Delivery.objects.filter(accepted__gt=1).values(
        "mailing_id", "email_normalized", "accepted"
    )
    return [
        {
            "mailing_id": row["mailing_id"],
            "email": row["email_normalized"],
            "accepted": row["accepted"],
        }
        for row in rows
    ]


# --- status counts -------------------------------------------------------------------------------


def delivery_status_counts(*, deliveries: QuerySet[Delivery] | None = None) -> dict[str, int]:
    """Every status with its count (zeros included, so reports have a stable shape).

    Without ``deliveries``: every delivery ever recorded, from the mailings' summaries and the
    open mailings' rows (``summaries.status_totals``), archived mailings included.
    """
    if deliveries is None:
        return summaries.status_totals()[0]
    found = dict(deliveries.order_by().values_list("status").annotate(n=Count("id")))
    return {status: found.get(status, 0) for status in DeliveryStatus.values}


def mailing_counts(*, mailing: Mailing) -> dict[str, int]:
    return summaries.mailings_counts([mailing.pk])[mailing.pk]


def deliveries_of(source: Slip | Broadcast) -> QuerySet[Delivery]:
    """Every delivery of a slip (its reminders included) or a broadcast."""
    key = "mailing__slip" if isinstance(source, Slip) else "mailing__broadcast"
    return Delivery.objects.filter(**{key: source}, school_id=source.school_id)


def source_counts(source: Slip | Broadcast) -> dict[str, int]:
    """Counts across every mailing of a slip or broadcast, archived ones included."""
    ids = mailings_of(source).values_list("pk", flat=True)
    return summaries.counts_sum(summaries.mailings_counts(ids).values())


def source_provider_counts(source: Slip | Broadcast) -> dict[str, int]:
    """Deliveries of a slip or broadcast the provider reported as bounced (hard or soft) and
    complained about, each delivery once. Read through the source's mailings' deliveries and
    the provider events' (delivery, kind) index; events go with their rows at retention, so an
    archived mailing's bounces are no longer counted."""
    mailing_ids = mailings_of(source).values("pk")
    events = ProviderEvent.objects.filter(
        delivery__mailing_id__in=mailing_ids, school_id=source.school_id
    ).order_by()
    bounced = events.filter(kind__in=ProviderEvent.BOUNCED_KINDS).values("delivery_id").distinct()
    complaints = events.filter(kind=ProviderEvent.Kind.COMPLAINT).values("delivery_id").distinct()
    return {"bounced": bounced.count(), "complaints": complaints.count()}


@dataclass(frozen=True)
class BroadcastReach:
    sent: int
    failed: int
    unknown: int
    opened: int
    bounced: int = 0
    complaints: int = 0


def broadcast_reach(*, broadcast: Broadcast) -> BroadcastReach:
    """Sent, failed and unknown deliveries of a broadcast, and how many were opened online.

    ``opened`` counts deliveries whose link was first followed (``opened_at``), so one
    recipient counts once however often they open it; mail scanners that prefetch links
    make it an upper bound.
    """
    counts = source_counts(broadcast)
    # Parents still open a broadcast after it completed, so its rows are counted while they
    # exist; retention's final count stands in for them once they are gone.
    archived = MailingSummary.objects.filter(
        mailing__broadcast=broadcast, archived_at__isnull=False
    )
    opened = (
        deliveries_of(broadcast)
        .filter(opened_at__isnull=False)
        .exclude(mailing_id__in=archived.values("mailing_id"))
        .count()
    )
    provider = source_provider_counts(broadcast)
    return BroadcastReach(
        sent=counts[S.SENT],
        failed=counts[S.FAILED],
        unknown=counts[S.UNKNOWN],
        opened=opened + (archived.aggregate(n=Sum("opened"))["n"] or 0),
        bounced=provider["bounced"],
        complaints=provider["complaints"],
    )


def mailing_has_open_rows() -> Exists:
    """For a Mailing queryset: some delivery of the mailing can still change (not terminal).
    What decides that a mailing is complete, or must be reopened."""
    return Exists(
        Delivery.objects.filter(mailing=OuterRef("pk")).exclude(status__in=list(TERMINAL_STATUSES))
    )


# --- switches and messages -----------------------------------------------------------------------


def sending_status() -> dict:
    switch = SendingSwitch.objects.filter(pk=1).first()
    return {
        "global_paused": bool(switch and switch.paused),
        "global_reason": switch.reason if switch else "",
        "schools_paused": list(
            School.objects.filter(sending_paused=True).values_list("slug", flat=True)
        ),
        "mailings_sending": Mailing.objects.filter(status=Mailing.Status.SENDING).count(),
        "mailings_paused": Mailing.objects.filter(status=Mailing.Status.PAUSED).count(),
    }


class UnknownMessage(LookupError):
    pass


# Every command that names a message takes one of these, and ``compose``, ``delivery_report``
# and the admin print them. A bare number is refused: a slip, a broadcast and a mailing each
# count their ids from 1, so ``3`` could be any of three different messages.
HANDLE_FORMS = "slip:N, broadcast:N or mailing:N"
HANDLE_KINDS: dict[str, type[Mailing] | type[Slip] | type[Broadcast]] = {
    "slip": Slip,
    "broadcast": Broadcast,
    "mailing": Mailing,
}
_HANDLE = re.compile(r"([a-z]+):([0-9]+)", re.ASCII | re.IGNORECASE)
_MAX_ID = 2**63 - 1  # the largest primary key PostgreSQL's bigint holds


def message_handle(obj: Mailing | Slip | Broadcast) -> str:
    """The handle that names ``obj`` unmistakably: ``slip:3``, ``broadcast:3``, ``mailing:3``."""
    if isinstance(obj, Mailing):
        return f"mailing:{obj.pk}"
    return f"{'slip' if isinstance(obj, Slip) else 'broadcast'}:{obj.pk}"


def message_lookup(handle: str) -> Mailing | Slip | Broadcast:
    """The message a handle names (``slip:7``, ``broadcast:7`` or ``mailing:7``).

    Raises UnknownMessage, saying which forms are accepted, for a bare number, an unknown
    kind, or a handle naming nothing.
    """
    text = handle.strip()
    match = _HANDLE.fullmatch(text)
    if match is None:
        if text.isdigit():
            raise UnknownMessage(
                f"{handle!r} is a bare number, which could be a slip, a broadcast or a mailing: "
                f"say which, as {HANDLE_FORMS} (compose and delivery_report print them)"
            )
        raise UnknownMessage(f"{handle!r} is not a message handle: use {HANDLE_FORMS}")
    kind, digits = match.group(1).lower(), match.group(2)
    model = HANDLE_KINDS.get(kind)
    if model is None:
        raise UnknownMessage(f"{kind!r} is not a message kind: use {HANDLE_FORMS}")
    # Compared as text first: a thousand-digit id must not reach int() or the database.
    pk = int(digits) if len(digits) <= 19 else _MAX_ID + 1
    found = (
        model.objects.select_related("school").filter(pk=pk).first() if 0 < pk <= _MAX_ID else None
    )
    if found is None:
        raise UnknownMessage(f"no {kind} with id {digits}")
    return found


def mailings_of(obj: Mailing | Slip | Broadcast) -> QuerySet[Mailing]:
    if isinstance(obj, Mailing):
        return Mailing.objects.filter(pk=obj.pk)
    key = "slip" if isinstance(obj, Slip) else "broadcast"
    return Mailing.objects.filter(**{key: obj})
