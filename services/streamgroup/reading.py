"""The consumer's reads: XREADGROUP on a connection of its own, sent before the reply is needed.

Sending the next read before handling the batch in hand lets Redis fill it meanwhile, and the
acknowledgements due so far go out in the same write (or alone, with flush(), when no read is
about to go out: they never wait for one). redis-py's pipeline does a round trip in one
await, and its per-call bookkeeping cost more CPU than everything else on the consumer's read path.

The connection is one to the node that serves the stream (streamgroup.topology.KeyConnections):
on one server or through Sentinel the client's pool; on a Redis Cluster the owner of the stream's
slot. A MOVED or ASK reply (the slot moved or is moving) or UNBLOCKED (Redis 7.0: the blocked
read's slot moved away, or its node became a replica) sends the reads in flight again at once, to
the node that serves the slot now, with the acknowledgements not known to be applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from streamgroup.keys import StreamKeys
from streamgroup.logs import get_logger
from streamgroup.message import Entry
from streamgroup.streams import entries_of, raise_if_wrong_type
from streamgroup.topology import Client, KeyConnections, Lease

log = get_logger("streamgroup.reading")

# Redirects followed in a row before the last one is raised (an outage the service waits out):
# a slot that keeps moving, or a cluster whose nodes disagree on who serves it.
MAX_REDIRECTS = 16


@dataclass(slots=True)
class _Request:
    acks: list[str]  # acknowledged by this request's XACK (sent first), if any; emptied once its reply is in
    sent_at: float
    read: tuple | None  # the XREADGROUP sent after the XACK; None: a bare XACK
    deadline_seconds: float  # for its replies, from when they are awaited
    asking: bool  # each command went after an ASKING (a slot mid-migration): one +OK more each

    @property
    def reads(self) -> bool:
        return self.read is not None


class _Redirected(Exception):
    """The reads in flight went again to the node that serves the stream now."""


class GroupReader:
    """Reads for one consumer and acknowledges on the way: ids passed to acknowledge() go out with
    the next read, or on their own with flush(); they count as acknowledged (on_acked, with the
    number Redis acknowledged) once the XACK's reply came back. Reads may be sent before the reply
    to the previous one was taken; replies come back in order."""

    def __init__(
        self,
        client: Client,
        keys: StreamKeys,
        consumer: str,
        count: int,
        on_acked: Callable[[Sequence[str], float, int], None],
        timeout_seconds: float,
    ) -> None:
        self._connections = KeyConnections(client)
        self._keys, self._consumer, self._count = keys, consumer, count
        self._timeout = timeout_seconds
        self._on_acked = on_acked
        self._lease: Lease | None = None
        self._redirects = 0  # in a row
        self._due: list[str] = []
        self._in_flight: deque[_Request] = deque()
        self._reads_in_flight = 0

    @property
    def reads_in_flight(self) -> int:
        return self._reads_in_flight

    def acknowledge(self, ids: Sequence[str]) -> None:
        self._due.extend(ids)

    async def send(self, start: str, block_ms: int | None, count: int | None = None) -> None:
        """Send a read of up to `count` entries (default: the batch size) after `start`, with the
        acknowledgements due so far in the same write, applied before the read."""
        keys = self._keys
        block = ("BLOCK", block_ms) if block_ms is not None else ()
        read = ("XREADGROUP", "GROUP", keys.group, self._consumer, "COUNT", count or self._count, *block,
                "STREAMS", keys.stream, start)  # fmt: skip
        await self._send(read, self._timeout + (block_ms or 0) / 1000.0)

    async def flush(self) -> None:
        """Send the acknowledgements due now, on their own (no read is about to go out)."""
        if self._due:
            await self._send(None, self._timeout)

    async def _send(self, read: tuple | None, deadline_seconds: float) -> None:
        lease = await self._usable_lease()
        acks, self._due = self._due, []
        commands: list[tuple] = [("XACK", self._keys.stream, self._keys.group, *acks)] if acks else []
        if read is not None:
            commands.append(read)
        connection = lease.connection
        self._in_flight.append(_Request(acks, time.time(), read, deadline_seconds, lease.asking))
        self._reads_in_flight += read is not None
        try:
            packed = connection.pack_commands(lease.prepare(commands) if lease.asking else commands)
            await connection.send_packed_command(packed, check_health=False)
        except BaseException as exc:
            await self._failed(exc)
            raise

    async def _usable_lease(self) -> Lease:
        """The lease to send on. Its connection may have been closed under it by another task:
        redis-py's cluster client closes every connection, those in use included, on CLUSTERDOWN,
        and so does the Sentinel client on a failover. Sending would connect again silently, and
        the replies the old connection owed would never come: the next reply taken would be
        another command's. So with replies owed on a closed connection, the lease is given up as
        on any failure (acknowledgements go again); with reads among them that is an outage (their
        entries stay pending for this consumer, and the next run reads them back first)."""
        lease = self._lease
        if lease is not None and self._in_flight and not lease.connection.is_connected:
            error = RedisConnectionError("the connection to the stream's node was closed while it owed replies")
            reads_lost = self._reads_in_flight
            await self._failed(error)
            if reads_lost:
                raise error
        if self._lease is None:
            self._lease = await self._connections.acquire(self._keys.stream)
        return self._lease

    async def receive(self) -> list[Entry]:
        """The entries of the oldest read in flight (taking the replies to bare acknowledgements
        sent before it); raises what Redis or the connection raised."""
        assert self._reads_in_flight, "no read was sent"
        while True:
            request = self._in_flight[0]
            try:
                reply = await self._take_replies(request)
            except _Redirected:
                continue
            self._in_flight.popleft()
            if request.reads:
                self._reads_in_flight -= 1
                self._redirects = 0
                return entries_of(reply)

    async def _take_replies(self, request: _Request) -> object:
        lease = self._lease
        assert lease is not None
        connection = lease.connection
        try:
            async with asyncio.timeout(request.deadline_seconds):
                if request.acks:
                    if request.asking:
                        await connection.read_response(timeout=math.inf)  # +OK to ASKING
                    acknowledged = await connection.read_response(timeout=math.inf)
                    acks, request.acks = request.acks, []
                    self._on_acked(acks, request.sent_at, int(acknowledged))
                if not request.reads:
                    return None
                if request.asking:
                    await connection.read_response(timeout=math.inf)
                return await connection.read_response(timeout=math.inf)
        except BaseException as exc:
            reads = [(r.read, r.deadline_seconds) for r in self._in_flight if r.read is not None]
            if await self._failed(exc):
                log.info("the stream's slot moved; reading on the node that serves it now", reply=str(exc))
                for read, deadline_seconds in reads:  # the acknowledgements due go with the first
                    await self._send(read, deadline_seconds)
                raise _Redirected from exc
            if isinstance(exc, ResponseError):
                raise_if_wrong_type(exc, self._keys.stream)
            if isinstance(exc, TimeoutError):
                raise RedisTimeoutError(f"no reply from Redis within {request.deadline_seconds:g} s") from exc
            raise

    async def _failed(self, exc: BaseException) -> bool:
        """Acknowledgements not known to be applied go again with the next read (acknowledging an
        id twice is harmless: the second XACK answers 0). The connection may still owe replies, so
        it is never used again. True if the reads in flight should go again at once: the stream's
        slot moved (MOVED, ASK, UNBLOCKED; at most MAX_REDIRECTS times in a row)."""
        self._due[:0] = [entry_id for request in self._in_flight for entry_id in request.acks]
        self._in_flight.clear()
        self._reads_in_flight = 0
        lease, self._lease = self._lease, None
        if lease is not None:
            await self._connections.release(lease, broken=True)
        if isinstance(exc, (asyncio.CancelledError, KeyboardInterrupt, SystemExit)):
            return False
        if not await self._connections.failed(exc):
            return False
        self._redirects += 1
        return self._redirects <= MAX_REDIRECTS

    async def close(self) -> list[str]:
        """Take the replies still owed (their acknowledgements count), give the connection back,
        and return the ids whose acknowledgement was never applied."""
        with contextlib.suppress(Exception):  # on failure the ids are due again; the caller sends them
            while self._in_flight:
                try:
                    await self._take_replies(self._in_flight[0])
                except _Redirected:  # sent again: their replies are taken next
                    continue
                self._reads_in_flight -= self._in_flight.popleft().reads
        if self._lease is not None:
            lease, self._lease = self._lease, None
            await self._connections.release(lease)
        due, self._due = self._due, []
        return due
