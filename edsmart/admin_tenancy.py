"""Tenant isolation for the staff admin: every school-owned model admin builds on this.

Staff users (``is_staff``, not superuser) belong to schools through ``slips.Membership``. The
one rule: a staff user reaches only rows of their own schools, through every door the admin
has — changelist, change/delete/history page by URL, search, filters, autocomplete, actions,
CSV export and the choices of every foreign key on a form. Superusers (platform ops) see all.

Almost everything follows from ``get_queryset``: Django builds changelists, action querysets,
autocomplete results and ``get_object`` from it. What does not follow, and is handled here:
- foreign-key and many-to-many choices on forms (``formfield_for_*``);
- the ``school`` field itself (limited, hidden for single-school staff, fixed after creation);
- a form that mixes schools for a multi-school user (``TenantModelForm.clean``);
- a missing object answering 404 instead of Django's redirect with a message, so a probe by
  id cannot tell "another school's" from "does not exist".

Permissions are membership-based rather than Django model permissions, so a staff login works
without any permission set-up. Every member may view their schools' rows; who may add and
change them is the admin's ``edit_roles`` (every role unless narrowed), who may delete them its
``delete_roles`` (school admins); each holds only in the schools where the user has that role.
What each admin grants to which role is walked for every registered admin by
tests/test_roles.py, and summed up in docs/security.md. Admins that must stay with platform ops
(memberships, the global switch) use ``SuperuserOnlyAdmin``.
"""

from __future__ import annotations

import csv
import datetime as dt
from collections.abc import Collection, Iterable, Sequence
from typing import Any

from django import forms
from django.contrib import admin
from django.core.exceptions import FieldDoesNotExist
from django.db import models
from django.db.models import QuerySet
from django.http import Http404, HttpRequest, HttpResponse
from django.utils import timezone

from edsmart.admin_paging import EstimatedCountPaginator
from slips.models import Membership, School

_CACHE_ATTR = "_edsmart_memberships"

#: Every school role: the default of who may add and change a school's rows.
ALL_ROLES: tuple[str, ...] = tuple(Membership.Role.values)
#: The school's admins: the default of who may delete, and who changes the school itself.
ADMIN_ONLY: tuple[str, ...] = (Membership.Role.ADMIN,)


def user_memberships(request: HttpRequest) -> dict[int, str]:
    """{school_id: role} for the request's user, read once per request."""
    cached = getattr(request, _CACHE_ATTR, None)
    if cached is None:
        user = request.user
        if not (user.is_authenticated and user.is_active and user.is_staff):
            cached = {}
        else:
            cached = dict(
                Membership.objects.filter(user_id=user.pk).values_list("school_id", "role")
            )
        setattr(request, _CACHE_ATTR, cached)
    return cached


def is_ops(request: HttpRequest) -> bool:
    user = request.user
    return bool(user.is_active and user.is_superuser)


def school_lookup_for(model: type[models.Model]) -> str | None:
    """The ORM path from ``model`` to its School, or None if it belongs to no school."""
    if model is School:
        return "pk"
    try:
        field = model._meta.get_field("school")
    except FieldDoesNotExist:
        return None
    if field.is_relation and field.related_model is School:
        return "school"
    return None


def school_ids_with_role(request: HttpRequest, roles: Collection[str]) -> list[int]:
    """The user's schools in which they hold one of ``roles`` (not meaningful for ops)."""
    return [pk for pk, role in user_memberships(request).items() if role in roles]


def has_role(request: HttpRequest, roles: Collection[str], school_id: int | None = None) -> bool:
    """Ops, or a member holding one of ``roles`` in ``school_id`` (in any of their schools when
    ``school_id`` is None: e.g. whether to offer an action at all)."""
    if is_ops(request):
        return True
    memberships = user_memberships(request)
    if school_id is None:
        return any(role in roles for role in memberships.values())
    return memberships.get(school_id) in roles


def schools_for(request: HttpRequest, roles: Collection[str] | None = None) -> QuerySet[School]:
    """The user's schools (every one for ops); only those where they hold one of ``roles``
    when given."""
    if is_ops(request):
        return School.objects.all()
    ids = list(user_memberships(request)) if roles is None else school_ids_with_role(request, roles)
    return School.objects.filter(pk__in=ids)


