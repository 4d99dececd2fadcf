"""The shared send rate: one bucket in Redis that every worker process on every host draws from.

Providers cap the send rate per account (Amazon SES starts at 14 emails/s), so the cap is
global, not per worker: ``EDSMART_SEND_RATE`` emails per second (0 = no cap). Each email's start
first reserves a slot here. The slot is a GCRA "theoretical arrival time" kept in one hash and
moved by one Lua script, so two workers on two hosts can never take the same slot, and the
slots are spaced 1/rate apart whatever the number of workers.

Why a short script and not the ``limits`` library: ``limits`` answers "may I, now?" (a hit
that succeeds or fails), so a worker over the limit must poll; the script here hands out the
next free slot and the worker sleeps exactly until it, and the same script carries the
throttling state below, which ``limits`` has no notion of. Slots are handed out at most
``RESERVE_AHEAD`` seconds ahead, so a worker that dies or pauses after reserving wastes a few
slots (the rate dips) and never lets the rate exceed the cap.

Throttling replies (SMTP 421/451/452, API 429) are the provider saying "slower": the effective
rate halves (at most once a second, so that the replies to emails already in flight count as
one signal) and then climbs back linearly to its ceiling over
``EDSMART_SEND_RATE_RECOVERY_SECONDS``: additive increase, multiplicative decrease. With no cap
set, the ceiling is the rate the fleet was achieving when the first throttle came (counted
here, once per chunk of emails), and the limiter switches itself off again once recovered.

When Redis is unreachable and a cap is set, sending waits: exceeding a provider's cap gets an
account suspended, which is worse than a delay. The database, not this bucket, decides which
email is sent: a lost or doubled slot changes the pace, never who gets what.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import redis
from django.conf import settings

from edsmart.redis_client import lua_script

log = logging.getLogger("edsmart.ratelimit")

KEY = "edsmart:rate"
# How far ahead a slot may be handed out. Short, so that a worker that reserves and then
# stops wastes little, and so that a newly due urgent message is not queued behind slots
# reserved long ago.
RESERVE_AHEAD = 0.25
# How long a worker waits before asking Redis again after an error.
REDIS_RETRY = 0.5

_SCRIPT = """
local key = KEYS[1]
local op = ARGV[1]
local cap = tonumber(ARGV[2])
local recovery = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local s = redis.call('HMGET', key, 'tat', 'b_rate', 'b_at', 'ceiling', 'w_start', 'w_count',
                     'seen')
local tat = tonumber(s[1]) or 0
local b_rate = tonumber(s[2])
local b_at = tonumber(s[3]) or 0
local ceiling = tonumber(s[4])
local w_start = tonumber(s[5])
local w_count = tonumber(s[6]) or 0
local seen = tonumber(s[7]) or 0

-- The rate in force now: the cap, or a backed-off rate climbing back towards its ceiling.
local rate = cap
if b_rate and ceiling then
  local climbed = b_rate + (ceiling / 2) / recovery * (now - b_at)
  if climbed >= ceiling then
    redis.call('HDEL', key, 'b_rate', 'b_at', 'ceiling')
    b_rate = nil
  else
    rate = climbed
    if cap > 0 and rate > cap then rate = cap end
  end
end

if op == 'reserve' then
  local ahead = tonumber(ARGV[4])
  if rate <= 0 then return {1, '0', tostring(rate)} end
  local slot = math.max(tat, now)
  local wait = slot - now
  if wait > ahead then return {0, tostring(wait), tostring(rate)} end
  redis.call('HSET', key, 'tat', slot + 1 / rate)
  return {1, tostring(wait), tostring(rate)}
elseif op == 'note' then
  -- A chunk of emails went out: count them towards the fleet's observed rate (used as the
  -- ceiling when no cap is set), and say whether a limit is in force.
  local n = tonumber(ARGV[4])
  if not w_start or now - w_start > 5 then
    redis.call('HSET', key, 'w_start', now, 'w_count', n)
  elseif now - w_start >= 1 then
    redis.call('HSET', key, 'seen', (w_count + n) / (now - w_start), 'w_start', now,
               'w_count', 0)
  else
    redis.call('HINCRBY', key, 'w_count', n)
  end
  return {rate > 0 and 1 or 0, '0', tostring(rate)}
