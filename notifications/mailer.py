"""Hand one email to the mail server and classify the reply, reporting exactly how far it got.

Building the email is ``compose``'s job; this module only sends and classifies.

The pipeline's exactly-once promise depends on one distinction this module makes: whether the
message body may have reached the server. Anything that goes wrong before the body is sent is
a *definite* non-delivery (safe to retry); anything after it, short of a reply, is *unknown*.
Django's SMTP backend hides that distinction inside ``smtplib.sendmail``, so for SMTP we drive
the MAIL / RCPT / DATA exchange ourselves over the backend's own connection.
"""

from __future__ import annotations

import enum
import logging
import smtplib
from dataclasses import dataclass

from django.conf import settings
from django.core.mail import EmailMultiAlternatives
from django.core.mail.backends.smtp import EmailBackend as SMTPBackend
from django.core.mail.message import sanitize_address

log = logging.getLogger("edsmart.pipeline")


class Outcome(enum.Enum):
    ACCEPTED = "accepted"  # the server said 250: it is the server's now
    RETRY = "retry"  # definitely not accepted; may be tried again later
    FAILED = "failed"  # definitely not accepted and never will be (5xx, invalid address)
    UNKNOWN = "unknown"  # the body may have been accepted; nobody can tell


@dataclass(frozen=True)
class SendResult:
    outcome: Outcome
    detail: str = ""
    provider_id: str = ""
    # Set when the send was cut short by something the caller must re-raise or act on
    # (a soft time limit, say), after recording the outcome.
    interrupted_by: BaseException | None = None
    # The connection itself failed: the next delivery in the batch would fail the same way.
    connection_lost: bool = False
    # The provider refused our credentials (SMTP 535, API 401/403): no recipient's fault, so
    # no recipient is charged a try; sending must stop until someone fixes the credentials.
    credentials_refused: bool = False
    # Failed before any of the message went out, on a connection that was already open:
    # safe to try once on a new connection (see ``send_one``).
    reconnect_ok: bool = False
    # The provider said "slower" (SMTP 421/451/452, API 429): not the recipient's fault, so not
    # charged as a try; the shared send rate backs off (notifications/ratelimit.py).
    throttled: bool = False


# Replies that mean "too fast / try later" rather than anything about this recipient: 421
# (service closing, used for rate limits), 451 (local error, greylisting and throttling), 452
# (too many recipients / messages for now).
THROTTLE_CODES = frozenset({421, 451, 452})


def _reply_outcome(code: int) -> Outcome:
    return Outcome.RETRY if 400 <= code < 500 else Outcome.FAILED


def _text(resp: bytes | str) -> str:
    return resp.decode("utf-8", "replace") if isinstance(resp, bytes) else str(resp)


@dataclass(frozen=True)
class RawEmail:
    """An email already serialized (CRLF line ends, not dot-stuffed), with its envelope.

    Only the SMTP path can send it; other backends need an ``EmailMultiAlternatives``.
    """

    from_addr: str
    to_addr: str
    payload: bytes


@dataclass
class Envelope:
    """MAIL, RCPT and DATA already written to the server, replies not yet read.

    ``envelope_ahead`` writes them just before the delivery's start is recorded, so that the
    server works on them while the database commits: one round trip to the mail server per
    email overlaps the database's, instead of following it. Only the envelope goes early;
    the body waits for the start (``send_one(ahead=...)``). A start that does not happen
    abandons the envelope, which closes the connection: a server in the data phase discards
    what it has, and nothing was submitted.
    """

    backend: SMTPBackend
    smtp: smtplib.SMTP
    commands: list[str]
    payload: bytes
    settled: bool = False


def envelope_ahead(
    *, connection: object, message: EmailMultiAlternatives | RawEmail
) -> Envelope | None:
    """Write this message's envelope now, on a connection already open to a server that
    offers PIPELINING (RFC 2920). None when that does not hold, or the write fails (the
    send then goes the usual way, on a new connection if need be)."""
    if not isinstance(connection, SMTPBackend) or connection.connection is None:
        return None
    smtp = connection.connection
    if not (smtp.does_esmtp and smtp.has_extn("pipelining")):
        return None
    try:
        from_addr, recipients, payload = _envelope(message)
        commands = [f"MAIL FROM:{from_addr}", *(f"RCPT TO:{r}" for r in recipients), "DATA"]
        lines = _command_lines(commands).encode(smtp.command_encoding)
    except Exception:  # noqa: BLE001 - the usual path meets the same error and reports it
        return None
    try:
        smtp.send(lines)
    except (OSError, smtplib.SMTPException):
        _drop(connection)
        return None
    return Envelope(connection, smtp, commands, payload)


