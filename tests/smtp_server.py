"""A real SMTP server on 127.0.0.1 for tests: records every accepted message, injects faults.

Its ``accepted`` list is the ground truth the exactly-once checks compare the database with.
"""

from __future__ import annotations

import asyncio
import email
import socket
import threading
import time
from dataclasses import dataclass, field

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult


@dataclass
class Accepted:
    rcpt: str
    message_id: str
    delivery_id: int | None
    subject: str
    raw: bytes
    mail_from: str = ""
    at: float = field(default_factory=time.time)  # when the 250 went back


@dataclass
class Behaviour:
    """What the server does; tests change it between or during runs."""

    rcpt_reply: str | None = None  # e.g. "450 4.2.0 mailbox busy" or "550 5.1.1 no such user"
    data_reply: str | None = None  # final reply instead of 250
    delay: float = 0.0  # seconds to wait before the final reply (a slow server)
    stall: float = 0.0  # seconds to stall after DATA; the message still counts as accepted
    fail_first: int = 0  # refuse the first N RCPTs with a 450 (mailbox busy), then behave
    throttle_first: int = 0  # refuse the first N RCPTs with a 451 rate limit, then behave
    pipelining: bool = False  # offer PIPELINING (RFC 2920) in the EHLO reply
    mail_reply: str | None = None  # e.g. "451 4.7.1 sender rate limited"
    # Close the connection when the next MAIL comes after this many accepted messages on it,
    # as providers do every N messages (0: never).
    close_every: int = 0
    close_silently: bool = False  # ... without the "421 closing" reply first (an idle timeout)
    refuse_auth: bool = False  # answer AUTH with 535 (credentials rotated or revoked)


@dataclass
class Handler:
    behaviour: Behaviour = field(default_factory=Behaviour)
    accepted: list[Accepted] = field(default_factory=list)
    received_data: int = 0
    rcpt_refusals: int = 0
    closed_connections: int = 0
    ehlos: int = 0  # one per connection the client opened
    logins: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def authenticate(self, server, session, envelope, mechanism, auth_data) -> AuthResult:
        """Any credentials pass unless ``refuse_auth``: then 535, as after a rotation."""
        with self.lock:
            self.logins += 1
        if self.behaviour.refuse_auth:
            return AuthResult(success=False, handled=False)  # aiosmtpd then answers 535
        return AuthResult(success=True)

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        with self.lock:
            self.ehlos += 1
        if self.behaviour.pipelining:
            responses.insert(-1, "250-PIPELINING")
        return responses

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        every = self.behaviour.close_every
        if every and getattr(session, "edsmart_accepted", 0) >= every:
            with self.lock:
                self.closed_connections += 1
            if self.behaviour.close_silently:
                server.transport.close()
                return "421 4.7.0 closing"  # never reaches the client
            # Say so, then hang up, as a provider does at its per-connection limit.
            asyncio.get_running_loop().call_later(0.01, server.transport.close)
            return "421 4.7.0 Too many messages on this connection, closing"
        if self.behaviour.mail_reply:
            return self.behaviour.mail_reply
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        b = self.behaviour
        with self.lock:
            if b.fail_first > 0:
                b.fail_first -= 1
                self.rcpt_refusals += 1
                return "450 4.2.0 Mailbox busy, try again later"
            if b.throttle_first > 0:
                b.throttle_first -= 1
                self.rcpt_refusals += 1
                return "451 4.7.1 Sending rate exceeded, slow down"
        if b.rcpt_reply:
            with self.lock:
                self.rcpt_refusals += 1
            return b.rcpt_reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        b = self.behaviour
        with self.lock:
            self.received_data += 1
        if b.stall:
            await asyncio.sleep(b.stall)
        elif b.delay:
            await asyncio.sleep(b.delay)
        if b.data_reply:
            return b.data_reply
        msg = email.message_from_bytes(envelope.content)
        header = msg.get("X-EdSmart-Delivery")
        session.edsmart_accepted = getattr(session, "edsmart_accepted", 0) + 1
        with self.lock:
            for rcpt in envelope.rcpt_tos:
                self.accepted.append(
                    Accepted(
                        rcpt=rcpt.lower(),
                        message_id=msg.get("Message-ID", ""),
                        delivery_id=int(header) if header else None,
                        subject=str(msg.get("Subject", "")),
                        raw=envelope.content,
                        mail_from=envelope.mail_from,
                    )
                )
        return "250 2.0.0 Ok: queued"

    def reset(self) -> None:
        with self.lock:
            self.behaviour = Behaviour()
            self.accepted.clear()
            self.received_data = 0
            self.rcpt_refusals = 0
            self.ehlos = 0
            self.closed_connections = 0
            self.logins = 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SMTPServer:
    def __init__(self, port: int | None = None) -> None:
        self.handler = Handler()
        self.port = port or free_port()
        # AUTH is offered without TLS (loopback only); clients without credentials skip it.
        self.controller = Controller(
            self.handler,
            hostname="127.0.0.1",
            port=self.port,
            ready_timeout=10,
            authenticator=self.handler.authenticate,
            auth_require_tls=False,
        )

    def start(self) -> SMTPServer:
        self.controller.start()
        return self

    def stop(self) -> None:
        self.controller.stop()

    @property
    def accepted(self) -> list[Accepted]:
        return self.handler.accepted

    @property
    def behaviour(self) -> Behaviour:
        return self.handler.behaviour
