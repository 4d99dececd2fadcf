"""``compose slip|broadcast``: create and schedule one message from a script; prints its handle.

The handle (``slip:3``, ``broadcast:3``) is what ``delivery_report``, ``sending`` and
``resolve_unknown`` take as ``--message``, as it is. A bare id was ambiguous: slips, broadcasts
and mailings each number from 1, and the ops commands read ``3`` as a mailing.

Scripts depend on this interface (and on stdout being only the handle), so keep both stable.
"""

from __future__ import annotations

import argparse
import datetime as dt
import zoneinfo

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction
from django.utils import timezone

from notifications.selectors import message_handle
from slips.models import Audience, Broadcast, Group, School, Slip
from slips.services import message_schedule

WHOLE_SCHOOL_AUDIENCE = "Whole school"
OPTION_FOR_FIELD = {
    "title": "--title",
    "body": "--body",
    "audience": "--audience",
    "send_at": "--send-at",
    "due_at": "--due",
}


class Command(BaseCommand):
    help = (
        "Create a slip or broadcast for a school's whole roster or one group, schedule it, and "
        "print its handle (slip:N or broadcast:N), which the ops commands take as --message. "
        "Date-times without an offset are in the school's time zone; a date "
        "alone means midnight for --send-at and the end of that day for --due."
    )

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("kind", choices=["slip", "broadcast"])
        parser.add_argument("--school", required=True, help="School slug.")
        parser.add_argument(
            "--audience",
            required=True,
            help="'all' for the whole school, or 'group:NAME' (case-insensitive) for one group.",
        )
        parser.add_argument("--title", required=True)
        parser.add_argument("--body", required=True)
        parser.add_argument("--due", default=None, help="Slips only: ISO date or date-time.")
        parser.add_argument(
            "--send-at", default="now", help="ISO date-time, or 'now' (the default)."
        )
        parser.add_argument(
            "--urgent",
            action="store_true",
            help="Broadcasts only: a closure or an emergency, sent ahead of all other mail.",
        )

    def handle(self, *args: object, **options: object) -> None:
        school = School.objects.filter(slug=options["school"]).first()
        if school is None:
            raise CommandError(f"No school with slug '{options['school']}'.")
        tz = zoneinfo.ZoneInfo(school.time_zone)
        kind = options["kind"]
        raw_send_at = str(options["send_at"]).strip()
        send_at = (
            timezone.now()
            if raw_send_at.lower() == "now"
            else _parse_when(raw_send_at, tz=tz, option="--send-at", end_of_day=False)
        )
        due_at = None
        if options["due"] is not None:
            if kind != "slip":
                raise CommandError("--due applies to slips only; broadcasts take no response.")
            due_at = _parse_when(str(options["due"]), tz=tz, option="--due", end_of_day=True)
        if options["urgent"] and kind != "broadcast":
            raise CommandError("--urgent applies to broadcasts only.")

        # One transaction: a message that fails validation or scheduling leaves no draft (and no
        # audience made for it) behind.
        try:
            with transaction.atomic():
                audience = _resolve_audience(school=school, spec=str(options["audience"]))
                model = Slip if kind == "slip" else Broadcast
                message = model(
                    school=school,
                    audience=audience,
                    title=options["title"],
                    body=options["body"],
                    created_by=None,
                )
                if due_at is not None:
                    message.due_at = due_at
                if options["urgent"]:
                    message.urgent = True
                message.full_clean()
                message.save()
                message = message_schedule(message=message, send_at=send_at)
        except ValidationError as exc:
            raise CommandError(_describe(exc)) from exc
        self.stdout.write(message_handle(message))


def _parse_when(raw: str, *, tz: zoneinfo.ZoneInfo, option: str, end_of_day: bool) -> dt.datetime:
    text = raw.strip()
    try:
        day = dt.date.fromisoformat(text)
    except ValueError:
        try:
            value = dt.datetime.fromisoformat(text)
        except ValueError:
            raise CommandError(
                f"{option}: '{raw}' is not an ISO date or date-time "
                "(e.g. 2025-03-14, 2025-03-14T09:00 or 2025-03-14T09:00+11:00)."
            ) from None
    else:
        value = dt.datetime.combine(day, dt.time(23, 59) if end_of_day else dt.time(0, 0))
    if value.tzinfo is not None:
        return value
    aware = value.replace(tzinfo=tz)
    # A wall-clock time skipped when clocks go forward does not exist; zoneinfo would quietly
    # shift it by an hour, so refuse it instead.
    if aware.astimezone(dt.UTC).astimezone(tz).replace(tzinfo=None) != value:
        raise CommandError(f"{option}: {text} does not exist in {tz.key} (daylight saving change).")
    return aware


def _resolve_audience(*, school: School, spec: str) -> Audience:
    spec = spec.strip()
    if spec.lower() == "all":
        audience = Audience.objects.filter(school=school, whole_school=True).order_by("pk").first()
        if audience is None:
            audience = Audience.objects.create(
                school=school, name=WHOLE_SCHOOL_AUDIENCE, whole_school=True
            )
        return audience
    prefix, _, name = spec.partition(":")
    if prefix.lower() != "group" or not name.strip():
        raise CommandError(f"--audience must be 'all' or 'group:NAME', not '{spec}'.")
    group = Group.objects.filter(school=school, name__iexact=name.strip()).first()
    if group is None:
        known = ", ".join(Group.objects.filter(school=school).values_list("name", flat=True))
        raise CommandError(
            f"No group named '{name.strip()}' in {school.slug} (groups: {known or 'none'})."
        )
    # Reuse an audience that is exactly this group, so repeated scripting does not pile up
    # identical audiences; anything wider or narrower under the same name is left alone.
    for audience in Audience.objects.filter(
        school=school, name=group.name, whole_school=False, groups=group
    ).order_by("pk"):
        if audience.groups.count() == 1 and not audience.students.exists():
            return audience
    audience = Audience.objects.create(school=school, name=group.name)
    audience.groups.add(group)
    return audience


def _describe(exc: ValidationError) -> str:
    if not hasattr(exc, "error_dict"):
        return " ".join(exc.messages)
    lines = []
    for field, messages in exc.message_dict.items():
        label = OPTION_FOR_FIELD.get(field, field)
        for text in messages:
            lines.append(text if field == "__all__" else f"{label}: {text}")
    return "\n".join(lines)
