"""What a school's staff see first: messages sending now, what is scheduled next, recent slips
with their answer rate, and the school's open alerts. Read only; polled every few seconds
while something is sending, so every read stays small however long the history:

- sending now: mailings ``sending`` or ``paused`` (the status index lists the few open ones),
  counted through ``summaries.mailings_counts`` (the (mailing, status) index of their rows),
  plus those finished in the last ``FINISHED_SHOWN`` (found among the last day's mailings by
  the ``mailing_newest`` index; their counts are summaries once the sweep has written them);
- scheduled next: ``scheduled`` slips, broadcasts and reminder rounds (the status indexes);
- recent slips: the newest slip mailings (``mailing_newest``), each slip's answers counted
  over its roster (``slips.selectors.slip_answer_totals``, one aggregate);
- alerts: the open ones of these schools.

The send rate is not stored anywhere, so none is invented here: ``rate_since_start`` is the
average over the mailing's life so far (accepted sends over the time since dispatch), and the
page refines it from the difference between two polls (see ``staff_home.js``).

Callers pass the schools the user may see (``edsmart.admin_tenancy.schools_for``); ``None``
means every school, for ops only.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Collection
from dataclasses import dataclass

from django.db.models import Q, QuerySet
from django.utils import timezone

from notifications import summaries
from notifications.models import Alert, DeliveryStatus, Mailing, SendingSwitch
from notifications.wording import mailing_words
from slips.models import Broadcast, ReminderRound, SendStatus, Slip
from slips.selectors import AnswerCounts, slip_answer_totals

S = DeliveryStatus

FINISHED_SHOWN = dt.timedelta(minutes=15)
SCHEDULED_SHOWN = 8
RECENT_SLIPS_SHOWN = 5
ALERTS_SHOWN = 20

_WAITING = (S.PENDING, S.CLAIMED, S.SUBMITTING)


@dataclass(frozen=True)
class Progress:
    mailing_id: int
    source_kind: str  # "slip" or "broadcast"
    source_id: int
    title: str
    kind: str  # the mailing's kind label: "Slip", "Broadcast", "Slip reminder 1"
    school_id: int
    school_name: str
    time_zone: str
    status: str  # the mailing's status in staff's words
    paused: bool
    paused_why: str
    total: int
    sent: int
    failed: int
    unknown: int
    skipped: int
    cancelled: int
    waiting: int  # not yet tried, or being sent now
    retrying: int  # waiting out a back-off
    started_at: dt.datetime
    finished_at: dt.datetime | None
    rate_since_start: float  # accepted sends per minute since dispatch

    @property
    def done(self) -> int:
        """Deliveries that will not move by themselves any more."""
        return self.sent + self.failed + self.unknown + self.skipped + self.cancelled


@dataclass(frozen=True)
class Upcoming:
    source_kind: str
    source_id: int
    title: str
    kind: str
    school_name: str
    time_zone: str
    send_at: dt.datetime | None


@dataclass(frozen=True)
class SlipAnswers:
    slip_id: int
    title: str
    school_name: str
    status: str
    answers: AnswerCounts


@dataclass(frozen=True)
class OpenAlert:
    severity: str
    message: str
    school_name: str
    raised_at: dt.datetime


@dataclass(frozen=True)
class Home:
    as_of: dt.datetime
    global_paused: bool
    sending: list[Progress]
    scheduled: list[Upcoming]
    recent_slips: list[SlipAnswers]
    alerts: list[OpenAlert]

    @property
    def busy(self) -> bool:
        """Something is moving: the page polls fast while this holds."""
        return any(p.finished_at is None and not p.paused for p in self.sending)


def _in_schools(queryset: QuerySet, school_ids: Collection[int] | None, lookup: str) -> QuerySet:
    return queryset if school_ids is None else queryset.filter(**{f"{lookup}__in": school_ids})


def _label(mailing: Mailing) -> str:
    label = mailing.get_kind_display()
    return f"{label} {mailing.round}" if mailing.kind == Mailing.Kind.REMINDER else label


def _progress(
    mailing: Mailing, counts: dict[str, int], now: dt.datetime, global_paused: bool
) -> Progress:
    school = mailing.school
    why = ""
    if global_paused:
        why = "ops have paused all sending"
    elif school.sending_paused:
        why = "sending is paused for the school"
    elif mailing.status == Mailing.Status.PAUSED:
        why = "this message is paused"
    finished = mailing.completed_at if mailing.status != Mailing.Status.SENDING else None
    if mailing.status == Mailing.Status.PAUSED:
        finished = None
    minutes = max((now - mailing.created_at).total_seconds(), 1.0) / 60
    return Progress(
        mailing_id=mailing.pk,
        source_kind="slip" if mailing.slip_id else "broadcast",
        source_id=mailing.slip_id or mailing.broadcast_id,
        title=mailing.subject,
        kind=_label(mailing),
        school_id=school.pk,
        school_name=school.name,
        time_zone=school.time_zone,
        status=mailing_words(mailing.status),
        paused=bool(why) and finished is None,
        paused_why=why if finished is None else "",
        total=sum(counts.values()),
        sent=counts[S.SENT],
        failed=counts[S.FAILED],
        unknown=counts[S.UNKNOWN],
        skipped=counts[S.SKIPPED],
        cancelled=counts[S.CANCELLED],
        waiting=sum(counts[s] for s in _WAITING),
        retrying=counts[S.RETRY_WAIT],
        started_at=mailing.created_at,
        finished_at=finished,
        rate_since_start=counts[S.SENT] / minutes,
    )


def sending_now(
    *, school_ids: Collection[int] | None, now: dt.datetime, global_paused: bool
) -> list[Progress]:
    open_statuses = [Mailing.Status.SENDING, Mailing.Status.PAUSED]
    recent = Q(
        created_at__gte=now - dt.timedelta(days=1),
        status__in=[Mailing.Status.COMPLETED, Mailing.Status.CANCELLED],
        completed_at__gte=now - FINISHED_SHOWN,
    )
    mailings = list(
        _in_schools(Mailing.objects.all(), school_ids, "school_id")
        .filter(Q(status__in=open_statuses) | recent)
        .select_related("school")
        .defer("body")
        .order_by("-urgent", "created_at", "pk")
    )
    counts = summaries.mailings_counts(m.pk for m in mailings)
    return [_progress(m, counts[m.pk], now, global_paused) for m in mailings]


def scheduled_next(*, school_ids: Collection[int] | None) -> list[Upcoming]:
    found: list[Upcoming] = []
    for model in (Slip, Broadcast):
        rows = (
            _in_schools(model.objects.filter(status=SendStatus.SCHEDULED), school_ids, "school_id")
            .select_related("school")
            .order_by("send_at", "pk")[:SCHEDULED_SHOWN]
        )
        found += [
            Upcoming(
                source_kind=model._meta.model_name,
                source_id=m.pk,
                title=m.title,
                kind=model._meta.verbose_name.capitalize(),
                school_name=m.school.name,
                time_zone=m.school.time_zone,
                send_at=m.send_at,
            )
            for m in rows
        ]
    reminders = (
        _in_schools(
            ReminderRound.objects.filter(status=ReminderRound.Status.SCHEDULED),
            school_ids,
            "school_id",
        )
        .select_related("slip", "school")
        .order_by("send_at", "pk")[:SCHEDULED_SHOWN]
    )
    found += [
        Upcoming(
            source_kind="slip",
            source_id=r.slip_id,
            title=r.slip.title,
            kind=f"Slip reminder {r.number}",
            school_name=r.school.name,
            time_zone=r.school.time_zone,
            send_at=r.send_at,
        )
        for r in reminders
    ]
    # A scheduled message with no send time goes at the next dispatch: first.
    epoch = dt.datetime.min.replace(tzinfo=dt.UTC)
    found.sort(key=lambda u: u.send_at or epoch)
    return found[:SCHEDULED_SHOWN]


def recent_slips(*, school_ids: Collection[int] | None) -> list[SlipAnswers]:
    mailings = (
        _in_schools(Mailing.objects.filter(kind=Mailing.Kind.SLIP), school_ids, "school_id")
        .order_by("-created_at", "-id")
        .values_list("slip_id", flat=True)[:RECENT_SLIPS_SHOWN]
    )
    slips = Slip.objects.select_related("school", "audience").in_bulk(list(mailings))
    found = []
    for slip_id in mailings:
        slip = slips.get(slip_id)
        if slip is None:
            continue
        found.append(
            SlipAnswers(
                slip_id=slip.pk,
                title=slip.title,
                school_name=slip.school.name,
                status=slip.get_status_display().lower(),
                answers=slip_answer_totals(slip=slip),
            )
        )
    return found


def open_alerts(*, school_ids: Collection[int] | None) -> list[OpenAlert]:
    """Open alerts of these schools (every open alert, platform-wide ones too, for ops)."""
    rows = _in_schools(
        Alert.objects.filter(cleared_at__isnull=True), school_ids, "school_id"
    ).select_related("school")
    return [
        OpenAlert(
            severity=a.severity,
            message=a.message,
            school_name=a.school.name if a.school_id else "",
            raised_at=a.raised_at,
        )
        for a in rows.order_by("-raised_at")[:ALERTS_SHOWN]
    ]


def school_home(*, school_ids: Collection[int] | None, now: dt.datetime | None = None) -> Home:
    """The home page of these schools (``None``: every school, for ops)."""
    now = now or timezone.now()
    if school_ids is not None:
        school_ids = list(school_ids)
    global_paused = SendingSwitch.objects.filter(pk=1, paused=True).exists()
    return Home(
        as_of=now,
        global_paused=global_paused,
        sending=sending_now(school_ids=school_ids, now=now, global_paused=global_paused),
        scheduled=scheduled_next(school_ids=school_ids),
        recent_slips=recent_slips(school_ids=school_ids),
        alerts=open_alerts(school_ids=school_ids),
    )
