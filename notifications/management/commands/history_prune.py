"""``history_prune [--days N] [--budget SECONDS] [--dry-run]``: retention, by hand.

Beat runs the same every hour (``notifications.tasks.history_prune``); this is for ops who
want to see what is due, or to catch up after raising the retention or restoring a backup.
"""

from __future__ import annotations

import datetime as dt
import json

from django.core.management.base import BaseCommand, CommandParser
from django.utils import timezone

from notifications import retention
from notifications.models import MailingSummary


class Command(BaseCommand):
    help = "Archive mailings closed longer ago than the retention and remove their deliveries."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--days",
            type=int,
            default=None,
            help="retention in days (default: EDSMART_DELIVERY_RETENTION_DAYS)",
        )
        parser.add_argument(
            "--budget", type=float, default=300.0, help="stop after this many seconds"
        )
        parser.add_argument(
            "--dry-run", action="store_true", help="say what is due, change nothing"
        )

    def handle(self, *args: object, **opts: object) -> None:
        days = opts["days"] if opts["days"] is not None else retention.retention_days()
        if int(days) < 1:
            self.stderr.write("--days must be at least 1")
            raise SystemExit(2)
        if opts["dry_run"]:
            cutoff = timezone.now() - dt.timedelta(days=int(days))
            due = MailingSummary.objects.filter(
                archived_at__isnull=True, summarised_at__lt=cutoff, mailing__summarised=True
            )
            self.stdout.write(
                json.dumps(
                    {
                        "retention_days": days,
                        "cutoff": cutoff.isoformat(),
                        "mailings_due": due.filter(unknown=0).count(),
                        "mailings_held_by_unknowns": due.filter(unknown__gt=0).count(),
                        "mailings_with_rows_to_remove": MailingSummary.objects.filter(
                            archived_at__isnull=False, rows_removed_at__isnull=True
                        ).count(),
                    }
                )
            )
            return
        report = retention.history_prune(days=int(days), budget_seconds=float(opts["budget"]))
        self.stdout.write(
            json.dumps(
                {
                    "archived": len(report.archived),
                    "rows_removed": report.rows_removed,
                    "mailings_emptied": len(report.mailings_emptied),
                    "out_of_time": report.out_of_time,
                    "lock_waits": report.lock_waits,
                }
            )
        )
