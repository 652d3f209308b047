--[[ settle.lua: after the call, charge the real tokens instead of the reserved ones and
free the concurrency slot, in one round trip.

KEYS[i]    the bucket of check i (the caller passes each bucket once)
ARGV[1]    lease id
ARGV[2]    seconds a quota counter is kept after its month ends
ARGV[3..]  per check, 3 values: kind ("r" rate | "c" concurrency | "q" quota), limit,
           window in seconds (rate) or the month's end as unix time (quota)
ARGV[last] delta = actual - reserved tokens (negative gives back, positive may go into debt)
Reply      1
]]

local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local lease = ARGV[1]
local keep = tonumber(ARGV[2])
local delta = tonumber(ARGV[#ARGV])

for i = 1, #KEYS do
  local key = KEYS[i]
  local a = 2 + (i - 1) * 3
  local kind, limit, span = ARGV[a + 1], tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  if kind == 'c' then
    redis.call('ZREM', key, lease)
  elseif kind == 'r' then
    local s = redis.call('HMGET', key, 'l', 't')
    local level = 0
    if s[1] then
      level = tonumber(s[1])
      if limit > 0 then
        level = math.max(level - math.max(now - tonumber(s[2]), 0) * limit / span, 0)
      end
    end
    level = level + delta
    if level > 0 then
      redis.call('HSET', key, 'l', string.format('%.17g', level), 't', string.format('%.17g', now))
      local drain = span
      if limit > 0 then drain = level * span / limit end
      redis.call('PEXPIRE', key, math.ceil(drain * 1000) + 1000)
    else
      redis.call('DEL', key)
    end
  else
    local used = redis.call('GET', key)
    if used or delta > 0 then
      redis.call('SET', key, string.format('%d', math.max(tonumber(used or '0') + delta, 0)))
      redis.call('EXPIREAT', key, math.ceil(span + keep))
    end
  end
end
return 1