def restrict(queryset: QuerySet, request: HttpRequest, lookup: str | None = None) -> QuerySet:
    """``queryset`` cut down to the user's schools (all of them for ops)."""
    if is_ops(request):
        return queryset
    lookup = lookup or school_lookup_for(queryset.model)
    if lookup is None:
        # A model with no school cannot be shown to staff safely.
        return queryset.none()
    return queryset.filter(**{f"{lookup}__in": list(user_memberships(request))})


def _school_id_of(obj: models.Model) -> int | None:
    if isinstance(obj, School):
        return obj.pk
    return getattr(obj, "school_id", None)


class TenantModelForm(forms.ModelForm):
    """Refuses a form whose related objects belong to a school other than the object's.

    The choices are already limited to the user's schools; this covers a user in two schools
    who picks school A and a group of school B.
    """

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean()
        school = cleaned.get("school")
        school_id = (
            school.pk if isinstance(school, School) else self.instance.__dict__.get("school_id")
        )
        if school_id is None:
            return cleaned
        for name, value in list(cleaned.items()):  # add_error() removes keys as it goes
            if name == "school" or value is None:
                continue
            related: Iterable[object]
            if isinstance(value, models.Model):
                related = [value]
            elif isinstance(value, QuerySet | list | tuple):
                related = value
            else:
                continue
            strangers = [
                obj
                for obj in related
                if isinstance(obj, models.Model)
                and _school_id_of(obj) is not None
                and _school_id_of(obj) != school_id
            ]
            if strangers:
                names = ", ".join(str(obj) for obj in strangers)
                self.add_error(name, f"Belongs to another school: {names}.")
        return cleaned


class SchoolListFilter(admin.SimpleListFilter):
    """A school filter that offers only the user's schools (Django's would list every one)."""

    title = "school"
    parameter_name = "school"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple]:
        return [(str(s.pk), s.name) for s in schools_for(request)]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        lookup = getattr(self, "lookup", None) or school_lookup_for(queryset.model)
        return filter_by_id(queryset, self.value(), lookup)


def filter_by_id(queryset: QuerySet, value: str | None, lookup: str) -> QuerySet:
    """A list filter's id from the URL applied: nothing for no value, no rows for one that is
    not a number (a probe, not a crash)."""
    if not value:
        return queryset
    if not value.isdigit():
        return queryset.none()
    return queryset.filter(**{lookup: int(value)})


class RecentRelatedFilter(admin.SimpleListFilter):
    """A filter on a related message (slip, broadcast, mailing) that lists only the user's
    recent ones, yet accepts any id of theirs in the URL.

    Django's ``RelatedOnlyFieldListFilter`` reads the distinct related ids of every row in the
    list: a hundred thousand rows for one school's deliveries, ten million for ops, then a
    sidebar of every message of the year. Links from a slip's page to its deliveries carry the
    id, so the filter need not list it to apply it. Subclasses set ``related_model``, the
    ``field`` the rows are filtered on and ``parameter_name`` (kept as Django's lookup names,
    so existing links keep working).
    """

    related_model: type[models.Model]
    field: str
    recent_days = 30
    listed = 20

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple]:
        since = timezone.now() - dt.timedelta(days=self.recent_days)
        recent = restrict(self.related_model.objects.all(), request).filter(created_at__gte=since)
        found = [(str(o.pk), str(o)) for o in recent.order_by("-pk")[: self.listed]]
        value = self.value()
        if value and value.isdigit() and value not in {pk for pk, _ in found}:
            chosen = restrict(self.related_model.objects.all(), request).filter(pk=int(value))
            found = [(str(o.pk), str(o)) for o in chosen] + found
        return found

    def has_output(self) -> bool:
        return True  # so that an id given in the URL is applied even when nothing is recent

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        return filter_by_id(queryset, self.value(), self.field)


def recent_filter(
    related_model: type[models.Model], field: str, parameter_name: str, title: str
) -> type[RecentRelatedFilter]:
    return type(
        f"Recent{related_model.__name__}Filter",
        (RecentRelatedFilter,),
        {
            "related_model": related_model,
            "field": field,
            "parameter_name": parameter_name,
            "title": title,
        },
    )


def csv_response(*, filename: str, header: Sequence[str], rows: Iterable[Sequence]) -> HttpResponse:
    response = HttpResponse(content_type="text/csv; charset=utf-8")
    stamp = timezone.now().strftime("%Y%m%d-%H%M")
    response["Content-Disposition"] = f'attachment; filename="{filename}-{stamp}.csv"'
    writer = csv.writer(response)
    writer.writerow(header)
    for row in rows:
        writer.writerow(csv_safe(row))
    return response


