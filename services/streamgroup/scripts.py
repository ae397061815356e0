"""Lua scripts for the steps that must be atomic: a check and the change it allows, with nothing
able to happen in between (a consumer reading between "holds nothing" and DELCONSUMER would lose
what it read)."""

from __future__ import annotations

from collections.abc import Sequence

import redis.asyncio as aioredis

from streamgroup import streams
from streamgroup.keys import StreamKeys

_ID_HELPERS = """
local function parse_id(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local function id_less(a, b)
  local ams, aseq = parse_id(a)
  local bms, bseq = parse_id(b)
  return ams < bms or (ams == bms and aseq < bseq)
end
local function fields(flat)
  local t = {}
  for i = 1, #flat, 2 do t[flat[i]] = flat[i + 1] end
  return t
end
"""

# Reset the idle time of entries this consumer still owns (XCLAIM ... JUSTID does not count as a
# delivery), so the reclaimer never takes work from a consumer that is alive and busy with it.
RENEW_LEASE = """
local renewed = 0
for i = 3, #ARGV do
  local row = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if row[1] and row[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    renewed = renewed + 1
  end
end
return renewed
"""

# At shutdown: if the consumer holds nothing, it leaves the group; otherwise what it holds is
# marked idle for ARGV[3] ms so the reclaimer's next pass takes it over, and it stays registered.
RELEASE_OR_LEAVE = """
local rows = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 100000, ARGV[2])
if #rows == 0 then
  redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
  return {0, 1}
end
for first = 1, #rows, 1000 do
  local args = {KEYS[1], ARGV[1], ARGV[2], 0}
  for i = first, math.min(first + 999, #rows) do args[#args + 1] = rows[i][1] end
  for _, word in ipairs({'IDLE', ARGV[3], 'JUSTID'}) do args[#args + 1] = word end
  redis.call('XCLAIM', unpack(args))
end
return {#rows, 0}
"""

# Remove a consumer that holds nothing and has been idle at least ARGV[3] ms.
DELETE_IF_IDLE = """
for _, row in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local c = {}
  for i = 1, #row, 2 do c[row[i]] = row[i + 1] end
  if c['name'] == ARGV[2] then
    if tonumber(c['pending']) == 0 and tonumber(c['idle']) >= tonumber(ARGV[3]) then
      return redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2]) + 1
    end
    return 0
  end
end
return 0
"""

# Trim below the oldest entry any group still needs: pending in it, or not yet delivered to it.
# Keeps at least ARGV[1] entries. With no group on the stream nothing says what is done: no trim.
TRIM_SAFELY = (
    _ID_HELPERS
    + """
local groups = redis.call('XINFO', 'GROUPS', KEYS[1])
if #groups == 0 then return 0 end
local floor = nil
for _, flat in ipairs(groups) do
  local g = fields(flat)
  local ms, seq = parse_id(g['last-delivered-id'])
  local need = ms .. '-' .. (seq + 1)
  if tonumber(g['pending']) > 0 then
    local oldest = redis.call('XPENDING', KEYS[1], g['name'])[2]
    if id_less(oldest, need) then need = oldest end
  end
  if floor == nil or id_less(need, floor) then floor = need end
end
local keep = tonumber(ARGV[1])
if keep > 0 then
  local newest = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', keep)
  if #newest < keep then return 0 end
  local boundary = newest[#newest][1]
  if id_less(boundary, floor) then floor = boundary end
end
return redis.call('XTRIM', KEYS[1], 'MINID', floor)
"""
)


# Add a batch of entries in one command: KEYS = the stream, the producer run's marker; ARGV =
# batch number, marker lifetime (s), field count F, F field names, then F values per entry. One
# reply instead of one per entry: redis.asyncio spends most of a pipelined XADD batch awaiting and
# parsing replies one by one.
# Idempotent: the marker holds the last batch number of this run the stream already has, so a
# batch sent again after a lost or late reply is not added twice (returns 0). Lua has no rollback:
# if an XADD failed midway, the entries before it would stay and the marker would not move, so a
# resend would add those again (same run, producer and serial). Under maxmemory the first XADD is
# the one refused (Redis checks OOM before a script's first write only), so nothing is added.
ADD_BATCH = """
local number = tonumber(ARGV[1])
local done = redis.call('GET', KEYS[2])
if done and tonumber(done) >= number then return 0 end
local width = tonumber(ARGV[3])
local added = 0
for first = 4 + width, #ARGV, width do
  local args = {KEYS[1], '*'}
  for j = 0, width - 1 do
    args[#args + 1] = ARGV[4 + j]
    args[#args + 1] = ARGV[first + j]
  end
  redis.call('XADD', unpack(args))
  added = added + 1
end
redis.call('SET', KEYS[2], number, 'EX', ARGV[2])
return added
"""

# How long a run's marker outlives its last batch: longer than any outage the producer rides out.
PRODUCER_RUN_MARKER_SECONDS = 86_400


# Move entries to the dead-letter stream, each only while ARGV[2] (the caller) still owns it in
# the group's pending list: an entry another consumer claimed meanwhile is theirs to settle, and an
# entry already moved (or acknowledged) is no longer pending. That also makes a re-sent EVALSHA
# (after a reply that never came) a no-op for what the first one moved. Each XADD is followed by
# its XACK; a script stops at the first error, so an entry whose XADD fails is never acknowledged
# (MULTI/EXEC would run the XACK anyway and lose it). ARGV = group, consumer, then per entry: its
# id, the length n of its flat field list, and the n field/value items. Returns the moved ids.
# Lua's unpack() refuses 8,000 values or more (LUAI_MAXCSTACK), and the script unpacks one
# entry's fields into one XADD: wider entries take DEAD_LETTER_WIDE_ACK below.
SCRIPT_MAX_FIELDS = 7_000

