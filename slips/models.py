"""The school domain: tenants, people, audiences, slips, broadcasts and responses.

Every row belongs to exactly one school (the tenant). Admin querysets and services filter on
``school`` so that staff of one school never reach another school's rows.
"""

from __future__ import annotations

import datetime as dt
import re
import zoneinfo

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import validate_email
from django.db import models
from django.db.models import Q
from django.db.models.functions import Lower


def normalize_email(address: str) -> str:
    """The key under which two spellings of one mailbox count as one recipient.

    Case is folded on the whole address: real mail systems treat the local part
    case-insensitively, and sending twice to "Ann@x" and "ann@x" is exactly the duplicate
    this product exists to prevent.
    """
    return address.strip().lower()


def validate_time_zone(value: str) -> None:
    if value not in zoneinfo.available_timezones():
        raise ValidationError(f"{value!r} is not a known time zone (e.g. Australia/Sydney).")


# Line breaks of every kind (what str.splitlines splits on), and the other control characters
# but the tab: none of them belongs in a name or a subject, and in an email header they break it.
_LINE_BREAK = re.compile("[\n\r\x0b\x0c\x1c-\x1e\x85\u2028\u2029]")
_CONTROL = re.compile("[\x00-\x08\x0e-\x1b\x1f\x7f]")


def validate_single_line(value: str) -> None:
    """For every value that reaches an email header (school and sender names, titles)."""
    if _LINE_BREAK.search(value):
        raise ValidationError("Must be a single line (no line breaks).")
    if _CONTROL.search(value):
        raise ValidationError("Must not contain control characters.")


def validate_body_size(value: str) -> None:
    limit = settings.EDSMART_MAX_BODY_BYTES
    size = len(value.encode("utf-8"))
    if size > limit:
        raise ValidationError(f"Body is {size // 1024} KB; the limit is {limit // 1024} KB.")


class School(models.Model):
    name = models.CharField(max_length=200, validators=[validate_single_line])
    slug = models.SlugField(max_length=64, unique=True)
    time_zone = models.CharField(
        max_length=64, default="Australia/Sydney", validators=[validate_time_zone]
    )
    sender_name = models.CharField(max_length=200, blank=True, validators=[validate_single_line])
    sender_email = models.EmailField(blank=True, help_text="Replies from parents go here.")
    sending_paused = models.BooleanField(
        default=False, help_text="While set, no delivery of this school is claimed or sent."
    )
    quiet_hours_start = models.TimeField(
        default=dt.time(21, 0), help_text="Reminders wait from this local time …"
    )
    quiet_hours_end = models.TimeField(default=dt.time(7, 0), help_text="… until this one.")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    @property
    def display_sender_name(self) -> str:
        return self.sender_name or self.name


class Membership(models.Model):
    """A staff user's place in a school. A user may belong to several schools."""

    class Role(models.TextChoices):
        ADMIN = "admin", "School admin"
        TEACHER = "teacher", "Teacher"
        OFFICE = "office", "Office"

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="memberships"
    )
    school = models.ForeignKey(School, on_delete=models.CASCADE, related_name="memberships")
    role = models.CharField(max_length=16, choices=Role.choices, default=Role.TEACHER)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["user", "school"], name="membership_unique_user_school")
        ]

    def __str__(self) -> str:
        return f"{self.user} @ {self.school} ({self.get_role_display()})"


class Student(models.Model):
    school = models.ForeignKey(School, on_delete=models.CASCADE, related_name="students")
    first_name = models.CharField(max_length=100)
    last_name = models.CharField(max_length=100)
    year_level = models.CharField(max_length=16, blank=True, help_text="e.g. K, 1, 2 … 12")
    external_id = models.CharField(max_length=64, blank=True, help_text="The school's own id.")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["last_name", "first_name"]
        constraints = [
            models.UniqueConstraint(
                fields=["school", "external_id"],
                condition=~Q(external_id=""),
                name="student_unique_external_id_per_school",
            )
        ]
        indexes = [models.Index(fields=["school", "last_name", "first_name"])]

    def __str__(self) -> str:
        return f"{self.first_name} {self.last_name}"

    @property
    def full_name(self) -> str:
        return f"{self.first_name} {self.last_name}"


class Guardian(models.Model):
    school = models.ForeignKey(School, on_delete=models.CASCADE, related_name="guardians")
    name = models.CharField(max_length=200)
    email = models.EmailField(blank=True)
    email_normalized = models.CharField(max_length=254, blank=True, editable=False, db_index=True)
    phone = models.CharField(max_length=40, blank=True)
    receives_email = models.BooleanField(default=True)
    suppressed_at = models.DateTimeField(
        null=True, blank=True, help_text="Set after a hard bounce or complaint; no mail is sent."
    )
    suppressed_reason = models.CharField(max_length=200, blank=True)
    students = models.ManyToManyField(Student, related_name="guardians", blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]
        indexes = [models.Index(fields=["school", "email_normalized"])]

    def __str__(self) -> str:
        return f"{self.name} <{self.email}>" if self.email else self.name

    def save(self, *args: object, **kwargs: object) -> None:
        self.email_normalized = normalize_email(self.email) if self.email else ""
        super().save(*args, **kwargs)

    def clean(self) -> None:
        if self.email:
            validate_email(self.email)
        if self.receives_email and not self.email:
            raise ValidationError({"email": "An email address is needed to receive email."})


