"""The SMTP exchange, with and without PIPELINING, against the real test server.

The classification must not depend on whether the envelope went in one write: a refusal of
MAIL, RCPT or DATA is definite (nothing was accepted), a refusal after the body is definite
too, and silence after the body is unknown. After a refusal the connection must still carry
the next message, or be dropped; never left in a state that could submit something.
"""

from __future__ import annotations

import socket
import threading

import pytest
from django.core.mail import EmailMultiAlternatives, get_connection

from notifications.mailer import Outcome, RawEmail, send_one

both_modes = pytest.mark.parametrize("pipelining", [False, True], ids=["plain", "pipelined"])


def _raw(to: str) -> RawEmail:
    payload = (
        f"From: school@edsmart.localhost\r\nTo: {to}\r\nSubject: hello\r\n"
        f"Message-ID: <m.{to}>\r\n\r\nHello.\r\n.leading dot\r\n"
    ).encode()
    return RawEmail(from_addr="school@edsmart.localhost", to_addr=to, payload=payload)


def _built(to: str) -> EmailMultiAlternatives:
    return EmailMultiAlternatives(
        "hello", "Hello.", "Our School <school@edsmart.localhost>", [to], headers={"X-A": "1"}
    )


@pytest.fixture
def backend(smtp, settings):
    settings.EMAIL_TIMEOUT = 1
    connection = get_connection(fail_silently=False)
    yield connection
    connection.close()


@both_modes
def test_both_message_forms_are_accepted_over_one_connection(smtp, backend, pipelining):
    smtp.behaviour.pipelining = pipelining
    assert send_one(connection=backend, message=_raw("a@example.org")).outcome is Outcome.ACCEPTED
    first = backend.connection
    assert send_one(connection=backend, message=_built("b@example.org")).outcome is Outcome.ACCEPTED
    assert backend.connection is first
    assert first.has_extn("pipelining") is pipelining
    assert [m.rcpt for m in smtp.accepted] == ["a@example.org", "b@example.org"]
    assert {m.mail_from for m in smtp.accepted} == {"school@edsmart.localhost"}
    assert b"\r\n.leading dot\r\n" in smtp.accepted[0].raw  # dot-stuffing undone by the server


@both_modes
@pytest.mark.parametrize(
    ("field", "reply", "outcome", "detail", "throttled"),
    [
        ("mail_reply", "451 4.7.1 slow down", Outcome.RETRY, "MAIL FROM refused: 451", True),
        ("mail_reply", "550 5.7.1 not you", Outcome.FAILED, "MAIL FROM refused: 550", False),
        ("rcpt_reply", "451 4.3.0 try later", Outcome.RETRY, "RCPT TO refused: 451", True),
        ("rcpt_reply", "452 4.5.3 too many", Outcome.RETRY, "RCPT TO refused: 452", True),
        ("rcpt_reply", "450 4.2.0 busy", Outcome.RETRY, "RCPT TO refused: 450", False),
        ("rcpt_reply", "550 5.1.1 no such user", Outcome.FAILED, "RCPT TO refused: 550", False),
        ("data_reply", "554 5.7.1 spam", Outcome.FAILED, "message refused after DATA: 554", False),
        ("data_reply", "452 4.3.1 full", Outcome.RETRY, "message refused after DATA: 452", True),
    ],
)
def test_refusals_are_definite_and_the_connection_carries_on(
    smtp, backend, pipelining, field, reply, outcome, detail, throttled
):
    smtp.behaviour.pipelining = pipelining
    setattr(smtp.behaviour, field, reply)
    result = send_one(connection=backend, message=_raw("a@example.org"))
    assert result.outcome is outcome
    assert result.throttled is throttled
    assert result.detail.startswith(detail)
    assert smtp.accepted == []
    setattr(smtp.behaviour, field, None)
    assert send_one(connection=backend, message=_raw("b@example.org")).outcome is Outcome.ACCEPTED
    assert [m.rcpt for m in smtp.accepted] == ["b@example.org"]


@both_modes
def test_silence_after_the_body_is_unknown(smtp, backend, pipelining):
    smtp.behaviour.pipelining = pipelining
    smtp.behaviour.stall = 2.5  # past EMAIL_TIMEOUT=1; the server still accepts it
    result = send_one(connection=backend, message=_raw("a@example.org"))
    assert result.outcome is Outcome.UNKNOWN
    assert result.connection_lost
    assert backend.connection is None


def test_data_taken_despite_a_refused_recipient_is_abandoned_not_ended(settings):
    """RFC 2920 servers refuse a pipelined DATA when no recipient was accepted; one that says
    354 anyway must not get the end-of-data dot (it could submit an empty message). Dropping
    the connection aborts the transaction."""
    received: list[bytes] = []
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.sendall(b"220 odd ESMTP\r\n")
            replies = {
                b"EHLO": b"250-odd\r\n250 PIPELINING\r\n",
                b"MAIL": b"250 OK\r\n",
                b"RCPT": b"550 5.1.1 no such user\r\n",
                b"DATA": b"354 go ahead anyway\r\n",
                b"RSET": b"250 OK\r\n",
                b"QUIT": b"221 bye\r\n",
            }
            buffer = b""
            while chunk := conn.recv(65536):
                received.append(chunk)
                buffer += chunk
                while b"\r\n" in buffer:
                    line, buffer = buffer.split(b"\r\n", 1)
                    if line[:4].upper() in replies:
                        conn.sendall(replies[line[:4].upper()])

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    settings.EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    settings.EMAIL_HOST, settings.EMAIL_PORT, settings.EMAIL_TIMEOUT = "127.0.0.1", port, 2
    backend = get_connection(fail_silently=False)
    result = send_one(connection=backend, message=_raw("a@example.org"))
    thread.join(timeout=5)
    listener.close()
    assert result.outcome is Outcome.FAILED
    assert result.detail.startswith("RCPT TO refused: 550")
    assert backend.connection is None
    # Hung up without QUIT: in the data phase it would be a line of the message, and its
    # reply would be awaited until the timeout.
    assert b"QUIT" not in b"".join(received)
    assert not b"".join(received).endswith(b"\r\n.\r\n")
    sent = b"".join(received)
    assert b"DATA\r\n" in sent
    assert b"\r\n.\r\n" not in sent and b"Hello." not in sent
