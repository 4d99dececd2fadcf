"""URL routes: the staff admin, parents' pages and ops endpoints."""

from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    path("admin/", admin.site.urls),
    path("", include("slips.urls")),
    path("", include("notifications.urls")),
]