def envelope_abandon(envelope: Envelope | None) -> None:
    """The start did not happen: close the connection, which aborts the pending exchange."""
    if envelope is not None and not envelope.settled:
        envelope.settled = True
        if envelope.backend.connection is envelope.smtp:
            _hang_up(envelope.backend)


@dataclass
class AwaitingReply:
    """A message whose body has gone out and whose final reply has not been read yet.

    The batch composes the next email while the server takes this one in (``send_body``),
    then reads the reply (``await_reply``) before recording anything: a round trip per email
    overlaps work instead of following it. Until the reply is read the outcome is not known,
    and nothing about this delivery is recorded."""

    backend: SMTPBackend
    smtp: smtplib.SMTP


def send_one(
    *,
    connection: object,
    message: EmailMultiAlternatives | RawEmail,
    ahead: Envelope | None = None,
) -> SendResult:
    """Send ``message`` over an open-or-openable Django email backend ``connection``;
    ``ahead``: its envelope, already written by ``envelope_ahead``."""
    sent = send_body(connection=connection, message=message, ahead=ahead)
    return await_reply(sent) if isinstance(sent, AwaitingReply) else sent


def send_body(
    *,
    connection: object,
    message: EmailMultiAlternatives | RawEmail,
    ahead: Envelope | None = None,
) -> SendResult | AwaitingReply:
    """``send_one`` up to the body: the outcome, or (SMTP, body sent) what to read it from."""
    if ahead is not None:
        ahead.settled = True
        if ahead.backend.connection is ahead.smtp:
            sent = _send_smtp(ahead.backend, message, ahead=ahead)
            if isinstance(sent, SendResult) and sent.reconnect_ok:
                # The kept connection had gone (see below); the envelope went nowhere.
                return _send_smtp(ahead.backend, message)
            return sent
        # That connection was closed since it was written to (the previous body's reply
        # failed), and the envelope went with it: the usual way opens a new one.
    if isinstance(connection, SMTPBackend):
        reused = connection.connection is not None
        sent = _send_smtp(connection, message)
        if reused and isinstance(sent, SendResult) and sent.reconnect_ok:
            # The server closed the connection we kept between messages (providers do, every
            # N messages or when idle): nothing of this message was taken, so it goes once
            # more on a new connection, and the delivery is not charged for the old one.
            return _send_smtp(connection, message)
        return sent
    if isinstance(message, RawEmail):
        raise TypeError("a RawEmail can only be sent through the SMTP backend")
    return _send_generic(connection, message)


def await_reply(sent: AwaitingReply) -> SendResult:
    """The server's reply to a body ``send_body`` wrote: silence now means ``unknown``."""
    try:
        code, resp = sent.smtp.getreply()
    except (TimeoutError, smtplib.SMTPException, OSError) as exc:
        _drop(sent.backend)
        return SendResult(Outcome.UNKNOWN, f"no reply after DATA: {exc!r}", connection_lost=True)
    except BaseException as exc:  # noqa: BLE001 - a soft time limit, say: record, then re-raise
        _drop(sent.backend)
        return SendResult(
            Outcome.UNKNOWN, f"interrupted: {exc!r}", interrupted_by=exc, connection_lost=True
        )
    if code == 250:
        return SendResult(Outcome.ACCEPTED, provider_id=_text(resp)[:250])
    return SendResult(
        _reply_outcome(code),
        f"message refused after DATA: {code} {_text(resp)}",
        throttled=code in THROTTLE_CODES,
    )


def _drop(backend: SMTPBackend) -> None:
    """Forget a connection whose state we no longer trust; the next send opens a new one."""
    try:
        backend.close()
    except Exception:  # noqa: BLE001 - closing a broken socket may fail any way it likes
        backend.connection = None


def _hang_up(backend: SMTPBackend) -> None:
    """Close a connection that may be in the data phase, without QUIT: there a QUIT would be
    taken as a line of the message and its reply awaited until the timeout. A server that
    loses the connection before the final dot discards the message."""
    smtp = backend.connection
    backend.connection = None
    if smtp is not None:
        try:
            smtp.close()
        except Exception:  # closing a broken socket may fail any way it likes
            log.debug("closing an abandoned SMTP connection failed", exc_info=True)


