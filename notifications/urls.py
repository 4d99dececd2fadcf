"""Ops endpoints: health, readiness, metrics, provider webhooks and the superusers' ops page.

The ops page lives at ``/ops/``: ``/admin/`` is matched first by ``admin.site.urls``, which
would answer 404 for anything it does not know.
"""

from __future__ import annotations

from django.urls import path

from notifications import ops_views, views, webhooks

urlpatterns = [
    path("healthz", views.healthz, name="healthz"),
    path("readyz", views.readyz, name="readyz"),
    path("metrics", views.metrics_view, name="metrics"),
    path(
        "webhooks/anymail/mailgun/tracking/",
        webhooks.mailgun_tracking,
        name="mailgun_tracking_webhook",
    ),
    path(
        "webhooks/anymail/postmark/tracking/",
        webhooks.postmark_tracking,
        name="postmark_tracking_webhook",
    ),
    path("ops/", ops_views.ops_page, name="ops"),
    path("ops/sending/", ops_views.ops_sending, name="ops_sending"),
]
