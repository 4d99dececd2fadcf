"""A minimal SMTP sink for benchmarks: accepts everything, counts messages, keeps nothing.

Run as ``python bench/smtp_sink.py PORT``; it prints the count on SIGTERM. aiosmtpd is the
same server the tests use, so baseline and pipeline pay the same per-message server cost.
"""

from __future__ import annotations

import asyncio
import signal
import sys

from aiosmtpd.controller import Controller


class Counter:
    def __init__(self) -> None:
        self.count = 0

    async def handle_DATA(self, server, session, envelope) -> str:
        self.count += len(envelope.rcpt_tos)
        return "250 OK"


def main() -> None:
    port = int(sys.argv[1])
    handler = Counter()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    print("ready", flush=True)
    stop = asyncio.Event()
    loop = asyncio.new_event_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.run_until_complete(stop.wait())
    controller.stop()
    print(f"accepted {handler.count}", flush=True)


if __name__ == "__main__":
    main()
