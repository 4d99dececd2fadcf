"""Parents' pages, reached from signed links in their emails."""

from __future__ import annotations

from django.urls import path

from slips import views

urlpatterns = [
    path("p/<str:token>/", views.parent_page, name="parent-page"),
]
