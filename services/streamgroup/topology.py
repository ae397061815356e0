"""Which Redis deployment the services talk to, and the client for it: one server, a Redis Cluster,
or a primary found through Sentinel (STREAMGROUP_REDIS_MODE, default auto).

Every mode gets the options of streamgroup.connection.client_options (timeouts, TLS, password
file, one immediate retry) and the same reply handling and hiredis packing as connection.create_client.
Commands sent by hand (the consumer's pipelined reads) take a raw connection from KeyConnections,
which knows which node serves a key and follows a cluster's MOVED and ASK redirects.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import AbstractConnection, parse_url
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.cluster import PRIMARY
from redis.crc import key_slot
from redis.exceptions import AskError, ClusterError, MovedError, RedisClusterException, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from streamgroup.backoff import Backoff
from streamgroup.connection import RAW_REPLIES, as_sent, client_options, packing_in_c, url_without_password
from streamgroup.connection import create_client as create_standalone_client
from streamgroup.errors import ConfigError
from streamgroup.keys import StreamKeys, read_shards
from streamgroup.logs import get_logger
from streamgroup.settings import Settings

log = get_logger("streamgroup.topology")

# What the cluster client raises, besides redis-py's ConnectionError and TimeoutError, while the
# cluster cannot serve: no node reachable or a slot without a primary ("Redis Cluster cannot be
# connected", SlotNotCoveredError; neither is a RedisError), redirects that never settle
# ("TTL exhausted"). All are outages: retry with backoff, never an exit.
CLUSTER_OUTAGES = (RedisClusterException, ClusterError)

Mode = Literal["standalone", "cluster", "sentinel"]
Client = aioredis.Redis | RedisCluster


async def create_client(settings: Settings) -> Client:
    """The client for the configured deployment. In auto mode this asks the URL's server once
    (INFO cluster), so it raises a ConnectionError while that server is unreachable: an outage.
    Through Sentinel, the client also starts following failovers as the sentinels announce them."""
    mode = await detect_mode(settings)
    client = build_client(settings, mode)
    if isinstance(client, _SentinelManagedRedis):
        client.follow_failovers()
    return client


async def detect_mode(settings: Settings) -> Mode:
    if settings.redis_mode != "auto":
        return settings.redis_mode
    if settings.redis_sentinels is not None:
        return "sentinel"
    probe = create_standalone_client(settings)
    try:
        info = await probe.info("cluster")
    finally:
        await probe.aclose()
    return "cluster" if int(info.get("cluster_enabled", 0)) == 1 else "standalone"


def build_client(settings: Settings, mode: Mode) -> Client:
    """The client for `mode`; raises ConfigError if the keys cannot work there (see check_slots)."""
    if mode == "cluster":
        if settings.redis_db != 0:
            raise ConfigError(
                ["STREAMGROUP_REDIS_URL: the server is a Redis Cluster node, which has only database 0; use /0"]
            )
        for keys in read_shards(settings):  # with STREAMGROUP_SHARDS, the keys each shard's scripts take
            check_slots(keys)
        return _cluster_client(settings)
    if mode == "sentinel":
        return _sentinel_client(settings)
    return create_standalone_client(settings)


def check_slots(keys: StreamKeys) -> None:
    """Every key a multi-key script touches must be in one hash slot of a cluster (Redis refuses
    the script otherwise). The dead-letter script takes the stream and its dead-letter stream:
    if they hash apart, start fails here rather than at the first poison message. The default
    dead-letter name is not changed to fit: a deployment moving to a cluster would silently write
    dead letters to a new key; a hash tag in the stream's name makes the default fit."""
    stream_slot, dead_slot = key_slot(keys.stream.encode()), key_slot(keys.dead_letter.encode())
    if stream_slot == dead_slot:
        return
    tagged = _hash_tagged(keys.stream)
    raise ConfigError(
        [
            f"STREAMGROUP_STREAM {keys.stream!r} (hash slot {stream_slot}) and its dead-letter stream "
            f"{keys.dead_letter!r} (hash slot {dead_slot}) are in different Redis Cluster slots, and "
            "dead-lettering moves an entry between them in one script: give the stream a hash tag, "
            f"e.g. STREAMGROUP_STREAM={tagged} (dead letters then go to {tagged}:dead), or set "
            "STREAMGROUP_DEAD_LETTER_STREAM to a name with the stream's hash tag"
        ]
    )


def _hash_tagged(name: str) -> str:
    return "{" + name.replace("{", "").replace("}", "") + "}"


def _adapt(client: Client) -> Client:
    """The reply handling connection.create_client gives a plain client."""
    for command in RAW_REPLIES:
        client.set_response_callback(command, as_sent)
    return client


