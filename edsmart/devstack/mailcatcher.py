"""A local mail catcher for development: an SMTP server that keeps every message, and a web page
that shows them.

The dev stack points Django's SMTP backend at it so a newcomer can see exactly what a parent
would receive (and click the parent's link) without a real mail account. Messages are kept as
``.eml`` files, so they survive a restart and can be opened in any mail client.

Everything shown in the viewer came from outside (staff-written subjects and bodies, addresses),
so it is escaped; an HTML part is only ever rendered inside a sandboxed iframe with no scripts.

Run it alone with
``python -m edsmart.devstack.mailcatcher [--smtp-port 1025] [--http-port 8025]``.

One module a little over 400 lines on purpose: the SMTP side, the store and the viewer share
one small data model, and the catcher is meant to be read and run as a single file.
"""

from __future__ import annotations

import argparse
import email
import email.policy
import html
import json
import re
import signal
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller

DEFAULT_DIR = Path(".devstack") / "mail"
# Only names we wrote ourselves are served: this is what keeps a crafted URL out of the rest
# of the file system.
_NAME_RE = re.compile(r"^[0-9]{8}T[0-9]{12}-[0-9a-f]{32}\.eml$")
_URL_RE = re.compile(r"https?://[^\s<>\"'()\[\]{}]+")
_TRAILING_PUNCTUATION = ".,;:!?"


@dataclass(frozen=True)
class StoredMessage:
    """One caught message, parsed enough to list and show it."""

    name: str
    received: datetime
    envelope_from: str
    envelope_to: list[str]
    message: EmailMessage

    @property
    def subject(self) -> str:
        return str(self.message.get("Subject", ""))

    def part(self, subtype: str) -> str | None:
        body = self.message.get_body(preferencelist=(subtype,))
        if body is None or body.get_content_subtype() != subtype:
            return None
        try:
            return body.get_content()
        except (LookupError, UnicodeError):
            return body.get_payload(decode=True).decode("utf-8", "replace")

    def summary(self) -> dict[str, Any]:
        return {
            "id": self.name,
            "received": self.received.isoformat(),
            "envelope_from": self.envelope_from,
            "envelope_to": self.envelope_to,
            "from": str(self.message.get("From", "")),
            "to": str(self.message.get("To", "")),
            "subject": self.subject,
            "message_id": str(self.message.get("Message-ID", "")),
        }


class MailStore:
    """Messages as ``.eml`` files in one directory; the envelope goes in X-Envelope-* headers.

    Files rather than memory so the SMTP side and the viewer can be separate processes and the
    mail outlives a restart of the stack.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def add(self, raw: bytes, *, mail_from: str, rcpt_tos: list[str]) -> str:
        now = datetime.now(UTC)
        name = f"{now:%Y%m%dT%H%M%S%f}-{uuid.uuid4().hex}.eml"
        envelope = (
            f"X-Envelope-From: {_one_line(mail_from)}\r\n"
            f"X-Envelope-To: {_one_line(', '.join(rcpt_tos))}\r\n"
        ).encode()
        tmp = self.directory / f".{name}.tmp"
        tmp.write_bytes(envelope + raw)
        # Rename so the viewer never lists a half-written file.
        tmp.rename(self.directory / name)
        return name

    def names(self) -> list[str]:
        """Newest first: names start with the UTC receive time, so a reverse sort does it."""
        return sorted(
            (p.name for p in self.directory.iterdir() if _NAME_RE.match(p.name)), reverse=True
        )

    def get(self, name: str) -> StoredMessage | None:
        if not _NAME_RE.match(name):
            return None
        path = self.directory / name
        if not path.is_file():
            return None
        message = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
        received = datetime.strptime(name[:15], "%Y%m%dT%H%M%S").replace(tzinfo=UTC)
        recipients = str(message.get("X-Envelope-To", ""))
        return StoredMessage(
            name=name,
            received=received,
            envelope_from=str(message.get("X-Envelope-From", "")),
            envelope_to=[r.strip() for r in recipients.split(",") if r.strip()],
            message=message,
        )

    def raw(self, name: str) -> bytes | None:
        if not _NAME_RE.match(name):
            return None
        path = self.directory / name
        return path.read_bytes() if path.is_file() else None

    def __iter__(self) -> Iterator[StoredMessage]:
        for name in self.names():
            stored = self.get(name)
            if stored is not None:
                yield stored


def _one_line(value: str) -> str:
    return value.replace("\r", " ").replace("\n", " ")


class _SMTPHandler:
    def __init__(self, store: MailStore) -> None:
        self.store = store

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        content = envelope.original_content or envelope.content
        if isinstance(content, str):
            content = content.encode("utf-8")
        self.store.add(content, mail_from=envelope.mail_from or "", rcpt_tos=envelope.rcpt_tos)
        return "250 Message accepted for delivery"


def smtp_controller(store: MailStore, *, host: str = "127.0.0.1", port: int = 1025) -> Controller:
    """An aiosmtpd controller (call ``start()``/``stop()``) that files every message in store."""
    # SMTPUTF8 so staff names with accents in addresses are accepted as a real server would.
    return Controller(
        _SMTPHandler(store),
        hostname=host,
        port=port,
        enable_SMTPUTF8=True,
        data_size_limit=50 * 1024 * 1024,
    )


# --- Viewer -------------------------------------------------------------------------------------

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">{refresh}
<title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5rem; color: #222; }}
table {{ border-collapse: collapse; width: 100%; }}
th, td {{ text-align: left; padding: .35rem .6rem; border-bottom: 1px solid #ddd; }}
tr:hover {{ background: #f5f7fb; }}
pre {{ white-space: pre-wrap; word-break: break-word; background: #f7f7f7; padding: 1rem; }}
iframe {{ width: 100%; height: 32rem; border: 1px solid #ccc; }}
.muted {{ color: #666; }}
dl {{ display: grid; grid-template-columns: max-content auto; gap: .2rem 1rem; }}
dt {{ font-weight: 600; }}
</style></head><body>
{body}
</body></html>
"""


