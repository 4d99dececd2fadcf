"""Staff and ops views of the send pipeline: mailings, deliveries, their events, the switch.

Everything here is read-only except through ``notifications.controls``: deliveries move only by
the conditional updates of ``transitions``, so the admin never saves a Delivery, Mailing or
SendingSwitch itself.
Staff resolve ``unknown`` deliveries with the actions on the Delivery changelist; every
resolution is an event row carrying the staff username.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from django.contrib import admin, messages
from django.contrib.admin.views.main import ChangeList
from django.db.models import F, QuerySet
from django.http import HttpRequest, HttpResponse
from django.template.loader import render_to_string
from django.urls import reverse
from django.utils.html import format_html
from django.utils.http import urlencode
from django.utils.safestring import SafeString

from edsmart.admin_tenancy import (
    HistoryInline,
    ReadOnlyTenantAdmin,
    SuperuserOnlyAdmin,
    is_ops,
    recent_filter,
    restrict,
    user_memberships,
)
from notifications import (
    admin_bounces,  # noqa: F401 - registers the bounce log
    controls,
    selectors,
    summaries,
)
from notifications.admin_evidence import MailingEvidenceAdminMixin, evidence_url
from notifications.models import (
    Delivery,
    DeliveryEvent,
    DeliveryStatus,
    Mailing,
    SendingSwitch,
)
from notifications.wording import delivery_words, mailing_words
from slips.models import Broadcast, Slip, normalize_email

# A whole address (``someone@example.org``): searched exactly, not as a substring.
_ADDRESS = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")

# The per-recipient log on a slip or broadcast page stops here and links to the changelist.
LOG_LIMIT = 500

_IN_FLIGHT = [
    DeliveryStatus.PENDING,
    DeliveryStatus.CLAIMED,
    DeliveryStatus.SUBMITTING,
    DeliveryStatus.RETRY_WAIT,
]


# --- read helpers shared with the slip and broadcast pages ------------------------------------


def delivery_changelist_url(source: Slip | Broadcast, **params: str) -> str:
    key = (
        "mailing__slip__id__exact" if isinstance(source, Slip) else "mailing__broadcast__id__exact"
    )
    query = urlencode({key: source.pk, **params})
    return f"{reverse('admin:notifications_delivery_changelist')}?{query}"


def delivery_counts(source: Slip | Broadcast) -> list[tuple[str, str, int]]:
    """(status, label, count) for every status, across all mailings of the message."""
    found = selectors.source_counts(source)
    return [(value, label, found[value]) for value, label in DeliveryStatus.choices]


def render_delivery_counts(source: Slip | Broadcast) -> SafeString:
    counts = delivery_counts(source)
    return render_to_string(
        "admin/notifications/delivery_counts.html",
        {
            "counts": [
                (label, n, delivery_changelist_url(source, status__exact=value))
                for value, label, n in counts
            ],
            "total": sum(n for _, _, n in counts),
            "all_url": delivery_changelist_url(source),
            # Reported by the mail provider after sending (each delivery once).
            "provider": selectors.source_provider_counts(source),
            "bounce_log_url": reverse("admin:notifications_providerevent_changelist"),
        },
    )


def render_delivery_log(source: Slip | Broadcast) -> SafeString:
    deliveries = (
        selectors.deliveries_of(source).select_related("mailing").order_by("mailing_id", "id")
    )
    total = deliveries.count()
    return render_to_string(
        "admin/notifications/delivery_log.html",
        {
            "rows": deliveries[:LOG_LIMIT],
            "total": total,
            "limit": LOG_LIMIT,
            "truncated": total > LOG_LIMIT,
            "all_url": delivery_changelist_url(source),
        },
    )


# --- handles -------------------------------------------------------------------------------------


class MessageHandleAdminMixin:
    """The handle of a slip, broadcast or mailing (``slip:3``), as the ops commands take it."""

    @admin.display(description="handle", ordering="pk")
    def message_handle(self, obj: Mailing | Slip | Broadcast) -> str:
        return selectors.message_handle(obj) if obj.pk else "—"


# --- Mailing -------------------------------------------------------------------------------------

# The changelist's count columns: (attribute, label, statuses it adds up).
COUNT_COLUMNS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("n_in_flight", "in flight", tuple(_IN_FLIGHT)),
    ("n_sent", "sent", (DeliveryStatus.SENT,)),
    ("n_failed", "failed", (DeliveryStatus.FAILED,)),
    ("n_unknown", "unknown", (DeliveryStatus.UNKNOWN,)),
    ("n_cancelled", "cancelled", (DeliveryStatus.CANCELLED,)),
    ("n_skipped", "skipped", (DeliveryStatus.SKIPPED,)),
)


def mailing_columns(counts: dict[str, int]) -> dict[str, int]:
    return {attr: sum(counts[s] for s in statuses) for attr, _, statuses in COUNT_COLUMNS}


class MailingChangeList(ChangeList):
    """Counts for the page's mailings only, in two queries (``summaries.mailings_counts``):
    a join of every mailing with its deliveries, grouped, was a scan of the whole history."""

    def get_results(self, request: HttpRequest) -> None:
        super().get_results(request)
        self.result_list = list(self.result_list)
        counts = summaries.mailings_counts(m.pk for m in self.result_list)
        for mailing in self.result_list:
            mailing.columns = mailing_columns(counts[mailing.pk])


class _OperateMixin:
    """Resolving unknowns and pausing a mailing are for members of the school and for ops."""

    def has_operate_permission(self, request: HttpRequest) -> bool:
        return is_ops(request) or bool(request.user.is_staff and user_memberships(request))


def _count_column(attr: str, label: str) -> Callable[[MailingAdmin, Mailing], int]:
    @admin.display(description=label)
    def column(self: MailingAdmin, obj: Mailing) -> int:
        return self.columns_of(obj)[attr]

    return column


@admin.register(Mailing)
class MailingAdmin(
    MailingEvidenceAdminMixin, MessageHandleAdminMixin, _OperateMixin, ReadOnlyTenantAdmin
):
    list_display = (
        "message_handle",
        "kind",
        "subject",
        "status_words",
        "recipient_count",
        *(attr for attr, _, _ in COUNT_COLUMNS),
        "created_at",
    )
    # A date filter, not a date hierarchy: the hierarchy reads the distinct years of every
    # mailing listed on each page view (100,000 of them for ops), the filter reads nothing.
    list_filter = ("status", "kind", ("created_at", admin.DateFieldListFilter))
    search_fields = ("subject",)
    ordering = ("-created_at",)
    readonly_fields = ("message_handle", "deliveries_link")
    actions = ["pause_mailings", "resume_mailings"]

    n_in_flight = _count_column("n_in_flight", "in flight")
    n_sent = _count_column("n_sent", "sent")
    n_failed = _count_column("n_failed", "failed")
    n_unknown = _count_column("n_unknown", "unknown")
    n_cancelled = _count_column("n_cancelled", "cancelled")
    n_skipped = _count_column("n_skipped", "skipped")

    def get_changelist(self, request: HttpRequest, **kwargs: object) -> type[ChangeList]:
        return MailingChangeList

    def get_fields(self, request: HttpRequest, obj: Mailing | None = None) -> list:
        fields = [f for f in super().get_fields(request, obj) if f != "message_handle"]
        return ["message_handle", *fields]  # the handle first, as the commands take it

    @staticmethod
    def columns_of(obj: Mailing) -> dict[str, int]:
        columns = getattr(obj, "columns", None)
        if columns is None:  # a change page: one mailing, counted on its own
            columns = obj.columns = mailing_columns(selectors.mailing_counts(mailing=obj))
        return columns

    @admin.display(description="deliveries")
    def deliveries_link(self, obj: Mailing) -> str:
        url = reverse("admin:notifications_delivery_changelist")
        columns = self.columns_of(obj)
        counts = ", ".join(f"{label}: {columns[attr]}" for attr, label, _ in COUNT_COLUMNS)
        return format_html(
            '{} — <a href="{}?{}">see every delivery</a> · <a href="{}">evidence per recipient</a>',
            counts,
            url,
            urlencode({"mailing__id__exact": obj.pk}),
            reverse("admin:notifications_mailing_evidence", args=[obj.pk]),
        )

    @admin.display(description="status", ordering="status")
    def status_words(self, obj: Mailing) -> str:
        return mailing_words(obj.status)

    @admin.action(description="Pause selected mailings", permissions=["operate"])
    def pause_mailings(self, request: HttpRequest, queryset: QuerySet[Mailing]) -> None:
        changed = sum(controls.mailing_set_paused(mailing=m, paused=True) for m in queryset)
        self.message_user(request, f"Paused {changed} of {len(queryset)} selected mailings.")

    @admin.action(description="Resume selected mailings", permissions=["operate"])
    def resume_mailings(self, request: HttpRequest, queryset: QuerySet[Mailing]) -> None:
        changed = sum(controls.mailing_set_paused(mailing=m, paused=False) for m in queryset)
        self.message_user(request, f"Resumed {changed} of {len(queryset)} selected mailings.")


# --- Delivery ------------------------------------------------------------------------------------


class DeliveryEventInline(HistoryInline):
    model = DeliveryEvent
    fields = ("at", "attempt", "from_status", "to_status", "detail", "actor")
    readonly_fields = fields
    ordering = ("at", "id")


@admin.register(Delivery)
class DeliveryAdmin(_OperateMixin, ReadOnlyTenantAdmin):
    list_display = (
        "email",
        "recipient_name",
        "mailing",
        "status_words",
        "tries",
        "short_error",
        "sent_at",
        "updated_at",
    )
    list_filter = (
        "status",
        recent_filter(Slip, "mailing__slip_id", "mailing__slip__id__exact", "slip"),
        recent_filter(
            Broadcast, "mailing__broadcast_id", "mailing__broadcast__id__exact", "broadcast"
        ),
        recent_filter(Mailing, "mailing_id", "mailing__id__exact", "mailing"),
    )
    search_fields = ("email_normalized", "recipient_name")
    list_select_related = ("mailing",)
    # Newest first, read backwards off the (school, id) index: no sort of a school's year.
    ordering = ("-id",)
    inlines = (DeliveryEventInline,)
    actions = ["mark_unknown_sent", "mark_unknown_failed", "resend_unknown"]
    readonly_fields = ("evidence_link",)

    @admin.display(description="evidence")
    def evidence_link(self, obj: Delivery) -> str:
        return format_html(
            '<a href="{}">every try, reply and provider report for this address</a>',
            evidence_url(obj),
        )

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[Delivery], search_term: str
    ) -> tuple[QuerySet[Delivery], bool]:
        """A whole address finds that parent's deliveries exactly, through the unique
        (school, mailing, address) index probed once per mailing of the user's schools (the
        join on the mailing's school is what lets each probe use the whole key); anything
        else searches names and addresses by substring, as Django does."""
        term = search_term.strip()
        if _ADDRESS.fullmatch(term):
            mailings = restrict(Mailing.objects.all(), request).values("pk")
            found = queryset.filter(
                email_normalized=normalize_email(term),
                mailing__in=mailings,
                school_id=F("mailing__school_id"),
            )
            return found, False
        return super().get_search_results(request, queryset, search_term)

    @admin.display(description="status", ordering="status")
    def status_words(self, obj: Delivery) -> str:
        return delivery_words(obj.status)

    @admin.display(description="last error")
    def short_error(self, obj: Delivery) -> str:
        return obj.last_error if len(obj.last_error) <= 80 else f"{obj.last_error[:77]}…"

    def _resolve(self, request: HttpRequest, queryset: QuerySet[Delivery], resolution: str) -> None:
        # The changelist queryset is already limited to the user's schools; the ids go to the
        # transitions, which move only rows that are still ``unknown``.
        ids = list(queryset.values_list("pk", flat=True))
        moved = controls.unknowns_resolve(
            delivery_ids=ids, resolution=resolution, actor=request.user.get_username()
        )
        verb = {
            controls.Resolution.SENT: "marked as sent",
            controls.Resolution.FAILED: "marked as failed",
            controls.Resolution.RESEND: "queued to be sent again",
        }[resolution]
        skipped = len(ids) - moved
        text = f"{moved} unknown deliveries {verb}."
        if skipped:
            text += f" {skipped} selected were not in the unknown state and were left alone."
        self.message_user(request, text, messages.SUCCESS if moved else messages.WARNING)

    @admin.action(description="Mark unknown as sent (the parent got it)", permissions=["operate"])
    def mark_unknown_sent(self, request: HttpRequest, queryset: QuerySet[Delivery]) -> None:
        self._resolve(request, queryset, controls.Resolution.SENT)

    @admin.action(
        description="Mark unknown as failed (the parent did not get it)", permissions=["operate"]
    )
    def mark_unknown_failed(self, request: HttpRequest, queryset: QuerySet[Delivery]) -> None:
        self._resolve(request, queryset, controls.Resolution.FAILED)

    @admin.action(
        description="Resend unknown (the parent may get it twice)", permissions=["operate"]
    )
    def resend_unknown(self, request: HttpRequest, queryset: QuerySet[Delivery]) -> None:
        self._resolve(request, queryset, controls.Resolution.RESEND)


@admin.register(DeliveryEvent)
class DeliveryEventAdmin(ReadOnlyTenantAdmin):
    """The audit log: every state change, including who resolved an unknown."""

    school_lookup = "delivery__school"
    list_display = ("at", "delivery", "attempt", "from_status", "to_status", "actor", "detail")
    list_filter = ("to_status", "from_status")
    search_fields = ("delivery__email_normalized", "actor")
    list_select_related = ("delivery",)


# --- the global switch ---------------------------------------------------------------------------


@admin.register(SendingSwitch)
class SendingSwitchAdmin(SuperuserOnlyAdmin):
    """The global pause. It is flipped through ``controls.sending_set_paused`` only, which
    records who did it and nudges the waiting work on resume."""

    list_display = ("__str__", "paused", "changed_by", "changed_at", "reason")
    fields = ("paused", "reason", "changed_by", "changed_at")
    readonly_fields = ("changed_by", "changed_at")
    actions = ["pause_all", "resume_all"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False

    def changelist_view(self, request: HttpRequest, extra_context: dict | None = None):
        SendingSwitch.current()  # the single row, so there is always something to act on
        return super().changelist_view(request, extra_context)

    def save_model(self, request: HttpRequest, obj: SendingSwitch, form, change: bool) -> None:
        controls.sending_set_paused(
            paused=obj.paused, actor=request.user.get_username(), reason=obj.reason
        )
        obj.refresh_from_db()

    @admin.action(description="Pause ALL sending, every school")
    def pause_all(self, request: HttpRequest, queryset: QuerySet) -> HttpResponse | None:
        controls.sending_set_paused(paused=True, actor=request.user.get_username())
        self.message_user(request, "All sending is paused.", messages.WARNING)
        return None

    @admin.action(description="Resume sending")
    def resume_all(self, request: HttpRequest, queryset: QuerySet) -> HttpResponse | None:
        controls.sending_set_paused(paused=False, actor=request.user.get_username())
        self.message_user(request, "Sending resumed.")
        return None
