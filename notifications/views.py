"""Ops endpoints for machines: liveness, readiness and Prometheus metrics. Kept thin."""

from __future__ import annotations

import hmac

from django.conf import settings
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET
from prometheus_client import CONTENT_TYPE_LATEST

from notifications import health, metrics


@never_cache
@require_GET
def healthz(request: HttpRequest) -> JsonResponse:
    """The process answers. Nothing else is checked: a load balancer restarts on this."""
    return JsonResponse({"status": "ok"})


def _bearer(request: HttpRequest) -> str:
    """How the request stands with ``EDSMART_METRICS_TOKEN``: "disabled" (no token is
    configured), "missing", "wrong" or "ok"."""
    token = settings.EDSMART_METRICS_TOKEN
    if not token:
        return "disabled"
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        return "missing"
    if not hmac.compare_digest(given.strip().encode(), token.encode()):
        return "wrong"
    return "ok"


@never_cache
@require_GET
def readyz(request: HttpRequest) -> JsonResponse:
    """Database, Redis, beat and workers: 200 when all pass, 503 when any fails.

    Anyone sees the status and which checks failed; the details (worker host names, error
    texts) need the metrics token, ``Authorization: Bearer $EDSMART_METRICS_TOKEN``. A missing
    or wrong token still gets the status, so a plain uptime probe keeps working.
    """
    ok, checks = health.readiness()
    shown = checks if _bearer(request) == "ok" else health.public(checks)
    return JsonResponse(
        {"status": "ok" if ok else "fail", "checks": shown}, status=200 if ok else 503
    )


@never_cache
@require_GET
def metrics_view(request: HttpRequest) -> HttpResponse:
    """Prometheus text format behind a bearer token; without a configured token, no endpoint."""
    state = _bearer(request)
    if state == "disabled":
        raise Http404("metrics are not enabled")
    if state == "missing":
        response = HttpResponse("bearer token required\n", status=401, content_type="text/plain")
        response["WWW-Authenticate"] = 'Bearer realm="metrics"'
        return response
    if state == "wrong":
        return HttpResponse("wrong token\n", status=403, content_type="text/plain")
    return HttpResponse(metrics.render(), content_type=CONTENT_TYPE_LATEST)
