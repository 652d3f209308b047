--[[ seed.lua: raise monthly quota counters to at least the usage the database recorded.

A Redis that restarted without persistence has lost every quota counter; seeding them again
from the usage records keeps an account from getting its month's quota back. A counter is
never lowered: what Redis counted since is the usage of requests not all recorded yet, and
a second process seeding the same month changes nothing.

KEYS       the quota counters
ARGV[1]    unix time at which the counters expire (the month's end plus the retention)
then       per counter, the tokens recorded this month
Reply      how many counters were raised
]]

local expires = tonumber(ARGV[1])
local raised = 0
for i, key in ipairs(KEYS) do
  local used = tonumber(ARGV[i + 1])
  if used > tonumber(redis.call('GET', key) or '0') then
    redis.call('SET', key, string.format('%d', used))
    redis.call('EXPIREAT', key, math.ceil(expires))
    raised = raised + 1
  end
end
return raised
