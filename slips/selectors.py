"""Read-only queries behind the staff views of answers (a broadcast's reach, which counts
deliveries, is ``notifications.selectors.broadcast_reach``).

Services write, selectors read: nothing here changes a row, and every query is bounded by the
slip's or broadcast's own school, so a caller that has checked the message's tenant needs no
further checks for what these return.

Who counts for a slip (its *roster*): the students its audience covers now, plus any student
who has already answered. Audiences are live (a student may leave a group after answering),
and an answer that was given is never hidden from the counts or the export; "no answer" is
always about students who are in the audience now.
"""

from __future__ import annotations

import zoneinfo
from collections.abc import Iterator
from dataclasses import dataclass, field

from django.db.models import Count, FilteredRelation, Prefetch, Q, QuerySet

from slips.audiences import audience_students
from slips.models import Group, Guardian, Response, Slip, Student


@dataclass(frozen=True)
class AnswerCounts:
    """Yes, no and no answer for a set of students; ``label`` names the set."""

    label: str
    yes: int
    no: int
    none: int

    @property
    def total(self) -> int:
        return self.yes + self.no + self.none

    @property
    def answered_percent(self) -> int:
        return round(100 * (self.yes + self.no) / self.total) if self.total else 0


@dataclass(frozen=True)
class AnswerSummary:
    total: AnswerCounts
    groups: list[AnswerCounts]


@dataclass
class GuardianContact:
    name: str
    email: str
    phone: str
    receives_email: bool
    suppressed_reason: str  # empty unless mail to this address is suppressed

    @property
    def suppressed(self) -> bool:
        return bool(self.suppressed_reason)


@dataclass
class UnansweredStudent:
    student_id: int
    name: str
    year_level: str
    groups: list[str] = field(default_factory=list)
    guardians: list[GuardianContact] = field(default_factory=list)


def _audience_student_ids(slip: Slip) -> QuerySet:
    if slip.audience_id is None:
        return Student.objects.none().values("pk")
    return audience_students(slip.audience).values("pk")


def slip_roster(*, slip: Slip) -> QuerySet[Student]:
    """The students a slip's answers are counted over (see the module docstring)."""
    answered = Response.objects.filter(slip=slip).values("student_id")
    return Student.objects.filter(school_id=slip.school_id).filter(
        Q(pk__in=_audience_student_ids(slip)) | Q(pk__in=answered)
    )


def _counts(label: str, row: dict[str, int]) -> AnswerCounts:
    return AnswerCounts(label=label, yes=row["yes"], no=row["no"], none=row["none"])


def slip_answer_totals(*, slip: Slip) -> AnswerCounts:
    """Yes / no / no answer over the slip's roster, in one aggregate (the staff home page
    shows it for each recent slip; ``slip_answer_summary`` adds the groups)."""
    answer = FilteredRelation("responses", condition=Q(responses__slip=slip))
    total = (
        slip_roster(slip=slip)
        .annotate(answer=answer)
        .aggregate(
            yes=Count("pk", filter=Q(answer__consent=True)),
            no=Count("pk", filter=Q(answer__consent=False)),
            none=Count("pk", filter=Q(answer__isnull=True)),
        )
    )
    return _counts("All students", total)


def slip_answer_summary(*, slip: Slip) -> AnswerSummary:
    """Yes / no / no answer in total and per group of the roster's students.

    A student in two groups counts in both groups (and once in the total). Two queries, both
    aggregated in PostgreSQL: the response is joined on (slip, student) only, so a student's
    answers to other slips never multiply the rows.
    """
    total = slip_answer_totals(slip=slip)
    link = Group.students.through
    per_group = (
        link.objects.filter(
            group__school_id=slip.school_id, student_id__in=slip_roster(slip=slip).values("pk")
        )
        .annotate(
            answer=FilteredRelation(
                "student__responses", condition=Q(student__responses__slip=slip)
            )
        )
        .values("group_id", "group__name", "group__kind")
        .annotate(
            yes=Count("pk", filter=Q(answer__consent=True)),
            no=Count("pk", filter=Q(answer__consent=False)),
            none=Count("pk", filter=Q(answer__isnull=True)),
        )
        .order_by("group__kind", "group__name")
    )
    return AnswerSummary(
        total=total,
        groups=[_counts(row["group__name"], row) for row in per_group],
    )


