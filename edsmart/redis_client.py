"""The process's one Redis client for coordination (nudge markers, health, metrics).

Short timeouts: every caller treats Redis as a helper that may be away, never as the truth,
so a Redis that hangs must not hang a batch, a scrape or a health check. redis-py's pool
notices a fork and opens fresh connections in the child, so a client made before Celery
forks its pool is safe to share.
"""

from __future__ import annotations

import redis
from django.conf import settings

# One client per URL, looked up at each call, so a changed REDIS_URL (a test's override, say)
# is followed at once rather than a stale client kept.
_clients: dict[str, redis.Redis] = {}


def redis_client() -> redis.Redis:
    url = settings.REDIS_URL
    client = _clients.get(url)
    if client is None:
        client = _clients[url] = redis.Redis.from_url(
            url, socket_timeout=2, socket_connect_timeout=2
        )
    return client


_scripts: dict[tuple[int, str], redis.commands.core.Script] = {}


def lua_script(source: str) -> redis.commands.core.Script:
    """A Lua script registered once per client: calls send EVALSHA and load it on a miss
    (after a Redis restart, say), so each call is one round trip."""
    client = redis_client()
    key = (id(client), source)
    script = _scripts.get(key)
    if script is None:
        script = _scripts[key] = client.register_script(source)
    return script
