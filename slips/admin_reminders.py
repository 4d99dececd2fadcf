"""A slip's reminder rounds, for staff: schedule, see, cancel, or remind now.

The engine sends a reminder round as its own message to the families of students who have not
answered when it falls due, after the school's quiet hours; until now only Python code could
schedule one. This page (``<slip id>/reminders/``, linked from the slip's change page) lists
each round with its state and reach, schedules one at a date and time or some days before the
due date, cancels one that has not started, and reminds now. Every view loads the slip through
``get_object`` (the tenant-restricted queryset), so another school's slip is a 404; changes
need the slip's change permission. Changes go through ``slips.services``.
"""

from __future__ import annotations

from dataclasses import dataclass
from zoneinfo import ZoneInfo

from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied, ValidationError
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseNotAllowed, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils import timezone

from notifications import summaries
from notifications.models import DeliveryStatus, Mailing
from slips import services
from slips.forms import ReminderForm
from slips.models import ReminderRound, Slip

S = DeliveryStatus
IN_FLIGHT = (S.PENDING, S.CLAIMED, S.SUBMITTING, S.RETRY_WAIT)


@dataclass(frozen=True)
class RoundRow:
    reminder: ReminderRound
    # Per status of its deliveries, once it has gone out (None before).
    counts: dict[str, int] | None
    cancel_url: str

    @property
    def reach(self) -> str:
        if self.counts is None:
            return "not sent yet"
        c = self.counts
        in_flight = sum(c[s] for s in IN_FLIGHT)
        parts = [f"{c[S.SENT]} sent"]
        parts += [f"{in_flight} on their way"] if in_flight else []
        parts += [f"{c[S.FAILED]} failed"] if c[S.FAILED] else []
        parts += [f"{c[S.UNKNOWN]} outcome unknown"] if c[S.UNKNOWN] else []
        parts += [f"{c[S.CANCELLED]} cancelled (answered first)"] if c[S.CANCELLED] else []
        parts += [f"{c[S.SKIPPED]} skipped"] if c[S.SKIPPED] else []
        return ", ".join(parts)


class SlipRemindersAdminMixin:
    """Adds the reminders page and the "remind now" action to the slip admin."""

    def _reminders_url(self, slip: Slip, view: str = "reminders", *args: object) -> str:
        return reverse(f"admin:slips_slip_{view}", args=[slip.pk, *args])

    def get_urls(self) -> list:
        wrap = self.admin_site.admin_view  # login, staff check and CSRF protection
        return [
            path(
                "<path:object_id>/reminders/",
                wrap(self.reminders_view),
                name="slips_slip_reminders",
            ),
            path(
                "<path:object_id>/reminders/now/",
                wrap(self.remind_now_view),
                name="slips_slip_remind_now",
            ),
            path(
                "<path:object_id>/reminders/<int:number>/cancel/",
                wrap(self.reminder_cancel_view),
                name="slips_slip_reminder_cancel",
            ),
            *super().get_urls(),
        ]

    def _reminder_slip(self, request: HttpRequest, object_id: str, *, change: bool) -> Slip:
        slip = self.get_object(request, object_id)  # 404 for another school's id
        allowed = self.has_change_permission if change else self.has_view_permission
        if not allowed(request, slip):
            raise PermissionDenied
        return slip

    def reminders_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        if request.method not in ("GET", "POST"):
            return HttpResponseNotAllowed(["GET", "POST"])
        slip = self._reminder_slip(request, object_id, change=request.method == "POST")
        form = ReminderForm(request.POST or None, slip=slip)
        if request.method == "POST" and form.is_valid():
            try:
                reminder = services.slip_reminder_add(slip=slip, send_at=form.cleaned_data["at"])
            except ValidationError as exc:
                form.add_error(None, exc.messages)
            else:
                local = timezone.localtime(reminder.send_at, ZoneInfo(slip.school.time_zone))
                self.message_user(
                    request,
                    f"Reminder {reminder.number} scheduled for {local:%Y-%m-%d %H:%M %Z}, to the "
                    "families who have not answered by then.",
                    messages.SUCCESS,
                )
                return HttpResponseRedirect(self._reminders_url(slip))
        return self._render_reminders(request, slip, form)

    def remind_now_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        slip = self._reminder_slip(request, object_id, change=True)
        self._remind_now(request, [slip])
        return HttpResponseRedirect(self._reminders_url(slip))

    def reminder_cancel_view(self, request: HttpRequest, object_id: str, number: int):
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        slip = self._reminder_slip(request, object_id, change=True)
        reminder = ReminderRound.objects.filter(slip=slip, number=number).first()
        if reminder is None:
            self.message_user(request, f"Reminder {number} does not exist.", messages.ERROR)
        elif services.reminder_cancel(reminder=reminder):
            self.message_user(request, f"Reminder {number} cancelled.", messages.SUCCESS)
        else:
            reminder.refresh_from_db()
            self.message_user(
                request,
                f"Reminder {number} is {reminder.get_status_display().lower()}: only a "
                "scheduled one can be cancelled (pause or cancel the slip to stop one sending).",
                messages.WARNING,
            )
        return HttpResponseRedirect(self._reminders_url(slip))

    def _remind_now(self, request: HttpRequest, slips: list[Slip]) -> None:
        for slip in slips:
            try:
                reminder = services.slip_reminder_add(slip=slip, send_at=timezone.now())
            except ValidationError as exc:
                self.message_user(
                    request,
                    f"No reminder for “{slip}”: {' '.join(exc.messages)}",
                    messages.ERROR,
                )
                continue
            self.message_user(
                request,
                f"Reminder {reminder.number} of “{slip}” goes now to the families who have "
                "not answered (after the school's quiet hours, if it is within them).",
                messages.SUCCESS,
            )

    @admin.action(description="Remind those who have not answered, now", permissions=["change"])
    def remind_now(self, request: HttpRequest, queryset: QuerySet[Slip]) -> None:
        self._remind_now(request, [s for s in queryset if self.has_change_permission(request, s)])

    def _render_reminders(self, request: HttpRequest, slip: Slip, form: ReminderForm):
        rounds = list(ReminderRound.objects.filter(slip=slip).order_by("number"))
        mailings = dict(Mailing.objects.filter(slip=slip, round__gte=1).values_list("round", "pk"))
        counts = summaries.mailings_counts(mailings.values())
        rows = [
            RoundRow(
                reminder=r,
                counts=counts.get(mailings[r.number]) if r.number in mailings else None,
                cancel_url=self._reminders_url(slip, "reminder_cancel", r.number),
            )
            for r in rounds
        ]
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "original": slip,
            "title": f"Reminders: {slip}",
            "page_name": "Reminders",
            "time_zone": slip.school.time_zone,
            "rows": rows,
            "form": form,
            "can_change": self.has_change_permission(request, slip),
            "remindable": slip.status in services.REMINDABLE,
            "change_url": reverse("admin:slips_slip_change", args=[slip.pk]),
            "reminders_url": self._reminders_url(slip),
            "remind_now_url": self._reminders_url(slip, "remind_now"),
        }
        return TemplateResponse(request, "admin/slips/slip_reminders.html", context)
