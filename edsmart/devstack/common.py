"""What every part of the dev stack shares: where the project and its state live, the host the
services listen on, and small port and URL helpers."""

from __future__ import annotations

import socket
import sys
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parent.parent.parent
STATE_DIR = ROOT / ".devstack"
DATABASE_NAME = "edsmart"
LOCALHOST = "127.0.0.1"


def log(message: str) -> None:
    print(f"devstack | {message}", file=sys.stderr, flush=True)


def port_open(port: int, host: str = LOCALHOST, timeout: float = 0.5) -> bool:
    """Whether something accepts TCP connections there."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def free_port(host: str = LOCALHOST) -> int:
    """A port nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_or_free(preferred: int, host: str = LOCALHOST) -> int:
    """The preferred port when it is free, else any free one: a second stack or an unrelated
    service on 8000 should not stop a newcomer's first run."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, preferred))
        return preferred
    except OSError:
        return free_port(host)


def mask_url(url: str) -> str:
    """The URL without its password, for printing."""
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url
