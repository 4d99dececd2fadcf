"""Parents' link tokens stay out of the logs: Django's request warnings through the project's
logging configuration, and gunicorn's access log through its logger class."""

from __future__ import annotations

import datetime as dt
import logging
from types import SimpleNamespace

import pytest
from gunicorn.config import Config

from edsmart.log_redaction import RedactingGunicornLogger, RedactParentTokens, redact
from slips.tokens import delivery_token

TOKEN = delivery_token(delivery_id=12345)


def test_redact_takes_out_every_token_and_nothing_else():
    assert redact(f"GET /p/{TOKEN}/ HTTP/1.1") == "GET /p/[token]/ HTTP/1.1"
    assert redact(f"https://x.example/p/{TOKEN}/?a=1") == "https://x.example/p/[token]/?a=1"
    assert redact("/admin/slips/slip/3/change/") == "/admin/slips/slip/3/change/"
    assert TOKEN not in redact(f"/p/{TOKEN}")


@pytest.mark.django_db
@pytest.mark.usefixtures("web_settings")
def test_a_not_found_warning_for_a_parent_link_is_logged_without_its_token(client):
    # The console handler of settings.LOGGING carries the filter.
    handler = next(
        h
        for h in logging.getLogger().handlers
        if any(isinstance(f, RedactParentTokens) for f in h.filters)
    )
    records = []
    capture = logging.Handler()
    capture.emit = records.append
    capture.addFilter(RedactParentTokens())
    logging.getLogger("django.request").addHandler(capture)
    try:
        client.get(f"/p/{TOKEN}x/", secure=True)  # a mangled token: a 404 page, a warning
    finally:
        logging.getLogger("django.request").removeHandler(capture)
    assert records, "django.request logged nothing"
    for record in records:
        line = handler.format(record)
        assert TOKEN not in line and "/p/[token]/" in line, line


def test_gunicorns_access_log_line_carries_no_token():
    logger = RedactingGunicornLogger(Config())
    environ = {
        "REQUEST_METHOD": "GET",
        "RAW_URI": f"/p/{TOKEN}/",
        "PATH_INFO": f"/p/{TOKEN}/",
        "QUERY_STRING": "",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "203.0.113.9",
        "HTTP_REFERER": f"https://edsmart.example/p/{TOKEN}/",
        "HTTP_USER_AGENT": "Mail scanner",
    }
    req = SimpleNamespace(headers=[("REFERER", environ["HTTP_REFERER"])])
    resp = SimpleNamespace(status="200 OK", sent=1234, headers=[])
    atoms = logger.atoms(resp, req, environ, dt.timedelta(milliseconds=12))
    line = logger.cfg.access_log_format % atoms
    assert TOKEN not in line, line
    assert "GET /p/[token]/ HTTP/1.1" in line and "200" in line
