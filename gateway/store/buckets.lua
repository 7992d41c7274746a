-- Token buckets, the same rules as gateway/limits.py, on Redis's clock.
-- One call checks one or more independent groups; each group holds the buckets of one API key and is
-- all-or-nothing. KEYS: every bucket key, in order. ARGV: n_groups, then per group: n_ops, then per op:
-- limit, window_ms, cost, mode (0 take, 1 gate, 2 reserve, 3 force), min_cost.
-- Reply: per op, five integers: allowed, remaining, reset_ms, retry_ms, debited.
-- A bucket's state is one string, "<tokens> <ms timestamp>", expiring when the bucket would be full again
-- (a GET and a SET PX per take; earlier versions kept a hash {t, ts}, still read until the next take rewrites it;
-- a state of any other shape reads as a full bucket).
-- Written for a cold cache (a check at low load finds Redis idle): no closures or tables made per call beyond
-- the reply and one scratch table, the refill and wait times inline.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local floor, ceil, min, max = math.floor, math.ceil, math.min, math.max
local call, try, find, sub, tonumber = redis.call, redis.pcall, string.find, string.sub, tonumber
local out = {}
local s = {}  -- eight values per op of the current group: limit, window, cost, mode, min_cost, level, debit, and
-- whether its state is stamped later than now (written under a clock that was ahead: a primary before a failover to
-- a node whose clock is behind, or Redis's clock before it stepped back): restamped now even if nothing is taken,
-- or it would not refill until the clock caught up with the stamp
local o, a, k = 0, 2, 0
for _ = 1, tonumber(ARGV[1]) do
  local n = tonumber(ARGV[a]); a = a + 1
  local ok = true
  local j = 0
  for i = 1, n do
    local lim, win, c, m = tonumber(ARGV[a]), tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
    local mc = tonumber(ARGV[a + 4])
    a = a + 5
    local st = try('GET', KEYS[k + i])
    local lv = lim
    local ahead = false
    if st then
      local tokens, ts
      if type(st) == 'table' then  -- WRONGTYPE: a bucket stored as a hash by an earlier version
        local h = try('HMGET', KEYS[k + i], 't', 'ts')
        tokens, ts = tonumber(h[1]), tonumber(h[2])
      else
        local sp = find(st, ' ', 1, true)
        if sp then tokens, ts = tonumber(sub(st, 1, sp - 1)), tonumber(sub(st, sp + 1)) end
      end
      if not (tokens and ts) then
        -- a state this version cannot read (another version's layout): a full bucket, as a missing one, rewritten
        -- by the next take; an error here would fail every check of the call, other keys' too
        lv = lim
      else
        ahead = ts > now
        if lim <= 0 then
          lv = min(tokens, 0)
        else
          lv = min(lim, tokens + max(0, now - ts) * lim / win)
        end
      end
    end
    local good, d
    if m == 0 then
      good = lv >= c and lim > 0; d = good and c or 0
    elseif m == 1 then
      good = lv >= c and lim > 0; d = 0
    elseif m == 2 then
      d = max(0, min(c, floor(lv))); good = d >= mc and d > 0
    else
      good = true; d = c
    end
    s[j + 1], s[j + 2], s[j + 3], s[j + 4], s[j + 5], s[j + 6], s[j + 7], s[j + 8] = lim, win, c, m, mc, lv, d, ahead
    j = j + 8
    ok = ok and good
  end
  j = 0
  for i = 1, n do
    local lim, win, c, m, mc, lv, d = s[j + 1], s[j + 2], s[j + 3], s[j + 4], s[j + 5], s[j + 6], s[j + 7]
    local ahead = s[j + 8]
    j = j + 8
    local taken = ok and d or 0
    local after = min(lim, lv - taken)
    local retry = 0
    if (not ok) and m ~= 3 then
      local need = c
      if m == 2 then need = max(mc, 1) end
      need = max(need, 1)
      if after < need then retry = lim <= 0 and win or ceil((need - after) * win / lim - 1e-6) end
    end
    local reset = 0
    if after < lim then reset = lim <= 0 and win or ceil((lim - after) * win / lim - 1e-6) end
    if taken == 0 and not ahead then
      -- nothing taken (a gate, or a denied group): the stored state already refills to the same level
    elseif after >= lim then
      call('DEL', KEYS[k + i])
    else
      call('SET', KEYS[k + i], after .. ' ' .. now, 'PX', reset + 1000)
    end
    local remaining = floor(after)
    if remaining < 0 then remaining = 0 end
    out[o + 1], out[o + 2], out[o + 3], out[o + 4], out[o + 5] = ok and 1 or 0, remaining, reset, retry, taken
    o = o + 5
  end
  k = k + n
end
return out
