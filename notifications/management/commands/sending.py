"""``sending pause|resume|status [--school SLUG] [--message HANDLE]``: the ops switches.

Without --school or --message, pause and resume act on the global switch.
"""

from __future__ import annotations

import getpass
import json

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser

from notifications import controls, selectors
from notifications.controls import message_pause, message_resume
from notifications.models import Mailing
from slips.models import Broadcast, School, Slip


class Command(BaseCommand):
    help = "Pause, resume or show sending: globally, for one school, or for one message."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("action", choices=["pause", "resume", "status"])
        target = parser.add_mutually_exclusive_group()
        target.add_argument("--school", metavar="SLUG")
        target.add_argument(
            "--message", metavar="HANDLE", help=f"the message: {selectors.HANDLE_FORMS}"
        )
        parser.add_argument("--reason", default="", help="recorded with a global pause")
        parser.add_argument("--json", action="store_true", help="status as JSON")

    def handle(self, *args: object, **opts: object) -> None:
        action = opts["action"]
        actor = f"cli:{getpass.getuser()}"
        if action == "status":
            self._status(as_json=bool(opts["json"]))
            return
        paused = action == "pause"
        if opts["school"]:
            school = School.objects.filter(slug=opts["school"]).first()
            if school is None:
                raise CommandError(f"No school with slug {opts['school']!r}.")
            controls.sending_set_paused(paused=paused, actor=actor, school=school)
            self.stdout.write(f"Sending {action}d for school {school.slug}.")
        elif opts["message"]:
            self._message(str(opts["message"]), paused)
        else:
            controls.sending_set_paused(paused=paused, actor=actor, reason=str(opts["reason"]))
            self.stdout.write(f"Sending {action}d globally.")

    def _message(self, ref: str, paused: bool) -> None:
        try:
            obj = selectors.message_lookup(ref)
        except selectors.UnknownMessage as exc:
            raise CommandError(str(exc)) from None
        # A reminder round pauses alone; any other mailing stands for its whole slip or
        # broadcast, which is what the output names.
        if isinstance(obj, Mailing) and obj.kind == Mailing.Kind.REMINDER:
            target: Mailing | Slip | Broadcast = obj
            if not controls.mailing_set_paused(mailing=obj, paused=paused):
                raise CommandError(
                    f"{selectors.message_handle(obj)} is {obj.status}; nothing to change."
                )
        else:
            target = obj.source if isinstance(obj, Mailing) else obj
            try:
                (message_pause if paused else message_resume)(message=target)
            except ValidationError as exc:
                raise CommandError("; ".join(exc.messages)) from None
        handle = selectors.message_handle(target)
        self.stdout.write(f"Message {handle} {'paused' if paused else 'resumed'}.")

    def _status(self, *, as_json: bool) -> None:
        status = selectors.sending_status()
        backlog = selectors.backlog()
        status["backlog"] = backlog.deliveries
        status["oldest_pending_seconds"] = backlog.oldest_due_seconds
        if as_json:
            self.stdout.write(json.dumps(status))
            return
        state = "PAUSED" if status["global_paused"] else "running"
        self.stdout.write(f"Global sending: {state} {status['global_reason']}".rstrip())
        paused = ", ".join(status["schools_paused"]) or "none"
        self.stdout.write(f"Schools paused: {paused}")
        self.stdout.write(
            f"Mailings sending: {status['mailings_sending']}, paused: {status['mailings_paused']}"
        )
        age = status["oldest_pending_seconds"]
        self.stdout.write(
            f"Backlog: {status['backlog']} deliveries"
            + (f", oldest {age:.0f}s old" if age is not None else "")
        )