def slip_unanswered(*, slip: Slip) -> QuerySet[Student]:
    """Students in the slip's audience with no response, with their guardians and groups
    prefetched (the office phones these families)."""
    return (
        Student.objects.filter(pk__in=_audience_student_ids(slip))
        .exclude(pk__in=Response.objects.filter(slip=slip).values("student_id"))
        .prefetch_related(
            Prefetch("guardians", queryset=Guardian.objects.filter(school_id=slip.school_id)),
            Prefetch("groups", queryset=Group.objects.filter(school_id=slip.school_id)),
        )
        .order_by("last_name", "first_name", "pk")
    )


def unanswered_contacts(students: QuerySet[Student] | list[Student]) -> list[UnansweredStudent]:
    """Plain rows for the no-answer list, from ``slip_unanswered`` (sliced as the caller needs)."""
    rows = []
    for student in students:
        rows.append(
            UnansweredStudent(
                student_id=student.pk,
                name=student.full_name,
                year_level=student.year_level,
                groups=[g.name for g in student.groups.all()],
                guardians=[
                    GuardianContact(
                        name=g.name,
                        email=g.email,
                        phone=g.phone,
                        receives_email=g.receives_email,
                        suppressed_reason=(
                            (g.suppressed_reason or "suppressed") if g.suppressed_at else ""
                        ),
                    )
                    for g in student.guardians.all()
                ],
            )
        )
    return rows


def slip_responses(*, slip: Slip) -> QuerySet[Response]:
    """The current answers of a slip, with what the answers list and export show."""
    return (
        Response.objects.filter(slip=slip, school_id=slip.school_id)
        .select_related("student", "guardian", "recorded_by")
        .annotate(n_changes=Count("changes"))
        .order_by("student__last_name", "student__first_name", "student_id")
    )


def answered_by(response: Response, *, style: str = "list") -> str:
    """Who gave an answer: the guardian, or the staff member who took it by phone.

    ``style="csv"`` gives ``staff: <username> (phone)``, ``"list"`` gives
    ``recorded by <username> (phone)``; either is followed by the guardian who called, if known.
    """
    guardian = response.guardian.name if response.guardian_id else ""
    if response.recorded_by_id is None:
        return guardian
    username = response.recorded_by.get_username() if response.recorded_by else "staff"
    text = f"staff: {username} (phone)" if style == "csv" else f"recorded by {username} (phone)"
    return f"{text}, {guardian} called" if guardian else text


ANSWER_CSV_HEADER_FIELDS = ("student", "year level", "groups", "consent", "answer")


def slip_answer_csv_header(*, slip: Slip) -> list[str]:
    return [*ANSWER_CSV_HEADER_FIELDS, f"answered at ({slip.school.time_zone})", "answered by"]


def slip_answer_csv_rows(*, slip: Slip) -> Iterator[list[str]]:
    """One row per roster student: answered or not (blank consent), in the school's time."""
    zone = zoneinfo.ZoneInfo(slip.school.time_zone)
    answers = {r.student_id: r for r in slip_responses(slip=slip)}
    students = (
        slip_roster(slip=slip)
        .prefetch_related(
            Prefetch("groups", queryset=Group.objects.filter(school_id=slip.school_id))
        )
        .order_by("last_name", "first_name", "pk")
    )
    for student in students.iterator(chunk_size=2000):
        groups = "; ".join(g.name for g in student.groups.all())
        response = answers.get(student.pk)
        if response is None:
            yield [student.full_name, student.year_level, groups, "", "", "", ""]
            continue
        yield [
            student.full_name,
            student.year_level,
            groups,
            "yes" if response.consent else "no",
            response.answer,
            response.answered_at.astimezone(zone).strftime("%Y-%m-%d %H:%M"),
            answered_by(response, style="csv"),
        ]
