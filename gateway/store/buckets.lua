-- Token buckets, the same rules as gateway/limits.py, on Redis's clock.
-- One call checks one or more independent groups; each group holds the buckets of one API key and is
-- all-or-nothing. KEYS: every bucket key, in order. ARGV: n_groups, then per group: n_ops, then per op:
-- limit, window_ms, cost, mode (0 take, 1 gate, 2 reserve, 3 force), min_cost.
-- Reply: per op, five integers: allowed, remaining, reset_ms, retry_ms, debited.
-- A bucket's state is one string, "<tokens> <ms timestamp>", expiring when the bucket would be full again
-- (a GET and a SET PX per take; earlier versions kept a hash {t, ts}, still read until the next take rewrites it).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local floor, ceil, min, max = math.floor, math.ceil, math.min, math.max
local call, find, sub = redis.call, string.find, string.sub
local out = {}
local o = 0
local a = 2
local k = 0
-- per-op scratch, reused by every group
local limit, window, cost, mode, min_cost, level, debit = {}, {}, {}, {}, {}, {}, {}

local function state(key)
  local st = redis.pcall('GET', key)
  if type(st) == 'table' and st.err then
    local h = call('HMGET', key, 't', 'ts')  -- WRONGTYPE: a bucket stored as a hash by an earlier version
    if not h[1] then return nil end
    return tonumber(h[1]), tonumber(h[2])
  end
  if not st then return nil end
  local sp = find(st, ' ', 1, true)
  return tonumber(sub(st, 1, sp - 1)), tonumber(sub(st, sp + 1))
end

local function time_to(target, tokens, lim, win)
  if tokens >= target then return 0 end
  if lim <= 0 then return win end
  return ceil((target - tokens) * win / lim - 1e-6)
end

for _ = 1, tonumber(ARGV[1]) do
  local n = tonumber(ARGV[a]); a = a + 1
  local ok = true
  for i = 1, n do
    local lim, win, c, m = tonumber(ARGV[a]), tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
    local mc = tonumber(ARGV[a + 4])
    a = a + 5
    limit[i], window[i], cost[i], mode[i], min_cost[i] = lim, win, c, m, mc
    local tokens, ts = state(KEYS[k + i])
    local lv
    if not tokens then
      lv = lim
    elseif lim <= 0 then
      lv = min(tokens, 0)
    else
      lv = min(lim, tokens + max(0, now - ts) * lim / win)
    end
    level[i] = lv
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
    debit[i] = d
    ok = ok and good
  end
  for i = 1, n do
    local lim, win, m = limit[i], window[i], mode[i]
    local taken = ok and debit[i] or 0
    local after = min(lim, level[i] - taken)
    local retry = 0
    if (not ok) and m ~= 3 then
      local need = cost[i]
      if m == 2 then need = max(min_cost[i], 1) end
      retry = time_to(max(need, 1), after, lim, win)
    end
    local reset = time_to(lim, after, lim, win)
    if taken == 0 then
      -- nothing taken (a gate, or a denied group): the stored state already refills to the same level
    elseif after >= lim then
      call('DEL', KEYS[k + i])
    else
      call('SET', KEYS[k + i], after .. ' ' .. now, 'PX', reset + 1000)
    end
    local remaining = floor(after)
    if remaining < 0 then remaining = 0 end
    out[o + 1] = ok and 1 or 0
    out[o + 2] = remaining
    out[o + 3] = reset
    out[o + 4] = retry
    out[o + 5] = taken
    o = o + 5
  end
  k = k + n
end
return out
