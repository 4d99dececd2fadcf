"""Roster import in the admin: upload a CSV, see what it would do, confirm.

"Add roster import" is the upload page (the school, among those where the user keeps the
people, and the file); saving it stores the file's preview, never the school's people, and
opens the import's page: what would be added, changed and removed, or every error with its
line. Confirming there imports exactly the previewed file, in the request when small or in a
task (``slips.tasks``) with its progress on the page. The work is ``slips.roster_imports``'.

Who: school admins and office staff, in their schools (teachers do not keep the people). Every
view loads an import through ``get_object``, the tenant-restricted queryset narrowed to those
roles, so another school's import id is a 404. The ``import_roster`` command stays the way for
ops and scripts; both read, check and write through ``slips.roster``.
"""

from __future__ import annotations

from typing import Any

from django import forms
from django.conf import settings
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.db import models
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseNotAllowed, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils import timezone

from edsmart.admin_tenancy import (
    TenantAdmin,
    TenantModelForm,
    has_role,
    is_ops,
    school_ids_with_role,
)
from slips import roster_imports
from slips.models import Membership, RosterImport
from slips.roster import not_utf8_message

S = RosterImport.Status
# Who may import: those who keep the people up to date (``slips.admin.PEOPLE_ROLES``).
IMPORT_ROLES = (Membership.Role.ADMIN, Membership.Role.OFFICE)
# A queued import not done after this long may have lost its task message (or web process).
REQUEUE_AFTER_SECONDS = 120


class RosterUploadForm(TenantModelForm):
    file = forms.FileField(
        label="Roster CSV",
        help_text="UTF-8 CSV, one row per student and guardian (see the columns in "
        "docs/roster-import.md). Nothing is imported before you confirm the preview.",
    )

    class Meta:
        model = RosterImport
        fields = ["school"]

    def clean_file(self) -> tuple[str, str]:
        """(file name, text); a file that is too large or not UTF-8 text is refused here, before
        anything is stored."""
        upload = self.cleaned_data["file"]
        limit = settings.EDSMART_ROSTER_MAX_BYTES
        if upload.size > limit:
            raise forms.ValidationError(
                f"The file is {_size(upload.size)}; the limit is {_size(limit)}. Split the "
                "roster into several files (by year level, say) and import each.",
                code="too_large",
            )
        name = upload.name or "roster.csv"
        try:
            text = upload.read().decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise forms.ValidationError(not_utf8_message(name, exc), code="encoding") from exc
        if "\x00" in text:
            raise forms.ValidationError(
                f"{name} is not a CSV text file (it contains NUL bytes); a spreadsheet must be "
                "saved as 'CSV UTF-8' first.",
                code="binary",
            )
        return name, text


