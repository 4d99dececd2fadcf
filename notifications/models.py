"""Mailings (one per message) and their deliveries (one per recipient address).

A *mailing* is what DESIGN.md calls a message: one slip, one broadcast, or one reminder round
of a slip, with its content frozen at dispatch so that an edit during sending cannot make two
parents read two versions. A *delivery* is one (mailing, normalized email) pair. The unique
constraint on that pair is what makes a fan-out that runs twice create nothing new.

Delivery state machine (every arrow is one conditional UPDATE in ``notifications.transitions``,
the only code that writes a delivery's status):

```
pending --claim--> claimed --start--> submitting --250--> sent
   ^                  |                   |--4xx before DATA, refused--> retry_wait --due--> claimed
   |--lease expired---+                   |--5xx, invalid, attempts exhausted--> failed
                      |                   |--timeout/reset after DATA, lease expired--> unknown
                      |                   |--credentials refused (not charged)--> retry_wait
                      |--email cannot be built--> failed
                      |--error before the send (counted as a try)--> retry_wait | failed
                      |--lease expired EDSMART_MAX_LOST_CLAIMS times--> failed
unknown --late confirmation / resolve--> sent | failed | pending (resend)
unknown --the provider's event (delivered / bounced / rejected)--> sent | failed | retry_wait
pending/claimed/retry_wait --cancel--> cancelled
(fan-out of a suppressed address) --> skipped
```
"""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.db.models import Q

from slips.models import Broadcast, School, Slip


class Mailing(models.Model):
    class Kind(models.TextChoices):
        SLIP = "slip", "Slip"
        BROADCAST = "broadcast", "Broadcast"
        REMINDER = "reminder", "Slip reminder"

    class Status(models.TextChoices):
        SENDING = "sending", "Sending"
        PAUSED = "paused", "Paused"
        COMPLETED = "completed", "Completed"
        CANCELLED = "cancelled", "Cancelled"

    school = models.ForeignKey(School, on_delete=models.CASCADE, related_name="mailings")
    kind = models.CharField(max_length=16, choices=Kind.choices)
    slip = models.ForeignKey(
        Slip, on_delete=models.CASCADE, null=True, blank=True, related_name="mailings"
    )
    broadcast = models.ForeignKey(
        Broadcast, on_delete=models.CASCADE, null=True, blank=True, related_name="mailings"
    )
    round = models.PositiveSmallIntegerField(
        default=0, help_text="0 for the first send of a slip; 1, 2 … for reminder rounds."
    )
    status = models.CharField(
        max_length=16, choices=Status.choices, default=Status.SENDING, db_index=True
    )
    subject = models.CharField(max_length=250)
    body = models.TextField()
    # Copied from the broadcast at dispatch: its deliveries take turns before all others.
    urgent = models.BooleanField(default=False, db_default=False)
    recipient_count = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)
    completed_at = models.DateTimeField(null=True, blank=True)
    # True while a MailingSummary holds this mailing's counts, so that watches, scrapes and
    # staff pages read one summary row instead of its deliveries. Only mailings none of whose
    # rows can change are summarised (see ``summaries``); a partial index lists the others.
    summarised = models.BooleanField(default=False, db_default=False)

    class Meta:
        ordering = ["-created_at"]
        indexes = [
            # The open ones: a few dozen among a year's hundred thousand mailings.
            models.Index(fields=["id"], condition=Q(summarised=False), name="mailing_unsummarised"),
            # The admin's newest-first list, for ops across every school.
            models.Index(fields=["-created_at", "-id"], name="mailing_newest"),
        ]
        constraints = [
            # Dispatch's one mailing per message (and per reminder round), keyed by school
            # as a database sharded by school requires (migration 0013): exactly as strict
            # as without it, since a mailing's school is its message's (a composite foreign
            # key, also 0013).
            models.UniqueConstraint(
                fields=["school", "slip", "round"],
                condition=Q(slip__isnull=False),
                name="mailing_one_per_school_slip_round",
            ),
            models.UniqueConstraint(
                fields=["school", "broadcast"],
                condition=Q(broadcast__isnull=False),
                name="mailing_one_per_school_broadcast",
            ),
            models.CheckConstraint(
                condition=(Q(kind="broadcast", broadcast__isnull=False, slip__isnull=True))
                | (Q(kind__in=["slip", "reminder"], slip__isnull=False, broadcast__isnull=True)),
                name="mailing_kind_matches_source",
            ),
            # The target of the deliveries' composite foreign key (school_id, mailing_id):
            # what ties a delivery's school to its mailing's (docs/scaling.md).
            models.UniqueConstraint(fields=["school", "id"], name="mailing_school_id_key"),
        ]

    def __str__(self) -> str:
        label = self.get_kind_display()
        if self.kind == self.Kind.REMINDER:
            label = f"{label} {self.round}"
        return f"#{self.pk} {label}: {self.subject}"

    @property
    def source(self) -> Slip | Broadcast:
        return self.slip if self.slip_id else self.broadcast  # type: ignore[return-value]


