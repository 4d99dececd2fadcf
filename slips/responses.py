"""Recording parents' answers to slips: one response per (slip, student), history kept.

Answering twice (double click, two tabs, two guardians) never creates a second response: the
row is locked, and an identical repeat changes nothing. A different answer before the due
date replaces the current one and appends to the history.
"""

from __future__ import annotations

from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.dispatch import Signal
from django.utils import timezone

from slips.models import Guardian, Response, ResponseChange, SendStatus, Slip, Student

ANSWERABLE = (SendStatus.SENDING, SendStatus.SENT)

# Sent inside the answer's transaction with ``slip`` and ``student_ids``. The sending side
# listens (notifications cancels reminders nobody needs any more) so that the answer and what
# follows from it commit together, without this domain module importing the send pipeline.
answers_recorded = Signal()


def slip_is_open(*, slip: Slip) -> bool:
    return slip.status in ANSWERABLE and (slip.due_at is None or timezone.now() < slip.due_at)


def response_record(
    *,
    slip: Slip,
    student: Student,
    consent: bool,
    answer: str = "",
    guardian: Guardian | None = None,
    recorded_by: object | None = None,
) -> Response:
    """Record (or change) the answer for one student. Staff (``recorded_by``) may record
    after the due date, e.g. from a phone call; parents may not."""
    if student.school_id != slip.school_id:
        raise ValidationError("This student is not at the slip's school.")
    if guardian is not None and guardian.school_id != slip.school_id:
        raise ValidationError("This guardian is not at the slip's school.")
    if slip.status not in ANSWERABLE:
        raise ValidationError("This slip is not open for answers.")
    if recorded_by is None and not slip_is_open(slip=slip):
        raise ValidationError("The due date for this slip has passed.")
    answer = answer.strip()
    now = timezone.now()
    with transaction.atomic():
        try:
            with transaction.atomic():
                response, created = Response.objects.get_or_create(
                    slip=slip,
                    student=student,
                    defaults={
                        "school_id": slip.school_id,
                        "consent": consent,
                        "answer": answer,
                        "guardian": guardian,
                        "recorded_by": recorded_by,
                        "answered_at": now,
                    },
                )
        except IntegrityError:  # a concurrent first answer won the insert
            created = False
        if not created:
            response = Response.objects.select_for_update().get(slip=slip, student=student)
            if response.consent == consent and response.answer == answer:
                return response  # the same answer again: nothing to record
            response.consent = consent
            response.answer = answer
            response.guardian = guardian
            response.recorded_by = recorded_by
            response.answered_at = now
            response.save(
                update_fields=["consent", "answer", "guardian", "recorded_by", "answered_at"]
            )
        ResponseChange.objects.create(
            response=response,
            consent=consent,
            answer=answer,
            guardian=guardian,
            recorded_by=recorded_by,
            answered_at=now,
        )
        answers_recorded.send(sender=Response, slip=slip, student_ids=[student.pk])
    return response
