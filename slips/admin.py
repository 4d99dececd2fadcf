"""The staff admin for the school domain. Tenant isolation comes from ``edsmart.admin_tenancy``.

Kept thin: state changes of slips and broadcasts go through ``slips.services``, sending
switches through ``notifications.pipeline``; validation reuses the model validators and
``slips.services.message_validate_for_schedule`` (see ``slips.forms``). A slip's answers and a
broadcast's reach are views mixed in from ``slips.admin_answers``, reading ``slips.selectors``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied, ValidationError
from django.db.models import Count, QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseNotAllowed, HttpResponseRedirect
from django.urls import path, reverse

from edsmart.admin_tenancy import (
    HistoryInline,
    ReadOnlyTenantAdmin,
    SuperuserOnlyAdmin,
    TenantAdmin,
    csv_response,
    is_ops,
    restrict,
    user_memberships,
)
from notifications import pipeline
from notifications.admin import render_delivery_counts, render_delivery_log
from slips import services
from slips.admin_answers import BroadcastReachAdminMixin, SlipAnswersAdminMixin
from slips.audiences import audience_recipient_count
from slips.forms import SendableAdminForm
from slips.models import (
    Audience,
    Broadcast,
    Group,
    Guardian,
    Membership,
    Response,
    ResponseChange,
    School,
    SendStatus,
    Slip,
    Student,
)

# --- School and Membership -----------------------------------------------------------------------


@admin.register(School)
class SchoolAdmin(TenantAdmin):
    """Staff see and edit their own schools; only ops create or delete one."""

    staff_can_add = False
    staff_can_delete = False
    list_display = ("name", "slug", "time_zone", "sender_name", "sending_paused")
    search_fields = ("name", "slug")
    actions = ["pause_sending", "resume_sending"]

    def get_readonly_fields(self, request: HttpRequest, obj: School | None = None) -> tuple:
        # The slug is what commands and scripts use; the pause flag moves only via the pipeline.
        readonly = ("sending_paused", "created_at")
        if obj is not None and not is_ops(request):
            readonly = ("slug", *readonly)
        return readonly

    def has_pause_permission(self, request: HttpRequest) -> bool:
        return is_ops(request) or Membership.Role.ADMIN in user_memberships(request).values()

    def _set_paused(self, request: HttpRequest, queryset: QuerySet[School], paused: bool) -> None:
        if not is_ops(request):
            roles = user_memberships(request)
            queryset = queryset.filter(
                pk__in=[pk for pk, role in roles.items() if role == Membership.Role.ADMIN]
            )
        names = []
        for school in queryset:
            pipeline.sending_set_paused(
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


# --- people and groups ---------------------------------------------------------------------------


@admin.register(Student)
class StudentAdmin(TenantAdmin):
    list_display = ("last_name", "first_name", "year_level", "external_id")
    list_filter = ("year_level", ("groups", admin.RelatedOnlyFieldListFilter))
    search_fields = ("first_name", "last_name", "external_id")
    readonly_fields = ("guardian_list",)
    actions = ["export_csv"]
    csv_fields = ("id", "first_name", "last_name", "year_level", "external_id", "school__slug")

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

    @admin.display(boolean=True, description="suppressed", ordering="suppressed_at")
    def suppressed(self, obj: Guardian) -> bool:
        return obj.suppressed_at is not None

    def csv_row(self, obj: Guardian) -> list[object]:
        row = super().csv_row(obj)
        row[-1] = "; ".join(s.full_name for s in obj.students.all())
        return row

    @admin.action(description="Reactivate suppressed addresses (mail will be sent again)")
    def reactivate(self, request: HttpRequest, queryset: QuerySet[Guardian]) -> None:
        count = queryset.filter(suppressed_at__isnull=False).update(
            suppressed_at=None, suppressed_reason=""
        )
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


# --- slips and broadcasts ------------------------------------------------------------------------


@dataclass(frozen=True)
class Transition:
    label: str
    done: str
    service: Callable[..., Any]
    from_statuses: tuple[str, ...]


TRANSITIONS: dict[str, Transition] = {
    "schedule": Transition("Schedule", "Scheduled", services.message_schedule, (SendStatus.DRAFT,)),
    "unschedule": Transition(
        "Back to draft", "Returned to draft", services.message_unschedule, (SendStatus.SCHEDULED,)
    ),
    "pause": Transition(
        "Pause", "Paused", services.message_pause, (SendStatus.SCHEDULED, SendStatus.SENDING)
    ),
    "resume": Transition("Resume", "Resumed", services.message_resume, (SendStatus.PAUSED,)),
    "cancel": Transition(
        "Cancel",
        "Cancelled",
        services.message_cancel,
        (SendStatus.DRAFT, SendStatus.SCHEDULED, SendStatus.SENDING, SendStatus.PAUSED),
    ),
}


class SendableAdmin(TenantAdmin):
    """What slip and broadcast pages share: the audience, recipients, timing, transitions and,
    once dispatched, the delivery counts and per-recipient log.

    Transitions are both changelist actions and buttons on the change page (each button posts
    to ``<id>/transition/<name>/``). Content is editable only while a draft.
    """

    form = SendableAdminForm
    change_form_template = "admin/slips/sendable_change_form.html"
    content_fields: tuple[str, ...] = ("school", "title", "body", "audience", "send_at")
    list_display = ("title", "status", "send_at", "audience", "created_at")
    list_filter = ("status", ("audience", admin.RelatedOnlyFieldListFilter))
    search_fields = ("title",)
    autocomplete_fields = ("audience",)
    date_hierarchy = "send_at"
    list_select_related = ("audience",)
    actions = ["schedule", "unschedule", "pause", "resume", "cancel"]
    status_fields = ("status", "recipients", "created_by", "dispatched_at", "completed_at")

    def get_fieldsets(self, request: HttpRequest, obj: Any = None) -> list:
        fieldsets: list = [
            (None, {"fields": self.content_fields}),
            ("Sending", {"fields": self.status_fields}),
        ]
        if obj is not None:
            fieldsets.append(("Deliveries", {"fields": ("delivery_counts", "delivery_log")}))
        return fieldsets

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> tuple:
        readonly = (*self.status_fields, "delivery_counts", "delivery_log")
        if obj is not None and obj.status != SendStatus.DRAFT:
            readonly = (*self.content_fields, *readonly)
        return readonly

    def save_model(self, request: HttpRequest, obj: Any, form: Any, change: bool) -> None:
        if not change:
            obj.created_by = request.user
        super().save_model(request, obj, form, change)

    # --- read-only displays ---

    @admin.display(description="recipients now")
    def recipients(self, obj: Slip | Broadcast) -> str:
        if obj.audience_id is None:
            return "Choose an audience to see who would receive it."
        count = audience_recipient_count(obj.audience)
        return f"{count} email addresses would receive it if it were sent now."

    @admin.display(description="counts per delivery status")
    def delivery_counts(self, obj: Slip | Broadcast) -> str:
        return render_delivery_counts(obj) if obj.pk else "—"

    @admin.display(description="per-recipient log")
    def delivery_log(self, obj: Slip | Broadcast) -> str:
        return render_delivery_log(obj) if obj.pk else "—"

    # --- transitions ---

    def get_urls(self) -> list:
        info = self.opts.app_label, self.opts.model_name
        return [
            path(
                "<path:object_id>/transition/<str:name>/",
                self.admin_site.admin_view(self.transition_view),
                name="{}_{}_transition".format(*info),
            ),
            *super().get_urls(),
        ]

    def _run(self, request: HttpRequest, name: str, objs: list[Slip | Broadcast]) -> None:
        transition = TRANSITIONS[name]
        for obj in objs:
            try:
                transition.service(message=obj)
            except ValidationError as exc:
                self.message_user(
                    request,
                    f"Could not {transition.label.lower()} “{obj}”: {' '.join(exc.messages)}",
                    messages.ERROR,
                )
                continue
            text = f"{transition.done} “{obj}”."
            if name == "schedule":
                count = audience_recipient_count(obj.audience)
                text = (
                    f"Scheduled “{obj}” for {obj.send_at:%Y-%m-%d %H:%M %Z} to {count} addresses."
                )
            self.message_user(request, text, messages.SUCCESS)

    def transition_view(self, request: HttpRequest, object_id: str, name: str) -> HttpResponse:
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        obj = self.get_object(request, object_id)  # 404 for another school's id
        if name not in TRANSITIONS or not self.has_change_permission(request, obj):
            raise PermissionDenied
        self._run(request, name, [obj])
        return HttpResponseRedirect(
            reverse(f"admin:{self.opts.app_label}_{self.opts.model_name}_change", args=[obj.pk])
        )

    def render_change_form(
        self,
        request: HttpRequest,
        context: dict,
        add: bool = False,
        change: bool = False,
        form_url: str = "",
        obj: Any = None,
    ) -> HttpResponse:
        buttons = []
        if obj is not None and self.has_change_permission(request, obj):
            for name, transition in TRANSITIONS.items():
                if obj.status in transition.from_statuses:
                    url = reverse(
                        f"admin:{self.opts.app_label}_{self.opts.model_name}_transition",
                        args=[obj.pk, name],
                    )
                    buttons.append({"name": name, "label": transition.label, "url": url})
        context["transitions"] = buttons
        context["can_schedule_on_save"] = (
            obj is None or obj.status == SendStatus.DRAFT
        ) and self.has_change_permission(request, obj)
        return super().render_change_form(request, context, add, change, form_url, obj)

    def _after_save(self, request: HttpRequest, obj: Any, response: HttpResponse) -> HttpResponse:
        if "_schedule" not in request.POST:
            return response
        self._run(request, "schedule", [obj])
        return HttpResponseRedirect(
            reverse(f"admin:{self.opts.app_label}_{self.opts.model_name}_change", args=[obj.pk])
        )

    def response_add(self, request: HttpRequest, obj: Any, post_url_continue: Any = None):
        return self._after_save(request, obj, super().response_add(request, obj, post_url_continue))

    def response_change(self, request: HttpRequest, obj: Any) -> HttpResponse:
        return self._after_save(request, obj, super().response_change(request, obj))

    @admin.action(description="Schedule selected (at their send time, or now)")
    def schedule(self, request: HttpRequest, queryset: QuerySet) -> None:
        self._run(request, "schedule", list(queryset))

    @admin.action(description="Return selected to draft (not yet sending)")
    def unschedule(self, request: HttpRequest, queryset: QuerySet) -> None:
        self._run(request, "unschedule", list(queryset))

    @admin.action(description="Pause selected")
    def pause(self, request: HttpRequest, queryset: QuerySet) -> None:
        self._run(request, "pause", list(queryset))

    @admin.action(description="Resume selected")
    def resume(self, request: HttpRequest, queryset: QuerySet) -> None:
        self._run(request, "resume", list(queryset))

    @admin.action(description="Cancel selected (mail not yet sent is not sent)")
    def cancel(self, request: HttpRequest, queryset: QuerySet) -> None:
        self._run(request, "cancel", list(queryset))


@admin.register(Slip)
class SlipAdmin(SlipAnswersAdminMixin, SendableAdmin):
    """Slips, with their answers: counts on the change page, the rest on the answers page
    (``slips.admin_answers``)."""

    content_fields = (
        "school",
        "title",
        "body",
        "consent_question",
        "free_text_question",
        "audience",
        "send_at",
        "due_at",
    )
    list_display = ("title", "status", "send_at", "due_at", "audience", "created_at")
    actions = [*SendableAdmin.actions, "export_responses_csv"]

    def get_fieldsets(self, request: HttpRequest, obj: Any = None) -> list:
        fieldsets = super().get_fieldsets(request, obj)
        if obj is not None:
            fieldsets.insert(2, ("Answers", {"fields": ("answer_counts",)}))
        return fieldsets

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> tuple:
        return (*super().get_readonly_fields(request, obj), "answer_counts")

    def render_change_form(
        self,
        request: HttpRequest,
        context: dict,
        add: bool = False,
        change: bool = False,
        form_url: str = "",
        obj: Any = None,
    ) -> HttpResponse:
        if obj is not None and obj.pk is not None:
            context["answers_url"] = reverse("admin:slips_slip_answers", args=[obj.pk])
        return super().render_change_form(request, context, add, change, form_url, obj)

    @admin.action(description="Export responses of selected slips as CSV")
    def export_responses_csv(self, request: HttpRequest, queryset: QuerySet[Slip]) -> HttpResponse:
        responses = restrict(
            Response.objects.filter(slip__in=queryset).select_related(
                "slip", "student", "guardian"
            ),
            request,
        ).order_by("slip_id", "student__last_name", "student__first_name")
        return csv_response(
            filename="responses",
            header=ResponseAdmin.csv_fields,
            rows=(ResponseAdmin.csv_values(r) for r in responses.iterator(chunk_size=2000)),
        )


@admin.register(Broadcast)
class BroadcastAdmin(BroadcastReachAdminMixin, SendableAdmin):
    def get_fieldsets(self, request: HttpRequest, obj: Any = None) -> list:
        fieldsets = super().get_fieldsets(request, obj)
        if obj is not None:
            fieldsets.insert(2, ("Reach", {"fields": ("reach",)}))
        return fieldsets

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> tuple:
        return (*super().get_readonly_fields(request, obj), "reach")


# --- responses -----------------------------------------------------------------------------------


class ResponseChangeInline(HistoryInline):
    model = ResponseChange
    fields = ("answered_at", "consent", "answer", "guardian", "recorded_by")
    readonly_fields = fields


@admin.register(Response)
class ResponseAdmin(ReadOnlyTenantAdmin):
    """Parents' answers: recorded through their links, so staff read and export them here."""

    list_display = ("slip", "student", "consent", "answer", "guardian", "answered_at")
    list_filter = ("consent", ("slip", admin.RelatedOnlyFieldListFilter))
    search_fields = ("student__first_name", "student__last_name", "slip__title", "guardian__name")
    list_select_related = ("slip", "student", "guardian")
    inlines = (ResponseChangeInline,)
    actions = ["export_csv"]
    csv_fields = (
        "slip",
        "student_first_name",
        "student_last_name",
        "year_level",
        "consent",
        "answer",
        "guardian",
        "guardian_email",
        "answered_at",
    )

    @staticmethod
    def csv_values(r: Response) -> list[object]:
        return [
            r.slip.title,
            r.student.first_name,
            r.student.last_name,
            r.student.year_level,
            "yes" if r.consent else "no",
            r.answer,
            r.guardian.name if r.guardian else "",
            r.guardian.email if r.guardian else "",
            r.answered_at.isoformat(),
        ]

    def csv_row(self, obj: Response) -> list[object]:
        return self.csv_values(obj)
