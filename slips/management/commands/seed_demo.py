"""``seed_demo [--school SLUG] [--families N]``: a demo school to log in to; safe to rerun."""

from __future__ import annotations

import argparse

from django.core.management.base import BaseCommand, CommandError

from slips.demo import demo_seed


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
        "and N families. Running it twice creates nothing new. The staff password is "
        "$DEMO_PASSWORD, or 'edsmart-demo' when unset."
    )

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--school", default="demo", help="School slug (default: demo).")
        parser.add_argument(
            "--families", type=_positive_int, default=20, help="Number of families (default: 20)."
        )

    def handle(self, *args: object, school: str, families: int, **options: object) -> None:
        if not school.strip():
            raise CommandError("--school must not be empty.")
        result = demo_seed(slug=school, families=families)
        self.stdout.write(
            f"Demo school '{result.school.name}' (slug {result.school.slug}): "
            f"{result.students} students, {result.guardians} guardians, {result.groups} groups."
        )
        self.stdout.write(f"Staff login: username {result.username} password {result.password}")
        self.stdout.write(
            f'Demo slip #{result.slip.pk} "{result.slip.title}" is scheduled; the worker sends it '
            "and parents' emails show in the mail catcher."
        )
