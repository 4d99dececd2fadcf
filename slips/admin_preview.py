"""Preview and "send a test to me" on a slip or broadcast, mixed into their admins.

Three views per message, each loading it through ``get_object`` (the tenant-restricted
queryset, so another school's id is a 404 like a missing one):

- ``<id>/preview/``: the email one family of the audience would get (subject, text part, HTML
  part), rendered by the pipeline's own code (``notifications.preview``), and the page behind
  its link. The HTML part is shown in an ``<iframe sandbox srcdoc>``: no script, no form, no
  plugin runs, and the staff-written content in it is the email's own escaped rendering.
- ``<id>/preview/answer/``: the parents' page as that family would see it, marked as a
  preview. It is the preview's and the test email's link target, never a parent's link: it
  needs a staff login for the school, answers only GET, carries no CSRF token, and is served
  with ``Content-Security-Policy: sandbox`` (no form can be submitted from it). Nothing on it
  can record an answer for anyone.
- ``<id>/preview/test/`` (POST): the same email to the user's own address, through the
  pipeline's mailer, marked "[TEST]". It creates no mailing or delivery, so it is not one of the
  message's sends; it is limited per user (``notifications.preview``).

Available in every status: before scheduling is what it is for, and afterwards it shows what
went out (the content is frozen once the message leaves draft).
"""

from __future__ import annotations

from django.conf import settings
from django.contrib import messages
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse, HttpResponseNotAllowed, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.views.decorators.clickjacking import xframe_options_sameorigin

from notifications import preview
from notifications.mailer import Outcome
from slips.links import Child
from slips.models import Broadcast, Guardian, Slip, Student
from slips.parent_forms import SlipAnswerForm

# The answer page's preview: shown in a frame of the preview page, never able to submit.
ANSWER_PREVIEW_CSP = (
    "sandbox; default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'self'"
)


class MessagePreviewAdminMixin:
    """Adds the preview, its answer page and the test send to the slip and broadcast admins."""

    def _preview_name(self, view: str) -> str:
        return f"{self.opts.app_label}_{self.opts.model_name}_{view}"

    def get_urls(self) -> list:
        wrap = self.admin_site.admin_view  # login, staff check and CSRF protection
        return [
            path(
                "<path:object_id>/preview/",
                wrap(self.preview_view),
                name=self._preview_name("preview"),
            ),
            path(
                "<path:object_id>/preview/answer/",
                wrap(xframe_options_sameorigin(self.preview_answer_view)),
                name=self._preview_name("preview_answer"),
            ),
            path(
                "<path:object_id>/preview/test/",
                wrap(self.preview_test_view),
                name=self._preview_name("preview_test"),
            ),
            *super().get_urls(),
        ]

    def _message_for(self, request: HttpRequest, object_id: str) -> Slip | Broadcast:
        obj = self.get_object(request, object_id)  # 404 for another school's id
        if not self.has_view_permission(request, obj):
            raise PermissionDenied
        return obj

    def _url(self, view: str, obj: Slip | Broadcast) -> str:
        return reverse(f"admin:{self._preview_name(view)}", args=[obj.pk])

    def _answer_link(self, obj: Slip | Broadcast) -> str:
        return f"{settings.SITE_URL}{self._url('preview_answer', obj)}"

    def preview_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        obj = self._message_for(request, object_id)
        family = preview.sample_family(obj)
        parts = preview.preview_parts(obj, family, link=self._answer_link(obj))
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "original": obj,
            "title": f"Preview: {obj.title}",
            "family": family,
            "parts": parts,
            "answer_url": self._url("preview_answer", obj),
            "test_url": self._url("preview_test", obj),
            "change_url": reverse(
                f"admin:{self.opts.app_label}_{self.opts.model_name}_change", args=[obj.pk]
            ),
            "user_email": request.user.email,
            "per_window": preview.TEST_SENDS_PER_WINDOW,
            "window_minutes": preview.TEST_WINDOW_SECONDS // 60,
        }
        return TemplateResponse(request, "admin/slips/message_preview.html", context)

    def preview_answer_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        if request.method not in ("GET", "HEAD"):
            return HttpResponseNotAllowed(["GET", "HEAD"])
        obj = self._message_for(request, object_id)
        family = preview.sample_family(obj)
        mailing = preview.draft_mailing(obj)
        context = {
            "school": obj.school,
            "mailing": mailing,
            "family": family,
            # Not the admin's: no token to post with, and no admin message shown (or used up).
            "csrf_token": "",
            "messages": [],
        }
        if isinstance(obj, Slip):
            children = _sample_children(obj, family)
            form = SlipAnswerForm(
                None, children=children, free_text_question=obj.free_text_question
            )
            context.update(slip=obj, form=form, blocks=form.blocks(), closed="")
        kind = "slip" if isinstance(obj, Slip) else "broadcast"
        context["parent_template_path"] = f"slips/parent/{kind}.html"
        response = TemplateResponse(request, "admin/slips/message_preview_answer.html", context)
        response["Content-Security-Policy"] = ANSWER_PREVIEW_CSP
        response["Cache-Control"] = "no-store"
        return response

    def preview_test_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        obj = self._message_for(request, object_id)
        back = HttpResponseRedirect(self._url("preview", obj))
        to = (request.user.email or "").strip()
        try:
            family, result = preview.send_to_self(
                source=obj, user_id=request.user.pk, to=to, link=self._answer_link(obj)
            )
        except preview.SendToSelfRefused as exc:
            self.message_user(request, str(exc), messages.ERROR)
            return back
        words = preview.outcome_words(result)
        level = messages.SUCCESS if result.outcome is Outcome.ACCEPTED else messages.ERROR
        self.message_user(
            request,
            f"Test email to {to} (as {family.name} would get it): {words}. "
            "It is not one of this message's sends.",
            level,
        )
        return back


def _sample_children(slip: Slip, family: preview.SampleFamily) -> list[Child]:
    """The family's children in the slip's school, each with no answer yet: what the answer
    page shows them before they answer. A made-up child when the audience has nobody."""
    students = list(
        Student.objects.filter(pk__in=family.student_ids, school_id=slip.school_id).order_by(
            "first_name", "last_name", "pk"
        )
    )
    if not students:
        students = [Student(pk=0, school=slip.school, first_name=preview.MADE_UP_CHILD)]
        students[0].last_name = ""
    guardian = Guardian(school=slip.school, name=family.name, email=family.email)
    return [Child(student=s, guardian=guardian, response=None) for s in students]
