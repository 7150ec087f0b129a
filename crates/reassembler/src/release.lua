-- Ordo release script: the only writer of reorder state (see ordo-core keys.rs).
-- Atomic per call, so any number of reassembler replicas may run it for the
-- same streams concurrently, and redelivered batches are harmless.
--
-- KEYS: for each stream, three keys: meta, pend, log.
-- ARGV[1] = retention (max released entries kept per stream log)
-- ARGV[2] = pub/sub channel for released batches
-- ARGV[3] = ttl in ms of a stream's keys after its last activity (0 = none)
-- then for each stream: stream_id, mode ('1' ordered, '2' unordered), n,
--   then n pairs: sequence, encoded EventResult.
-- Returns one string with a '1' (accepted) or '0' (duplicate) per result, in
-- input order.

local retention = ARGV[1]
local channel = ARGV[2]
local ttl = tonumber(ARGV[3])

local function varint(n)
  local out = {}
  while n >= 128 do
    out[#out + 1] = string.char(n % 128 + 128)
    n = math.floor(n / 128)
  end
  out[#out + 1] = string.char(n)
  return table.concat(out)
end

local flags = {}
local a = 4
for k = 1, #KEYS, 3 do
  local meta, pend, log = KEYS[k], KEYS[k + 1], KEYS[k + 2]
  local stream, want_mode, n = ARGV[a], ARGV[a + 1], tonumber(ARGV[a + 2])
  a = a + 3

  local m = redis.call('HMGET', meta, 'next', 'released', 'mode')
  local nxt = tonumber(m[1]) or 0
  local released = tonumber(m[2]) or 0
  local mode = m[3]
  if not mode then
    mode = want_mode
    redis.call('HSET', meta, 'mode', mode)
  end

  local out = {}
  local function release(body)
    -- Appending field 8 (position, varint) to an encoded message sets it:
    -- protobuf keeps the last value of a repeated scalar field.
    local rec = body .. '\64' .. varint(released)
    redis.call('XADD', log, 'MAXLEN', '~', retention, '0-' .. (released + 1), 'r', rec)
    out[#out + 1] = '\26' .. varint(#rec) .. rec
    released = released + 1
  end

  local fresh = {}
  for _ = 1, n do
    local seq, body = tonumber(ARGV[a]), ARGV[a + 1]
    a = a + 2
    local dup = seq < nxt or fresh[seq] ~= nil
    if not dup then
      if mode == '2' then
        dup = redis.call('HSETNX', pend, seq, '') == 0
        if not dup then
          fresh[seq] = true
          release(body)
        end
      else
        -- pend never holds `nxt` between calls, so seq == nxt is new.
        dup = seq ~= nxt and redis.call('HEXISTS', pend, seq) == 1
        if not dup then
          fresh[seq] = body
        end
      end
    end
    flags[#flags + 1] = dup and '0' or '1'
  end

  if mode == '2' then
    while redis.call('HDEL', pend, nxt) == 1 do
      nxt = nxt + 1
    end
  else
    while true do
      local body = fresh[nxt]
      if body then
        fresh[nxt] = nil
      else
        body = redis.call('HGET', pend, nxt)
        if not body then break end
        redis.call('HDEL', pend, nxt)
      end
      release(body)
      nxt = nxt + 1
    end
    for seq, body in pairs(fresh) do
      redis.call('HSET', pend, seq, body)
    end
  end

  redis.call('HSET', meta, 'next', nxt, 'released', released)
  if ttl > 0 then
    redis.call('PEXPIRE', meta, ttl)
    redis.call('PEXPIRE', pend, ttl)
    redis.call('PEXPIRE', log, ttl)
  end
  if #out > 0 then
    redis.call('PUBLISH', channel,
      '\10' .. varint(#stream) .. stream .. '\16' .. varint(nxt) .. table.concat(out))
  end
end
return table.concat(flags)