def _envelope(message: EmailMultiAlternatives | RawEmail) -> tuple[str, list[str], bytes]:
    """The reverse path, forward paths (as ``<addr>``) and body of one message."""
    if isinstance(message, RawEmail):
        return f"<{message.from_addr}>", [f"<{message.to_addr}>"], message.payload
    encoding = message.encoding or settings.DEFAULT_CHARSET
    from_addr = smtplib.quoteaddr(sanitize_address(message.from_email, encoding))
    recipients = [
        smtplib.quoteaddr(sanitize_address(addr, encoding)) for addr in message.recipients()
    ]
    return from_addr, recipients, message.message().as_bytes(linesep="\r\n")


def _command_ok(command: str, code: int) -> bool:
    """Whether an envelope command's reply lets the exchange go on."""
    return code == 354 if command == "DATA" else code in (250, 251)


def _command_lines(commands: list[str]) -> str:
    for command in commands:
        if "\r" in command or "\n" in command:
            raise ValueError(f"line break in an SMTP command: {command!r}")
    return "".join(command + "\r\n" for command in commands)


def _envelope_replies(smtp: smtplib.SMTP, commands: list[str]) -> list[tuple[int, bytes]]:
    """Send MAIL, RCPT... and DATA; return the replies, stopping at the first refusal.

    When the server offers PIPELINING (RFC 2920: Postfix, the big providers) the commands go
    in one write and all replies are read: one round trip instead of one per command.
    Nothing here sends the body, so whatever happens the message was not accepted.
    """
    lines = _command_lines(commands)  # every command checked before the first is sent
    if smtp.has_extn("pipelining"):
        smtp.send(lines.encode(smtp.command_encoding))
        return [smtp.getreply() for _ in commands]
    replies = []
    for command in commands:
        smtp.send(_command_lines([command]).encode(smtp.command_encoding))
        replies.append(smtp.getreply())
        if not _command_ok(command, replies[-1][0]):
            break
    return replies


def _refusal(commands: list[str], replies: list[tuple[int, bytes]]) -> SendResult | None:
    for command, (code, resp) in zip(commands, replies, strict=False):
        if not _command_ok(command, code):
            verb = command.split(":", 1)[0]
            return SendResult(
                _reply_outcome(code),
                f"{verb} refused: {code} {_text(resp)}",
                throttled=code in THROTTLE_CODES,
            )
    return None


def _credentials_refused(exc: smtplib.SMTPAuthenticationError) -> SendResult:
    return SendResult(
        Outcome.RETRY,
        f"the mail server refused our credentials: {exc.smtp_code} {_text(exc.smtp_error)}",
        connection_lost=True,
        credentials_refused=True,
    )


def _send_smtp(
    backend: SMTPBackend,
    message: EmailMultiAlternatives | RawEmail,
    *,
    ahead: Envelope | None = None,
) -> SendResult | AwaitingReply:
    if ahead is not None:
        return _exchange(backend, ahead.smtp, ahead.commands, ahead.payload, written=True)
    try:
        backend.open()
    except smtplib.SMTPAuthenticationError as exc:
        _drop(backend)
        return _credentials_refused(exc)
    except Exception as exc:  # noqa: BLE001 - whatever stops us connecting, nothing was sent
        _drop(backend)
        return SendResult(
            Outcome.RETRY,
            f"could not connect to the mail server: {exc!r}",
            connection_lost=True,
            interrupted_by=exc if not isinstance(exc, OSError | smtplib.SMTPException) else None,
        )
    smtp = backend.connection
    from_addr, recipients, payload = _envelope(message)
    commands = [f"MAIL FROM:{from_addr}", *(f"RCPT TO:{r}" for r in recipients), "DATA"]
    return _exchange(backend, smtp, commands, payload, written=False)