def _page(title: str, body: str, *, refresh: bool = False) -> bytes:
    return _PAGE.format(
        title=html.escape(title),
        body=body,
        refresh='<meta http-equiv="refresh" content="5">' if refresh else "",
    ).encode("utf-8")


def linkify(text: str) -> str:
    """Escape text for HTML and turn http(s) URLs into links (the parent's link must be
    clickable). Only the http and https schemes ever become links."""
    out: list[str] = []
    last = 0
    for match in _URL_RE.finditer(text):
        url = match.group(0).rstrip(_TRAILING_PUNCTUATION)
        end = match.start() + len(url)
        out.append(html.escape(text[last : match.start()]))
        out.append(
            f'<a href="{html.escape(url)}" target="_blank" rel="noopener noreferrer">'
            f"{html.escape(url)}</a>"
        )
        last = end
    out.append(html.escape(text[last:]))
    return "".join(out)


def render_index(store: MailStore) -> bytes:
    rows = []
    for stored in store:
        rows.append(
            "<tr>"
            f'<td class="muted">{html.escape(stored.received.strftime("%Y-%m-%d %H:%M:%S"))}'
            "</td>"
            f"<td>{html.escape(', '.join(stored.envelope_to))}</td>"
            f'<td><a href="/messages/{html.escape(stored.name)}">'
            f"{html.escape(stored.subject) or '(no subject)'}</a></td>"
            f"<td>{html.escape(str(stored.message.get('From', '')))}</td>"
            "</tr>"
        )
    table = (
        "<table><thead><tr><th>Received (UTC)</th><th>To</th><th>Subject</th><th>From</th>"
        "</tr></thead><tbody>" + "".join(rows) + "</tbody></table>"
        if rows
        else '<p class="muted">No mail yet. Messages sent by the app appear here.</p>'
    )
    body = (
        f"<h1>Caught mail ({len(rows)})</h1>"
        f'<p class="muted">Newest first; this page refreshes every 5 seconds. '
        f'<a href="/api/messages">JSON</a></p>{table}'
    )
    return _page("EdSmart mail catcher", body, refresh=True)


def render_message(stored: StoredMessage) -> bytes:
    msg = stored.message
    headers = [
        ("Subject", stored.subject),
        ("From", str(msg.get("From", ""))),
        ("To", str(msg.get("To", ""))),
        ("Envelope to", ", ".join(stored.envelope_to)),
        ("Date", str(msg.get("Date", ""))),
        ("Message-ID", str(msg.get("Message-ID", ""))),
    ]
    parts = [
        '<p><a href="/">&larr; all mail</a> &middot; '
        f'<a href="/messages/{html.escape(stored.name)}/raw">raw source</a></p>',
        f"<h1>{html.escape(stored.subject) or '(no subject)'}</h1>",
        "<dl>"
        + "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in headers)
        + "</dl>",
    ]
    text = stored.part("plain")
    if text is not None:
        parts.append(f"<h2>Text part</h2><pre>{linkify(text)}</pre>")
    if stored.part("html") is not None:
        # No allow-scripts and no allow-same-origin: the mail's HTML runs nothing and reads
        # nothing. Popups are allowed so its links open in a new tab (the app itself refuses to
        # be framed).
        parts.append(
            "<h2>HTML part</h2>"
            f'<iframe sandbox="allow-popups allow-popups-to-escape-sandbox" '
            f'src="/messages/{html.escape(stored.name)}/html" title="HTML part"></iframe>'
        )
    if text is None and stored.part("html") is None:
        parts.append('<p class="muted">No text or HTML part.</p>')
    return _page(stored.subject or "(no subject)", "".join(parts))


