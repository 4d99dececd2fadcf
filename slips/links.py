"""Parents' links: signed, scoped to one delivery (one recipient, one message), expiring.

The token is a Django signature over the delivery id with a dedicated salt, so it cannot be
guessed or altered to reach another family, message or school: changing any character, or
signing with another salt, breaks the signature, and the id inside is only trusted once the
signature checks out. Everything a page shows is then derived from that one delivery row.

Expiry is computed from the delivery (its slip's due date, or its mailing's creation for a
broadcast), not from the token's age, so an email re-sent later carries a link that behaves
exactly like the first one, and moving a due date moves the expiry with it.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from notifications.models import Delivery
from slips.models import Guardian, Response, Slip, Student
from slips.responses import response_record, slip_is_open
from slips.tokens import LinkError, LinkInvalid, delivery_id_from_token

__all__ = ["LinkError", "LinkExpired", "LinkInvalid", "StudentNotCovered"]


class LinkExpired(LinkError):
    """A genuine link whose time is over."""


class StudentNotCovered(ValidationError):
    """An answer for a student this delivery does not name (a crafted request)."""


def link_expiry_days() -> int:
    # Read at call time so a changed setting (or a test's override) applies at once.
    return settings.EDSMART_LINK_EXPIRY_DAYS


def link_expires_at(*, delivery: Delivery) -> dt.datetime:
    """When this delivery's link stops working: N days after the slip's due date, or after
    the mailing was created for a broadcast (or a slip with no due date)."""
    mailing = delivery.mailing
    slip = mailing.slip if mailing.slip_id else None
    start = slip.due_at if slip is not None and slip.due_at is not None else mailing.created_at
    return start + dt.timedelta(days=link_expiry_days())


def link_resolve(*, token: str) -> Delivery:
    """The Delivery (with its mailing, slip or broadcast, and school) a token names.

    Raises LinkInvalid for anything not issued by us or no longer pointing at a consistent
    row, and LinkExpired for a genuine link past its expiry.
    """
    delivery_id = delivery_id_from_token(token)
    delivery = (
        Delivery.objects.select_related(
            "school", "mailing", "mailing__slip", "mailing__broadcast", "mailing__school"
        )
        .filter(pk=delivery_id)
        .first()
    )
    if delivery is None:
        raise LinkInvalid
    mailing = delivery.mailing
    source = mailing.source
    # Rows of one school only: a delivery never legitimately points across tenants, so if it
    # ever did, refuse rather than show one school's content under another's name.
    if source is None or not (delivery.school_id == mailing.school_id == source.school_id):
        raise LinkInvalid
    if timezone.now() >= link_expires_at(delivery=delivery):
        raise LinkExpired
    return delivery


def delivery_mark_opened(*, delivery_id: int) -> bool:
    """Record the first GET of a valid link; later GETs change nothing.

    The only write a GET may make. Mail scanners that prefetch links set it too, so it counts
    opened pages generously, never answers.
    """
    return bool(
        Delivery.objects.filter(pk=delivery_id, opened_at__isnull=True).update(
            opened_at=timezone.now()
        )
    )


@dataclass(frozen=True)
class Child:
    """One child a slip link may answer for, the guardian who answers, and the current answer."""

    student: Student
    guardian: Guardian
    response: Response | None


def delivery_children(*, delivery: Delivery, slip: Slip) -> list[Child]:
    """The children this delivery may answer for, each with a guardian to record it under.

    A child counts only while one of the delivery's guardians is still that child's guardian
    in the same school: if the roster changed since the email went out (a custody change,
    say), the old link no longer answers for that child.
    """
    student_ids = [int(s) for s in (delivery.student_ids or [])]
    guardian_ids = [int(g) for g in (delivery.guardian_ids or [])]
    school_id = delivery.school_id
    if not student_ids or not guardian_ids:
        return []
    links = (
        Guardian.students.through.objects.filter(
            student_id__in=student_ids,
            guardian_id__in=guardian_ids,
            student__school_id=school_id,
            guardian__school_id=school_id,
        )
        .order_by("guardian_id")
        .values_list("student_id", "guardian_id")
    )
    guardian_of: dict[int, int] = {}
    for student_id, guardian_id in links:
        guardian_of.setdefault(student_id, guardian_id)
    students = Student.objects.filter(pk__in=guardian_of, school_id=school_id).order_by(
        "first_name", "last_name", "pk"
    )
    guardians = Guardian.objects.in_bulk(set(guardian_of.values()))
    responses = {
        r.student_id: r for r in Response.objects.filter(slip=slip, student_id__in=guardian_of)
    }
    return [
        Child(student=s, guardian=guardians[guardian_of[s.pk]], response=responses.get(s.pk))
        for s in students
    ]


def slip_closed_reason(*, slip: Slip) -> str:
    """Why parents can no longer answer, in words for them; empty while the slip is open."""
    if slip_is_open(slip=slip):
        return ""
    if slip.due_at is not None and timezone.now() >= slip.due_at:
        return (
            "The due date for this slip has passed, so answers can no longer be changed here. "
            "Please contact the school if something has changed."
        )
    return "This slip is not open for answers at the moment. Please contact the school."


def delivery_answers_record(
    *, delivery: Delivery, slip: Slip, answers: dict[int, tuple[bool, str]]
) -> list[Response]:
    """Record the answers a parent gave on one page, all or none.

    ``answers`` maps student id to (consent, free-text answer). Only children this delivery
    covers may be answered; the service (``response_record``) makes a repeat a no-op and
    keeps a change of mind as history.
    """
    children = {c.student.pk: c for c in delivery_children(delivery=delivery, slip=slip)}
    foreign = set(answers) - set(children)
    if foreign:
        raise StudentNotCovered("This link does not cover every student in the request.")
    recorded: list[Response] = []
    with transaction.atomic():
        for student_id, (consent, answer) in sorted(answers.items()):
            child = children[student_id]
            recorded.append(
                response_record(
                    slip=slip,
                    student=child.student,
                    consent=consent,
                    answer=answer,
                    guardian=child.guardian,
                )
            )
    return recorded