def csv_safe(row: Iterable[object]) -> list[object]:
    """The row with every text cell a spreadsheet would run as a formula (a leading =, +, -
    or @) quoted as text: staff open these files, and cells hold parents' and providers' text."""
    return [f"'{v}" if isinstance(v, str) and v[:1] in ("=", "+", "-", "@") else v for v in row]


class TenantAdmin(admin.ModelAdmin):
    """A ModelAdmin for school-owned rows: see the module docstring for what it guarantees.

    ``school_lookup`` is the ORM path to the School when it is not the ``school`` field
    (e.g. ``"response__school"``). ``csv_fields`` enables the "Export selected as CSV" action.
    ``staff_can_add`` / ``staff_can_change`` / ``staff_can_delete`` narrow what members may do;
    ``edit_roles`` (add and change) and ``delete_roles`` name the school roles that may do it,
    each in the schools where the user holds the role.
    """

    school_lookup: str | None = None
    csv_fields: Sequence[str] = ()
    staff_can_add = True
    staff_can_change = True
    staff_can_delete = True
    edit_roles: Collection[str] = ALL_ROLES
    delete_roles: Collection[str] = ADMIN_ONLY
    form = TenantModelForm
    actions = ["export_csv"]
    # A school's year is a hundred thousand rows, ops' is millions: never count them all.
    paginator = EstimatedCountPaginator
    show_full_result_count = False

    # --- who sees what -----------------------------------------------------------------------

    def get_school_lookup(self) -> str:
        lookup = self.school_lookup or school_lookup_for(self.model)
        if lookup is None:
            raise TypeError(f"{type(self).__name__}: set school_lookup for {self.model.__name__}")
        return lookup

    def get_queryset(self, request: HttpRequest) -> QuerySet:
        return restrict(super().get_queryset(request), request, self.get_school_lookup())

    def get_object(
        self, request: HttpRequest, object_id: str, from_field: str | None = None
    ) -> models.Model:
        obj = super().get_object(request, object_id, from_field)
        if obj is None:
            raise Http404(f"No {self.opts.verbose_name} with that id.")
        return obj

    def _member(self, request: HttpRequest) -> bool:
        return bool(request.user.is_active and request.user.is_staff and user_memberships(request))

    def has_module_permission(self, request: HttpRequest) -> bool:
        return is_ops(request) or self._member(request)

    def has_view_permission(self, request: HttpRequest, obj: models.Model | None = None) -> bool:
        return is_ops(request) or self._member(request)

    def _may(
        self, request: HttpRequest, allowed: bool, roles: Collection[str], obj: models.Model | None
    ) -> bool:
        """Ops; or a member, if the admin lets staff do it at all, holding one of ``roles`` in
        the object's school (in any of their schools when there is no object yet: Django asks
        that to decide whether to offer a page or action, then again per object)."""
        if is_ops(request):
            return True
        if not (allowed and self._member(request)):
            return False
        if obj is None:
            return has_role(request, roles)
        school_id = self._school_id(obj)
        return school_id is not None and has_role(request, roles, school_id)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return self._may(request, self.staff_can_add, self.edit_roles, None)

    def has_change_permission(self, request: HttpRequest, obj: models.Model | None = None) -> bool:
        return self._may(request, self.staff_can_change, self.edit_roles, obj)

    def has_delete_permission(self, request: HttpRequest, obj: models.Model | None = None) -> bool:
        return self._may(request, self.staff_can_delete, self.delete_roles, obj)

    def _school_id(self, obj: models.Model) -> int | None:
        value: Any = obj
        for part in self.get_school_lookup().split("__"):
            if part == "pk" or value is None:
                break
            value = getattr(value, part)
        return value.pk if isinstance(value, School) else None

    # --- forms -------------------------------------------------------------------------------

    def _scoped_choices(self, db_field: models.Field, request: HttpRequest) -> QuerySet | None:
        related = db_field.related_model
        if related is None or school_lookup_for(related) is None:
            return None
        if db_field.name in ("created_by", "recorded_by"):
            return None
        return restrict(related._default_manager.all(), request)

    def formfield_for_foreignkey(
        self, db_field: models.ForeignKey, request: HttpRequest, **kwargs: Any
    ) -> forms.Field | None:
        if "queryset" not in kwargs:
            queryset = self._scoped_choices(db_field, request)
            if queryset is not None:
                kwargs["queryset"] = queryset
        return super().formfield_for_foreignkey(db_field, request, **kwargs)

    def formfield_for_manytomany(
        self, db_field: models.ManyToManyField, request: HttpRequest, **kwargs: Any
    ) -> forms.Field | None:
        if "queryset" not in kwargs:
            queryset = self._scoped_choices(db_field, request)
            if queryset is not None:
                kwargs["queryset"] = queryset
        return super().formfield_for_manytomany(db_field, request, **kwargs)

    def get_form(
        self, request: HttpRequest, obj: models.Model | None = None, change: bool = False, **kwargs
    ) -> type[forms.ModelForm]:
        form = super().get_form(request, obj, change=change, **kwargs)
        # modelform_factory builds a fresh class on every call, so its fields are ours to edit.
        field = form.base_fields.get("school")
        if field is not None:
            # A new row goes only to a school where the user may add (edit) rows.
            field.queryset = schools_for(request, None if obj is not None else self.edit_roles)
            if obj is not None and obj.pk is not None:
                # Moving a row between schools would strand its relations in the old one.
                field.disabled = True
            else:
                schools = list(field.queryset[:2])
                if len(schools) == 1:
                    field.initial = schools[0].pk
                    field.widget = forms.HiddenInput()
        return form

    def lookup_allowed(self, lookup: str, value: str, request: HttpRequest) -> bool:
        # A RecentRelatedFilter applies its own parameter, which Django's check does not know.
        for item in self.get_list_filter(request):
            recent = isinstance(item, type) and issubclass(item, RecentRelatedFilter)
            if recent and item.parameter_name == lookup:
                return True
        return super().lookup_allowed(lookup, value, request)

    def get_list_filter(self, request: HttpRequest) -> Sequence:
        filters = list(super().get_list_filter(request))
        if self.model is not School and (is_ops(request) or len(user_memberships(request)) > 1):
            filters.insert(0, self._school_filter())
        return filters

    def _school_filter(self) -> type[SchoolListFilter]:
        return type(
            f"{self.model.__name__}SchoolFilter",
            (SchoolListFilter,),
            {"lookup": self.get_school_lookup()},
        )

    # --- actions -----------------------------------------------------------------------------

    def get_actions(self, request: HttpRequest) -> dict:
        actions = super().get_actions(request)
        if not self.csv_fields:
            actions.pop("export_csv", None)
        return actions

    @admin.action(description="Export selected as CSV")
    def export_csv(self, request: HttpRequest, queryset: QuerySet) -> HttpResponse:
        # ``queryset`` comes from the changelist, i.e. from get_queryset: already restricted.
        # Restricting again costs nothing and keeps a future override honest.
        queryset = restrict(queryset, request, self.get_school_lookup())
        return csv_response(
            filename=self.opts.model_name,
            header=list(self.csv_fields),
            rows=(self.csv_row(obj) for obj in queryset.iterator(chunk_size=2000)),
        )

    def csv_row(self, obj: models.Model) -> list[object]:
        row = []
        for name in self.csv_fields:
            value: Any = obj
            for part in name.split("__"):
                value = getattr(value, part, None) if value is not None else None
            row.append("" if value is None else value)
        return row


class ReadOnlyTenantAdmin(TenantAdmin):
    """Rows written only by the system (deliveries, responses): staff may look, not touch."""

    staff_can_add = False
    staff_can_change = False
    staff_can_delete = False

    def has_add_permission(self, request: HttpRequest, obj: models.Model | None = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: models.Model | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: models.Model | None = None) -> bool:
        return False


class HistoryInline(admin.TabularInline):
    """A read-only history table shown inside a page the user could already open."""

    extra = 0
    can_delete = False

    def has_view_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return True

    def has_add_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False


class SuperuserOnlyAdmin(admin.ModelAdmin):
    """Platform-wide rows (memberships, the global switch): ops only, invisible to staff."""

    def has_module_permission(self, request: HttpRequest) -> bool:
        return is_ops(request)

    def has_view_permission(self, request: HttpRequest, obj: models.Model | None = None) -> bool:
        return is_ops(request)

    def has_add_permission(self, request: HttpRequest, *args: object) -> bool:
        return is_ops(request)

    def has_change_permission(self, request: HttpRequest, obj: models.Model | None = None) -> bool:
        return is_ops(request)

    def has_delete_permission(self, request: HttpRequest, obj: models.Model | None = None) -> bool:
        return is_ops(request)