class Group(models.Model):
    class Kind(models.TextChoices):
        CLASS = "class", "Class"
        YEAR = "year", "Year level"
        CUSTOM = "custom", "Custom"

    school = models.ForeignKey(School, on_delete=models.CASCADE, related_name="groups")
    name = models.CharField(max_length=100)
    kind = models.CharField(max_length=16, choices=Kind.choices, default=Kind.CUSTOM)
    students = models.ManyToManyField(Student, related_name="groups", blank=True)

    class Meta:
        ordering = ["kind", "name"]
        constraints = [
            models.UniqueConstraint("school", Lower("name"), name="group_unique_name_per_school_ci")
        ]

    def __str__(self) -> str:
        return self.name


class Audience(models.Model):
    """Who a slip or broadcast is for: the whole school, some groups, or picked students.

    The recipients are the guardians of those students who receive email, one per distinct
    normalized address (see ``slips.audiences``).
    """

    school = models.ForeignKey(School, on_delete=models.CASCADE, related_name="audiences")
    name = models.CharField(max_length=200)
    whole_school = models.BooleanField(default=False)
    groups = models.ManyToManyField(Group, related_name="audiences", blank=True)
    students = models.ManyToManyField(Student, related_name="audiences", blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class SendStatus(models.TextChoices):
    DRAFT = "draft", "Draft"
    SCHEDULED = "scheduled", "Scheduled"
    SENDING = "sending", "Sending"
    SENT = "sent", "Sent"
    PAUSED = "paused", "Paused"
    CANCELLED = "cancelled", "Cancelled"


class Sendable(models.Model):
    """What slips and broadcasts share: content, audience, timing and the sending lifecycle.

    ```
    draft --schedule--> scheduled --due (dispatch_due)--> sending --all deliveries terminal--> sent
      scheduled/sending --pause--> paused --resume--> scheduled (not yet fanned out) or sending
      draft/scheduled/sending/paused --cancel--> cancelled
    ```
    Every transition is a conditional UPDATE: scheduling in ``slips.services``, dispatch in
    ``notifications.dispatch``, pause, resume and cancel in ``notifications.controls`` (they
    move the message's mailings with it), completion in ``notifications.sweep``.
    ``dispatched_at`` records that the fan-out happened, so resume knows which state to return to.
    """

    school = models.ForeignKey(School, on_delete=models.CASCADE, related_name="%(class)ss")
    title = models.CharField(max_length=200, validators=[validate_single_line])
    body = models.TextField(validators=[validate_body_size])
    audience = models.ForeignKey(
        Audience, on_delete=models.PROTECT, related_name="%(class)ss", null=True, blank=True
    )
    send_at = models.DateTimeField(null=True, blank=True)
    status = models.CharField(
        max_length=16, choices=SendStatus.choices, default=SendStatus.DRAFT, db_index=True
    )
    dispatched_at = models.DateTimeField(null=True, blank=True, editable=False)
    completed_at = models.DateTimeField(null=True, blank=True, editable=False)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        abstract = True
        ordering = ["-created_at"]
        constraints = [
            # The target of a mailing's composite foreign key (school_id, slip_id or
            # broadcast_id): what ties a mailing's school to its message's (docs/scaling.md).
            models.UniqueConstraint(
                fields=["school", "id"], name="%(app_label)s_%(class)s_school_id_key"
            ),
        ]

    def __str__(self) -> str:
        return self.title


class Slip(Sendable):
    consent_question = models.CharField(
        max_length=300, default="Do you give consent?", validators=[validate_single_line]
    )
    free_text_question = models.CharField(max_length=300, blank=True)
    due_at = models.DateTimeField(null=True, blank=True)

    class Meta(Sendable.Meta):
        indexes = [models.Index(fields=["status", "send_at"])]


class Broadcast(Sendable):
    urgent = models.BooleanField(
        default=False,
        help_text="A closure or an emergency: its emails go ahead of every other message "
        "waiting to be sent, at every school.",
    )

    class Meta(Sendable.Meta):
        indexes = [models.Index(fields=["status", "send_at"])]


class ReminderRound(models.Model):
    """A reminder of a slip to families who have not answered yet: its own message (mailing).

    ```
    scheduled --due, outside quiet hours (dispatch_due)--> sending --all terminal--> sent
    scheduled --cancel--> cancelled
    ```
    """

    class Status(models.TextChoices):
        SCHEDULED = "scheduled", "Scheduled"
        SENDING = "sending", "Sending"
        SENT = "sent", "Sent"
        CANCELLED = "cancelled", "Cancelled"

    school = models.ForeignKey(School, on_delete=models.CASCADE, related_name="reminder_rounds")
    slip = models.ForeignKey(Slip, on_delete=models.CASCADE, related_name="reminder_rounds")
    number = models.PositiveSmallIntegerField(help_text="1 for the first reminder, 2 …")
    send_at = models.DateTimeField()
    status = models.CharField(
        max_length=16, choices=Status.choices, default=Status.SCHEDULED, db_index=True
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["slip", "number"]
        constraints = [
            models.UniqueConstraint(fields=["slip", "number"], name="reminder_round_unique"),
            models.CheckConstraint(condition=models.Q(number__gte=1), name="reminder_round_gte1"),
        ]

    def __str__(self) -> str:
        return f"Reminder {self.number} of {self.slip}"


class Response(models.Model):
    """The current answer for one student to one slip. Earlier answers live in ResponseChange."""

    school = models.ForeignKey(School, on_delete=models.CASCADE, related_name="responses")
    slip = models.ForeignKey(Slip, on_delete=models.CASCADE, related_name="responses")
    student = models.ForeignKey(Student, on_delete=models.CASCADE, related_name="responses")
    guardian = models.ForeignKey(
        Guardian, on_delete=models.SET_NULL, null=True, blank=True, related_name="responses"
    )
    consent = models.BooleanField()
    answer = models.TextField(blank=True)
    answered_at = models.DateTimeField()
    recorded_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="+",
        help_text="Set when staff recorded the answer on a parent's behalf.",
    )

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["slip", "student"], name="response_one_per_student")
        ]

    def __str__(self) -> str:
        return f"{self.student} — {'yes' if self.consent else 'no'}"