def _url_and_options(settings: Settings) -> tuple[str, dict[str, Any]]:
    options = client_options(settings)
    url = settings.redis_url.get_secret_value()
    if "password" in options:
        url = url_without_password(url)  # the password file wins over the URL, as in connection.py
    return url, options


def _cluster_client(settings: Settings) -> RedisCluster:
    url, options = _url_and_options(settings)
    # `retry` is the cluster client's own: after a connection error or CLUSTERDOWN it refreshes the
    # slot map and tries once more; beyond that the service's loop backs off.
    client = RedisCluster.from_url(url, **options)
    packing = packing_in_c(client.connection_kwargs["connection_class"])
    client.connection_kwargs["connection_class"] = packing  # for every node found from now on
    for node in client.startup_nodes:
        node.connection_class = packing
    return _adapt(client)


class _SentinelManagedRedis(aioredis.Redis):
    """A client of the primary Sentinel names, that leaves the old primary as soon as the sentinels
    announce a failover, and closes its connections to the sentinels with its own.

    redis-py alone asks the sentinels only when it opens a connection: the connections it has stay
    on the old primary until that refuses a write (READONLY), which it does only once Sentinel has
    demoted it, seconds later (about ten after a SENTINEL FAILOVER here). Every write the old
    primary takes meanwhile is lost when it resyncs from the new one."""

    _watch: asyncio.Task | None = None

    def follow_failovers(self) -> None:
        if self._watch is None:
            self._watch = asyncio.get_running_loop().create_task(self._follow_failovers())

    async def _follow_failovers(self) -> None:
        pool: SentinelConnectionPool = self.connection_pool
        backoff = Backoff(cap_seconds=5.0)
        while True:
            for sentinel in list(pool.sentinel_manager.sentinels):
                try:
                    await self._listen(sentinel, pool, backoff)
                except (RedisConnectionError, RedisTimeoutError, OSError, ResponseError) as exc:
                    log.debug("sentinel unreachable; trying the next", error=str(exc))
                await asyncio.sleep(backoff.next_delay())

    async def _listen(self, sentinel: aioredis.Redis, pool: SentinelConnectionPool, backoff: Backoff) -> None:
        async with sentinel.pubsub() as pubsub:
            await pubsub.subscribe(SWITCH_MASTER)
            await self._leave_if_moved(pool)  # a switch announced while nobody listened
            backoff.reset()
            checked = time.monotonic()
            while True:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if message is None:
                    if time.monotonic() - checked >= RECHECK_SECONDS:
                        # A sentinel cut off without a word would leave this silent forever: ask.
                        await self._leave_if_moved(pool)
                        checked = time.monotonic()
                    continue
                name, *_old, new_host, new_port = _text(message["data"]).split()
                if name == pool.service_name:
                    log.warning("sentinel switched the primary; reconnecting", primary=f"{new_host}:{new_port}")
                    await self._leave(pool)

    async def _leave_if_moved(self, pool: SentinelConnectionPool) -> None:
        known = pool.master_address
        if known is not None and await pool.sentinel_manager.discover_master(pool.service_name) != known:
            await self._leave(pool)

    @staticmethod
    async def _leave(pool: SentinelConnectionPool) -> None:
        """Close every connection, those in use too: a command in flight fails as a connection
        error (an outage its caller retries), the next one connects to the primary named now."""
        pool.master_address = None
        await pool.disconnect(inuse_connections=True)

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        manager = getattr(self.connection_pool, "sentinel_manager", None)
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
            self._watch = None
        try:
            await super().aclose(close_connection_pool)
        finally:
            if manager is not None:
                await manager.aclose()


RECHECK_SECONDS = 5.0  # between asking the sentinels who the primary is, when none announced a switch
SWITCH_MASTER = "+switch-master"  # Sentinel's announcement: "<name> <old ip> <old port> <new ip> <new port>"


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _sentinel_client(settings: Settings) -> aioredis.Redis:
    url, options = _url_and_options(settings)
    tls = urlsplit(url).scheme == "rediss"
    from_url = parse_url(url)  # credentials and db; host and port come from the sentinels
    for name in ("host", "port", "path", "connection_class"):
        from_url.pop(name, None)
    tls_options = {name: value for name, value in options.items() if name.startswith("ssl_")}
    # The sentinels get the timeouts and TLS of the data nodes, not their credentials.
    sentinel_options = {name: value for name, value in options.items() if name.startswith("socket_") or name == "retry"}
    sentinel = Sentinel(
        settings.sentinel_addresses,
        sentinel_kwargs={**sentinel_options, **({"ssl": True, **tls_options} if tls else {})},
    )
    client = sentinel.master_for(
        settings.redis_sentinel_master,
        redis_class=_SentinelManagedRedis,
        **{**from_url, **options, "ssl": tls},
    )
    pool = client.connection_pool
    pool.connection_class = packing_in_c(pool.connection_class)
    return _adapt(client)


