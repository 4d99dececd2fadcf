"""Parents' link tokens kept out of the logs.

A parent's link (``/p/<token>/``) is the only thing that lets someone read that family's
message and answer for their children, so a log line that carries it is a copy of that key:
in gunicorn's access log (the request line, and the Referer of the page's own assets), and in
Django's request warnings ("Not Found: /p/…/"). Both are redacted to ``/p/[token]/`` before they
are written. The pipeline's own log lines carry ids, never links.
"""

from __future__ import annotations

import logging
import re

from gunicorn.glogging import Logger as GunicornLogger

_TOKEN_IN_PATH = re.compile(r"(/p/)[^/\s?#\"'<>]+")
REDACTED = r"\1[token]"


def redact(text: str) -> str:
    """``text`` with every parent link token replaced by ``[token]``."""
    return _TOKEN_IN_PATH.sub(REDACTED, text) if "/p/" in text else text


class RedactParentTokens(logging.Filter):
    """A handler filter: Django's request and server loggers write paths, and so tokens."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("django."):
            return True  # the pipeline's lines carry ids only; keep them cheap
        message = record.getMessage()
        redacted = redact(message)
        if redacted != message:
            record.msg, record.args = redacted, ()
        request = getattr(record, "request", None)
        if request is not None:
            shown = str(request)
            if redact(shown) != shown:
                record.request = redact(shown)
        return True


class RedactingGunicornLogger(GunicornLogger):
    """gunicorn's logger with link tokens taken out of the access log's request line, path and
    Referer (``--logger-class`` in the Procfile)."""

    def atoms(self, resp, req, environ, request_time) -> dict:
        atoms = super().atoms(resp, req, environ, request_time)
        for key in ("r", "U", "f", "{referer}i"):
            value = atoms.get(key)
            if isinstance(value, str):
                atoms[key] = redact(value)
        return atoms