class DeliveryStatus(models.TextChoices):
    PENDING = "pending", "Pending"
    CLAIMED = "claimed", "Claimed"
    SUBMITTING = "submitting", "Submitting"
    SENT = "sent", "Sent"
    RETRY_WAIT = "retry_wait", "Waiting to retry"
    FAILED = "failed", "Failed"
    UNKNOWN = "unknown", "Unknown outcome"
    CANCELLED = "cancelled", "Cancelled"
    SKIPPED = "skipped", "Skipped"


TERMINAL_STATUSES = frozenset(
    {
        DeliveryStatus.SENT,
        DeliveryStatus.FAILED,
        DeliveryStatus.UNKNOWN,
        DeliveryStatus.CANCELLED,
        DeliveryStatus.SKIPPED,
    }
)


class Delivery(models.Model):
    # No index of its own: (mailing, status) leads with it (the unique guard leads with the school),
    # and every index costs an insert on each of the three updates a delivery goes through.
    mailing = models.ForeignKey(
        Mailing, on_delete=models.CASCADE, related_name="deliveries", db_index=False
    )
    # Indexed as (school, id) below, which also serves every lookup by school alone.
    school = models.ForeignKey(
        School, on_delete=models.CASCADE, related_name="deliveries", db_index=False
    )
    email = models.CharField(max_length=254)
    email_normalized = models.CharField(max_length=254)
    recipient_name = models.CharField(max_length=200, blank=True)
    guardian_ids = models.JSONField(default=list, blank=True)
    student_ids = models.JSONField(default=list, blank=True)
    status = models.CharField(
        max_length=16, choices=DeliveryStatus.choices, default=DeliveryStatus.PENDING
    )
    # The counters below are plain integers, not Positive*: a CHECK constraint is parsed
    # afresh by PostgreSQL for every statement that updates the row, and five of them were
    # about 6% of the database's work per email. Only ``transitions`` writes them, and only
    # upwards (``tries`` is given back with greatest(tries - 1, 0)).
    # The fencing token: bumped by every claim, required by every later transition.
    attempt = models.IntegerField(default=0)
    # How many times a send was actually started (entered ``submitting``); bounded by
    # EDSMART_MAX_ATTEMPTS. Claims given back unused do not count.
    tries = models.SmallIntegerField(default=0)
    # Claims whose worker vanished (lease expired before the send started); bounded by
    # EDSMART_MAX_LOST_CLAIMS so that an email that kills its worker cannot cycle forever.
    lost_claims = models.SmallIntegerField(default=0, db_default=0)
    # Sends the provider throttled (SMTP 421/451/452, API 429): not charged as tries, since
    # the recipient is not at fault, but bounded by EDSMART_MAX_THROTTLES so that a provider
    # that never stops throttling cannot keep a delivery cycling forever.
    throttles = models.SmallIntegerField(default=0, db_default=0)
    # Acceptances recorded for this row: 1 once sent, more than 1 is a duplicate (what the
    # duplicate check looks for). Kept on the row because an event per accepted send was
    # about a third of the database's work per email.
    accepted = models.SmallIntegerField(default=0, db_default=0)
    lease_until = models.DateTimeField(null=True, blank=True)
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    message_id_header = models.CharField(max_length=250, blank=True)
    provider_id = models.CharField(max_length=250, blank=True)
    last_error = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    submitted_at = models.DateTimeField(null=True, blank=True)
    sent_at = models.DateTimeField(null=True, blank=True)
    # First GET of a valid parent link (mail scanners prefetch links, so this over-counts).
    opened_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name_plural = "deliveries"
        ordering = ["id"]
        constraints = [
            # The fan-out's exactly-once guard: one row per (mailing, address). It leads with
            # the school, as a database sharded by school requires of every unique key
            # (docs/scaling.md); the composite foreign key (school_id, mailing_id) -> mailing
            # (school_id, id) added by migration 0012 makes a row's school its mailing's, so
            # this is exactly as strict as (mailing, address) alone.
            models.UniqueConstraint(
                fields=["school", "mailing", "email_normalized"],
                name="delivery_one_per_school_mailing_address",
            ),
        ]
        indexes = [
            models.Index(fields=["mailing", "status"]),
            models.Index(
                fields=["status", "next_attempt_at"],
                condition=Q(status__in=["pending", "retry_wait"]),
                name="delivery_claimable",
            ),
            # A turn claims one mailing's next rows in id order: this reads them straight off
            # the index, where (mailing, status) would sort all of a 50,000-row mailing's
            # pending rows at every claim. Partial, so the per-email moves (claimed,
            # submitting, sent) never insert into it; only fan-out, retries and give-backs do.
            models.Index(
                fields=["mailing", "id"],
                condition=Q(status__in=["pending", "retry_wait"]),
                name="delivery_claimable_in_mailing",
            ),
            models.Index(
                fields=["status", "lease_until"],
                condition=Q(status__in=["claimed", "submitting"]),
                name="delivery_leased",
            ),
            # The duplicate check's rows, and only those: empty while all is well.
            models.Index(
                fields=["mailing"], condition=Q(accepted__gt=1), name="delivery_duplicated"
            ),
            # Outcomes waiting for a person, which may sit in a mailing completed long ago.
            models.Index(fields=["school"], condition=Q(status="unknown"), name="delivery_unknown"),
            # A school's deliveries newest first (the admin's list), in place of the plain
            # school index: the same one insert per row version, and no sort of 100,000 rows.
            # Not unique (migration 0012 says why).
            models.Index(fields=["school", "id"], name="delivery_school_id_order"),
        ]

    def __str__(self) -> str:
        return f"{self.email} ({self.get_status_display()})"