class RosterImportAdmin(TenantAdmin):
    edit_roles = IMPORT_ROLES
    staff_can_delete = False  # the record of who imported what; ops may clean up
    form = RosterUploadForm
    add_form_template = "admin/slips/rosterimport_upload.html"
    fields = ("school", "file")
    list_display = ("filename", "school", "status", "outcome", "uploaded_by", "created_at")
    list_filter = ("status",)
    search_fields = ("filename",)
    list_select_related = ("school", "uploaded_by")
    actions = None  # no bulk actions: an import is looked at, confirmed, kept

    # --- who: admins and office staff only, each in their own schools ------------------------

    def get_queryset(self, request: HttpRequest) -> QuerySet[RosterImport]:
        queryset = super().get_queryset(request).defer("csv_text")
        # Narrowed to the schools where the user may import, so that there another school's
        # import is a 404; a user who may import nowhere gets the 403 of has_view_permission.
        ids = [] if is_ops(request) else school_ids_with_role(request, IMPORT_ROLES)
        return queryset.filter(school_id__in=ids) if ids else queryset

    def has_module_permission(self, request: HttpRequest) -> bool:
        return self.has_view_permission(request)

    def has_view_permission(self, request: HttpRequest, obj: models.Model | None = None) -> bool:
        school_id = obj.school_id if isinstance(obj, RosterImport) else None
        return super().has_view_permission(request, obj) and has_role(
            request, IMPORT_ROLES, school_id
        )

    # --- upload: Django's add view, then the preview -----------------------------------------

    def save_model(
        self, request: HttpRequest, obj: RosterImport, form: forms.Form, change: bool
    ) -> None:
        name, text = form.cleaned_data["file"]
        obj.uploaded_by = request.user
        obj.filename = name[: RosterImport._meta.get_field("filename").max_length]
        roster_imports.roster_import_preview(roster_import_row=obj, text=text)

    def response_add(
        self, request: HttpRequest, obj: RosterImport, post_url_continue: str | None = None
    ) -> HttpResponse:
        return HttpResponseRedirect(self._url(obj, "change"))

    # --- the import's page and its confirmation -------------------------------------------------

    def get_urls(self) -> list:
        wrap = self.admin_site.admin_view  # login, staff check and CSRF protection
        return [
            path(
                "<path:object_id>/confirm/",
                wrap(self.confirm_view),
                name="slips_rosterimport_confirm",
            ),
            *super().get_urls(),
        ]

    def _url(self, obj: RosterImport, view: str) -> str:
        return reverse(f"admin:slips_rosterimport_{view}", args=[obj.pk])

    def _load(self, request: HttpRequest, object_id: str, *, change: bool) -> RosterImport:
        obj = self.get_object(request, object_id)  # 404 for another school's id
        allowed = self.has_change_permission if change else self.has_view_permission
        if not allowed(request, obj):
            raise PermissionDenied
        return obj

    def change_view(
        self,
        request: HttpRequest,
        object_id: str,
        form_url: str = "",
        extra_context: dict | None = None,
    ) -> HttpResponse:
        if request.method == "POST":
            self._load(request, object_id, change=True)
            return HttpResponseNotAllowed(["GET"])  # confirming has its own URL
        obj = self._load(request, object_id, change=False)
        return self._render(request, obj)

    def confirm_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        obj = self._load(request, object_id, change=True)
        if obj.status not in (S.PREVIEWED, S.QUEUED):
            self.message_user(
                request, f"This import is {obj.get_status_display().lower()}.", messages.WARNING
            )
            return HttpResponseRedirect(self._url(obj, "change"))
        requeue = bool(request.POST.get("requeue"))
        obj = roster_imports.roster_import_confirm(roster_import_row=obj, requeue=requeue)
        # The import's history then says who confirmed it (the upload is logged as its adding).
        self.log_change(request, obj, "Queued again." if requeue else "Confirmed.")
        level, text = {
            S.DONE: (messages.SUCCESS, "The roster was imported."),
            S.QUEUED: (messages.INFO, "The roster is being imported; this page shows how far."),
            S.PREVIEWED: (messages.WARNING, "Nothing was imported: see below."),
            S.INVALID: (messages.ERROR, "Nothing was imported: the file has errors now."),
            S.FAILED: (messages.ERROR, "The import failed; nothing was imported."),
        }[S(obj.status)]
        self.message_user(request, text, level)
        return HttpResponseRedirect(self._url(obj, "change"))

    def _render(self, request: HttpRequest, obj: RosterImport) -> TemplateResponse:
        done, total = roster_imports.roster_import_progress(roster_import_row=obj)
        queued_for = (timezone.now() - obj.confirmed_at).total_seconds() if obj.confirmed_at else 0
        can_change = self.has_change_permission(request, obj)
        context: dict[str, Any] = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "original": obj,
            "title": f"Roster import: {obj.filename}",
            "has_change_permission": can_change,
            "can_confirm": can_change and obj.status == S.PREVIEWED,
            "can_requeue": can_change
            and obj.status == S.QUEUED
            and queued_for > REQUEUE_AFTER_SECONDS,
            "preview": obj.preview,
            "counts": obj.preview.get("counts", {}),
            "errors": obj.errors,
            "error_count": obj.preview.get("error_count", len(obj.errors)),
            "runs_in_background": obj.rows > settings.EDSMART_ROSTER_INLINE_ROWS,
            "progress_done": done,
            "progress_total": total,
            "confirm_url": self._url(obj, "confirm"),
            "upload_url": reverse("admin:slips_rosterimport_add"),
            "limit": roster_imports.PREVIEW_LIMIT,
        }
        return TemplateResponse(request, "admin/slips/rosterimport_page.html", context)

    @admin.display(description="outcome")
    def outcome(self, obj: RosterImport) -> str:
        counts = obj.preview.get("counts")
        if obj.status == S.INVALID:
            return f"{obj.preview.get('error_count', len(obj.errors))} errors"
        if not counts:
            return "—"
        return (
            f"{counts['students_added']} students to add, {counts['students_changed']} to "
            f"change; {counts['guardians_added']} guardians to add, "
            f"{counts['guardians_changed']} to change"
        )


def _size(n: int) -> str:
    if n >= 1024 * 1024:
        return f"{n / (1024 * 1024):.1f} MB"
    return f"{max(1, n // 1024)} KB"
