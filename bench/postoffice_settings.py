"""Settings for bench/send_throughput.py's django-post-office contender, and for nothing else.

post_office is a bench-only extra (``pip install -e '.[bench]'``): it must never be in the
project's own INSTALLED_APPS, so this module takes the project's settings as they are and adds
it here. It gets a database of its own (the bench database's name plus ``_po``), so its tables
never meet the pipeline's, and Django's SMTP backend (post_office's default transport when
EMAIL_BACKEND is a real one), pointed by EMAIL_HOST/EMAIL_PORT at the bench's sink.
"""

from __future__ import annotations

from edsmart.env import env_int
from edsmart.settings import *  # noqa: F403
from edsmart.settings import DATABASES as PROJECT_DATABASES
from edsmart.settings import INSTALLED_APPS as PROJECT_APPS

INSTALLED_APPS = [*PROJECT_APPS, "post_office"]

DATABASES = {
    "default": {
        **PROJECT_DATABASES["default"],
        "NAME": PROJECT_DATABASES["default"]["NAME"] + "_po",
    }
}

EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"

# post_office's own defaults (3.12), written out so that the figure says what it measured: the
# command takes BATCH_SIZE queued emails at a time, splits them over its processes (a fork pool
# made per batch), each sending with THREADS_PER_PROCESS threads (one SMTP connection each),
# then marks the batch's sent emails in one UPDATE and, at LOG_LEVEL 2, adds a Log row for each.
# BATCH_SIZE moves the figure most (a pool forked and connections opened per batch), so
# send_throughput.py's --postoffice-batch-size can change it through BENCH_PO_BATCH_SIZE.
POST_OFFICE = {
    "BATCH_SIZE": env_int("BENCH_PO_BATCH_SIZE", default=100, minimum=1),
    "THREADS_PER_PROCESS": 5,
    "LOG_LEVEL": 2,
    "MAX_RETRIES": 0,
}