class DeliveryEvent(models.Model):
    """The audit log of a delivery's settling moves, and the record of every accepted send.

    Written by ``notifications.transitions`` in the same statement as the move, for: each
    recorded outcome but an accepted send (retry_wait, failed, unknown), each expired lease,
    each cancel, each person's or policy's resolution. Not for the per-email hot path (claim,
    start, acceptance, a claim given back), which is logged instead: an event row per claim,
    start and acceptance would double the writes of every email. Rows already terminal at
    fan-out (skipped, invalid address) have none either; their ``last_error`` says why.

    An accepted send writes no event: the row records it (``sent_at``, ``provider_id``,
    ``accepted``), since an event per email was about a third of the database's work per
    email. Moves into ``sent`` that settle something (a late reply after ``unknown``, a
    person's resolution) do have one. Events into ``sent`` written before migration 0007
    were folded into ``accepted`` by it.
    """

    delivery = models.ForeignKey(Delivery, on_delete=models.CASCADE, related_name="events")
    # The delivery's school and mailing, copied by the move that writes the event. Nothing
    # reads them yet: they are what a database sharded by school needs on every row and what
    # history partitioned by mailing needs (docs/scaling.md), cheap to fill now and a rewrite
    # of billions of rows later. Null only for events written before migration 0011 finished
    # its backfill (the next release makes them NOT NULL once no older code writes events).
    school = models.ForeignKey(
        School, on_delete=models.CASCADE, null=True, related_name="+", db_index=False
    )
    mailing = models.ForeignKey(
        Mailing, on_delete=models.CASCADE, null=True, related_name="+", db_index=False
    )
    attempt = models.PositiveIntegerField()
    from_status = models.CharField(max_length=16, choices=DeliveryStatus.choices)
    to_status = models.CharField(max_length=16, choices=DeliveryStatus.choices)
    detail = models.TextField(blank=True)
    actor = models.CharField(max_length=150, blank=True, help_text="Who resolved it, if a person.")
    at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["at", "id"]
        indexes = [
            models.Index(fields=["to_status", "delivery"]),
            # The failure rate's window: failures recorded since a moment, however long the log.
            models.Index(fields=["to_status", "at"], name="deliveryevent_status_at"),
        ]

    def __str__(self) -> str:
        return f"{self.from_status} → {self.to_status} (attempt {self.attempt})"


