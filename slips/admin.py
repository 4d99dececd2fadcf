"""The staff admin for the school domain. Tenant isolation comes from ``edsmart.admin_tenancy``.

This module holds schools and memberships, people, groups and audiences, and parents'
responses. Slips and broadcasts have their own module, ``slips.admin_messages``, imported below
so that their admins are registered: Django's autodiscover imports only ``slips.admin``.

Kept thin: a school's sending switch goes through ``notifications.controls``. The CSV columns
of responses are shared with the slips' export action, so they live in ``slips.admin_messages``.

Roles (see ``edsmart.admin_tenancy`` and docs/security.md): only a school's admins change the
school (its name, sender address, time zone, quiet hours, sending switch) and undo bounce and
complaint suppressions; admins and office staff keep the people (students, guardians) up to
date (and import rosters: ``slips.admin_roster``, registered below); every member, teachers
included, works on groups, audiences, messages and answers.
"""

from __future__ import annotations

from django.contrib import admin, messages
from django.db.models import Count, QuerySet
from django.http import HttpRequest
from django.urls import reverse

from edsmart.admin_tenancy import (
    ADMIN_ONLY,
    HistoryInline,
    ReadOnlyTenantAdmin,
    SuperuserOnlyAdmin,
    TenantAdmin,
    has_role,
    is_ops,
    recent_filter,
    school_ids_with_role,
)
from notifications import controls

# Importing it registers the Slip and Broadcast admins (autodiscover imports only this module).
from slips import admin_messages  # noqa: F401
from slips.admin_messages import RESPONSE_CSV_FIELDS, response_csv_values
from slips.admin_roster import RosterImportAdmin
from slips.audiences import audience_recipient_count
from slips.models import (
    Audience,
    Group,
    Guardian,
    Membership,
    Response,
    ResponseChange,
    RosterImport,
    School,
    Slip,
    Student,
)

# --- School and Membership -----------------------------------------------------------------------


# Who keeps the people (students and guardians, with their contact details) up to date.
PEOPLE_ROLES = (Membership.Role.ADMIN, Membership.Role.OFFICE)


@admin.register(School)
class SchoolAdmin(TenantAdmin):
    """Members see their own schools; only a school's admins change one (its sender address is
    the Reply-To of every email); only ops create or delete one."""

    staff_can_add = False
    staff_can_delete = False
    edit_roles = ADMIN_ONLY
    list_display = ("name", "slug", "time_zone", "sender_name", "sending_paused")
    search_fields = ("name", "slug")
    actions = ["pause_sending", "resume_sending"]

    def get_readonly_fields(self, request: HttpRequest, obj: School | None = None) -> tuple:
        # The slug is what commands and scripts use; the pause flag moves only via controls.
        readonly = ("sending_paused", "created_at")
        if obj is not None and not is_ops(request):
            readonly = ("slug", *readonly)
        return readonly

    def has_pause_permission(self, request: HttpRequest) -> bool:
        return has_role(request, ADMIN_ONLY)

    def _set_paused(self, request: HttpRequest, queryset: QuerySet[School], paused: bool) -> None:
        if not is_ops(request):
            queryset = queryset.filter(pk__in=school_ids_with_role(request, ADMIN_ONLY))
        names = []
        for school in queryset:
            controls.sending_set_paused(
                paused=paused, actor=request.user.get_username(), school=school
            )
            names.append(school.name)
        verb = "paused" if paused else "resumed"
        if names:
            self.message_user(request, f"Sending {verb} for {', '.join(names)}.")
        else:
            self.message_user(request, "Only a school admin can do that.", messages.ERROR)

    @admin.action(description="Pause all sending of selected schools", permissions=["pause"])
    def pause_sending(self, request: HttpRequest, queryset: QuerySet[School]) -> None:
        self._set_paused(request, queryset, paused=True)

    @admin.action(description="Resume sending of selected schools", permissions=["pause"])
    def resume_sending(self, request: HttpRequest, queryset: QuerySet[School]) -> None:
        self._set_paused(request, queryset, paused=False)


@admin.register(Membership)
class MembershipAdmin(SuperuserOnlyAdmin):
    """Who works where. Ops only: granting access is not something a school does for itself
    here, since choosing a user would mean listing every user of every school."""

    list_display = ("user", "school", "role")
    list_filter = ("role", "school")
    search_fields = ("user__username", "user__email", "school__name")
    autocomplete_fields = ("school",)
    raw_id_fields = ("user",)


# Upload a roster CSV, see its preview, confirm it (slips.admin_roster).
admin.site.register(RosterImport, RosterImportAdmin)


# --- people and groups ---------------------------------------------------------------------------


@admin.register(Student)
class StudentAdmin(TenantAdmin):
    edit_roles = PEOPLE_ROLES
    list_display = ("last_name", "first_name", "year_level", "external_id")
    list_filter = ("year_level", ("groups", admin.RelatedOnlyFieldListFilter))
    search_fields = ("first_name", "last_name", "external_id")
    readonly_fields = ("guardian_list",)
    actions = ["export_csv"]
    csv_fields = ("id", "first_name", "last_name", "year_level", "external_id", "school__slug")
    change_list_template = "admin/slips/student/change_list.html"  # adds "Import roster"

    def changelist_view(self, request: HttpRequest, extra_context: dict | None = None):
        importer = self.admin_site._registry[RosterImport]
        url = reverse("admin:slips_rosterimport_add")
        extra = {"roster_import_url": url if importer.has_add_permission(request) else None}
        return super().changelist_view(request, {**(extra_context or {}), **extra})

    @admin.display(description="guardians")
    def guardian_list(self, obj: Student) -> str:
        if obj.pk is None:
            return "—"
        return ", ".join(str(g) for g in obj.guardians.all()) or "—"


