"""``seed_demo [--school SLUG] [--families N] [--force]``: a demo school to log in to; safe to
rerun on the school it made, refused on any other, and refused with DEBUG off unless forced."""

from __future__ import annotations

import argparse

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from slips.demo import NotADemoSchool, demo_seed


def _positive_int(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


class Command(BaseCommand):
    help = (
        "Create (or bring up to date) a demo school with a staff login, year levels, classes "
        "and N families, and schedule a slip to the whole school. Running it twice creates "
        "nothing new. It never touches a school it did not make and never resets a password: "
        "the login's password is set once, to $DEMO_PASSWORD or 'edsmart-demo' when unset. "
        "For development: with DEBUG off it refuses unless --force."
    )

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--school", default="demo", help="School slug (default: demo).")
        parser.add_argument(
            "--families", type=_positive_int, default=20, help="Number of families (default: 20)."
        )
        parser.add_argument(
            "--force",
            action="store_true",
            help="Seed even with DEBUG off (a login with a published password, and mail).",
        )

    def handle(
        self, *args: object, school: str, families: int, force: bool, **options: object
    ) -> None:
        if not school.strip():
            raise CommandError("--school must not be empty.")
        if not settings.DEBUG and not force:
            raise CommandError(
                "seed_demo is for development and DEBUG is off: it would create a staff login "
                "with a published password and schedule a slip to a whole school. Run it with "
                "DEBUG=1, or pass --force if this really is a demo installation."
            )
        try:
            result = demo_seed(slug=school, families=families)
        except NotADemoSchool as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(
            f"Demo school '{result.school.name}' (slug {result.school.slug}): "
            f"{result.students} students, {result.guardians} guardians, {result.groups} groups."
        )
        if result.password is not None:
            self.stdout.write(f"Staff login: username {result.username} password {result.password}")
        else:
            self.stdout.write(
                f"Staff login: username {result.username} (its password was changed since it "
                "was seeded; seed_demo never resets it)"
            )
        self.stdout.write(
            f'Demo slip #{result.slip.pk} "{result.slip.title}" is scheduled; the worker sends it '
            "and parents' emails show in the mail catcher."
        )
