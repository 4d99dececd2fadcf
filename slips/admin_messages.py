"""The staff admin of slips and broadcasts: composing, scheduling, pausing, resuming and
cancelling them, and reading their deliveries.

Split from ``slips.admin`` so that each admin module stays one job; ``slips.admin`` imports this
one, which registers ``SlipAdmin`` and ``BroadcastAdmin`` (Django's autodiscover imports only
``slips.admin``). Kept thin: scheduling goes through ``slips.services``; pausing, resuming and
cancelling, through ``notifications.controls``; validation reuses the model validators and
``slips.services.message_validate_for_schedule`` (see ``slips.forms``). A slip's answers and a
broadcast's reach are views mixed in from ``slips.admin_answers``, reading ``slips.selectors``.

The CSV columns of responses live here, with the slip action that exports them;
``slips.admin.ResponseAdmin`` uses the same ones (importing them keeps the dependency one way).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied, ValidationError
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseNotAllowed, HttpResponseRedirect
from django.urls import path, reverse

from edsmart.admin_tenancy import TenantAdmin, csv_response, restrict
from notifications import controls
from notifications.admin import (
    MessageHandleAdminMixin,
    render_delivery_counts,
    render_delivery_log,
)
from slips import services
from slips.admin_answers import BroadcastReachAdminMixin, SlipAnswersAdminMixin
from slips.admin_preview import MessagePreviewAdminMixin
from slips.admin_reminders import SlipRemindersAdminMixin
from slips.audiences import audience_recipient_count
from slips.forms import SendableAdminForm
from slips.models import Broadcast, Response, SendStatus, Slip

# --- the CSV of responses --------------------------------------------------------------------

RESPONSE_CSV_FIELDS = (
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


def response_csv_values(r: Response) -> list[object]:
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


# --- slips and broadcasts --------------------------------------------------------------------


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
        "Pause", "Paused", controls.message_pause, (SendStatus.SCHEDULED, SendStatus.SENDING)
    ),
    "resume": Transition("Resume", "Resumed", controls.message_resume, (SendStatus.PAUSED,)),
    "cancel": Transition(
        "Cancel",
        "Cancelled",
        controls.message_cancel,
        (SendStatus.DRAFT, SendStatus.SCHEDULED, SendStatus.SENDING, SendStatus.PAUSED),
    ),
}


class SendableAdmin(MessagePreviewAdminMixin, MessageHandleAdminMixin, TenantAdmin):
    """What slip and broadcast pages share: the audience, recipients, timing, transitions and,
    once dispatched, the delivery counts and per-recipient log.

    Transitions are both changelist actions and buttons on the change page (each button posts
    to ``<id>/transition/<name>/``). Content is editable only while a draft.
    """

    form = SendableAdminForm
    change_form_template = "admin/slips/sendable_change_form.html"
    content_fields: tuple[str, ...] = ("school", "title", "body", "audience", "send_at")
    list_display = ("title", "message_handle", "status", "send_at", "audience", "created_at")
    list_filter = ("status", ("audience", admin.RelatedOnlyFieldListFilter))
    search_fields = ("title",)
    autocomplete_fields = ("audience",)
    date_hierarchy = "send_at"
    list_select_related = ("audience",)
    actions = ["schedule", "unschedule", "pause", "resume", "cancel"]
    status_fields = ("status", "recipients", "created_by", "dispatched_at", "completed_at")

    def get_fieldsets(self, request: HttpRequest, obj: Any = None) -> list:
        # Once saved, the handle (``slip:3``) that the ops commands take heads the status.
        status_fields = (
            self.status_fields if obj is None else ("message_handle", *self.status_fields)
        )
        fieldsets: list = [
            (None, {"fields": self.content_fields}),
            ("Sending", {"fields": status_fields}),
        ]
        if obj is not None:
            fieldsets.append(("Deliveries", {"fields": ("delivery_counts", "delivery_log")}))
        return fieldsets

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> tuple:
        readonly = ("message_handle", *self.status_fields, "delivery_counts", "delivery_log")
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
        if obj is not None and obj.pk is not None:
            # The email as a family will get it, and a test to oneself (slips.admin_preview).
            context["preview_url"] = reverse(
                f"admin:{self.opts.app_label}_{self.opts.model_name}_preview", args=[obj.pk]
            )
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
class SlipAdmin(SlipRemindersAdminMixin, SlipAnswersAdminMixin, SendableAdmin):
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
    list_display = (
        "title",
        "message_handle",
        "status",
        "send_at",
        "due_at",
        "audience",
        "created_at",
    )
    actions = [*SendableAdmin.actions, "remind_now", "export_responses_csv"]

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
            context["reminders_url"] = reverse("admin:slips_slip_reminders", args=[obj.pk])
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
            header=RESPONSE_CSV_FIELDS,
            rows=(response_csv_values(r) for r in responses.iterator(chunk_size=2000)),
        )


@admin.register(Broadcast)
class BroadcastAdmin(BroadcastReachAdminMixin, SendableAdmin):
    """Broadcasts. ``urgent`` (a closure, an emergency) sends ahead of every other message."""

    content_fields = ("school", "title", "body", "audience", "urgent", "send_at")
    list_display = (
        "title",
        "message_handle",
        "urgent",
        "status",
        "send_at",
        "audience",
        "created_at",
    )
    list_filter = ("status", "urgent", ("audience", admin.RelatedOnlyFieldListFilter))

    def get_fieldsets(self, request: HttpRequest, obj: Any = None) -> list:
        fieldsets = super().get_fieldsets(request, obj)
        if obj is not None:
            fieldsets.insert(2, ("Reach", {"fields": ("reach",)}))
        return fieldsets

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> tuple:
        return (*super().get_readonly_fields(request, obj), "reach")
