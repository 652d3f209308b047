--[[ acquire.lua: check every limit of one request and, only if all pass, take them all.

Redis runs a script atomically, so N gateway processes together admit no more than each
limit, in one round trip per request. Time is the server's TIME: one clock for every
process (Redis 7 replicates scripts by effects, so TIME before writes is allowed).

KEYS[i]    the bucket of check i
ARGV[1]    lease id (member of the concurrency sets)
ARGV[2]    lease ttl, seconds
ARGV[3]    retry hint for a full concurrency limit, seconds
ARGV[4]    seconds a quota counter is kept after its month ends
ARGV[5..]  per check, 4 values: kind ("r" rate | "c" concurrency | "q" quota), limit,
           window in seconds (rate) or the month's end as unix time (quota), cost
Reply      {allowed 0|1, failed index (0 = none), retry_after, level_1 .. level_n}
           levels are each check's state before this request; retry_after -1 = never.
           Floats go back as strings: Redis truncates Lua numbers to integers.

Rate buckets (GCRA, leaky-bucket form) are hashes {l = level, t = stamp}; concurrency is a
sorted set of lease id -> expiry; a quota is an integer counter per month.
]]

local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local lease = ARGV[1]
local ttl = tonumber(ARGV[2])
local hint = tonumber(ARGV[3])
local keep = tonumber(ARGV[4])
local EPS = 1e-6
local n = #KEYS

local kinds, limits, spans, costs, levels = {}, {}, {}, {}, {}
local failed, retry = 0, 0

for i = 1, n do
  local key = KEYS[i]
  local a = 4 + (i - 1) * 4
  local kind, limit = ARGV[a + 1], tonumber(ARGV[a + 2])
  local span, cost = tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4])
  kinds[i], limits[i], spans[i], costs[i] = kind, limit, span, cost

  local level = 0
  if kind == 'r' then
    local s = redis.call('HMGET', key, 'l', 't')
    if s[1] then
      level = tonumber(s[1])
      if limit > 0 then
        level = math.max(level - math.max(now - tonumber(s[2]), 0) * limit / span, 0)
      end
    end
  elseif kind == 'c' then
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
    level = redis.call('ZCARD', key)
  else
    level = tonumber(redis.call('GET', key) or '0')
  end
  levels[i] = level

  if failed == 0 and level + cost > limit + EPS then
    failed = i
    if cost > limit or (limit <= 0 and kind == 'r') then
      retry = -1
    elseif kind == 'r' then
      retry = (level + cost - limit) * span / limit
    elseif kind == 'c' then
      retry = hint
      local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
      if first[2] then retry = math.min(hint, math.max(tonumber(first[2]) - now, 0)) end
    else
      retry = math.max(span - now, 0)
    end
  end
end

local reply = {0, failed, string.format('%.17g', retry)}
for i = 1, n do reply[3 + i] = string.format('%.17g', levels[i]) end
if failed > 0 then return reply end

for i = 1, n do
  local key, kind, limit, span = KEYS[i], kinds[i], limits[i], spans[i]
  local after = levels[i] + costs[i]
  if kind == 'r' then
    redis.call('HSET', key, 'l', string.format('%.17g', after), 't', string.format('%.17g', now))
    local drain = span
    if limit > 0 then drain = after * span / limit end
    redis.call('PEXPIRE', key, math.ceil(drain * 1000) + 1000)
  elseif kind == 'c' then
    redis.call('ZADD', key, string.format('%.17g', now + ttl), lease)
    redis.call('PEXPIRE', key, math.ceil(ttl * 1000))
  else
    redis.call('SET', key, string.format('%d', after))
    redis.call('EXPIREAT', key, math.ceil(span + keep))
  end
end
reply[1] = 1
return reply
