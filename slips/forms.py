"""Staff forms for slips and broadcasts, and for an answer taken by phone.

The rules live in one place: the model validators (title on one line, body size) run in the
ModelForm's model validation, and everything else comes from
``slips.services.message_validate_for_schedule``, so a draft saved here is refused for the same
reasons, in the same words, that scheduling it later would be.
"""

from __future__ import annotations

import copy
import datetime as dt
import zoneinfo
from typing import Any

from django import forms
from django.core.exceptions import ValidationError
from django.utils import timezone

from edsmart.admin_tenancy import TenantModelForm
from slips.audiences import audience_students
from slips.models import Guardian, SendStatus, Slip, Student
from slips.services import message_validate_for_schedule

# Reported by the model validators already; the service repeats them for callers that skip
# model validation.
_MODEL_VALIDATED = frozenset({"title", "body"})


class SendableAdminForm(TenantModelForm):
    """A slip or broadcast edited in the admin: checked as if it were about to be scheduled.

    A draft may be saved without an audience (it is work in progress); once one is chosen it
    must reach at least one guardian, and send and due times must make sense.
    """

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean()
        if self.instance.pk is not None and self.instance.status != SendStatus.DRAFT:
            return cleaned  # content is read-only outside draft; nothing here to check
        school = cleaned.get("school") or getattr(self.instance, "school", None)
        if school is None or "body" not in cleaned or "title" not in cleaned:
            return cleaned
        message = copy.copy(self.instance)
        message.school = school
        for name in ("title", "body", "audience", "send_at", "due_at"):
            if name in self.fields and name in cleaned:
                setattr(message, name, cleaned[name])
        try:
            message_validate_for_schedule(
                message=message, send_at=cleaned.get("send_at") or timezone.now()
            )
        except ValidationError as exc:
            for field, texts in exc.message_dict.items():
                if field in _MODEL_VALIDATED:
                    continue
                if field == "audience" and cleaned.get("audience") is None:
                    continue  # a draft without an audience yet is fine
                target = field if field in self.fields else None
                for text in texts:
                    self.add_error(target, text)
        return cleaned


class PhoneAnswerForm(forms.Form):
    """An answer a parent gave by phone, taken down by staff for one student of the slip.

    The choices are the slip's own: students of its audience, and guardians of those students
    (only the chosen student's when the page was opened for one student). ``clean`` checks the
    guardian against the student again, since a POST can name any pair.
    """

    student = forms.ModelChoiceField(queryset=Student.objects.none())
    consent = forms.TypedChoiceField(
        choices=[("yes", "Yes"), ("no", "No")],
        coerce=lambda value: value == "yes",
        widget=forms.RadioSelect,
    )
    answer = forms.CharField(
        required=False,
        label="Answer text",
        max_length=2000,
        widget=forms.Textarea(attrs={"rows": 2, "cols": 60}),
    )
    guardian = forms.ModelChoiceField(
        queryset=Guardian.objects.none(),
        required=False,
        label="Guardian who called",
        help_text="Optional: who gave the answer.",
    )

    def __init__(self, *args: Any, slip: Slip, student: Student | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.slip = slip
        students = audience_students(slip.audience) if slip.audience_id else Student.objects.none()
        self.fields["student"].queryset = students.order_by("last_name", "first_name", "pk")
        self.fields["consent"].label = slip.consent_question
        if slip.free_text_question:
            self.fields["answer"].label = slip.free_text_question
        guardians = Guardian.objects.filter(school_id=slip.school_id)
        if student is not None:
            self.initial.setdefault("student", student.pk)
            guardians = guardians.filter(students=student)
        else:
            guardians = guardians.filter(students__in=students.values("pk")).distinct()
        self.fields["guardian"].queryset = guardians.order_by("name", "pk")

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean()
        student, guardian = cleaned.get("student"), cleaned.get("guardian")
        if (
            student is not None
            and guardian is not None
            and not guardian.students.filter(pk=student.pk).exists()
        ):
            self.add_error("guardian", f"{guardian.name} is not a guardian of {student}.")
        return cleaned


class ReminderForm(forms.Form):
    """A reminder round: at a date and time (the school's), or some days before the due date."""

    AT, DAYS_BEFORE = "at", "days_before"
    when = forms.ChoiceField(
        choices=[(DAYS_BEFORE, "Days before the due date"), (AT, "At a date and time")],
        initial=DAYS_BEFORE,
        widget=forms.RadioSelect,
    )
    days_before = forms.IntegerField(
        required=False, min_value=1, max_value=60, initial=1, label="Days before the due date"
    )
    send_at = forms.DateTimeField(
        required=False,
        label="Date and time",
        help_text="In the school's time zone.",
        widget=forms.DateTimeInput(attrs={"type": "datetime-local"}, format="%Y-%m-%dT%H:%M"),
        input_formats=["%Y-%m-%dT%H:%M", "%Y-%m-%d %H:%M"],
    )

    def __init__(self, *args: Any, slip: Slip, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.slip = slip

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean()
        if cleaned.get("when") == self.DAYS_BEFORE:
            days = cleaned.get("days_before")
            if days is None:
                self.add_error("days_before", "How many days before the due date?")
            elif self.slip.due_at is None:
                raise ValidationError("Reminders need a due date.")
            else:
                cleaned["at"] = self.slip.due_at - dt.timedelta(days=days)
        elif cleaned.get("when") == self.AT:
            at = cleaned.get("send_at")
            if at is None:
                self.add_error("send_at", "When should it go?")
            else:
                # Typed in the school's time zone, whatever the server's.
                zone = zoneinfo.ZoneInfo(self.slip.school.time_zone)
                cleaned["at"] = at.replace(tzinfo=None).replace(tzinfo=zone)
        return cleaned