class ProviderEvent(models.Model):
    """What the mail provider said about a delivery after accepting or refusing it.

    Written by ``notifications.provider_events`` from anymail's normalized tracking signal
    (every provider anymail supports): deliveries, deferrals, bounces, complaints and the
    provider's own rejections. Opens and clicks are not stored. ``delivery`` is null when the
    event matched none of ours (or its recipient disagreed with the row it named); ``school``
    follows the delivery, for the tenant wall of the bounce log.

    A provider's event id (or, for providers without one, a digest of the event) is unique
    per provider, so a redelivered event is recorded, and acts, once.
    """

    class Kind(models.TextChoices):
        DELIVERED = "delivered", "Delivered"
        DEFERRED = "deferred", "Deferred"
        SOFT_BOUNCE = "soft_bounce", "Soft bounce"
        HARD_BOUNCE = "hard_bounce", "Hard bounce"
        COMPLAINT = "complaint", "Complaint"
        REJECTED = "rejected", "Rejected"

    # Indexed as (delivery, kind) below: a delivery's events, and the reach's bounce counts.
    delivery = models.ForeignKey(
        Delivery,
        on_delete=models.CASCADE,
        null=True,
        blank=True,
        related_name="provider_events",
        db_index=False,
    )
    # Indexed by the bounce log's partial index below (the only per-school read).
    school = models.ForeignKey(
        School,
        on_delete=models.CASCADE,
        null=True,
        blank=True,
        related_name="provider_events",
        db_index=False,
    )
    esp = models.CharField(max_length=50)
    event_type = models.CharField(max_length=32)
    kind = models.CharField(max_length=16, choices=Kind.choices)
    reason = models.TextField(blank=True)
    email = models.CharField(max_length=254, blank=True)
    provider_message_id = models.CharField(max_length=250, blank=True)
    event_id = models.CharField(max_length=250, blank=True)
    occurred_at = models.DateTimeField(null=True, blank=True)
    received_at = models.DateTimeField(auto_now_add=True)
    outcome = models.CharField(max_length=100, blank=True)

    BOUNCE_LOG_KINDS = ("hard_bounce", "soft_bounce", "complaint")
    BOUNCED_KINDS = ("hard_bounce", "soft_bounce")

    class Meta:
        # Staff know the admin list of these as the school's bounce log (``admin_bounces``).
        verbose_name = "bounce log entry"
        verbose_name_plural = "bounce log"
        ordering = ["-received_at", "-id"]
        constraints = [
            models.UniqueConstraint(
                fields=["esp", "event_id"],
                condition=~Q(event_id=""),
                name="providerevent_one_per_esp_event",
            )
        ]
        indexes = [
            models.Index(fields=["delivery", "kind"], name="providerevent_delivery_kind"),
            # A school's bounce log, newest first, without reading its deliveries' events.
            models.Index(
                fields=["school", "-received_at", "-id"],
                condition=Q(kind__in=["hard_bounce", "soft_bounce", "complaint"]),
                name="providerevent_bounce_log",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.get_kind_display()} for {self.email or '?'} ({self.esp})"


class MailingSummary(models.Model):
    """A closed mailing's counts, written once none of its deliveries can change.

    Why it exists: every watch pass, metrics scrape and staff page needs per-status counts,
    and counting a year of delivery rows each time grows with history. A summary is written by
    the sweep for a completed or cancelled mailing with no open row (``summaries``), dropped
    again if a row of it moves (a person's or a late reply's settling of an ``unknown``), and
    is what remains of the mailing after retention removes its deliveries (``archived_at``).
    Who answered a slip is in Responses, which retention never touches.
    """

    mailing = models.OneToOneField(
        Mailing, on_delete=models.CASCADE, primary_key=True, related_name="summary"
    )
    school = models.ForeignKey(School, on_delete=models.CASCADE, related_name="+")
    sent = models.IntegerField(default=0)
    failed = models.IntegerField(default=0)
    unknown = models.IntegerField(default=0)
    cancelled = models.IntegerField(default=0)
    skipped = models.IntegerField(default=0)
    # Accepted sends (the rows' ``accepted``): more than ``sent`` only if a duplicate happened.
    accepted = models.IntegerField(default=0)
    opened = models.IntegerField(default=0)
    summarised_at = models.DateTimeField(db_index=True)
    # Set when retention starts removing the deliveries: the counts are final from then on.
    archived_at = models.DateTimeField(null=True, blank=True)
    # Set once the last of them is gone (removal goes in small batches, across runs).
    rows_removed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name_plural = "mailing summaries"

    def __str__(self) -> str:
        return f"summary of mailing {self.mailing_id}"

    def counts(self) -> dict[str, int]:
        """Every status with its count, shaped like ``selectors.delivery_status_counts``."""
        found = {
            DeliveryStatus.SENT: self.sent,
            DeliveryStatus.FAILED: self.failed,
            DeliveryStatus.UNKNOWN: self.unknown,
            DeliveryStatus.CANCELLED: self.cancelled,
            DeliveryStatus.SKIPPED: self.skipped,
        }
        return {status: found.get(status, 0) for status in DeliveryStatus.values}


SUMMARY_STATUSES = ("sent", "failed", "unknown", "cancelled", "skipped")


class SendingSwitch(models.Model):
    """The global pause switch: a single row (id=1) that every claim consults."""

    paused = models.BooleanField(default=False)
    changed_at = models.DateTimeField(auto_now=True)
    changed_by = models.CharField(max_length=150, blank=True)
    reason = models.CharField(max_length=300, blank=True)

    class Meta:
        verbose_name = "global sending switch"

    def __str__(self) -> str:
        return "Sending paused" if self.paused else "Sending running"

    @classmethod
    def current(cls) -> SendingSwitch:
        obj, _ = cls.objects.get_or_create(pk=1)
        return obj


class Alert(models.Model):
    """One alert per condition while it holds: raised once, re-seen quietly, then cleared.

    ``key`` names the condition (e.g. ``duplicates:school:3``); a partial unique index keeps
    at most one open alert per key, so two ``watch`` runs at once cannot raise it twice.
    """

    class Severity(models.TextChoices):
        WARNING = "warning", "Warning"
        CRITICAL = "critical", "Critical"

    key = models.CharField(max_length=200)
    kind = models.CharField(max_length=50)
    severity = models.CharField(max_length=16, choices=Severity.choices)
    school = models.ForeignKey(
        School, on_delete=models.CASCADE, null=True, blank=True, related_name="alerts"
    )
    message = models.TextField()
    raised_at = models.DateTimeField(auto_now_add=True)
    last_seen_at = models.DateTimeField(auto_now=True)
    cleared_at = models.DateTimeField(null=True, blank=True)
    notified = models.BooleanField(default=False)

    class Meta:
        ordering = ["-raised_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["key"], condition=Q(cleared_at__isnull=True), name="alert_one_open_per_key"
            )
        ]

    def __str__(self) -> str:
        return f"[{self.severity}] {self.message}"


class Heartbeat(models.Model):
    """Last time a component showed life: ``beat`` (a scheduled tick) or ``worker:<hostname>``."""

    name = models.CharField(max_length=200, unique=True)
    at = models.DateTimeField()

    def __str__(self) -> str:
        return f"{self.name} at {self.at:%Y-%m-%d %H:%M:%S}"


def sender_of(school: School) -> str:
    from email.utils import formataddr

    return formataddr((school.display_sender_name, settings.DEFAULT_FROM_EMAIL))
