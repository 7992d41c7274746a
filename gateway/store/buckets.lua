-- Token buckets, the same rules as gateway/limits.py, on Redis's clock.
-- One call checks one or more independent groups; each group holds the buckets of one API key and is
-- all-or-nothing. KEYS: every bucket key, in order. ARGV: n_groups, then per group: n_ops, then per op:
-- limit, window_ms, cost, mode (0 take, 1 gate, 2 reserve, 3 force), min_cost.
-- Reply: per op, five integers: allowed, remaining, reset_ms, retry_ms, debited.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
local a = 2
local k = 1
local n_groups = tonumber(ARGV[1])

local function time_to(target, tokens, limit, window)
  if tokens >= target then return 0 end
  if limit <= 0 then return window end
  return math.ceil((target - tokens) * window / limit - 1e-6)
end

for _ = 1, n_groups do
  local n = tonumber(ARGV[a]); a = a + 1
  local ops = {}
  local ok = true
  for i = 1, n do
    local op = {
      key = KEYS[k], limit = tonumber(ARGV[a]), window = tonumber(ARGV[a + 1]),
      cost = tonumber(ARGV[a + 2]), mode = tonumber(ARGV[a + 3]), min_cost = tonumber(ARGV[a + 4]),
    }
    k = k + 1; a = a + 5
    local st = redis.call('HMGET', op.key, 't', 'ts')
    local level
    if not st[1] then
      level = op.limit
    elseif op.limit <= 0 then
      level = math.min(tonumber(st[1]), 0)
    else
      local elapsed = math.max(0, now - tonumber(st[2]))
      level = math.min(op.limit, tonumber(st[1]) + elapsed * op.limit / op.window)
    end
    op.level = level
    local good
    if op.mode == 0 then
      good = level >= op.cost and op.limit > 0
      op.debit = good and op.cost or 0
    elseif op.mode == 1 then
      good = level >= op.cost and op.limit > 0
      op.debit = 0
    elseif op.mode == 2 then
      op.debit = math.max(0, math.min(op.cost, math.floor(level)))
      good = op.debit >= op.min_cost and op.debit > 0
    else
      good = true
      op.debit = op.cost
    end
    ok = ok and good
    ops[i] = op
  end
  for i = 1, n do
    local op = ops[i]
    local taken = ok and op.debit or 0
    local after = math.min(op.limit, op.level - taken)
    local retry = 0
    if (not ok) and op.mode ~= 3 then
      local need = op.cost
      if op.mode == 2 then need = math.max(op.min_cost, 1) end
      retry = time_to(math.max(need, 1), after, op.limit, op.window)
    end
    local reset = time_to(op.limit, after, op.limit, op.window)
    if taken == 0 then
      -- nothing taken (a gate, or a denied group): the stored state already refills to the same level
    elseif after >= op.limit then
      redis.call('DEL', op.key)
    else
      redis.call('HSET', op.key, 't', tostring(after), 'ts', tostring(now))
      redis.call('PEXPIRE', op.key, reset + 1000)
    end
    local remaining = math.floor(after)
    if remaining < 0 then remaining = 0 end
    out[#out + 1] = ok and 1 or 0
    out[#out + 1] = remaining
    out[#out + 1] = reset
    out[#out + 1] = retry
    out[#out + 1] = taken
  end
end
return out
