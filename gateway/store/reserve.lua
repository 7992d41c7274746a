-- The meter's reservations, each made at most once: a RESERVE of one token bucket under a reservation id, its
-- release (sent when the reservation's answer was lost) and its commit (the FORCE of the real usage less what was
-- reserved). Each can be made again when its own answer is lost and counts once. The bucket arithmetic is the
-- bucket script's own (buckets.lua, put in place of the line below as a function of its KEYS and ARGV), so the two
-- cannot differ, and the admission checks of `maas authz` (buckets.lua alone) pay nothing for this.
-- KEYS: the bucket, the reservation's marker (same hash tag). ARGV: limit, window_ms, cost, min_cost, the marker's
-- TTL in ms, then 'reserve', 'release' or 'commit'. The marker holds the tokens the reservation took, or 'x' once
-- released, followed by 'c' once committed.
-- Reply of a reserve: the bucket script's five integers (a reservation that finds its marker, released or
-- committed before it ran, takes nothing and is denied; one made again finds what it took and answers that). Reply of a release: the tokens given back. Reply of a
-- commit: 1, or 0 when it had been made before.
local function buckets(KEYS, ARGV)
--BUCKETS--
end
local marker, ttl, action = KEYS[2], ARGV[5], ARGV[6]
if action == 'reserve' then
  local ran = redis.call('GET', marker)
  if ran then
    -- a plain number: this reservation made again (its client's retry after a broken connection) answers as it
    -- did, what it took and the bucket's level now (a gate of 0 takes nothing); released or committed: denied
    local taken = tonumber(ran)
    if not taken then return {0, 0, 0, 0, 0} end
    local now = buckets({KEYS[1]}, {'1', '1', ARGV[1], ARGV[2], '0', '1', '0'})
    return {taken > 0 and 1 or 0, now[2], now[3], 0, taken}
  end
  local out = buckets({KEYS[1]}, {'1', '1', ARGV[1], ARGV[2], ARGV[3], '2', ARGV[4]})
  redis.call('SET', marker, out[5], 'PX', ttl)
  return out
end
local held = redis.call('GET', marker) or ''
local committed = string.sub(held, -1) == 'c'
if action == 'commit' then
  if committed then return 0 end
  buckets({KEYS[1]}, {'1', '1', ARGV[1], ARGV[2], ARGV[3], '3', '0'})
  redis.call('SET', marker, held .. 'c', 'PX', ttl)
  return 1
end
redis.call('SET', marker, committed and 'xc' or 'x', 'PX', ttl)
local taken = tonumber(string.match(held, '^%d+'))
if not taken or taken <= 0 then return 0 end
buckets({KEYS[1]}, {'1', '1', ARGV[1], ARGV[2], tostring(-taken), '3', '0'})
return taken
