"""``delivery_report [--message HANDLE] [--limit N] [--json]``: delivery counts per status.

Without ``--message`` it lists the newest ``--limit`` mailings (100 by default; ``more`` in the
JSON says whether older ones exist), their totals, and ``all_time``: every delivery ever
recorded, by status. Closed mailings' counts come from their summaries.

Each mailing is listed by its handle (``mailing:N``) beside the message it sends (``slip:N`` or
``broadcast:N``); either is accepted as it is by ``--message`` here, in ``sending`` and in
``resolve_unknown``.
"""

from __future__ import annotations

import json

from django.core.management.base import BaseCommand, CommandError, CommandParser

from notifications import selectors, summaries
from notifications.models import DeliveryStatus, Mailing

DEFAULT_LIMIT = 100


class Command(BaseCommand):
    help = "Counts of deliveries per status, for one message or for every mailing."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--message", metavar="HANDLE", help=f"the message: {selectors.HANDLE_FORMS}"
        )
        parser.add_argument(
            "--limit",
            type=int,
            default=DEFAULT_LIMIT,
            metavar="N",
            help=f"without --message: the newest N mailings (default {DEFAULT_LIMIT}; 0 = all)",
        )
        parser.add_argument("--json", action="store_true")

    def handle(self, *args: object, **opts: object) -> None:
        limit = int(opts["limit"])
        if limit < 0:
            raise CommandError("--limit must be 0 (all) or more")
        more = False
        if opts["message"]:
            try:
                obj = selectors.message_lookup(str(opts["message"]))
            except selectors.UnknownMessage as exc:
                raise CommandError(str(exc)) from None
            mailings = list(
                selectors.mailings_of(obj)
                .select_related("school", "slip", "broadcast")
                .order_by("pk")
            )
        else:
            # A year of history is a hundred thousand mailings: the newest first, a page of
            # them, read newest-first off the primary key.
            newest = Mailing.objects.select_related("school", "slip", "broadcast").order_by("-pk")
            if limit:
                mailings = list(newest[: limit + 1])
                more = len(mailings) > limit
                mailings = mailings[:limit]
            else:
                mailings = list(newest)
            mailings.reverse()
        counts = summaries.mailings_counts(m.pk for m in mailings)
        rows = [
            {
                "mailing": m.pk,
                "handle": selectors.message_handle(m),
                "message": selectors.message_handle(m.source),
                "school": m.school.slug,
                "kind": m.kind,
                "round": m.round,
                "subject": m.subject,
                "status": m.status,
                "counts": counts[m.pk],
            }
            for m in mailings
        ]
        totals = summaries.counts_sum(counts.values())
        if opts["json"]:
            report = {"mailings": rows, "totals": totals, "more": more}
            if not opts["message"]:
                report["all_time"] = selectors.delivery_status_counts()
            self.stdout.write(json.dumps(report))
            return
        columns = DeliveryStatus.values
        self.stdout.write(
            f"{'mailing':<16} {'message':<18} {'school':<16} {'status':<10} "
            + " ".join(f"{c:>10}" for c in columns)
        )
        for row in rows:
            self.stdout.write(
                f"{row['handle']:<16} {row['message']:<18} {row['school'][:16]:<16} "
                f"{row['status']:<10} " + " ".join(f"{row['counts'][c]:>10}" for c in columns)
            )
        self.stdout.write(
            f"{'total':<16} {'':<18} {'':<16} {'':<10} "
            + " ".join(f"{totals[c]:>10}" for c in columns)
        )
        if more:
            self.stdout.write(f"(the newest {limit} mailings; --limit 0 lists every one)")
