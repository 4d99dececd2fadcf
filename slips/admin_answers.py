"""The staff views of a slip's answers and of a broadcast's reach, mixed into their admins.

A slip's answers live on their own admin page (``<slip id>/answers/``) linked from the slip's
change page: counts per group, the students with no answer and how to reach their families,
every answer given, a CSV export, and a form for an answer taken by phone. Every view loads
the slip through ``get_object``, i.e. from the tenant-restricted queryset, so another school's
slip id is a 404 exactly like a missing one. Reading goes through ``slips.selectors``; the
phone answer goes through ``slips.responses.response_record`` like every other answer.
"""

from __future__ import annotations

from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied, ValidationError
from django.http import HttpRequest, HttpResponse, HttpResponseNotAllowed, HttpResponseRedirect
from django.template.loader import render_to_string
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.safestring import SafeString

from edsmart.admin_tenancy import csv_response
from notifications import selectors as notification_selectors
from slips import selectors
from slips.forms import PhoneAnswerForm
from slips.models import Broadcast, Slip, Student
from slips.responses import ANSWERABLE, response_record

# The lists on the answers page stop here; the CSV export always has everyone.
LIST_LIMIT = 500


def render_answer_counts(slip: Slip, *, answers_url: str) -> SafeString:
    return render_to_string(
        "admin/slips/answer_counts.html",
        {"summary": selectors.slip_answer_summary(slip=slip), "answers_link": answers_url},
    )


def render_broadcast_reach(broadcast: Broadcast) -> SafeString:
    return render_to_string(
        "admin/slips/broadcast_reach.html",
        {"reach": notification_selectors.broadcast_reach(broadcast=broadcast)},
    )


class SlipAnswersAdminMixin:
    """Adds the answers page, its CSV export and the phone-answer form to the slip admin."""

    def _answers_url(self, slip: Slip, view: str = "answers") -> str:
        return reverse(f"admin:slips_slip_{view}", args=[slip.pk])

    def get_urls(self) -> list:
        wrap = self.admin_site.admin_view  # login, staff check and CSRF protection
        return [
            path(
                "<path:object_id>/answers/",
                wrap(self.answers_view),
                name="slips_slip_answers",
            ),
            path(
                "<path:object_id>/answers/export/",
                wrap(self.answers_export_view),
                name="slips_slip_answers_export",
            ),
            path(
                "<path:object_id>/answers/record/",
                wrap(self.answer_record_view),
                name="slips_slip_answer_record",
            ),
            *super().get_urls(),
        ]

    def _slip_for(self, request: HttpRequest, object_id: str) -> Slip:
        slip = self.get_object(request, object_id)  # 404 for another school's id
        if not self.has_view_permission(request, slip):
            raise PermissionDenied
        return slip

    def _can_record(self, request: HttpRequest, slip: Slip) -> bool:
        return slip.status in ANSWERABLE and self.has_change_permission(request, slip)

    def answers_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        if request.method != "GET":
            return HttpResponseNotAllowed(["GET"])
        slip = self._slip_for(request, object_id)
        student = None
        wanted = request.GET.get("student", "")
        if wanted.isdigit():
            # Only a student of this slip's school can preselect the form; others are ignored.
            student = Student.objects.filter(pk=int(wanted), school_id=slip.school_id).first()
        form = PhoneAnswerForm(slip=slip, student=student)
        return self._render_answers(request, slip, form)

    def answer_record_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        slip = self._slip_for(request, object_id)
        if not self.has_change_permission(request, slip):
            raise PermissionDenied
        form = PhoneAnswerForm(request.POST, slip=slip)
        if form.is_valid():
            data = form.cleaned_data
            try:
                response = response_record(
                    slip=slip,
                    student=data["student"],
                    consent=data["consent"],
                    answer=data["answer"],
                    guardian=data["guardian"],
                    recorded_by=request.user,
                )
            except ValidationError as exc:
                form.add_error(None, exc.messages)
            else:
                word = "yes" if response.consent else "no"
                if response.recorded_by_id == request.user.pk:
                    text = f"Recorded “{word}” for {data['student']} (phone, by you)."
                    self.message_user(request, text, messages.SUCCESS)
                else:
                    # response_record leaves an identical answer untouched, with its author.
                    text = f"{data['student']} already had the answer “{word}”; nothing changed."
                    self.message_user(request, text, messages.WARNING)
                return HttpResponseRedirect(self._answers_url(slip))
        return self._render_answers(request, slip, form)

    def answers_export_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        if request.method != "GET":
            return HttpResponseNotAllowed(["GET"])
        slip = self._slip_for(request, object_id)
        return csv_response(
            filename=f"answers-slip-{slip.pk}",
            header=selectors.slip_answer_csv_header(slip=slip),
            rows=selectors.slip_answer_csv_rows(slip=slip),
        )

    def _render_answers(self, request: HttpRequest, slip: Slip, form: PhoneAnswerForm):
        unanswered = selectors.slip_unanswered(slip=slip)
        responses = selectors.slip_responses(slip=slip)
        answers = [
            (
                r,
                selectors.answered_by(r),
                reverse("admin:slips_response_change", args=[r.pk]),
            )
            for r in responses[:LIST_LIMIT]
        ]
        context = {
            **self.admin_site.each_context(request),
            "summary": selectors.slip_answer_summary(slip=slip),
            "opts": self.opts,
            "original": slip,
            "title": f"Answers: {slip}",
            "page_name": "Answers",
            "time_zone": slip.school.time_zone,
            "unanswered": selectors.unanswered_contacts(unanswered[:LIST_LIMIT]),
            "unanswered_total": unanswered.count(),
            "answers": answers,
            "answers_total": responses.count(),
            "limit": LIST_LIMIT,
            "form": form,
            "can_record": self._can_record(request, slip),
            "change_url": reverse("admin:slips_slip_change", args=[slip.pk]),
            "answers_url": self._answers_url(slip),
            "export_url": self._answers_url(slip, "answers_export"),
            "record_url": self._answers_url(slip, "answer_record"),
        }
        return TemplateResponse(request, "admin/slips/slip_answers.html", context)

    # --- on the slip's change page ---

    @admin.display(description="answers")
    def answer_counts(self, obj: Slip) -> str:
        if obj.pk is None:
            return "—"
        return render_answer_counts(obj, answers_url=self._answers_url(obj))


class BroadcastReachAdminMixin:
    """Adds sent / failed / unknown / opened to a broadcast's change page."""

    @admin.display(description="reach")
    def reach(self, obj: Broadcast) -> str:
        return render_broadcast_reach(obj) if obj.pk else "—"
