"""A minimal SMTP sink for benchmarks: accepts everything, counts messages, keeps nothing.

Run as ``python bench/smtp_sink.py PORT [--no-pipelining] [--record FILE]``; it prints
``ready``, then on SIGTERM ``messages M bytes B received R`` (the messages' size as sent, so
that a benchmark can show its contenders sent emails of a size, and every byte clients sent,
commands included: bench/capacity.py's bytes per email) and, last, ``accepted N`` (recipients).
It offers PIPELINING (RFC 2920) as Postfix and the big providers do, unless told not to. With
``--record FILE`` (bench/soak.py) it also appends one line per accepted recipient, written out
as the 250 goes back: the acceptance time (Unix seconds), the message's ``X-EdSmart-Delivery``
header (``-`` when it has none) and the RCPT address (``-`` when unreadable), separated by
spaces.

It speaks just enough SMTP (EHLO/HELO, MAIL, RCPT, DATA, RSET, NOOP, QUIT) over a bare
asyncio protocol. aiosmtpd, which the tests use for its fault injection, costs about 4 ms of
server CPU per message on this machine and would make the sink the thing measured; every
contender in bench/send_throughput.py sends here, so none is favoured.
"""

from __future__ import annotations

import asyncio
import re
import signal
import sys
import time
from typing import BinaryIO

DATA_END = b"\r\n.\r\n"
DELIVERY_HEADER = re.compile(rb"\r\nX-EdSmart-Delivery:[ \t]*(\d+)", re.IGNORECASE)
RCPT_ADDRESS = re.compile(rb"<([^>]*)>")


class SinkProtocol(asyncio.Protocol):
    accepted = 0
    messages = 0
    message_bytes = 0  # DATA content as sent (dot-stuffed), without the terminating "."
    received_bytes = 0  # everything clients sent: commands, envelopes and message content
    ehlo = b"250-sink\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SMTPUTF8\r\n"
    record: BinaryIO | None = None  # --record: one line per accepted recipient

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.buffer = b""
        self.in_data = False
        self.rcpts = 0
        self.rcpt_addresses: list[bytes] = []
        transport.write(b"220 sink ESMTP\r\n")

    def data_received(self, data: bytes) -> None:
        SinkProtocol.received_bytes += len(data)
        self.buffer += data
        while True:
            if self.in_data:
                end = self.buffer.find(DATA_END)
                if end < 0:
                    return
                if SinkProtocol.record is not None:
                    self.write_record(self.buffer[:end])
                self.buffer = self.buffer[end + len(DATA_END) :]
                self.in_data = False
                SinkProtocol.accepted += self.rcpts
                SinkProtocol.messages += 1
                # The CRLF kept in front stands in for the last line's, which DATA_END holds.
                SinkProtocol.message_bytes += end
                self.rcpts = 0
                self.rcpt_addresses = []
                self.transport.write(b"250 2.0.0 Ok: queued\r\n")
                continue
            line_end = self.buffer.find(b"\r\n")
            if line_end < 0:
                return
            line, self.buffer = self.buffer[:line_end], self.buffer[line_end + 2 :]
            verb = line[:4].upper()
            if verb == b"EHLO":
                self.transport.write(self.ehlo)
            elif verb == b"RCPT":
                self.rcpts += 1
                if SinkProtocol.record is not None:
                    found = RCPT_ADDRESS.search(line)
                    self.rcpt_addresses.append(found.group(1) if found and found.group(1) else b"-")
                self.transport.write(b"250 OK\r\n")
            elif verb == b"DATA":
                self.in_data = True
                # The body may already be in the buffer: keep the line break before it.
                self.buffer = b"\r\n" + self.buffer
                self.transport.write(b"354 End data with <CR><LF>.<CR><LF>\r\n")
            elif verb == b"QUIT":
                self.transport.write(b"221 Bye\r\n")
                self.transport.close()
                return
            elif verb == b"RSET":
                self.rcpts = 0
                self.rcpt_addresses = []
                self.transport.write(b"250 OK\r\n")
            else:  # HELO, MAIL, NOOP
                self.transport.write(b"250 OK\r\n")

    def write_record(self, content: bytes) -> None:
        """One line per recipient of the message just accepted (``content`` starts with the
        CRLF kept before the body, so the first header is found like the others)."""
        headers_end = content.find(b"\r\n\r\n", 2)
        if headers_end < 0:
            headers_end = len(content)
        found = DELIVERY_HEADER.search(content, 0, headers_end)
        delivery = found.group(1) if found else b"-"
        now = f"{time.time():.6f}".encode()
        record = SinkProtocol.record
        assert record is not None
        for address in self.rcpt_addresses or [b"-"] * self.rcpts:
            record.write(b"%s %s %s\n" % (now, delivery, address))
        record.flush()  # a reader may count lines at any moment


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(SinkProtocol, "127.0.0.1", port)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    print("ready", flush=True)
    await stop.wait()
    server.close()
    if SinkProtocol.record is not None:
        SinkProtocol.record.close()
    print(
        f"messages {SinkProtocol.messages} bytes {SinkProtocol.message_bytes} "
        f"received {SinkProtocol.received_bytes}"
    )
    print(f"accepted {SinkProtocol.accepted}", flush=True)


if __name__ == "__main__":
    if "--no-pipelining" in sys.argv:
        SinkProtocol.ehlo = SinkProtocol.ehlo.replace(b"250-PIPELINING\r\n", b"")
    if "--record" in sys.argv:
        SinkProtocol.record = open(sys.argv[sys.argv.index("--record") + 1], "ab")  # noqa: SIM115
    asyncio.run(serve(int(sys.argv[1])))
