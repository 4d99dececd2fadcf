"""The django-post-office contender's steps, each run by bench/send_throughput.py as a process.

    python bench/postoffice_steps.py migrate
    python bench/postoffice_steps.py queue N
    python bench/postoffice_steps.py send PROCESSES LOCKFILE
    python bench/postoffice_steps.py count

They run under ``bench.postoffice_settings`` (set here), which the benchmark's own process
cannot load next to the project's settings. ``send`` sets Django up, prints ``ready``, waits
for a line on stdin and then runs ``send_queued_mail --processes PROCESSES`` in process, so the
clock (printed as ``elapsed SECONDS``) holds the command's work and not the interpreter's start,
as the pipeline's clock starts with its worker pool already up. ``count`` prints the emails per
status as JSON.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ["DJANGO_SETTINGS_MODULE"] = "bench.postoffice_settings"

QUEUE_CHUNK = 2000  # emails per send_many (one bulk INSERT each)


def migrate() -> None:
    """Only post_office's tables: the project's own migrations are the pipeline's business."""
    from django.core.management import call_command

    call_command("migrate", "post_office", verbosity=0)


def queue(n: int) -> None:
    """N emails queued as an application would (``priority='medium'``), through send_many,
    post_office's bulk form of ``mail.send``: one INSERT per chunk. Not on the clock."""
    from post_office import mail

    from bench.send_throughput import FROM_HEADER, email_parts, recipient

    for first in range(0, n, QUEUE_CHUNK):
        batch = []
        for row in range(first, min(n, first + QUEUE_CHUNK)):
            subject, text, html, headers = email_parts(row)
            batch.append(
                {
                    "sender": FROM_HEADER,
                    "recipients": [recipient(row)],
                    "subject": subject,
                    "message": text,
                    "html_message": html,
                    "headers": headers,
                    "priority": "medium",
                }
            )
        mail.send_many(batch)


def send(processes: int, lockfile: str) -> None:
    from django.core.management import call_command

    print("ready", flush=True)
    sys.stdin.readline()
    start = time.perf_counter()
    call_command("send_queued_mail", processes=processes, lockfile=lockfile)
    print(f"elapsed {time.perf_counter() - start:.6f}", flush=True)


def count() -> None:
    from django.db.models import Count
    from post_office.models import STATUS, Email

    names = dict(enumerate(STATUS._fields))
    counts = Email.objects.values_list("status").annotate(n=Count("id"))
    print(json.dumps({names.get(status, str(status)): n for status, n in counts}))


def main() -> None:
    import django

    django.setup()
    step, args = sys.argv[1], sys.argv[2:]
    if step == "migrate":
        migrate()
    elif step == "queue":
        queue(int(args[0]))
    elif step == "send":
        send(int(args[0]), args[1])
    elif step == "count":
        count()
    else:
        raise SystemExit(f"unknown step {step!r}")


if __name__ == "__main__":
    main()