class ResponseChange(models.Model):
    """History: every answer ever given, so a change of mind keeps the earlier one."""

    response = models.ForeignKey(Response, on_delete=models.CASCADE, related_name="changes")
    consent = models.BooleanField()
    answer = models.TextField(blank=True)
    guardian = models.ForeignKey(
        Guardian, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    recorded_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    answered_at = models.DateTimeField()

    class Meta:
        ordering = ["answered_at"]

    def __str__(self) -> str:
        return f"{'yes' if self.consent else 'no'} at {self.answered_at:%Y-%m-%d %H:%M}"


class RosterImport(models.Model):
    """One roster CSV uploaded in the admin: its preview, then its import.

    The file's text is kept until the import ends so that the confirm step (or the task, for a
    large file) imports exactly the bytes that were previewed (``sha256`` checks it), and is
    then emptied: the students and guardians hold the data from there on, and the preview
    stays as the record of what changed.

    ::

        previewed --confirm--> queued --import commits--> done
            |                    |----school changed---> previewed (a fresh preview)
            |                    |----errors now-------> invalid
            |                    '----crashed----------> failed
        invalid (the file has errors: nothing can be confirmed)

    There is no "running" row state: the move ``queued -> done`` commits with the import itself
    (one transaction, the row locked), so a redelivered task finds it done and does nothing,
    and a worker that dies mid-import leaves it queued for the redelivery. While it runs, the
    progress is in Redis (``slips.roster_imports``), since nobody else can read the import's
    uncommitted transaction.
    """

    class Status(models.TextChoices):
        PREVIEWED = "previewed", "Previewed, waiting for confirmation"
        INVALID = "invalid", "Refused: the file has errors"
        QUEUED = "queued", "Importing"
        DONE = "done", "Imported"
        FAILED = "failed", "Failed, nothing imported"

    school = models.ForeignKey(School, on_delete=models.CASCADE, related_name="roster_imports")
    uploaded_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    filename = models.CharField(max_length=255)
    csv_text = models.TextField(blank=True, editable=False)
    sha256 = models.CharField(max_length=64, editable=False)
    status = models.CharField(max_length=16, choices=Status.choices, editable=False)
    rows = models.PositiveIntegerField(default=0, editable=False)
    preview = models.JSONField(default=dict, editable=False)
    errors = models.JSONField(default=list, editable=False)  # [{"line": n, "reason": "..."}]
    message = models.TextField(blank=True, editable=False)  # why it failed or was re-previewed
    result = models.JSONField(default=dict, editable=False)
    progress_done = models.PositiveIntegerField(default=0, editable=False)
    progress_total = models.PositiveIntegerField(default=0, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    confirmed_at = models.DateTimeField(null=True, blank=True, editable=False)
    finished_at = models.DateTimeField(null=True, blank=True, editable=False)

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["school", "-created_at"])]

    def __str__(self) -> str:
        return (
            f"{self.filename} ({self.created_at:%Y-%m-%d %H:%M})"
            if self.created_at
            else self.filename
        )
