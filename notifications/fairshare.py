"""Whose turn it is: the order in which send batches take work, kept in Redis for every host.

A send batch works in turns. Each turn it asks here which mailing goes next, claims a small
chunk of that mailing's due deliveries in the database, sends them, and asks again. The
answer follows three rules:
1. an urgent mailing (a closure, an emergency) goes before anything normal;
2. otherwise schools take turns: the school that has had the fewest turns goes next, so one
   school's ten large broadcasts cannot hold back another school's 40-family slip;
3. within a school, its mailings take turns the same way.

The state is three kinds of sorted set: urgent mailings, schools with work, and each school's
mailings, scored by turns taken. A school or mailing that joins starts level with the least
served one already there (as a fair scheduler's "virtual time" does), so a newcomer neither
waits behind the others' history nor gets to replay it. Each operation is one Lua script, so
concurrent batches on several hosts each get a different turn.

This decides only who goes next. The database stays the judge of who sends what: a claim is a
fenced UPDATE, and a mailing listed here with nothing claimable yields an empty claim and is
dropped. Losing this state (Redis restarted empty) loses nothing but the order: the sweeper
re-lists every mailing with due work, and without Redis a batch claims in plain id order.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import redis

from edsmart.redis_client import lua_script, redis_client

URGENT = "edsmart:turns:urgent"
SCHOOLS = "edsmart:turns:schools"
SCHOOL_PREFIX = "edsmart:turns:school:"

_ACTIVATE = """
-- KEYS: urgent, schools, this school's mailings. ARGV: mailing id, school id, urgent (0/1)
local function floor_of(key)
  local low = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  if low[2] then return tonumber(low[2]) end
  return 0
end
if ARGV[3] == '1' then
  redis.call('ZADD', KEYS[1], 'NX', floor_of(KEYS[1]), ARGV[1] .. ':' .. ARGV[2])
  return 1
end
redis.call('ZADD', KEYS[2], 'NX', floor_of(KEYS[2]), ARGV[2])
redis.call('ZADD', KEYS[3], 'NX', floor_of(KEYS[3]), ARGV[1])
return 1
"""

_NEXT = """
-- KEYS: urgent, schools. ARGV: school key prefix. Returns {mailing, school, urgent} or {}.
local u = redis.call('ZRANGE', KEYS[1], 0, 0)
if u[1] then
  redis.call('ZINCRBY', KEYS[1], 1, u[1])
  local sep = string.find(u[1], ':')
  return {string.sub(u[1], 1, sep - 1), string.sub(u[1], sep + 1), 1}
end
for _ = 1, 1000 do
  local s = redis.call('ZRANGE', KEYS[2], 0, 0)
  if not s[1] then return {} end
  local skey = ARGV[1] .. s[1]
  local m = redis.call('ZRANGE', skey, 0, 0)
  if m[1] then
    redis.call('ZINCRBY', KEYS[2], 1, s[1])
    redis.call('ZINCRBY', skey, 1, m[1])
    return {m[1], s[1], 0}
  end
  redis.call('ZREM', KEYS[2], s[1])
end
return {}
"""

_DONE = """
-- KEYS: urgent, schools, this school's mailings. ARGV: mailing id, school id
redis.call('ZREM', KEYS[1], ARGV[1] .. ':' .. ARGV[2])
redis.call('ZREM', KEYS[3], ARGV[1])
if redis.call('ZCARD', KEYS[3]) == 0 then redis.call('ZREM', KEYS[2], ARGV[2]) end
return 1
"""


@dataclass(frozen=True)
class Turn:
    mailing_id: int
    school_id: int
    urgent: bool


def activate(*, mailing_id: int, school_id: int, urgent: bool) -> None:
    """List a mailing as having work. Idempotent: a listed mailing keeps its place.

    Raises ``redis.RedisError``; callers treat that as "the sweeper will list it".
    """
    lua_script(_ACTIVATE)(
        keys=[URGENT, SCHOOLS, f"{SCHOOL_PREFIX}{school_id}"],
        args=[mailing_id, school_id, 1 if urgent else 0],
    )


def next_turn() -> Turn | None:
    """The mailing whose turn it is, charged one turn; None when nothing is listed.

    Raises ``redis.RedisError``; the batch then claims in id order.
    """
    found = lua_script(_NEXT)(keys=[URGENT, SCHOOLS], args=[SCHOOL_PREFIX])
    if not found:
        return None
    return Turn(mailing_id=int(found[0]), school_id=int(found[1]), urgent=bool(int(found[2])))


def finished(turn: Turn) -> None:
    """The mailing had nothing claimable: unlist it (the sweeper lists it again if a retry
    falls due or claims are given back)."""
    # On error the mailing stays listed: that costs one empty claim later.
    with contextlib.suppress(redis.RedisError):
        lua_script(_DONE)(
            keys=[URGENT, SCHOOLS, f"{SCHOOL_PREFIX}{turn.school_id}"],
            args=[turn.mailing_id, turn.school_id],
        )


@dataclass(frozen=True)
class Queue:
    urgent: int
    schools: int


def queue() -> Queue | None:
    """How many urgent mailings and schools are waiting for turns (metrics, ops page)."""
    try:
        client = redis_client()
        return Queue(urgent=client.zcard(URGENT), schools=client.zcard(SCHOOLS))
    except redis.RedisError:
        return None