elseif op == 'backoff' then
  redis.call('HINCRBY', key, 'throttles', 1)
  if b_rate and now - b_at < 1 then return {0, '0', tostring(rate)} end
  local base = rate
  local top = ceiling
  if not top then
    if cap > 0 then top = cap else top = seen end
  end
  if base <= 0 then base = top end
  if not base or base <= 0 then return {0, '0', tostring(rate)} end
  local halved = math.max(base / 2, 0.5)
  redis.call('HSET', key, 'b_rate', halved, 'b_at', now, 'ceiling', top)
  return {1, '0', tostring(halved)}
else
  local throttles = redis.call('HGET', key, 'throttles') or '0'
  return {b_rate and 1 or 0, throttles, tostring(rate)}
end
"""


def _call(op: str, arg: float = 0) -> tuple[int, float, float]:
    ok, value, rate = lua_script(_SCRIPT)(
        keys=[KEY],
        args=[
            op,
            settings.EDSMART_SEND_RATE,
            settings.EDSMART_SEND_RATE_RECOVERY_SECONDS,
            arg,
        ],
    )
    return int(ok), float(value), float(rate)


def capped() -> bool:
    return settings.EDSMART_SEND_RATE > 0


class RateWaitTimeout(RuntimeError):
    """No slot could be had before the caller's deadline (a slow cap, or Redis away)."""


def acquire(*, deadline: float) -> float:
    """Wait for this email's slot in the shared rate. Returns the seconds waited.

    Raises ``RateWaitTimeout`` when the slot would come after ``deadline`` (``time.monotonic``),
    so that the batch can give its claims back instead of holding them; with Redis away it
    keeps waiting (never sending over the cap) until then.
    """
    waited = 0.0
    while True:
        try:
            ok, wait, _ = _call("reserve", RESERVE_AHEAD)
        except redis.RedisError:
            log.warning("Redis unreachable: holding sends until the shared rate is back")
            ok, wait = 0, REDIS_RETRY
        pause = wait if ok else min(wait, RESERVE_AHEAD)
        if time.monotonic() + pause > deadline:
            raise RateWaitTimeout(f"no send slot before the batch's deadline (next: {wait:.2f} s)")
        if pause > 0:
            time.sleep(pause)
            waited += pause
        if ok:
            return waited


def note_sent(count: int) -> bool:
    """Count ``count`` emails towards the observed rate; True when a limit is in force now.

    Called once per chunk, not per email, when no cap is set: the one Redis round trip per
    chunk is how an uncapped fleet learns that a throttle reply engaged the limiter.
    """
    try:
        return bool(_call("note", count)[0])
    except redis.RedisError:
        return False


def backoff(*, detail: str) -> float:
    """The provider throttled us: halve the shared rate. Returns the rate now in force."""
    try:
        changed, _, rate = _call("backoff")
    except redis.RedisError:
        log.warning("Redis unreachable: could not back the shared rate off (%s)", detail)
        return 0.0
    if changed:
        log.warning(
            "provider throttled sending (%s): shared rate backed off to %.1f emails/s",
            detail,
            rate,
            extra={"send_rate": rate},
        )
    return rate


@dataclass(frozen=True)
class RateState:
    cap: float  # EDSMART_SEND_RATE, 0 = none
    effective: float  # the rate in force now; 0 = no limit
    backed_off: bool  # a throttle reply lowered it and it is still climbing back
    throttles: int  # throttle replies counted since Redis last started empty
    reachable: bool


def state() -> RateState:
    """For /metrics and the ops page."""
    cap = float(settings.EDSMART_SEND_RATE)
    try:
        backed_off, throttles, rate = _call("state")
    except redis.RedisError:
        return RateState(cap=cap, effective=cap, backed_off=False, throttles=0, reachable=False)
    return RateState(
        cap=cap,
        effective=rate,
        backed_off=bool(backed_off),
        throttles=int(throttles),
        reachable=True,
    )
