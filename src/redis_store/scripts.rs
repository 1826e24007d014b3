//! The Lua scripts. Each mirrors a pure function of this crate line by line,
//! on whole microseconds (see the module docs on time resolution).
//!
//! Both take `ARGV[1]` = the time in microseconds, or `-1` for the server's
//! `TIME`. Production always sends `-1`; only the parity tests inject a time.

/// Limiter: `KEYS[1]` = the key's state (`"a:b:c"`, microseconds).
///
/// `ARGV`: 1 now, 2 kind (1 fixed window, 2 sliding window, 3 token bucket,
/// 4 leaky bucket), 3 limit (max or capacity), 4 window or interval (µs),
/// 5 op (`a` acquire, `c` cancel), then for `a`: 6 cost, 7 max wait (µs);
/// for `c`: 6..8 the state before the reservation, 9..11 the state after.
///
/// Reply to `a`: `{allowed, remaining, reset_at, retry_after (-1: never),
/// wait, before_a, before_b, before_c, after_a, after_b, after_c}`; to `c`:
/// `{1}` if refunded, `{0}` otherwise.
pub(crate) const LIMITER: &str = r#"
local floor, max, min = math.floor, math.max, math.min
local now = tonumber(ARGV[1])
local injected = now >= 0
if not injected then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local kind, p1, p2 = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local function f(n) return string.format('%.0f', n) end

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
    redis.call('SET', KEYS[1], f(s[1]) .. ':' .. f(s[2]) .. ':' .. f(s[3]), 'PX', f(ttl))
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
return {allowed, remaining, reset_at, retry, wait, b1, b2, b3, s[1], s[2], s[3]}
"#;

/// Breaker: `KEYS[1]` = the key's state, `"state mode consecutive_failures
/// half_open_successes trips opened_at open_until next_probe [id deadline]*"`
/// (times in µs; state 0 closed, 1 open, 2 half-open; mode 0 normal,
/// 1 forced open, 2 forced closed, 3 disabled, 4 metrics only).
///
/// `ARGV`: 1 now, 2 op (`a` acquire, `r` record, `m` set mode), 3
/// consecutive failures that trip, 4 probe successes that close, 5 open time
/// (µs), 6 probes at once, 7 probe deadline (µs), 8 key TTL (ms), 9 result
/// (0 success, 1 failure, 2 neutral) or, for `m`, the mode, 10 probe id (-1:
/// none).
///
/// A key in a mode other than normal is written without expiry; resetting
/// the mode writes it with the TTL again (or deletes it if quiet).
///
/// Reply to `a`: `{allowed, probe (-1 none), retry_after (µs), from, to,
/// reason}`; to `r`: `{from, to, reason}`, `from = -1` when nothing changed;
/// to `m`: `{}`.
/// Reasons: 0 consecutive failures, 1 probe failed, 2 probe deadline, 3 open
/// time elapsed, 4 probes succeeded.
pub(crate) const BREAKER: &str = r#"
local max, min = math.max, math.min
local now = tonumber(ARGV[1])
if now < 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local cf_trip, success_close = tonumber(ARGV[3]), tonumber(ARGV[4])
local timeout, max_probes, deadline = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])

local v = redis.call('GET', KEYS[1])
local F = {}
if v then for x in string.gmatch(v, '%d+') do F[#F + 1] = tonumber(x) end end
local st, mode, cf, hos = F[1] or 0, F[2] or 0, F[3] or 0, F[4] or 0
local trips, opened, open_until, next_probe = F[5] or 0, F[6] or 0, F[7] or 0, F[8] or 0
local probes = {}
local i = 9
while F[i + 1] do
  probes[#probes + 1] = {F[i], F[i + 1]}
  i = i + 2
end
local from, to, reason = -1, -1, -1

local function open(why)
  from, to, reason = st, 1, why
  st = 1
  trips = trips + 1
  opened = now
  open_until = now + timeout
  probes = {}
  hos = 0
  cf = 0
end

local function close()
  from, to, reason = st, 0, 4
  st = 0
  trips = 0
  probes = {}
  hos = 0
  cf = 0
end

-- state::expire_probes
local function expire()
  if st ~= 2 then return end
  for _, p in ipairs(probes) do
    if p[2] <= now then
      open(2)
      return
    end
  end
end

local function save()
  local parts = {st, mode, cf, hos, trips, opened, open_until, next_probe}
  for _, p in ipairs(probes) do
    parts[#parts + 1] = p[1]
    parts[#parts + 1] = p[2]
  end
  for k, x in ipairs(parts) do parts[k] = string.format('%.0f', x) end
  local out = table.concat(parts, ' ')
  if out == v then return end
  if st == 0 and mode == 0 and cf == 0 and hos == 0 and trips == 0 and next_probe == 0 then
    if v then redis.call('DEL', KEYS[1]) end
  elseif mode ~= 0 then
    -- An operator's mode lasts until it is reset, whatever the TTL.
    redis.call('SET', KEYS[1], out)
  else
    redis.call('SET', KEYS[1], out, 'PX', ARGV[8])
  end
end

if ARGV[2] == 'm' then -- state::set_mode
  mode = tonumber(ARGV[9])
  save()
  return {}
end

if ARGV[2] == 'a' then -- state::acquire
  if mode == 2 or mode == 3 then return {1, -1, 0, -1, -1, -1} end
  if mode == 1 then return {0, -1, timeout, -1, -1, -1} end
  local dry = mode == 4
  expire()
  if st == 1 then
    if now < open_until then
      save()
      if dry then return {1, -1, 0, from, to, reason} end
      return {0, -1, open_until - now, from, to, reason}
    end
    st = 2
    hos = 0
    probes = {}
    from, to, reason = 1, 2, 3
  end
  if st == 2 then
    if dry then
      save()
      return {1, -1, 0, from, to, reason}
    end
    if #probes >= max(max_probes, 1) then
      local retry = nil
      for _, p in ipairs(probes) do
        local left = max(p[2] - now, 0)
        if retry == nil or left < retry then retry = left end
      end
      save()
      return {0, -1, retry or 0, from, to, reason}
    end
    local id = next_probe
    next_probe = (next_probe + 1) % 4294967296
    probes[#probes + 1] = {id, now + deadline}
    save()
    return {1, id, 0, from, to, reason}
  end
  save()
  return {1, -1, 0, from, to, reason}
end

-- state::record
local result, probe = tonumber(ARGV[9]), tonumber(ARGV[10])
expire()
local e_from, e_to, e_reason = from, to, reason
local was_probe = false
if probe >= 0 then
  for k, p in ipairs(probes) do
    if p[1] == probe then
      table.remove(probes, k)
      was_probe = true
      break
    end
  end
end
if result == 2 or not (mode == 0 or mode == 4) then
  save()
  return {e_from, e_to, e_reason}
end
from, to, reason = -1, -1, -1
if st == 0 then
  if result == 1 then cf = cf + 1 else cf = 0 end
  if cf_trip > 0 and cf >= cf_trip then open(0) end
elseif st == 2 and (was_probe or mode == 4) then
  if result == 1 then
    open(1)
  else
    hos = hos + 1
    if hos >= max(success_close, 1) then close() end
  end
end
save()
if from >= 0 then return {from, to, reason} end
return {e_from, e_to, e_reason}
"#;
