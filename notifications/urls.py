"""Ops endpoints: health, readiness, metrics, provider webhooks."""

urlpatterns: list = []