def _exchange(
    backend: SMTPBackend, smtp: smtplib.SMTP, commands: list[str], payload: bytes, *, written: bool
) -> SendResult | AwaitingReply:
    """The envelope's replies and the body. ``written``: the envelope was already
    sent (``envelope_ahead``), only its replies are to be read."""
    body_sent = False
    try:
        if written:
            replies = [smtp.getreply() for _ in commands]
        else:
            smtp.ehlo_or_helo_if_needed()
            replies = _envelope_replies(smtp, commands)
        refused = _refusal(commands, replies)
        if refused is not None and replies[0][0] == 421:
            # "421 closing connection" to MAIL: the server is done with this connection.
            _drop(backend)
            return SendResult(
                refused.outcome,
                refused.detail,
                connection_lost=True,
                reconnect_ok=True,
                throttled=True,
            )
        if refused is not None:
            if replies[-1][0] == 354:
                # A pipelined DATA was taken although an earlier command was refused. Ending
                # the data phase could submit something; closing the connection aborts it.
                _hang_up(backend)
            else:
                smtp.rset()
            return refused
        # From here on the server may hold the whole message: silence means "unknown".
        body_sent = True
        data = smtplib._quote_periods(payload)  # type: ignore[attr-defined]
        if data[-2:] != b"\r\n":
            data += b"\r\n"
        smtp.send(data + b".\r\n")
    except (TimeoutError, smtplib.SMTPException, OSError) as exc:
        _drop(backend)
        if body_sent:
            return SendResult(
                Outcome.UNKNOWN, f"no reply after DATA: {exc!r}", connection_lost=True
            )
        return SendResult(
            Outcome.RETRY,
            f"connection failed before DATA: {exc!r}",
            connection_lost=True,
            reconnect_ok=True,
        )
    except BaseException as exc:  # noqa: BLE001 - a soft time limit, say: record, then re-raise
        _drop(backend)
        outcome = Outcome.UNKNOWN if body_sent else Outcome.RETRY
        return SendResult(
            outcome, f"interrupted: {exc!r}", interrupted_by=exc, connection_lost=True
        )
    return AwaitingReply(backend, smtp)


def _send_generic(backend: object, message: EmailMultiAlternatives) -> SendResult:
    """Any other Django backend (django-anymail ESPs, locmem in tests).

    An HTTP API call is all-or-nothing from our side, so only errors that prove the request
    was not accepted are retried or failed; everything else is unknown.
    """
    delivery_id = (getattr(message, "extra_headers", None) or {}).get("X-EdSmart-Delivery")
    if delivery_id:
        # anymail sends this to the provider, which echoes it in every tracking event of the
        # message: ``provider_events`` finds the delivery by it. Other backends ignore it.
        metadata = getattr(message, "metadata", None) or {}
        message.metadata = {**metadata, "edsmart_delivery": str(delivery_id)}  # type: ignore[attr-defined]
    try:
        sent = backend.send_messages([message])  # type: ignore[attr-defined]
    except Exception as exc:  # noqa: BLE001 - classified below, erring towards unknown
        outcome, detail = classify_api_error(exc)
        status_code = getattr(exc, "status_code", None)
        if status_code in (401, 403):
            # A rotated or revoked API key: the provider refused us, not the recipient.
            return SendResult(Outcome.RETRY, detail, credentials_refused=True)
        return SendResult(outcome, detail, throttled=status_code == 429)
    except BaseException as exc:  # noqa: BLE001 - recorded as unknown, then re-raised
        return SendResult(Outcome.UNKNOWN, f"interrupted: {exc!r}", interrupted_by=exc)
    if not sent:
        return SendResult(Outcome.UNKNOWN, "backend reported nothing sent and raised nothing")
    status = getattr(message, "anymail_status", None)
    provider_id = str(getattr(status, "message_id", "") or "") if status else ""
    return SendResult(Outcome.ACCEPTED, provider_id=provider_id[:250])


def classify_api_error(exc: BaseException) -> tuple[Outcome, str]:
    """Map an email-API exception to an outcome, erring towards ``unknown``."""
    name = type(exc).__name__
    detail = f"{name}: {exc}"[:2000]
    if name == "AnymailRecipientsRefused" or name == "AnymailInvalidAddress":
        return Outcome.FAILED, detail
    status_code = getattr(exc, "status_code", None)
    if isinstance(status_code, int):
        if status_code == 429:
            return Outcome.RETRY, detail
        if 400 <= status_code < 500:
            return Outcome.FAILED, detail
        return Outcome.UNKNOWN, detail
    # requests' ConnectionError (but not its ReadTimeout) means the request never arrived.
    chain = [exc, exc.__cause__, exc.__context__]
    for item in chain:
        item_name = type(item).__name__ if item is not None else ""
        if item_name in {"ConnectTimeout", "ConnectionRefusedError", "NewConnectionError"}:
            return Outcome.RETRY, detail
    return Outcome.UNKNOWN, detail
