"""The staff admin's site: EdSmart's name and the school's on every page, and the home page.

Installed as the default admin site (``edsmart.apps.EdSmartAdminConfig``), so every
``admin.register`` and ``admin.site`` in the project is this site.

The home page is the admin index: messages sending now with their progress, what is
scheduled next, recent slips with their answer rate and the school's open alerts
(``notifications.home``), above the usual list of everything. It refreshes itself from
``home/status.json`` (``staff_home.js``, no build step, no inline script): every 2.5 s while
something is sending, every 30 s otherwise. Both show only the user's own schools
(``edsmart.admin_tenancy.schools_for``); a user of several schools, and ops, may narrow it to
one with ``?school=<id>``, and an id that is not theirs is a 404.
"""

from __future__ import annotations

import datetime as dt
import zoneinfo
from typing import Any

from django.contrib import admin
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.urls import path, reverse
from django.utils import timezone

from edsmart.admin_tenancy import is_ops, schools_for, user_memberships
from notifications.home import Home, Progress, school_home
from slips.models import School

FAST_POLL_MS = 2500
SLOW_POLL_MS = 30000


def _local(value: dt.datetime | None, tz: str) -> str:
    if value is None:
        return "at the next dispatch"
    local = value.astimezone(zoneinfo.ZoneInfo(tz))
    today = timezone.now().astimezone(zoneinfo.ZoneInfo(tz)).date()
    if local.date() == today:
        return local.strftime("today %H:%M")
    return local.strftime("%a %-d %b, %H:%M")


def _source_url(kind: str, pk: int, view: str = "change") -> str:
    return reverse(f"admin:slips_{kind}_{view}", args=[pk])


def progress_json(p: Progress) -> dict[str, Any]:
    return {
        "id": p.mailing_id,
        "title": p.title,
        "kind": p.kind,
        "school": p.school_name,
        "time_zone": p.time_zone,
        "status": p.status,
        "paused": p.paused,
        "paused_why": p.paused_why,
        "finished": p.finished_at is not None,
        "total": p.total,
        "done": p.done,
        "sent": p.sent,
        "failed": p.failed,
        "unknown": p.unknown,
        "skipped": p.skipped,
        "cancelled": p.cancelled,
        "waiting": p.waiting,
        "retrying": p.retrying,
        "started": _local(p.started_at, p.time_zone),
        "rate_since_start": round(p.rate_since_start, 1),
        "url": _source_url(p.source_kind, p.source_id),
        "deliveries_url": (
            f"{reverse('admin:notifications_delivery_changelist')}?mailing__id__exact={p.mailing_id}"
        ),
    }


def home_json(home: Home) -> dict[str, Any]:
    return {
        "as_of_ms": int(home.as_of.timestamp() * 1000),
        "poll_ms": FAST_POLL_MS if home.busy else SLOW_POLL_MS,
        "global_paused": home.global_paused,
        "sending": [progress_json(p) for p in home.sending],
        "scheduled": [
            {
                "title": u.title,
                "kind": u.kind,
                "school": u.school_name,
                "when": _local(u.send_at, u.time_zone),
                "url": _source_url(u.source_kind, u.source_id),
            }
            for u in home.scheduled
        ],
        "recent_slips": [
            {
                "title": s.title,
                "school": s.school_name,
                "status": s.status,
                "yes": s.answers.yes,
                "no": s.answers.no,
                "none": s.answers.none,
                "total": s.answers.total,
                "answered_percent": s.answers.answered_percent,
                "url": _source_url("slip", s.slip_id, "answers"),
            }
            for s in home.recent_slips
        ],
        "alerts": [
            {
                "severity": a.severity,
                "message": a.message,
                "school": a.school_name,
                "raised": a.raised_at.strftime("%-d %b %H:%M UTC"),
            }
            for a in home.alerts
        ],
    }


class EdSmartAdminSite(admin.AdminSite):
    site_header = "EdSmart"
    site_title = "EdSmart"
    index_title = "Home"
    index_template = "admin/edsmart/home.html"

    def _one_school(self, request: HttpRequest) -> School | None:
        """The user's school when they work in exactly one (ops: none)."""
        cached = getattr(request, "_edsmart_one_school", False)
        if cached is not False:
            return cached
        memberships = user_memberships(request)
        school = None
        if len(memberships) == 1 and not is_ops(request):
            school = School.objects.filter(pk=next(iter(memberships))).first()
        request._edsmart_one_school = school  # type: ignore[attr-defined]
        return school

    def each_context(self, request: HttpRequest) -> dict[str, Any]:
        context = super().each_context(request)
        school = self._one_school(request)
        if school is not None:
            context["site_header"] = f"EdSmart · {school.name}"
            context["site_title"] = f"EdSmart · {school.name}"
            context["school_name"] = school.name
        return context

    def get_urls(self) -> list:
        return [
            path("home/status.json", self.admin_view(self.home_status), name="home_status"),
            *super().get_urls(),
        ]

    def home_school_ids(self, request: HttpRequest) -> list[int] | None:
        """The schools the home shows: the user's (``None``: every school, for ops), or the
        one picked with ``?school=``, which must be one of theirs (404 otherwise)."""
        picked = request.GET.get("school", "")
        if picked:
            if not picked.isdigit() or len(picked) > 18:
                raise Http404("No such school.")
            if not schools_for(request).filter(pk=int(picked)).exists():
                raise Http404("No such school.")
            return [int(picked)]
        if is_ops(request):
            return None
        return list(user_memberships(request))

    def home_status(self, request: HttpRequest) -> HttpResponse:
        home = school_home(school_ids=self.home_school_ids(request))
        response = JsonResponse(home_json(home))
        response["Cache-Control"] = "no-store"
        return response

    def index(self, request: HttpRequest, extra_context: dict | None = None) -> HttpResponse:
        school_ids = self.home_school_ids(request)
        home = home_json(school_home(school_ids=school_ids))
        status_url = reverse("admin:home_status", current_app=self.name)
        picked = request.GET.get("school", "")
        school = self._one_school(request)
        choices = [] if school is not None else list(schools_for(request).values("pk", "name"))
        context = {
            "home": home,
            "home_status_url": f"{status_url}?school={picked}" if picked else status_url,
            "school_choices": choices if len(choices) > 1 else [],
            "school_picked": picked,
            "title": school.name if school is not None else "Home",
            **(extra_context or {}),
        }
        return super().index(request, context)
