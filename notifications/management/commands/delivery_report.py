"""``delivery_report [--message HANDLE] [--json]``: delivery counts per status.

Each mailing is listed by its handle (``mailing:N``) beside the message it sends (``slip:N`` or
``broadcast:N``); either is accepted as it is by ``--message`` here, in ``sending`` and in
``resolve_unknown``.
"""

from __future__ import annotations

import json

from django.core.management.base import BaseCommand, CommandError, CommandParser

from notifications import selectors
from notifications.models import Delivery, DeliveryStatus, Mailing


class Command(BaseCommand):
    help = "Counts of deliveries per status, for one message or for every mailing."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--message", metavar="HANDLE", help=f"the message: {selectors.HANDLE_FORMS}"
        )
        parser.add_argument("--json", action="store_true")

    def handle(self, *args: object, **opts: object) -> None:
        if opts["message"]:
            try:
                obj = selectors.message_lookup(str(opts["message"]))
            except selectors.UnknownMessage as exc:
                raise CommandError(str(exc)) from None
            mailings = selectors.mailings_of(obj)
        else:
            mailings = Mailing.objects.all()
        mailings = mailings.select_related("school", "slip", "broadcast").order_by("pk")
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
                "counts": selectors.mailing_counts(mailing=m),
            }
            for m in mailings
        ]
        totals = selectors.delivery_status_counts(
            deliveries=Delivery.objects.filter(mailing__in=mailings)
        )
        if opts["json"]:
            self.stdout.write(json.dumps({"mailings": rows, "totals": totals}))
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
