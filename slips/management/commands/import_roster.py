"""``import_roster --school SLUG FILE.csv``: all or nothing; see docs/roster-import.md."""

from __future__ import annotations

import argparse

from django.core.management.base import BaseCommand, CommandError

from slips.models import School
from slips.roster import RosterError, not_utf8_message, roster_import


class Command(BaseCommand):
    help = (
        "Import a CSV of students and guardians for one school. Every bad row is reported as "
        "'line N: reason' and nothing is imported unless the whole file is valid."
    )

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--school", required=True, help="School slug.")
        parser.add_argument("file", metavar="FILE.csv", help="UTF-8 CSV (a BOM is fine).")

    def handle(self, *args: object, school: str, file: str, **options: object) -> None:
        target = School.objects.filter(slug=school).first()
        if target is None:
            raise CommandError(f"No school with slug '{school}'.")
        try:
            # newline="" lets the csv module handle line breaks inside quoted cells.
            with open(file, encoding="utf-8-sig", newline="") as handle:
                result = roster_import(school=target, file=handle)
        except OSError as exc:
            raise CommandError(f"Cannot read {file}: {exc.strerror or exc}") from exc
        except UnicodeDecodeError as exc:
            raise CommandError(not_utf8_message(file, exc)) from exc
        except RosterError as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(str(result))
        self.stdout.write(
            f"({result.students_created} new students, {result.guardians_created} new guardians)"
        )
