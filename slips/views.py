"""Parents' pages, reached from signed links in their emails.

Mail scanners open links before people do, so a GET only ever shows a page (and notes the
first opening); answers change only through a POST carrying Django's CSRF token. The logic
lives in ``slips.links`` and ``slips.responses``; these views translate it to HTTP.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps

from django.contrib import messages
from django.core.exceptions import BadRequest, SuspiciousOperation, ValidationError
from django.http import HttpRequest, HttpResponse, HttpResponseNotAllowed, UnreadablePostError
from django.http.multipartparser import MultiPartParserError
from django.shortcuts import redirect, render
from django.views.decorators.cache import never_cache
from django.views.decorators.csrf import csrf_exempt, csrf_protect
from django.views.decorators.http import require_http_methods

from notifications.models import Delivery, Mailing
from slips import links
from slips.parent_forms import SlipAnswerForm

# No script, no third-party anything: the only resources a parent page may use are its own
# inline styles and a form posting back to this site.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
    "base-uri 'none'; frame-ancestors 'none'"
)
THANK_YOU = "Thank you. Your answers have been recorded."


def _parent_headers(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    """Headers for pages whose URL is a bearer token: keep it out of other sites' Referer
    headers, caches and search indexes, and forbid any resource the page did not bring itself.

    "same-origin", not "no-referrer": under no-referrer browsers send ``Origin: null`` with
    the form's POST, and Django's CSRF check then refuses every answer.
    """

    @wraps(view)
    def wrapped(request: HttpRequest, *args: object, **kwargs: object) -> HttpResponse:
        response = view(request, *args, **kwargs)
        response["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
        response["Referrer-Policy"] = "same-origin"
        response["X-Robots-Tag"] = "noindex, nofollow"
        return response

    return wrapped


# What Django raises for a body it cannot parse: a charset it refuses or cannot decode with,
# broken multipart, too many fields or bytes, a connection gone mid-body.
UNPARSABLE_BODY = (
    BadRequest,
    SuspiciousOperation,
    MultiPartParserError,
    UnreadablePostError,
    LookupError,
    UnicodeError,
    ValueError,
)


def _parsable_body(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    """A POST whose body cannot be parsed gets the 400 page, before anything else reads it.

    Django's CSRF check reads ``request.POST``; for some bodies (``application/
    x-www-form-urlencoded; charset=latin-1``, say) that raises ``BadRequest`` again on every
    read, and the 400 handler, which runs the CSRF check once more, turned it into a 500. So the
    view is exempt from the middleware's check and makes the same check itself (``csrf_protect``
    below this), once the body is known to parse.
    """

    @wraps(view)
    def wrapped(request: HttpRequest, *args: object, **kwargs: object) -> HttpResponse:
        if request.method == "POST":
            try:
                request.POST  # noqa: B018 (parsed here, once, to catch what it raises)
            except UNPARSABLE_BODY:
                return render(request, "slips/parent/bad_request.html", status=400)
        return view(request, *args, **kwargs)

    return wrapped


@csrf_exempt  # only from the middleware: csrf_protect below checks every POST that parses
@never_cache
@_parent_headers
@require_http_methods(["GET", "HEAD", "POST"])
@_parsable_body
@csrf_protect
def parent_page(request: HttpRequest, token: str) -> HttpResponse:
    try:
        delivery = links.link_resolve(token=token)
    except links.LinkExpired:
        return render(request, "slips/parent/link_expired.html", status=410)
    except links.LinkInvalid:
        return render(request, "slips/parent/link_invalid.html", status=404)
    if request.method == "GET":
        links.delivery_mark_opened(delivery_id=delivery.pk)
    if delivery.mailing.kind == Mailing.Kind.BROADCAST:
        return _broadcast_page(request, delivery)
    return _slip_page(request, delivery)


def _broadcast_page(request: HttpRequest, delivery: Delivery) -> HttpResponse:
    if request.method == "POST":
        return HttpResponseNotAllowed(["GET", "HEAD"])
    context = {"school": delivery.school, "mailing": delivery.mailing}
    return render(request, "slips/parent/broadcast.html", context)


def _slip_page(request: HttpRequest, delivery: Delivery) -> HttpResponse:
    slip = delivery.mailing.slip
    children = links.delivery_children(delivery=delivery, slip=slip)
    closed = links.slip_closed_reason(slip=slip)
    form = SlipAnswerForm(
        request.POST if request.method == "POST" else None,
        children=children,
        free_text_question=slip.free_text_question,
    )
    status = 200
    if request.method == "POST":
        if form.foreign_student_ids():
            return render(request, "slips/parent/bad_request.html", status=400)
        if closed:
            status = 409  # the page below says why, in place of the form
        elif form.is_valid():
            try:
                links.delivery_answers_record(delivery=delivery, slip=slip, answers=form.answers())
            except ValidationError as exc:
                # Closed between showing the form and now (due date passed, slip cancelled).
                messages.error(request, " ".join(exc.messages))
                return redirect(request.path)
            messages.success(request, THANK_YOU)
            return redirect(request.path)
        else:
            status = 400
    context = {
        "school": delivery.school,
        "mailing": delivery.mailing,
        "slip": slip,
        "form": form,
        "blocks": form.blocks(),
        "closed": closed,
    }
    return render(request, "slips/parent/slip.html", context, status=status)
