"""One process per consumer name: a lease in Redis that the process holding the name renews.

Two processes under one name (a mis-set Deployment, overlapping restarts) would each read the
other's unacknowledged entries as their own history and handle them again. The later one finds the
name taken and waits, not ready, until the lease runs out (its holder stopped, or died and stopped
renewing); then it takes the name over, history included.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid

import redis.asyncio as aioredis

from streamgroup.keys import StreamKeys
from streamgroup.logs import get_logger

log = get_logger("streamgroup.naming")

# Both scripts run under maxmemory too (allow-oom): a consumer can still read and acknowledge
# while Redis refuses writes, so its start and renewals must not wait for room; the key is tiny.
# A shebang script must declare every key it touches (these do: KEYS[1] only). Redis >= 7.0, Valkey.

# Take the name if free or already ours (a reconnect), and (re)set its expiry. Returns 1, or who holds it.
TAKE = """#!lua flags=allow-oom
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return holder end
if holder then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
else
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
end
return 1
"""

# Give the name back, only if it is still ours (expiring it at once needs no DEL permission).
RELEASE = """#!lua flags=allow-oom
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], 1) end
return 0
"""


class NameLease:
    """The lease on this process's consumer name, held under a random instance id."""

    def __init__(self, client: aioredis.Redis, keys: StreamKeys, consumer: str, ttl_ms: int) -> None:
        self.key = keys.consumer_name_lease(consumer)
        self.instance = uuid.uuid4().hex
        self.held = False
        self._valid_until = 0.0  # monotonic: when the lease runs out unless renewed
        self._consumer, self._ttl_ms = consumer, ttl_ms
        self._take = client.register_script(TAKE)
        self._release = client.register_script(RELEASE)

    @property
    def renew_every_seconds(self) -> float:
        """Three renewals per lifetime: two may be late before the name looks free."""
        return self._ttl_ms / 1000.0 / 3

    async def take(self) -> str | None:
        """Take or renew the name; returns None if it is ours now, else the instance holding it."""
        asked_at = time.monotonic()
        reply = await self._take(keys=[self.key], args=[self.instance, self._ttl_ms])
        self.held = reply == 1
        if self.held:
            self._valid_until = asked_at + self._ttl_ms / 1000.0
            return None
        return reply.decode() if isinstance(reply, bytes) else str(reply)

    def valid(self) -> bool:
        """Held, and renewed recently enough that nobody else can have taken it: false after this
        process was frozen (SIGSTOP, a paused VM) past the lease, until a renewal says otherwise."""
        return self.held and time.monotonic() < self._valid_until

    async def wait_until_taken(self, stopping: asyncio.Event, on_conflict) -> bool:
        """Retry until the name is ours (True) or the service stops (False). `on_conflict(holder)`
        is called on every refusal."""
        while not stopping.is_set():
            holder = await self.take()
            if holder is None:
                return True
            on_conflict(holder)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), timeout=self.renew_every_seconds)
        return False

    async def keep(self) -> None:
        """Renew until cancelled; if the name was lost (this process stalled past the lease and
        another one took it), `held` turns False and stays so."""
        while True:
            await asyncio.sleep(self.renew_every_seconds)
            try:
                holder = await self.take()
            except Exception as exc:  # the next renewal may succeed; the lease outlives two misses
                log.warning("could not renew the consumer name lease", key=self.key, error=str(exc))
                continue
            if holder is not None:
                log.error(
                    "lost the consumer name to another process; stopping reads",
                    consumer=self._consumer, key=self.key, holder=holder,
                )  # fmt: skip
                return

    async def release(self) -> bool:
        """Give the name back at a clean stop (only if still ours), so a successor need not wait."""
        released = bool(await self._release(keys=[self.key], args=[self.instance]))
        self.held = False
        return released