DEAD_LETTER = """
local moved, i = {}, 3
while i <= #ARGV do
  local id, n = ARGV[i], tonumber(ARGV[i + 1])
  local row = redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1)
  if row[1] and row[1][2] == ARGV[2] then
    local args = {KEYS[2], '*'}
    for j = i + 2, i + 1 + n do args[#args + 1] = ARGV[j] end
    redis.call('XADD', unpack(args))
    redis.call('XACK', KEYS[1], ARGV[1], id)
    moved[#moved + 1] = id
  end
  i = i + 2 + n
end
return moved
"""

# The second half of moving one entry too wide for DEAD_LETTER, sent in one MULTI/EXEC right
# after the XADD of its copy: if the caller (ARGV[2]) still owns ARGV[3] and the newest entry of
# the dead-letter stream is that copy (its XADD worked), acknowledge it; if the caller does not
# own it any more (another consumer claimed it, or a first attempt whose reply was lost moved it
# already), delete the copy just added. So the transaction adds exactly one copy or none.
DEAD_LETTER_WIDE_ACK = """
local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)[1]
if not last then return 0 end
local fields = last[2]
local is_copy = false
for k = #fields - 1, math.max(1, #fields - 15), -2 do
  if fields[k] == ARGV[4] and fields[k + 1] == ARGV[3] then is_copy = true end
end
if not is_copy then return 0 end
local row = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if row[1] and row[1][2] == ARGV[2] then
  redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
  return 1
end
redis.call('XDEL', KEYS[2], last[1])
return 0
"""


class Scripts:
    """The scripts registered on one client (EVALSHA; SCRIPT LOAD first when the server lacks one)."""

    def __init__(self, client: aioredis.Redis, keys: StreamKeys) -> None:
        self._client, self._keys = client, keys
        self.keys = keys
        self._renew = client.register_script(RENEW_LEASE)
        self._release = client.register_script(RELEASE_OR_LEAVE)
        self._delete = client.register_script(DELETE_IF_IDLE)
        self._trim = client.register_script(TRIM_SAFELY)
        self._add = client.register_script(ADD_BATCH)
        self._dead_letter = client.register_script(DEAD_LETTER)

    async def renew_lease(self, consumer: str, ids: Sequence[str]) -> int:
        if not ids:
            return 0
        return int(await self._renew(keys=[self._keys.stream], args=[self._keys.group, consumer, *ids]))

    async def release_or_leave(self, consumer: str, idle_ms: int) -> tuple[int, bool]:
        """(entries released for the reclaimer, whether the consumer left the group)."""
        released, left = await self._release(keys=[self._keys.stream], args=[self._keys.group, consumer, idle_ms])
        return int(released), bool(left)

    async def delete_if_idle(self, consumer: str, min_idle_ms: int) -> bool:
        return bool(await self._delete(keys=[self._keys.stream], args=[self._keys.group, consumer, min_idle_ms]))

    async def trim_safely(self, min_entries: int) -> int:
        return int(await self._trim(keys=[self._keys.stream], args=[min_entries]))

    async def add_batch(self, run: str, number: int, names: Sequence[str], rows: Sequence[Sequence[object]]) -> int:
        """XADD one entry per row (its values for `names`) in a single command, unless batch
        `number` of producer run `run` is already in the stream. Returns the entries added."""
        values = [value for row in rows for value in row]
        keys = [self._keys.stream, self._keys.producer_run(run)]
        args = [number, PRODUCER_RUN_MARKER_SECONDS, len(names), *names, *values]
        return int(await self._add(keys=keys, args=args))

    async def dead_letter(self, consumer: str, entries: Sequence[tuple[str, Sequence[bytes | str]]]) -> set[str]:
        """Move (entry id, flat dead-letter fields) pairs to the dead-letter stream, acknowledging
        each, if `consumer` still owns it; returns the ids really moved. Safe to send again."""
        keys = self._keys
        args: list[bytes | str | int] = [keys.group, consumer]
        wide = []
        for entry_id, fields in entries:
            if len(fields) > SCRIPT_MAX_FIELDS:
                wide.append((entry_id, fields))
            else:
                args += [entry_id, len(fields), *fields]
        moved: set[str] = set()
        if len(args) > 2:
            reply = await self._dead_letter(keys=[keys.stream, keys.dead_letter], args=args)
            moved.update(entry_id.decode() if isinstance(entry_id, bytes) else entry_id for entry_id in reply)
        for entry_id, fields in wide:
            if await self._dead_letter_wide(consumer, entry_id, fields):
                moved.add(entry_id)
        return moved

    async def _dead_letter_wide(self, consumer: str, entry_id: str, fields: Sequence[bytes | str]) -> bool:
        """XADD from here (too many arguments for a script), then DEAD_LETTER_WIDE_ACK, in one
        MULTI/EXEC: an error in queueing (OOM) runs neither, and the script keeps the copy only if
        this consumer still owns the entry, acknowledging it at the same time."""
        keys = self._keys
        # Loaded first (idempotent): a NOSCRIPT inside EXEC would not stop the XADD before it.
        sha = await self._client.script_load(DEAD_LETTER_WIDE_ACK)
        async with self._client.pipeline(transaction=True) as multi:
            multi.execute_command("XADD", keys.dead_letter, "*", *fields)
            multi.execute_command(  # not multi.evalsha: a cluster's pipeline refuses that by name
                "EVALSHA",
                sha,
                2,
                keys.stream,
                keys.dead_letter,
                keys.group,
                consumer,
                entry_id,
                f"{streams.DEAD_LETTER_FIELDS_PREFIX}original-id",
            )
            _, acked = await multi.execute()
        return bool(acked)
