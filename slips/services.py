"""What staff do to slips and broadcasts before sending: validate, schedule, unschedule,
set reminder rounds. Pause, resume and cancel move mailings too, so they live with the
sending side in ``notifications.controls``.

Each state change is one conditional UPDATE (``filter(status__in=...).update(...)``) whose row
count decides whether it happened, so two staff clicking at once, or a click racing the
dispatcher, cannot both win.
"""

from __future__ import annotations

import datetime as dt
import zoneinfo
from typing import TypeVar

from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from slips.audiences import audience_recipient_count
from slips.models import (
    Broadcast,
    ReminderRound,
    SendStatus,
    Slip,
    validate_body_size,
    validate_single_line,
)

Message = TypeVar("Message", Slip, Broadcast)

# Scheduling "now" from a form takes a moment; a send time this far in the past still counts.
PAST_TOLERANCE = dt.timedelta(minutes=1)


def message_validate_for_schedule(*, message: Slip | Broadcast, send_at: dt.datetime) -> None:
    """Every reason a message cannot be scheduled, as one ValidationError keyed by field."""
    errors: dict[str, list[str]] = {}

    def add(field: str, text: str) -> None:
        errors.setdefault(field, []).append(text)

    for field, validator in (("title", validate_single_line), ("body", validate_body_size)):
        try:
            validator(getattr(message, field))
        except ValidationError as exc:
            for text in exc.messages:
                add(field, text)
    if not message.body.strip():
        add("body", "The message has no body.")
    if message.audience_id is None:
        add("audience", "Choose an audience.")
    elif message.audience.school_id != message.school_id:
        add("audience", "The audience belongs to another school.")
    elif audience_recipient_count(message.audience) == 0:
        add("audience", "This audience has no guardian who receives email.")
    if send_at < timezone.now() - PAST_TOLERANCE:
        add("send_at", "The send time is in the past.")
    if isinstance(message, Slip) and message.due_at is not None and message.due_at <= send_at:
        add("due_at", "The due date must be after the send time.")
    if errors:
        raise ValidationError(errors)


def message_schedule(*, message: Message, send_at: dt.datetime | None = None) -> Message:
    """draft → scheduled. ``send_at`` defaults to the message's own, or now."""
    send_at = send_at or message.send_at or timezone.now()
    message_validate_for_schedule(message=message, send_at=send_at)
    updated = (
        type(message)
        .objects.filter(pk=message.pk, status=SendStatus.DRAFT)
        .update(status=SendStatus.SCHEDULED, send_at=send_at, updated_at=timezone.now())
    )
    if not updated:
        message.refresh_from_db(fields=["status"])
        raise ValidationError(f"Only a draft can be scheduled; this one is {message.status}.")
    message.refresh_from_db()
    return message


def message_unschedule(*, message: Message) -> Message:
    """scheduled → draft, for editing before the send time."""
    updated = (
        type(message)
        .objects.filter(pk=message.pk, status=SendStatus.SCHEDULED)
        .update(status=SendStatus.DRAFT, updated_at=timezone.now())
    )
    if not updated:
        raise ValidationError("Only a scheduled message that has not started can go back to draft.")
    message.refresh_from_db()
    return message


# Statuses of a slip that may get a reminder: it is going out, or has gone out. Not a paused
# one: staff paused it to stop mail, and a reminder is mail.
REMINDABLE = (SendStatus.SCHEDULED, SendStatus.SENDING, SendStatus.SENT)


def _last_round_number(slip: Slip) -> int:
    """The highest round number the slip has used (0 for none). Call with the slip row locked,
    so that two callers never take the same next number."""
    return (
        ReminderRound.objects.filter(slip=slip)
        .order_by("-number")
        .values_list("number", flat=True)
        .first()
        or 0
    )


def slip_reminder_add(*, slip: Slip, send_at: dt.datetime) -> ReminderRound:
    """One more reminder round of ``slip`` at ``send_at``, numbered after every earlier round.

    It goes, like every round, to the families of students with no answer when it falls due,
    after the school's quiet hours; a round due after the slip's due date is not sent.
    """
    now = timezone.now()
    if slip.status not in REMINDABLE:
        hint = ": schedule it first" if slip.status == SendStatus.DRAFT else ""
        raise ValidationError(
            f"A {slip.get_status_display().lower()} slip gets no reminders{hint}."
        )
    if slip.due_at is None:
        raise ValidationError("Reminders need a due date.")

    def local(moment: dt.datetime) -> str:  # staff read times in their school's zone
        zone = zoneinfo.ZoneInfo(slip.school.time_zone)
        return f"{timezone.localtime(moment, zone):%Y-%m-%d %H:%M %Z}"

    if send_at < now - PAST_TOLERANCE:
        raise ValidationError(f"{local(send_at)} is in the past.")
    if send_at >= slip.due_at:
        raise ValidationError(
            f"The slip is due {local(slip.due_at)}: a reminder must come before that."
        )
    if slip.send_at and send_at <= slip.send_at:
        raise ValidationError("A reminder must come after the slip is sent.")
    with transaction.atomic():
        # The slip row serialises numbering: two staff adding at once get two numbers.
        Slip.objects.select_for_update().filter(pk=slip.pk).first()
        last = _last_round_number(slip)
        return ReminderRound.objects.create(
            school_id=slip.school_id, slip=slip, number=last + 1, send_at=max(send_at, now)
        )


def reminder_cancel(*, reminder: ReminderRound) -> bool:
    """scheduled -> cancelled. A round already sending is the slip's to pause or cancel."""
    return bool(
        ReminderRound.objects.filter(pk=reminder.pk, status=ReminderRound.Status.SCHEDULED).update(
            status=ReminderRound.Status.CANCELLED
        )
    )


def slip_reminders_set(*, slip: Slip, days_before_due: list[int]) -> list[ReminderRound]:
    """Replace the slip's future reminder rounds, e.g. ``[3, 1]`` days before the due date.

    Rounds already sending or sent are kept and numbering continues after them, so a round
    number (and with it the mailing's unique key) is never reused.
    """
    if slip.due_at is None:
        raise ValidationError({"due_at": "Reminders need a due date."})
    now = timezone.now()
    times = sorted({slip.due_at - dt.timedelta(days=d) for d in days_before_due})
    for at in times:
        if at <= now:
            raise ValidationError(f"A reminder {at:%Y-%m-%d %H:%M} would be in the past.")
        if slip.send_at and at <= slip.send_at:
            raise ValidationError("A reminder must come after the slip is sent.")
    with transaction.atomic():
        Slip.objects.select_for_update().filter(pk=slip.pk).first()
        ReminderRound.objects.filter(slip=slip, status=ReminderRound.Status.SCHEDULED).delete()
        last = _last_round_number(slip)
        return [
            ReminderRound.objects.create(
                school_id=slip.school_id, slip=slip, number=last + i, send_at=at
            )
            for i, at in enumerate(times, start=1)
        ]
