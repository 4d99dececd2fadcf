"""The ops page for superusers: every school's sending state, backlog, problems and alerts,
with the pause switches one click away. Pausing and resuming go through
``controls.sending_set_paused`` like the ``sending`` command and the admin actions do.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from django.contrib import admin, messages
from django.contrib.admin.views.decorators import staff_member_required
from django.core.exceptions import PermissionDenied
from django.db.models import Q
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import get_object_or_404, render
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.http import require_POST

from notifications import alerts, controls, fairshare, heartbeats, ratelimit, selectors
from notifications.models import Alert, Mailing, SendingSwitch
from slips.models import School

RECENT_ALERTS = 30


@dataclass(frozen=True)
class SchoolRow:
    school: School
    stats: selectors.SchoolStats
    open_alerts: int


# A school found by the search box: at most this many rows.
SEARCH_LIMIT = 50
# Schools listed for their failures alone (the most first).
MOST_FAILED = 10


def ops_overview(*, query: str = "") -> dict:
    """Everything the page shows, read in a handful of queries.

    A platform has a thousand schools and on most of them nothing is going on: the table lists
    those with something to see (a backlog, an unknown outcome, an open alert, a message
    sending, a pause, or among the ten with most failures this week), and any school the search
    box names, so that every school stays one search away from its pause button while the page
    stays small (rendering a thousand rows took longer than all its queries).
    """
    stats = selectors.school_stats()
    open_by_school: dict[int, int] = {}
    for school_id in Alert.objects.filter(
        cleared_at__isnull=True, school__isnull=False
    ).values_list("school_id", flat=True):
        open_by_school[school_id] = open_by_school.get(school_id, 0) + 1
    sending = Mailing.objects.filter(status=Mailing.Status.SENDING).values("school_id")
    # A failed address or two a week is every school's normal: failures alone list only the
    # schools with the most of them.
    needs_look = [pk for pk, st in stats.items() if st.backlog or st.unknown]
    most_failed = sorted(
        (st for st in stats.values() if st.failed_recent), key=lambda st: -st.failed_recent
    )[:MOST_FAILED]
    shown = (
        Q(pk__in=[*needs_look, *open_by_school, *(st.school_id for st in most_failed)])
        | Q(pk__in=sending)
        | Q(sending_paused=True)
    )
    query = query.strip()[:100]
    if query:
        found = School.objects.filter(Q(name__icontains=query) | Q(slug__icontains=query))
        shown |= Q(pk__in=found.order_by("name").values("pk")[:SEARCH_LIMIT])
    rows = [
        SchoolRow(
            school=school,
            stats=stats.get(school.pk, selectors.SchoolStats(school_id=school.pk)),
            open_alerts=open_by_school.get(school.pk, 0),
        )
        for school in School.objects.filter(shown).order_by("name")
    ]
    since = timezone.now() - dt.timedelta(days=7)
    return {
        "switch": SendingSwitch.objects.filter(pk=1).first(),
        "rows": rows,
        "query": query,
        "schools_quiet": School.objects.count() - len(rows),
        "open_alerts": Alert.objects.filter(cleared_at__isnull=True).select_related("school"),
        "recent_alerts": Alert.objects.filter(cleared_at__gte=since).select_related("school")[
            :RECENT_ALERTS
        ],
        "beat_age": heartbeats.beat_age_seconds(),
        "beat_max_age": heartbeats.beat_max_age(),
        "workers": heartbeats.workers_seen(),
        "failure_rate": alerts.failure_rate(),
        "rate": ratelimit.state(),
        "turns": fairshare.queue(),
    }


def _superuser(request: HttpRequest) -> None:
    if not request.user.is_superuser:
        raise PermissionDenied("The ops page is for superusers.")


@staff_member_required
def ops_page(request: HttpRequest) -> HttpResponse:
    _superuser(request)
    context = {
        **admin.site.each_context(request),
        "title": "Sending operations",
        **ops_overview(query=request.GET.get("q", "")),
    }
    return render(request, "notifications/ops/index.html", context)


@staff_member_required
@require_POST
def ops_sending(request: HttpRequest) -> HttpResponse:
    """Pause or resume sending, globally or for one school (CSRF-protected POST)."""
    _superuser(request)
    action = request.POST.get("action")
    if action not in {"pause", "resume"}:
        return HttpResponse("action must be pause or resume", status=400)
    scope = request.POST.get("scope", "")
    school = None if scope == "global" else get_object_or_404(School, pk=_int(scope))
    reason = request.POST.get("reason", "").strip()[:300]
    controls.sending_set_paused(
        paused=action == "pause",
        actor=f"{request.user.get_username()} (ops page)",
        school=school,
        reason=reason,
    )
    where = school.name if school else "all schools"
    messages.success(request, f"Sending {action}d for {where}.")
    return HttpResponseRedirect(reverse("ops"))


def _int(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        return 0
