"""Who receives a slip or broadcast: selectors that turn an audience into recipients.

One recipient per distinct normalized address. Siblings share guardians and separated
parents may share a family address; either way that address gets one email naming every
child of theirs in the audience.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from django.db.models import QuerySet

from slips.models import Audience, Guardian, Student


@dataclass
class Recipient:
    email: str
    email_normalized: str
    names: list[str] = field(default_factory=list)
    guardian_ids: list[int] = field(default_factory=list)
    student_ids: list[int] = field(default_factory=list)
    suppressed_reason: str = ""

    @property
    def name(self) -> str:
        return " / ".join(self.names)


def audience_students(audience: Audience) -> QuerySet[Student]:
    """The students an audience covers, always restricted to the audience's own school."""
    students = Student.objects.filter(school_id=audience.school_id)
    if audience.whole_school:
        return students
    return students.filter(
        pk__in=Student.objects.filter(groups__audiences=audience)
        .values("pk")
        .union(Student.objects.filter(audiences=audience).values("pk"))
    )


def recipients_for_students(school_id: int, student_ids: QuerySet | list[int]) -> list[Recipient]:
    """Guardians of these students who receive email, merged by normalized address.

    Suppressed addresses (hard bounce, complaint) are kept with their reason so that the
    fan-out can record them as skipped rather than silently leaving them out.
    """
    link = Guardian.students.through
    rows = (
        link.objects.filter(
            student_id__in=student_ids,
            guardian__school_id=school_id,
            guardian__receives_email=True,
        )
        .exclude(guardian__email_normalized="")
        .order_by("guardian__email_normalized", "guardian_id", "student_id")
        .values_list(
            "guardian_id",
            "guardian__name",
            "guardian__email",
            "guardian__email_normalized",
            "guardian__suppressed_reason",
            "guardian__suppressed_at",
            "student_id",
        )
    )
    by_address: dict[str, Recipient] = {}
    for guardian_id, name, email, normalized, reason, suppressed_at, student_id in rows.iterator(
        chunk_size=5000
    ):
        recipient = by_address.get(normalized)
        if recipient is None:
            recipient = by_address[normalized] = Recipient(email=email, email_normalized=normalized)
        if guardian_id not in recipient.guardian_ids:
            recipient.guardian_ids.append(guardian_id)
            recipient.names.append(name)
        if student_id not in recipient.student_ids:
            recipient.student_ids.append(student_id)
        if suppressed_at is not None and not recipient.suppressed_reason:
            recipient.suppressed_reason = reason or "address suppressed"
    return list(by_address.values())


def audience_recipients(audience: Audience) -> list[Recipient]:
    return recipients_for_students(audience.school_id, audience_students(audience).values("pk"))


def audience_recipient_count(audience: Audience) -> int:
    """Distinct addresses that would get mail now (suppressed ones excluded)."""
    return sum(1 for r in audience_recipients(audience) if not r.suppressed_reason)


def audience_sample_recipient(audience: Audience) -> Recipient | None:
    """One family of the audience as the fan-out would address it (every child of theirs in
    the audience named), for a preview: the first guardian by id who receives email and is
    not suppressed. None when nobody in the audience receives email.

    Two small queries whatever the audience's size: the rest of the audience is not read.
    """
    students = audience_students(audience)
    guardian = (
        Guardian.objects.filter(
            school_id=audience.school_id,
            receives_email=True,
            suppressed_at__isnull=True,
            students__in=students.values("pk"),
        )
        .exclude(email_normalized="")
        .order_by("pk")
        .first()
    )
    if guardian is None:
        return None
    theirs = students.filter(guardians__email_normalized=guardian.email_normalized).values("pk")
    for recipient in recipients_for_students(audience.school_id, theirs):
        if recipient.email_normalized == guardian.email_normalized:
            return recipient
    return None