class _ViewerHandler(BaseHTTPRequestHandler):
    store: MailStore
    server_version = "EdSmartMailCatcher"

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the dev stack's console is busy enough."""

    def _send(
        self, status: int, body: bytes, content_type: str, extra: dict[str, str] | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Cache-Control", "no-store")
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        pieces = [p for p in path.split("/") if p]
        html_type = "text/html; charset=utf-8"
        page_csp = {
            "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
            "frame-src 'self'; frame-ancestors 'none'"
        }
        if not pieces:
            self._send(HTTPStatus.OK, render_index(self.store), html_type, page_csp)
            return
        if pieces == ["api", "messages"]:
            data = json.dumps([m.summary() for m in self.store], indent=2).encode()
            self._send(HTTPStatus.OK, data, "application/json")
            return
        if len(pieces) in (2, 3) and pieces[0] == "messages":
            stored = self.store.get(pieces[1])
            if stored is not None:
                if len(pieces) == 2:
                    self._send(HTTPStatus.OK, render_message(stored), html_type, page_csp)
                    return
                if pieces[2] == "raw":
                    raw = self.store.raw(pieces[1]) or b""
                    self._send(HTTPStatus.OK, raw, "text/plain; charset=utf-8")
                    return
                if pieces[2] == "html":
                    self._send_html_part(stored)
                    return
        self._send(HTTPStatus.NOT_FOUND, _page("Not found", "<h1>Not found</h1>"), html_type)

    def _send_html_part(self, stored: StoredMessage) -> None:
        content = stored.part("html") or ""
        # The CSP sandbox repeats the iframe's sandbox for anyone who opens this URL directly.
        csp = (
            "sandbox allow-popups allow-popups-to-escape-sandbox; default-src 'none'; "
            "img-src data: http: https:; style-src 'unsafe-inline'; frame-ancestors 'self'"
        )
        body = ('<base target="_blank">' + content).encode("utf-8")
        self._send(
            HTTPStatus.OK,
            body,
            "text/html; charset=utf-8",
            {"Content-Security-Policy": csp, "Referrer-Policy": "no-referrer"},
        )


def http_server(
    store: MailStore, *, host: str = "127.0.0.1", port: int = 8025
) -> ThreadingHTTPServer:
    """The viewer; run ``serve_forever()`` in a thread and ``shutdown()`` to stop."""
    handler = type("Handler", (_ViewerHandler,), {"store": store})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


class MailCatcher:
    """SMTP server and viewer together, for the dev stack and for tests."""

    def __init__(
        self,
        directory: Path = DEFAULT_DIR,
        *,
        host: str = "127.0.0.1",
        smtp_port: int = 1025,
        http_port: int = 8025,
    ) -> None:
        self.store = MailStore(directory)
        self.smtp = smtp_controller(self.store, host=host, port=smtp_port)
        self.http = http_server(self.store, host=host, port=http_port)
        self._thread: threading.Thread | None = None

    @property
    def smtp_port(self) -> int:
        return self.smtp.port

    @property
    def http_url(self) -> str:
        host, port = self.http.server_address[:2]
        return f"http://{host}:{port}/"

    def start(self) -> MailCatcher:
        self.smtp.start()
        self._thread = threading.Thread(target=self.http.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.http.shutdown()
        self.http.server_close()
        self.smtp.stop()

    def __enter__(self) -> MailCatcher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m edsmart.devstack.mailcatcher", description=__doc__
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--smtp-port", type=int, default=1025)
    parser.add_argument("--http-port", type=int, default=8025)
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="where .eml files go")
    args = parser.parse_args(argv)

    catcher = MailCatcher(
        args.dir, host=args.host, smtp_port=args.smtp_port, http_port=args.http_port
    )
    stop = threading.Event()

    def _stop(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    with catcher:
        print(
            f"Mail catcher: SMTP on {args.host}:{catcher.smtp_port}, "
            f"viewer on {catcher.http_url} (messages in {args.dir})",
            flush=True,
        )
        stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
