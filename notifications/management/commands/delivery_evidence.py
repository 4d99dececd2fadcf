"""``delivery_evidence HANDLE [--email ADDRESS]``: a message's evidence per recipient, as CSV.

The same steps as the admin's evidence page (``notifications.evidence``): each try with its
time, Message-ID, provider id, the server's reply, and the provider's later reports, for every
recipient of every mailing of the message (a slip's reminder rounds included), or for one
address. Written to standard output, streamed, so it works for any size of mailing.
"""

from __future__ import annotations

import csv

from django.core.management.base import BaseCommand, CommandError, CommandParser

from edsmart.admin_tenancy import csv_safe
from notifications import evidence, selectors
from slips.models import normalize_email


class Command(BaseCommand):
    help = "Every try and provider report of each recipient of a message, as CSV on stdout."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("message", metavar="HANDLE", help=selectors.HANDLE_FORMS)
        parser.add_argument("--email", default="", help="only this recipient's address")

    def handle(self, *args: object, **opts: object) -> None:
        try:
            obj = selectors.message_lookup(str(opts["message"]))
        except selectors.UnknownMessage as exc:
            raise CommandError(str(exc)) from None
        address = normalize_email(str(opts["email"])) if opts["email"] else ""
        if opts["email"] and "@" not in address:
            raise CommandError(f"{opts['email']!r} is not an email address")
        writer = csv.writer(self.stdout, lineterminator="\n")
        writer.writerow(evidence.CSV_HEADER)
        for row in evidence.csv_rows(selectors.mailings_of(obj), address=address):
            writer.writerow(csv_safe(row))