@dataclass
class Lease:
    """A raw connection to the node that serves a key. With `asking`, the node serves the key only
    for commands preceded by ASKING (a cluster slot mid-migration): send prepare(commands)."""

    connection: AbstractConnection
    asking: bool = False
    node: ClusterNode | None = field(default=None, repr=False)

    def prepare(self, commands: Sequence[tuple]) -> list[tuple]:
        """The commands to send: each after an ASKING when asking (its +OK is one more reply)."""
        if not self.asking:
            return list(commands)
        return [part for command in commands for part in (("ASKING",), command)]


class KeyConnections:
    """Raw connections for commands sent by hand, from the node that serves a key.

    On a cluster, the node comes from the client's slot map. When a command sent on a lease gets
    MOVED or ASK, pass the error to redirected() and take a new lease: MOVED updates the slot map;
    ASK gives the next lease for that slot on the node that asked, once, with asking set. After a
    connection error, call refresh(): a failover changed who serves the slot. On one server or
    through Sentinel every key has the same node: the client's pool (Sentinel's pool connects to
    whichever primary the sentinels name)."""

    def __init__(self, client: Client) -> None:
        self._client = client
        self._asked: dict[int, tuple[str, int]] = {}

    @property
    def is_cluster(self) -> bool:
        return isinstance(self._client, RedisCluster)

    async def acquire(self, key: str) -> Lease:
        client = self._client
        if not isinstance(client, RedisCluster):
            return Lease(await client.connection_pool.get_connection())
        await client.initialize()
        asked = self._asked.pop(key_slot(key.encode()), None)
        node = None
        if asked is not None:
            node = client.get_node(host=asked[0], port=asked[1])
            if node is None:  # a node the slot map does not know yet: add it as redis-py does for MOVED
                node = ClusterNode(asked[0], asked[1], PRIMARY, **client.connection_kwargs)
                client.nodes_manager.set_nodes(client.nodes_manager.nodes_cache, {node.name: node})
        if node is None:
            node = client.get_node_from_key(key)
        return Lease(node.acquire_connection(), asking=asked is not None, node=node)

    async def release(self, lease: Lease, *, broken: bool = False) -> None:
        """Give the connection back; `broken`: it may still owe replies, so it is closed first."""
        if broken:
            await lease.connection.disconnect(nowait=True)
        if lease.node is not None:
            lease.node.release(lease.connection)
        else:
            await self._client.connection_pool.release(lease.connection)

    async def redirected(self, error: MovedError | AskError) -> None:
        """Record a redirect for the next acquire() of the slot."""
        client = self._client
        if not isinstance(client, RedisCluster):
            raise error  # one server never redirects; a misconfigured one is not ours to follow
        if isinstance(error, MovedError):  # before AskError: redis-py makes MovedError a subclass of it
            await client.nodes_manager.move_slot(error)
        else:
            self._asked[error.slot_id] = (error.host, error.port)

    async def failed(self, error: BaseException) -> bool:
        """After a command sent on a lease failed (release the lease as broken first): note a
        redirect or refresh the slot map. True if the command should go again at once:
        - MOVED / ASK (a slot moved or is moving);
        - UNBLOCKED: Redis 7.0 answers a blocked XREADGROUP so when its slot is moved away
          ("the stream key no longer exists", after MIGRATE) or its node turns replica in a
          failover ("instance state changed"); Valkey sends MOVED or ASK instead. On one server
          UNBLOCKED means the stream was deleted: an outage the caller waits out (False).
        False for anything else; after a connection error the slot map is refreshed (a failover
        may have changed who serves the slot), and the caller backs off as for any outage."""
        if isinstance(error, (MovedError, AskError)) and self.is_cluster:
            await self.redirected(error)
            return True
        if isinstance(error, ResponseError) and str(error).startswith("UNBLOCKED") and self.is_cluster:
            with contextlib.suppress(RedisConnectionError, RedisTimeoutError, *CLUSTER_OUTAGES):
                await self.refresh()
            return True
        if isinstance(error, (RedisConnectionError, RedisTimeoutError, OSError)):
            with contextlib.suppress(RedisConnectionError, RedisTimeoutError, OSError, *CLUSTER_OUTAGES):
                await self.refresh()
        return False

    async def refresh(self) -> None:
        """Ask the cluster again who serves which slot (after a connection error: a failover)."""
        if isinstance(self._client, RedisCluster):
            await self._client.nodes_manager.initialize()
