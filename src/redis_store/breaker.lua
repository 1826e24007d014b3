-- The circuit breaker script: see `BREAKER` in scripts.rs for its key,
-- arguments and reply.
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
  local quiet = st == 0 and mode == 0 and cf == 0 and hos == 0 and trips == 0 and next_probe == 0
  -- A quiet breaker with no key stays without one: nothing to format.
  if quiet and not v then return end
  -- One format call for the fixed fields (each call costs about a GET).
  local out = string.format('%.0f %.0f %.0f %.0f %.0f %.0f %.0f %.0f',
    st, mode, cf, hos, trips, opened, open_until, next_probe)
  for _, p in ipairs(probes) do
    out = out .. string.format(' %.0f %.0f', p[1], p[2])
  end
  if out == v then return end
  if quiet then
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