class SuppressedFilter(admin.SimpleListFilter):
    title = "suppressed"
    parameter_name = "suppressed"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple]:
        return [("yes", "Suppressed"), ("no", "Not suppressed")]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        if self.value() == "yes":
            return queryset.filter(suppressed_at__isnull=False)
        if self.value() == "no":
            return queryset.filter(suppressed_at__isnull=True)
        return queryset


@admin.register(Guardian)
class GuardianAdmin(TenantAdmin):
    """Guardians and their addresses. A suppressed address (hard bounce, complaint) stays
    suppressed until a school admin reactivates it; nobody else may change its email either,
    which would let the same address in again on a new row."""

    edit_roles = PEOPLE_ROLES
    list_display = ("name", "email", "phone", "receives_email", "suppressed", "suppressed_reason")
    list_filter = ("receives_email", SuppressedFilter)
    search_fields = ("name", "email_normalized", "phone")
    autocomplete_fields = ("students",)
    readonly_fields = ("suppressed_at", "suppressed_reason")
    actions = ["export_csv", "reactivate"]
    csv_fields = (
        "id",
        "name",
        "email",
        "phone",
        "receives_email",
        "suppressed_at",
        "suppressed_reason",
        "students",
    )

    def get_queryset(self, request: HttpRequest) -> QuerySet[Guardian]:
        return super().get_queryset(request).prefetch_related("students")

    def get_readonly_fields(self, request: HttpRequest, obj: Guardian | None = None) -> tuple:
        readonly = tuple(super().get_readonly_fields(request, obj))
        if (
            obj is not None
            and obj.suppressed_at is not None
            and not has_role(request, ADMIN_ONLY, obj.school_id)
        ):
            readonly = ("email", *readonly)
        return readonly

    def has_reactivate_permission(self, request: HttpRequest) -> bool:
        return has_role(request, ADMIN_ONLY)

    @admin.display(boolean=True, description="suppressed", ordering="suppressed_at")
    def suppressed(self, obj: Guardian) -> bool:
        return obj.suppressed_at is not None

    def csv_row(self, obj: Guardian) -> list[object]:
        row = super().csv_row(obj)
        row[-1] = "; ".join(s.full_name for s in obj.students.all())
        return row

    @admin.action(
        description="Reactivate suppressed addresses (mail will be sent again)",
        permissions=["reactivate"],
    )
    def reactivate(self, request: HttpRequest, queryset: QuerySet[Guardian]) -> None:
        suppressed = queryset.filter(suppressed_at__isnull=False)
        if not is_ops(request):
            # A user who is an admin in one school and not in another: only the first.
            suppressed = suppressed.filter(school_id__in=school_ids_with_role(request, ADMIN_ONLY))
        count = 0
        for guardian in suppressed:
            reason = guardian.suppressed_reason
            guardian.suppressed_at, guardian.suppressed_reason = None, ""
            guardian.save(update_fields=["suppressed_at", "suppressed_reason"])
            # The guardian's history then says who undid which suppression.
            self.log_change(request, guardian, f"Reactivated the address (was: {reason}).")
            count += 1
        self.message_user(request, f"Reactivated {count} suppressed addresses.")


@admin.register(Group)
class GroupAdmin(TenantAdmin):
    list_display = ("name", "kind", "student_count")
    ordering = ("kind", "name")  # Meta.ordering is dropped from GROUP BY queries
    list_filter = ("kind",)
    search_fields = ("name",)
    autocomplete_fields = ("students",)

    def get_queryset(self, request: HttpRequest) -> QuerySet[Group]:
        return super().get_queryset(request).annotate(n_students=Count("students", distinct=True))

    @admin.display(description="students", ordering="n_students")
    def student_count(self, obj: Group) -> int:
        return obj.n_students


@admin.register(Audience)
class AudienceAdmin(TenantAdmin):
    list_display = ("name", "whole_school", "recipients")
    list_filter = ("whole_school",)
    search_fields = ("name",)
    autocomplete_fields = ("groups", "students")
    readonly_fields = ("recipients",)

    @admin.display(description="recipients now")
    def recipients(self, obj: Audience) -> int | str:
        if obj.pk is None:
            return "—"
        return audience_recipient_count(obj)


# --- responses -----------------------------------------------------------------------------------


class ResponseChangeInline(HistoryInline):
    model = ResponseChange
    fields = ("answered_at", "consent", "answer", "guardian", "recorded_by")
    readonly_fields = fields


@admin.register(Response)
class ResponseAdmin(ReadOnlyTenantAdmin):
    """Parents' answers: recorded through their links, so staff read and export them here."""

    list_display = ("slip", "student", "consent", "answer", "guardian", "answered_at")
    list_filter = ("consent", recent_filter(Slip, "slip_id", "slip__id__exact", "slip"))
    search_fields = ("student__first_name", "student__last_name", "slip__title", "guardian__name")
    list_select_related = ("slip", "student", "guardian")
    inlines = (ResponseChangeInline,)
    actions = ["export_csv"]
    csv_fields = RESPONSE_CSV_FIELDS  # shared with the slips' "Export responses" action
    csv_values = staticmethod(response_csv_values)

    def csv_row(self, obj: Response) -> list[object]:
        return self.csv_values(obj)
