"""A minimal SMTP sink for benchmarks: accepts everything, counts messages, keeps nothing.

Run as ``python bench/smtp_sink.py PORT [--no-pipelining]``; it prints ``ready``, then the
count on SIGTERM. It offers PIPELINING (RFC 2920) as Postfix and the big providers do, unless
told not to.

It speaks just enough SMTP (EHLO/HELO, MAIL, RCPT, DATA, RSET, NOOP, QUIT) over a bare
asyncio protocol. aiosmtpd, which the tests use for its fault injection, costs about 4 ms of
server CPU per message on this machine and would make the sink the thing measured; baseline
and pipeline both send here, so neither is favoured.
"""

from __future__ import annotations

import asyncio
import signal
import sys

DATA_END = b"\r\n.\r\n"


class SinkProtocol(asyncio.Protocol):
    accepted = 0
    ehlo = b"250-sink\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SMTPUTF8\r\n"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.buffer = b""
        self.in_data = False
        self.rcpts = 0
        transport.write(b"220 sink ESMTP\r\n")

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            if self.in_data:
                end = self.buffer.find(DATA_END)
                if end < 0:
                    return
                self.buffer = self.buffer[end + len(DATA_END) :]
                self.in_data = False
                SinkProtocol.accepted += self.rcpts
                self.rcpts = 0
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
                self.transport.write(b"250 OK\r\n")
            else:  # HELO, MAIL, NOOP
                self.transport.write(b"250 OK\r\n")


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(SinkProtocol, "127.0.0.1", port)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    print("ready", flush=True)
    await stop.wait()
    server.close()
    print(f"accepted {SinkProtocol.accepted}", flush=True)


if __name__ == "__main__":
    if "--no-pipelining" in sys.argv:
        SinkProtocol.ehlo = SinkProtocol.ehlo.replace(b"250-PIPELINING\r\n", b"")
    asyncio.run(serve(int(sys.argv[1])))
