-- Ordo release script: the only writer of reorder state (see ordo-core keys.rs).
-- Atomic per call, so any number of reassembler replicas may run it for the
-- same streams concurrently, and redelivered batches are harmless.
--
-- KEYS[1] = the dead-letter log; then for each stream three keys: meta, pend, log.
-- ARGV[1] = retention (max released entries kept per stream log)
-- ARGV[2] = ttl in ms of a stream's pend and log after its last activity
--   (0 = none: then its meta never expires either). Expiry is renewed at
--   most every ttl/16 per stream, not on every call: when it is renewed, the
--   keys expire ttl + ttl/16 from now (meta field 'x' holds that time), and
--   it is renewed once less than ttl is left. So keys expire between ttl and
--   17/16 × ttl after the stream's last activity, and a stream busy for a
--   while costs two PEXPIREs per ttl/16, not two per call.
-- ARGV[3] = dead letters kept (approximate)
-- ARGV[4] = ttl in ms of a stream's meta after its last activity, at least
--   ARGV[2] (used only when ARGV[2] > 0): meta outlives pend and log as the
--   stream's dedup tombstone (its `next` keeps refusing resent sequences)
-- then for each stream: stream_id, channel (the sharded pub/sub channel of
--   the stream's slot, or of its group of slots on a single node; see
--   ordo-core keys.rs. SPUBLISHed to on a single node and on a cluster alike;
--   on a cluster every key, the dead-letter log and the channel of one call
--   are in one slot), mode ('1' ordered, '2' unordered), n,
--   then n triples: sequence, encoded EventResult, encoded DeadLetter ('' = none).
-- Returns one string with a '1' (accepted) or '0' (duplicate) per result, in
-- input order.
--
-- Each log entry holds field 'r' (the encoded result) and 't' (release time,
-- Redis server Unix milliseconds: the push-gateway's age retention reads it).
--
-- Each channel gets one message per call, an encoded ReleasedBatches: one
-- ReleasedBatch (field 15) per stream of the call on that channel that
-- released something, in the order of the streams. One SPUBLISH per channel,
-- not per stream: a call carrying many short streams pays for few messages.
--
-- A dead letter is appended to the dead-letter log when its result is
-- accepted (stored), never for a duplicate: the first result wins, so a
-- FAILED that loses to an earlier OK leaves no dead letter, and a redelivered
-- batch leaves none twice. Entry fields: 'stream', 'sequence', 'letter'.

local dlq = KEYS[1]
local retention = tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
local dlq_retention = ARGV[3]
local meta_ttl = tonumber(ARGV[4])
local clock = redis.call('TIME')
local now = clock[1] * 1000 + math.floor(clock[2] / 1000)
local now_ms = string.format('%.0f', now)
local slack = math.floor(ttl / 16)

-- Hot: called twice per released result, so no table for the common short case.
local char, floor = string.char, math.floor
local function varint(n)
  if n < 128 then
    return char(n)
  end
  local s = ''
  while n >= 128 do
    s = s .. char(n % 128 + 128)
    n = floor(n / 128)
  end
  return s .. char(n)
end

-- Appends one released result to a stream's log, and its framed record to
-- `out`, the pieces of its channel's message. Appending field 8
-- (position, varint) to an encoded message sets it: protobuf keeps the last
-- value of a repeated scalar field.
-- A log holds at most `position` entries before this one, so below the
-- retention there is nothing to trim and no MAXLEN to check.
-- The frame header and the record stay separate pieces: every string Lua
-- makes here is hashed over all its bytes, so the record is built once and
-- the message once (table.concat), not once more per record.
-- `outlen` counts the bytes of the records appended for the current stream
-- (its ReleasedBatch's length, without the header).
local outlen = 0
local function release(log, body, position, out)
  local rec = body .. '\64' .. varint(position)
  if position < retention then
    redis.call('XADD', log, '0-' .. (position + 1), 'r', rec, 't', now_ms)
  else
    redis.call('XADD', log, 'MAXLEN', '~', retention, '0-' .. (position + 1), 'r', rec, 't', now_ms)
  end
  local head = '\26' .. varint(#rec)
  out[#out + 1] = head
  out[#out + 1] = rec
  outlen = outlen + #head + #rec
end

-- Meta field 'p' counts the fields of pend (every write of pend is here), so
-- a call needs no HLEN to know whether pend has any: one command less per
-- stream per call, which is most of what a call carrying results of many
-- different streams does. A meta written before 'p' existed (an older
-- version) falls back to HLEN once, and 'p' is recounted with HLEN whenever
-- the expiry is renewed (at most every ttl/16), so a count left stale by
-- pend expiring before its tombstone is corrected then.
local flags = {}
-- channel -> the pieces of its message; channels in the order first used.
local pubs, channels = {}, {}
local a = 5
for k = 2, #KEYS, 3 do
  local meta, pend, log = KEYS[k], KEYS[k + 1], KEYS[k + 2]
  local stream, channel, want_mode, n = ARGV[a], ARGV[a + 1], ARGV[a + 2], tonumber(ARGV[a + 3])
  a = a + 4

  local m = redis.call('HMGET', meta, 'next', 'released', 'mode', 'x', 'p')
  local nxt = tonumber(m[1]) or 0
  local released = tonumber(m[2]) or 0
  local released_before = released
  local mode = m[3]
  local expires = tonumber(m[4])
  -- A new stream's mode is written with its next and released, below.
  local new_mode = not mode
  if new_mode then
    mode = want_mode
  end
  local renew = ttl > 0 and (not expires or expires < now + ttl)
  -- A stream without meta has no pend (pend's ttl is at most meta's).
  local held = 0
  if m[1] then
    held = tonumber(m[5]) or -1
    if held < 0 or (renew and held > 0) then
      held = redis.call('HLEN', pend)
    end
  end
  local pending = held > 0

  -- Which of this batch's sequences are already pending: one HMGET for the
  -- batch (nothing at all when pend is empty), not a lookup per result.
  local known
  if pending then
    known = {}
    local ask = {}
    for j = 0, n - 1 do
      ask[#ask + 1] = ARGV[a + 3 * j]
    end
    for from = 1, #ask, 1000 do
      local upto = math.min(from + 999, #ask)
      local got = redis.call('HMGET', pend, unpack(ask, from, upto))
      for j = from, upto do
        if got[j - from + 1] then
          known[tonumber(ask[j])] = true
        end
      end
    end
  end
  -- The stream's ReleasedBatch goes into its channel's message: two pieces
  -- reserved for the frame's tag and length and for the batch's header
  -- (stream, next), set once `next` is known, then the records.
  local out = pubs[channel]
  if not out then
    out = {}
    pubs[channel] = out
    channels[#channels + 1] = channel
  end
  local first = #out + 1
  out[first] = ''
  out[first + 1] = ''
  outlen = 0
  local fresh = {}
  for _ = 1, n do
    local seq, body, letter = tonumber(ARGV[a]), ARGV[a + 1], ARGV[a + 2]
    a = a + 3
    local dup = seq < nxt or fresh[seq] ~= nil or (pending and known[seq] ~= nil)
    if not dup then
      if letter ~= '' then
        redis.call('XADD', dlq, 'MAXLEN', '~', dlq_retention, '*',
          'stream', stream, 'sequence', ARGV[a - 3], 'letter', letter)
      end
      if mode == '2' then
        fresh[seq] = ''
        release(log, body, released, out)
        released = released + 1
      else
        fresh[seq] = body
      end
    end
    flags[#flags + 1] = dup and '0' or '1'
  end

  if mode == '2' then
    -- Released already; only the contiguous floor `nxt` moves. Markers stay
    -- (in pend) for released sequences above it, to drop their duplicates.
    while true do
      if fresh[nxt] then
        fresh[nxt] = nil
      elseif pending and redis.call('HDEL', pend, nxt) == 1 then
        held = held - 1
        pending = held > 0
      else
        break
      end
      nxt = nxt + 1
    end
  else
    while true do
      local body = fresh[nxt]
      if body then
        fresh[nxt] = nil
      else
        if not pending then break end
        body = redis.call('HGET', pend, nxt)
        if not body then break end
        redis.call('HDEL', pend, nxt)
        held = held - 1
        pending = held > 0
      end
      release(log, body, released, out)
      released = released + 1
      nxt = nxt + 1
    end
  end
  -- What must wait (ORDERED: results; UNORDERED: markers), in few calls.
  local args = {}
  local waiting = false
  for seq, body in pairs(fresh) do
    waiting = true
    args[#args + 1] = seq
    args[#args + 1] = body
    if #args >= 1000 then
      held = held + redis.call('HSET', pend, unpack(args))
      args = {}
    end
  end
  if #args > 0 then
    held = held + redis.call('HSET', pend, unpack(args))
  end

  -- One HSET of meta: next, released, the pend count when it changed (or
  -- was not kept yet), the mode of a new stream, and the expiry time when it
  -- is renewed.
  local fields = { 'next', nxt, 'released', released }
  if held ~= tonumber(m[5]) then
    fields[#fields + 1] = 'p'
    fields[#fields + 1] = held
  end
  if new_mode then
    fields[#fields + 1] = 'mode'
    fields[#fields + 1] = mode
  end
  if renew then
    expires = now + ttl + slack
    fields[#fields + 1] = 'x'
    fields[#fields + 1] = string.format('%.0f', expires)
  end
  redis.call('HSET', meta, unpack(fields))
  -- Relative PEXPIREs of the remaining time (not PEXPIREAT: the documented
  -- ACL rule allows PEXPIRE).
  if renew then
    local left = string.format('%.0f', expires - now)
    redis.call('PEXPIRE', meta, string.format('%.0f', expires - now + meta_ttl - ttl))
    if released > 0 then
      redis.call('PEXPIRE', log, left)
    end
    -- pend exists only if it had entries or got some now.
    if held > 0 or waiting then
      redis.call('PEXPIRE', pend, left)
    end
  elseif ttl > 0 then
    -- Not renewed: a key this call created gets the stream's expiry.
    local left = string.format('%.0f', math.max(expires - now, 1))
    if waiting then
      redis.call('PEXPIRE', pend, left)
    end
    if released_before == 0 and released > 0 then
      redis.call('PEXPIRE', log, left)
    end
  end
  if #out > first + 1 then
    local header = '\10' .. varint(#stream) .. stream .. '\16' .. varint(nxt)
    out[first + 1] = header
    out[first] = '\122' .. varint(#header + outlen)
  else
    -- Nothing released: drop the reserved pieces (the last two).
    out[first + 1] = nil
    out[first] = nil
  end
end
for _, channel in ipairs(channels) do
  local out = pubs[channel]
  if #out > 0 then
    redis.call('SPUBLISH', channel, table.concat(out))
  end
end
return table.concat(flags)
