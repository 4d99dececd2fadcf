"""``resolve_unknown --message HANDLE --mark-sent|--mark-failed|--resend``.

A person decides what happened to deliveries whose outcome is unknown (the mail server may or
may not have accepted them). Every decision is recorded as a delivery event with the actor.
"""

from __future__ import annotations

import getpass

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import transaction

from notifications import controls, selectors
from notifications.models import Delivery, DeliveryStatus


class Command(BaseCommand):
    help = "Resolve deliveries in the unknown state: mark them sent or failed, or resend them."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--message",
            required=True,
            metavar="HANDLE",
            help=f"the message: {selectors.HANDLE_FORMS}",
        )
        choice = parser.add_mutually_exclusive_group(required=True)
        choice.add_argument("--mark-sent", action="store_const", dest="resolution", const="sent")
        choice.add_argument(
            "--mark-failed", action="store_const", dest="resolution", const="failed"
        )
        choice.add_argument(
            "--resend",
            action="store_const",
            dest="resolution",
            const="resend",
            help="send again with the same Message-ID; the recipient may get two copies",
        )
        parser.add_argument("--delivery", type=int, action="append", help="only these delivery ids")
        parser.add_argument("--actor", default=None, help="recorded as who decided")

    def handle(self, *args: object, **opts: object) -> None:
        try:
            obj = selectors.message_lookup(str(opts["message"]))
        except selectors.UnknownMessage as exc:
            raise CommandError(str(exc)) from None
        unknown = Delivery.objects.filter(
            mailing__in=selectors.mailings_of(obj), status=DeliveryStatus.UNKNOWN
        )
        if opts["delivery"]:
            unknown = unknown.filter(pk__in=opts["delivery"])
        ids = list(unknown.values_list("pk", flat=True))
        if not ids:
            self.stdout.write("No unknown deliveries to resolve.")
            return
        actor = opts["actor"] or f"cli:{getpass.getuser()}"
        with transaction.atomic():
            moved = controls.unknowns_resolve(
                delivery_ids=ids, resolution=str(opts["resolution"]), actor=actor
            )
        self.stdout.write(f"Resolved {moved} unknown deliveries as {opts['resolution']}.")
