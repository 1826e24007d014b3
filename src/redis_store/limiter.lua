-- The rate limiter script: see `LIMITER` in scripts.rs for its keys,
-- arguments and reply.
local floor, max, min = math.floor, math.max, math.min
local now = tonumber(ARGV[1])
local injected = now >= 0
if not injected then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local kind, p1, p2 = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])

local function load()
  local s = {0, 0, 0}
  local v = redis.call('GET', KEYS[1])
  if v then
    local i = 1
    for x in string.gmatch(v, '%d+') do
      if i <= 3 then s[i] = tonumber(x) end
      i = i + 1
    end
  end
  return s
end

-- fixed_window::settle / sliding_window::settle
local function settle(s)
  if kind == 1 or kind == 2 then
    local aligned = now - now % p2
    if aligned > s[1] then
      local passed = floor((aligned - s[1]) / p2)
      if kind == 1 then
        s[2] = max(s[2] - passed * p1, 0)
      else
        if passed == 1 then s[3] = s[2] else s[3] = 0 end
        s[2] = 0
      end
      s[1] = aligned
    end
  end
end

-- Policy::full_at: from then on the key is as good as new.
local function full_at(s)
  if kind == 1 then
    return s[1] + math.ceil(s[2] / p1) * p2
  elseif kind == 2 then
    if s[2] > 0 then return s[1] + 2 * p2 elseif s[3] > 0 then return s[1] + p2 end
    return 0
  end
  return s[1]
end

local function save(s)
  local ttl = math.ceil((full_at(s) - now) / 1000)
  if ttl <= 0 then
    redis.call('DEL', KEYS[1])
  else
    -- An injected (test) time runs ahead of real time: keep keys an hour longer.
    if injected then ttl = ttl + 3600000 end
    -- One format call for the state: each costs about as much as the GET.
    redis.call('SET', KEYS[1], string.format('%.0f:%.0f:%.0f', s[1], s[2], s[3]),
      'PX', string.format('%.0f', ttl))
  end
end

-- returns allowed, remaining, reset_at, retry_after (-1 never), wait
local function decide(s, cost, max_wait)
  if kind == 3 then -- token_bucket::acquire (GCRA)
    local burst = p1 * p2
    local base = max(s[1], now)
    if cost > p1 then return 0, 0, base, -1, 0 end
    local new_tat = base + cost * p2
    local allow_at = max(new_tat - burst, 0)
    if allow_at <= now then
      s[1] = new_tat
      return 1, floor((now + burst - new_tat) / p2), new_tat, 0, 0
    end
    local wait = allow_at - now
    if wait <= max_wait then
      s[1] = new_tat
      return 1, 0, new_tat, 0, wait
    end
    return 0, floor(max(now + burst - base, 0) / p2), base, max(wait, 1), 0
  elseif kind == 4 then -- leaky_bucket::acquire
    local room = p1 * p2
    local start = max(s[1], now)
    if cost > p1 then return 0, 0, start, -1, 0 end
    local level = start - now
    local needed = cost * p2
    if level + needed <= room then
      s[1] = start + needed
      return 1, floor((room - (s[1] - now)) / p2), s[1], 0, level
    end
    return 0, floor(max(room - level, 0) / p2), start, max(level + needed - room, 1), 0
  elseif kind == 1 then -- fixed_window::acquire
    settle(s)
    local n = max(now, s[1])
    local window_end = s[1] + p2
    if cost > p1 then return 0, 0, window_end, -1, 0 end
    local room = p1 - s[2] % p1
    local first = s[2]
    if cost > room then first = s[2] + room end
    local index = floor(first / p1)
    local remaining_now = max(p1 - s[2], 0)
    if index == 0 then
      s[2] = first + cost
      return 1, p1 - s[2], window_end, 0, 0
    end
    local wait = s[1] + index * p2 - n
    if wait <= max_wait then
      s[2] = first + cost
      return 1, 0, window_end, 0, wait
    end
    return 0, remaining_now, window_end, max(wait, 1), 0
  end
  -- sliding_window::acquire
  settle(s)
  local n = max(now, s[1])
  local w = p2
  local window_end = s[1] + w
  if cost > p1 then return 0, 0, window_end, -1, 0 end
  local limit = p1 * w
  local elapsed = n - s[1]
  local cur, prev = s[2], s[3]
  local remaining = floor(max(limit - (prev * (w - elapsed) + cur * w), 0) / w)
  local reset_at = window_end
  if cur > 0 then reset_at = window_end + w end
  local after = cur + cost
  local weighted = prev * (w - elapsed) + after * w
  if weighted <= limit then
    s[2] = after
    return 1, floor((limit - weighted) / w), reset_at, 0, 0
  end
  if after <= p1 and prev > 0 then
    local overlap = floor((p1 - after) * w / prev)
    local wait = max(w - min(overlap, w) - elapsed, 0)
    if wait <= max_wait then
      s[2] = after
      return 1, 0, reset_at, 0, wait
    end
    return 0, remaining, reset_at, max(wait, 1), 0
  end
  local fit_in_next = 0
  if cur > 0 then fit_in_next = w - min(floor((p1 - cost) * w / cur), w) end
  return 0, remaining, reset_at, max(w - elapsed + fit_in_next, 1), 0
end

local s = load()
if ARGV[5] == 'c' then -- Policy::refund
  local before = {tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])}
  local after = {tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11])}
  settle(s)
  settle(before)
  settle(after)
  if s[1] == after[1] and s[2] == after[2] and s[3] == after[3] then
    save(before)
    return {1}
  end
  return {0}
end
local b1, b2, b3 = s[1], s[2], s[3]
local allowed, remaining, reset_at, retry, wait = decide(s, tonumber(ARGV[6]), tonumber(ARGV[7]))
if allowed == 1 then save(s) end
-- The states only for a reservation (or when asked): the client parses
-- every value of the reply, and these are the long ones.
if wait > 0 or ARGV[8] == '1' then
  return {allowed, remaining, reset_at - now, retry, wait, b1, b2, b3, s[1], s[2], s[3]}
end
return {allowed, remaining, reset_at - now, retry, wait}
