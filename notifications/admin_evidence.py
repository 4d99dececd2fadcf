"""A message's evidence per recipient, for staff: a page and a CSV beside the mailing.

When a parent says "I never got it" or "I got it three times", staff need more than a status:
each try with its time, the Message-ID the parent (or their IT) can search their mailbox for,
the provider's id, the server's reply and the provider's later reports (``evidence``). The page
(``<mailing id>/evidence/``) shows a page of recipients at a time and finds one parent by whole
or partial address; the CSV (``<mailing id>/evidence.csv``) holds every step of every recipient,
or of the one address searched. Both load the mailing through ``get_object`` (the tenant
queryset), so another school's mailing is a 404, and need only view permission: they change
nothing.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Iterator

from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.http import HttpRequest, HttpResponse, HttpResponseNotAllowed, StreamingHttpResponse
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils import timezone
from django.utils.http import urlencode

from edsmart.admin_tenancy import csv_safe
from notifications import evidence
from notifications.models import Delivery, Mailing
from slips.models import normalize_email

PER_PAGE = 50


class _Echo:
    """A file-like sink for ``csv.writer`` that hands each line back instead of storing it."""

    def write(self, value: str) -> str:
        return value


def _csv_stream(header: Iterable[str], rows: Iterable[Iterable[object]]) -> Iterator[str]:
    writer = csv.writer(_Echo())
    yield "\ufeff"  # so a spreadsheet opens the UTF-8 file as UTF-8
    yield writer.writerow(header)
    for row in rows:
        yield writer.writerow(csv_safe(row))


class MailingEvidenceAdminMixin:
    """Adds the evidence page and CSV to the mailing admin."""

    def get_urls(self) -> list:
        wrap = self.admin_site.admin_view  # login, staff check and CSRF protection
        return [
            path(
                "<path:object_id>/evidence/",
                wrap(self.evidence_view),
                name="notifications_mailing_evidence",
            ),
            path(
                "<path:object_id>/evidence.csv",
                wrap(self.evidence_csv_view),
                name="notifications_mailing_evidence_csv",
            ),
            *super().get_urls(),
        ]

    def _evidence_mailing(self, request: HttpRequest, object_id: str) -> Mailing:
        mailing = self.get_object(request, object_id)  # 404 for another school's id
        if not self.has_view_permission(request, mailing):
            raise PermissionDenied
        return mailing

    @staticmethod
    def _search(request: HttpRequest) -> tuple[str, str]:
        """The search as typed, and the normalized form a whole address is matched by."""
        term = request.GET.get("q", "").strip()[:254]
        return term, (normalize_email(term) if "@" in term else "")

    def evidence_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        if request.method != "GET":
            return HttpResponseNotAllowed(["GET"])
        mailing = self._evidence_mailing(request, object_id)
        term, address = self._search(request)
        rows = evidence.deliveries_of_mailing(mailing)
        if address:
            rows = rows.filter(email_normalized=address)
        elif term:
            rows = rows.filter(email_normalized__contains=term.casefold())
        page = Paginator(rows, PER_PAGE).get_page(request.GET.get("p"))
        query = {"q": term} if term else {}
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "original": mailing,
            "title": f"Evidence per recipient: {mailing}",
            "change_url": reverse("admin:notifications_mailing_change", args=[mailing.pk]),
            "csv_url": reverse("admin:notifications_mailing_evidence_csv", args=[mailing.pk])
            + (f"?{urlencode(query)}" if address else ""),
            "items": evidence.evidence_for(list(page.object_list)),
            "page": page,
            "term": term,
            "query": urlencode(query),
            "time_zone": mailing.school.time_zone,
        }
        return TemplateResponse(request, "admin/notifications/mailing_evidence.html", context)

    def evidence_csv_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        if request.method != "GET":
            return HttpResponseNotAllowed(["GET"])
        mailing = self._evidence_mailing(request, object_id)
        _, address = self._search(request)
        rows = evidence.csv_rows(Mailing.objects.filter(pk=mailing.pk), address=address)
        response = StreamingHttpResponse(
            _csv_stream(evidence.CSV_HEADER, rows), content_type="text/csv; charset=utf-8"
        )
        stamp = timezone.now().strftime("%Y%m%d-%H%M")
        response["Content-Disposition"] = (
            f'attachment; filename="evidence-mailing-{mailing.pk}-{stamp}.csv"'
        )
        return response


def evidence_url(delivery: Delivery) -> str:
    """The evidence page of a delivery's mailing, opened at this recipient."""
    url = reverse("admin:notifications_mailing_evidence", args=[delivery.mailing_id])
    return f"{url}?{urlencode({'q': delivery.email_normalized})}"
