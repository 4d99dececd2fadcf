"""Django's admin app with EdSmart's site as the default one (``edsmart.admin_site``)."""

from __future__ import annotations

from django.contrib.admin.apps import AdminConfig


class EdSmartAdminConfig(AdminConfig):
    default_site = "edsmart.admin_site.EdSmartAdminSite"
