"""Each school's bounce log: what the mail provider reported as bounced or complained about.

The rows are ``ProviderEvent``s (hard and soft bounces, complaints) of the school's own
deliveries, newest first, read-only like every record the system writes. A hard bounce or a
complaint suppresses the address in every school (``webhooks``); a school's admin who knows
the address works again (the parent fixed their mailbox, the complaint was a mistake) may
reactivate it here, for their own school only: other schools keep their suppression until
their own admins decide. Events that matched no delivery have no school and are seen by ops
only. Registered from ``notifications.admin``.
"""

from __future__ import annotations

import logging

from django.contrib import admin
from django.db.models import Exists, OuterRef, QuerySet
from django.db.models.functions import Lower, Trim
from django.http import HttpRequest
from django.urls import reverse
from django.utils.html import format_html

from edsmart.admin_tenancy import (
    ADMIN_ONLY,
    ReadOnlyTenantAdmin,
    has_role,
    is_ops,
    school_ids_with_role,
)
from notifications.models import ProviderEvent
from slips.models import Guardian, normalize_email

log = logging.getLogger("edsmart.admin")


def _suppressed_here() -> Exists:
    """For a ProviderEvent queryset: a guardian of the event's school with its address is
    still suppressed."""
    return Exists(
        Guardian.objects.filter(
            school_id=OuterRef("school_id"),
            email_normalized=Lower(Trim(OuterRef("email"))),
            suppressed_at__isnull=False,
        )
    )


@admin.register(ProviderEvent)
class BounceLogAdmin(ReadOnlyTenantAdmin):
    list_display = (
        "received_at",
        "email",
        "kind",
        "short_reason",
        "occurred_at",
        "message",
        "still_suppressed",
    )
    list_filter = ("kind", "esp")
    search_fields = ("email",)
    list_select_related = ("delivery__mailing",)
    # Newest first, read off the (school, received_at, id) partial index of the bounce kinds.
    ordering = ("-received_at", "-id")
    actions = ["reactivate_address"]
    fields = (
        "kind",
        "email",
        "reason",
        "occurred_at",
        "received_at",
        "esp",
        "event_type",
        "provider_message_id",
        "event_id",
        "outcome",
        "delivery",
        "school",
    )
    readonly_fields = fields

    def get_queryset(self, request: HttpRequest) -> QuerySet[ProviderEvent]:
        return (
            super()
            .get_queryset(request)
            .filter(kind__in=ProviderEvent.BOUNCE_LOG_KINDS)
            .annotate(suppressed_here=_suppressed_here())
        )

    @admin.display(description="reason")
    def short_reason(self, obj: ProviderEvent) -> str:
        return obj.reason if len(obj.reason) <= 100 else f"{obj.reason[:97]}…"

    @admin.display(description="message")
    def message(self, obj: ProviderEvent) -> str:
        if obj.delivery_id is None:
            return "—"
        return format_html(
            '<a href="{}">{}</a>',
            reverse("admin:notifications_delivery_change", args=[obj.delivery_id]),
            obj.delivery.mailing,
        )

    @admin.display(boolean=True, description="still suppressed")
    def still_suppressed(self, obj: ProviderEvent) -> bool:
        return bool(getattr(obj, "suppressed_here", False))

    def has_reactivate_permission(self, request: HttpRequest) -> bool:
        return has_role(request, ADMIN_ONLY)

    @admin.action(
        description="Reactivate the address in this school (mail will be sent again)",
        permissions=["reactivate"],
    )
    def reactivate_address(self, request: HttpRequest, queryset: QuerySet[ProviderEvent]) -> None:
        """Clear the suppression of the selected events' addresses, for each event's own school
        only, and only where the user is that school's admin (ops: any school)."""
        events = queryset.exclude(school_id__isnull=True)
        if not is_ops(request):
            events = events.filter(school_id__in=school_ids_with_role(request, ADMIN_ONLY))
        pairs = {
            (school_id, normalize_email(email))
            for school_id, email in events.values_list("school_id", "email")
        }
        addresses = guardians = 0
        for school_id, address in sorted(pairs):
            suppressed = Guardian.objects.filter(
                school_id=school_id, email_normalized=address, suppressed_at__isnull=False
            )
            found = list(suppressed)
            for guardian in found:
                reason = guardian.suppressed_reason
                guardian.suppressed_at, guardian.suppressed_reason = None, ""
                guardian.save(update_fields=["suppressed_at", "suppressed_reason"])
                # The guardian's history says who undid which suppression, and from where.
                self.log_change(
                    request,
                    guardian,
                    f"Reactivated the address from the bounce log (was: {reason}).",
                )
            if found:
                addresses += 1
                guardians += len(found)
                log.warning(
                    "%s reactivated a suppressed address for %s guardian(s) of school %s",
                    request.user.get_username(),
                    len(found),
                    school_id,
                    extra={"school_id": school_id, "actor": request.user.get_username()},
                )
        self.message_user(
            request,
            f"Reactivated {addresses} address(es) ({guardians} guardian record(s)) in this "
            "school; other schools keep their own suppression.",
        )
