--[[ limiter.lua: apply pending settlements, then check every limit of one request and, only
if all pass, take them all; atomically, in one round trip.

One script for both jobs, so a gateway process pays one call per request: the settlements
of its finished requests ride on its next admission. A flush of settlements alone is the
same script with no checks (one body of Lua, nothing to drift apart).

Redis runs a script atomically, so N gateway processes together admit no more than each
limit. Time is the server's TIME: one clock for every process (Redis 7 replicates scripts
by effects, so TIME before writes is allowed).

KEYS       the buckets of settlement 1, of settlement 2, ..., then the bucket of each check
ARGV[1]    S, the number of settlements
ARGV[2]    seconds a quota counter is kept after its month ends
ARGV[3]    lease id of the request being admitted (member of the concurrency sets)
ARGV[4]    lease ttl, seconds
ARGV[5]    retry hint for a full concurrency limit, seconds
ARGV[6]    m: the first m checks are a second reservation's, taken with the others or not at
           all (a monthly budget, counted in money, beside the limits counted in tokens), and
           their concurrency sets hold ARGV[7], that reservation's lease id (0 and "": none)
ARGV[7]    the lease id of the first m checks
then       per settlement, in the order they are applied: lease id, delta (actual - reserved
           tokens: negative gives back, positive may go into debt), the reserved tokens, k
           (its number of buckets, each passed once, concurrency sets first; -k when no call
           that carried it before can have run, so its tokens move whatever became of its
           lease), then per bucket 3 values:
           kind ("r" rate | "c" concurrency | "q" quota | "n" renew the lease in this
           concurrency set for ARGV[4] from now, if it is still there | "R", "Q" a seed: raise
           the rate bucket's level or the quota counter to at least delta), limit, window in
           seconds (rate) or the month's end as unix time (quota)
then       per check (the KEYS left after the settlements' ones), 4 values: kind, limit,
           window or month's end (as above), cost; a rate check's kind is "p" when it counts
           requests ("r": tokens): a requests bucket found above its limit (the limit was
           lowered) is brought down to it, so its wait is never longer than one window, where
           tokens owed by a settlement stay owed
Reply      "allowed failed retry_after level_1 .. level_n", one string, the values apart by
           a space: allowed 0|1, failed the index of the check that answers the refusal
           (0 = none): of those that fail, the first quota, else the longest wait, the first
           on a tie (base.answers_refusal); retry_after its wait, -1 = never; levels are each
           check's state before this request.
           One string, not an array: the caller reads it with one split instead of an
           array's item by item; floats as %.17g (exact), which an array would need too
           (Redis truncates Lua numbers to integers). With no checks (a flush): "1 0 0".

Rate buckets (GCRA, leaky-bucket form) are hashes {l = level, t = stamp}; concurrency is a
sorted set of lease id -> expiry; a quota is an integer counter per month.

A reservation charged to a quota is held in Redis until it settles, and a process that dies
cannot settle it: its lease expires, and with it the reservation is given back. Each quota's
charge is kept by its own scope's concurrency set (a real limit's, or a marker: every quota
scope has one), else by the reservation's first, in the hash "<set>|h": lease id -> what the
lease charged to which quota counters ("amount key" lines). A settlement that frees the
lease drops its line; an admission that finds leases expired in a set (or the set gone: it
expires a TTL after its last lease) gives theirs back, before it reads any level, so the
counter it reads holds live reservations only. What was
given back is kept in "<set>|g": a process only cut off from Redis for a TTL, whose
settlement comes after all, is charged it again there, then its own difference.

So a quota counter holds a reservation exactly while its lease or its line is there. A
settlement gives back only what the counter it is applied to holds: one that finds neither
(Redis lost its data: a restart without persistence, a flush) meets a counter begun again,
re-seeded from the usage records, which its request is not in yet; it charges what was used
and gives nothing back (it gave back the whole unused reservation, and clamped at 0 that
wiped out the month's usage). A seed ("Q") raises what a counter holds besides the lines
still charged to it, which the records cannot hold yet; raising the whole counter swallowed
them, and their settlements then gave back what it no longer held.
]]

local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local settlements = tonumber(ARGV[1])
local keep = tonumber(ARGV[2])
local lease = ARGV[3]
local ttl = tonumber(ARGV[4])
local hint = tonumber(ARGV[5])
local split, split_lease = tonumber(ARGV[6]), ARGV[7]
local EPS = 1e-6
local held_until = math.ceil(now + keep + 31 * 86400)  -- "<set>|h" and "|g": past any month

-- The level of rate bucket `key` drained up to now (0 when it does not exist).
local function drained(key, limit, span)
  local s = redis.call('HMGET', key, 'l', 't')
  if not s[1] then return 0 end
  local level = tonumber(s[1])
  if limit > 0 then
    level = math.max(level - math.max(now - tonumber(s[2]), 0) * limit / span, 0)
  end
  return level
end

-- Store rate bucket `key` at `level`, expiring once it has drained (plus a second).
local function store(key, level, limit, span)
  redis.call('HSET', key, 'l', string.format('%.17g', level), 't', string.format('%.17g', now))
  local drain = span
  if limit > 0 then drain = level * span / limit end
  redis.call('PEXPIRE', key, math.ceil(drain * 1000) + 1000)
end

-- Add `sign` times each charge of `charged` (lines of "amount key") to its quota counter,
-- never below 0; a counter gone (its month is over) stays gone.
local function charge(charged, sign)
  for amount, key in string.gmatch(charged, '(%d+) ([^\n]+)') do
    if redis.call('EXISTS', key) == 1 then
      local left = redis.call('INCRBY', key, sign * tonumber(amount))
      if left < 0 then redis.call('INCRBY', key, -left) end
    end
  end
end

-- Give back what the dead leases `owners` of concurrency set `set` charged, and keep it in
-- "<set>|g": a settlement that comes after all (its process was cut off from Redis for a
-- TTL, not dead) charges it again, and then its own difference.
local function give_back(set, owners)
  local held, given = set .. '|h', set .. '|g'
  for _, owner in ipairs(owners) do
    local charged = redis.call('HGET', held, owner)
    if charged then
      charge(charged, -1)
      redis.call('HDEL', held, owner)
      redis.call('HSET', given, owner, charged)
      redis.call('EXPIREAT', given, held_until)
    end
  end
end

-- Drop the expired leases of concurrency set `key`, giving back what they charged; when the
-- set is gone, every lease in its hash was (it outlives its last lease by a TTL).
local function prune(key)
  local dead = redis.call('ZRANGEBYSCORE', key, '-inf', now)
  if #dead > 0 then
    give_back(key, dead)
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  end
  local live = redis.call('ZCARD', key)
  if live == 0 and redis.call('EXISTS', key .. '|h') == 1 then
    give_back(key, redis.call('HKEYS', key .. '|h'))
  end
  return live
end

-- 1. Settlements, in order: charge the real tokens instead of the reserved ones and free
-- the concurrency slot of each finished request. A settlement's slots come first: when it
-- holds one and a call that carried it before may have run, its tokens are moved only if a
-- slot was still there to free, so it applies once.
local k, a = 0, 7
for _ = 1, settlements do
  local owner, delta, reserved = ARGV[a + 1], tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  local count = tonumber(ARGV[a + 4])
  local leased, freed, sure = false, false, count < 0
  if sure then count = -count end
  a = a + 4
  for _ = 1, count do
    k = k + 1
    local key = KEYS[k]
    local kind, limit, span = ARGV[a + 1], tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
    a = a + 3
    if kind == 'c' then
      leased = true
      if redis.call('ZREM', key, owner) == 1 then
        freed = true
        redis.call('HDEL', key .. '|h', owner)
      else
        local given = redis.call('HGET', key .. '|g', owner)
        if given then  -- its lease expired and its charges were given back: not applied yet
          charge(given, 1)
          redis.call('HDEL', key .. '|g', owner)
          freed = true
        elseif redis.call('HDEL', key .. '|h', owner) == 1 then
          freed = true  -- its set expired before anyone gave its charges back: not applied yet
        end
      end
    elseif kind == 'n' then
      if redis.call('ZSCORE', key, owner) then
        redis.call('ZADD', key, string.format('%.17g', now + ttl), owner)
        redis.call('PEXPIRE', key, math.ceil(ttl * 1000))
      end
    elseif kind == 'R' then
      if delta > drained(key, limit, span) then store(key, delta, limit, span) end
    elseif kind == 'Q' then
      -- Raise the counter less the reservations still charged to it (their lines, in its
      -- scope's set: a marker's when the scope has no limit of its own) to at least delta.
      local held = 0
      for _, lines in ipairs(redis.call('HVALS', string.sub(key, 1, -11) .. '|c|h')) do
        for amount, charged in string.gmatch(lines, '(%d+) ([^\n]+)') do
          if charged == key then held = held + tonumber(amount) end
        end
      end
      if delta + held > tonumber(redis.call('GET', key) or '0') then
        redis.call('SET', key, string.format('%d', delta + held))
        redis.call('EXPIREAT', key, math.ceil(span + keep))
      end
    elseif leased and not freed and not sure then
      -- applied before (or its lease expired): its tokens were settled then
    elseif kind == 'r' then
      local level = drained(key, limit, span) + delta
      if level > 0 then
        store(key, level, limit, span)
      else
        redis.call('DEL', key)
      end
    else
      -- A quota counter. Its lease or its line not found on a first send: Redis lost them,
      -- and the counter (begun again) holds none of the reservation: what was used is charged.
      local change = delta
      if leased and not freed then change = reserved + delta end
      local used = redis.call('GET', key)
      if used or change > 0 then
        redis.call('SET', key, string.format('%d', math.max(tonumber(used or '0') + change, 0)))
        redis.call('EXPIREAT', key, math.ceil(span + keep))
      end
    end
  end
end

-- 2. The admission: check every limit; take them all only if all pass. First the
-- concurrency sets are pruned, which may give quota back (see above).
local n = #KEYS - k
local kinds, limits, spans, costs, levels = {}, {}, {}, {}, {}
local failed, retry = 0, 0
local TIE = 1e-6  -- seconds within which two waits are equal (base.RESET_TIE)

for i = 1, n do
  local b = a + (i - 1) * 4
  if ARGV[b + 1] == 'c' then levels[i] = prune(KEYS[k + i]) end
end

for i = 1, n do
  local key = KEYS[k + i]
  local b = a + (i - 1) * 4
  local kind, limit = ARGV[b + 1], tonumber(ARGV[b + 2])
  local span, cost = tonumber(ARGV[b + 3]), tonumber(ARGV[b + 4])
  kinds[i], limits[i], spans[i], costs[i] = kind, limit, span, cost

  local level = 0
  if kind == 'r' or kind == 'p' then
    level = drained(key, limit, span)
    if kind == 'p' and level > limit and limit > 0 then
      level = limit
      store(key, level, limit, span)
    end
  elseif kind == 'c' then
    level = levels[i]  -- pruned above
  else
    level = tonumber(redis.call('GET', key) or '0')
  end
  levels[i] = level

  -- A refusal is answered by a quota (the first), else by the longest wait (the first on a
  -- tie): waiting it lets the request through as far as every limit that refused goes.
  if level + cost > limit + EPS and (failed == 0 or kinds[failed] ~= 'q') then
    local wait
    if cost > limit or (limit <= 0 and (kind == 'r' or kind == 'p')) then
      wait = math.huge
    elseif kind == 'r' or kind == 'p' then
      wait = (level + cost - limit) * span / limit
    elseif kind == 'c' then
      wait = hint
      local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
      if first[2] then wait = math.min(hint, math.max(tonumber(first[2]) - now, 0)) end
    else
      wait = math.max(span - now, 0)
    end
    if failed == 0 or kind == 'q' or wait > retry + TIE then
      failed, retry = i, wait
    end
  end
end
if retry == math.huge then retry = -1 end

local reply = {0, failed, string.format('%.17g', retry)}
for i = 1, n do reply[3 + i] = string.format('%.17g', levels[i]) end
if failed > 0 then return table.concat(reply, ' ') end

-- Per reservation (1: the first `split` checks', 2: the others'), its concurrency sets by
-- scope (a set's key less "|c") and its first, and its quota charges, to hold until it
-- settles: each charge in its own scope's set (an account's quota in the account's set, which
-- every key of the account prunes), else in the first.
local holder, sets, charges = {}, {{}, {}}, {{}, {}}
for i = 1, n do
  local key, kind, limit, span = KEYS[k + i], kinds[i], limits[i], spans[i]
  local after = levels[i] + costs[i]
  local r = 2
  if i <= split then r = 1 end
  if kind == 'r' or kind == 'p' then
    store(key, after, limit, span)
  elseif kind == 'c' then
    local owner = lease
    if i <= split then owner = split_lease end
    redis.call('ZADD', key, string.format('%.17g', now + ttl), owner)
    redis.call('PEXPIRE', key, math.ceil(ttl * 1000))
    if not holder[r] then holder[r] = key end
    sets[r][string.sub(key, 1, -3)] = key
  else
    redis.call('SET', key, string.format('%d', after))
    redis.call('EXPIREAT', key, math.ceil(span + keep))
    if costs[i] > 0 then  -- the scope is the key less "|q|YYYY-MM"
      table.insert(charges[r], {string.sub(key, 1, -11), string.format('%d', costs[i]) .. ' ' .. key})
    end
  end
end
for r = 1, 2 do
  if holder[r] and #charges[r] > 0 then
    local owner = lease
    if r == 1 then owner = split_lease end
    local lines = {}
    for _, c in ipairs(charges[r]) do
      local set = sets[r][c[1]] or holder[r]
      lines[set] = (lines[set] and lines[set] .. '\n' or '') .. c[2]
    end
    for set, text in pairs(lines) do
      redis.call('HSET', set .. '|h', owner, text)
      redis.call('EXPIREAT', set .. '|h', held_until)
    end
  end
end
reply[1] = 1
return table.concat(reply, ' ')
