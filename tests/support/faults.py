"""Error replies from a real server, on demand, for any test: each injector makes the server answer
the services with what production Redis says when it is in trouble, then puts it back.

  busy(port, ms)          BUSY: another client runs a Lua script that loops for `ms`
  out_of_memory(client)   OOM: maxmemory below what is used, noeviction; every denyoom command refused
  unblock_readers(...)    UNBLOCKED (Redis 7.0; Valkey 9.1 and Redis 8.2 answer NOGROUP instead): the
                          stream is deleted under blocked XREADGROUPs, then recreated with its group
  MasterDown              MASTERDOWN: a replica with replica-serve-stale-data no whose master is down
  restart(server)         the server dies (SIGKILL, or SIGTERM) and comes back from its AOF

The caller decides what the services are connected to (directly, or through a FaultProxy for cut
connections and slow replies); these only act on the server.
"""

from __future__ import annotations

import contextlib
import shutil
import threading
import time
from collections.abc import Iterator

import redis

from streamgroup.devserver import DevServer

# Loops until `ms` milliseconds have passed by the server's clock; TIME is allowed in scripts since 5.0.
_BUSY_SCRIPT = """
local started = redis.call('TIME')
local start = tonumber(started[1]) * 1000000 + tonumber(started[2])
local until_us = start + tonumber(ARGV[1]) * 1000
repeat
  local now = redis.call('TIME')
until tonumber(now[1]) * 1000000 + tonumber(now[2]) >= until_us
return 1
"""

# Persist every write: a restarted server has everything it acknowledged.
DURABLE = ["--appendonly", "yes", "--appendfsync", "always"]


def _config_name(client: redis.Redis, *names: str) -> str:
    """The first of `names` the server knows (the same setting has been renamed across versions)."""
    for name in names:
        if client.config_get(name):
            return name
    raise LookupError(f"none of {names} is a config setting here")


@contextlib.contextmanager
def busy(port: int, ms: int, threshold_ms: int = 50) -> Iterator[threading.Thread]:
    """While the block runs, a script of another client busy-loops for `ms` ms; after `threshold_ms`
    the server answers every other client `-BUSY Redis is busy running a script`. Leaving the block
    waits for the script to end, and restores the threshold."""
    with redis.Redis(port=port) as admin:
        setting = _config_name(admin, "busy-reply-threshold", "lua-time-limit")
        before = admin.config_get(setting)[setting]
        admin.config_set(setting, threshold_ms)
    failure: list[BaseException] = []

    def run() -> None:
        try:
            with redis.Redis(port=port, socket_timeout=ms / 1000 + 30) as looping:
                looping.eval(_BUSY_SCRIPT, 0, ms)
        except BaseException as exc:  # reported when the block ends
            failure.append(exc)

    thread = threading.Thread(target=run, daemon=True, name="busy-script")
    thread.start()
    time.sleep(threshold_ms / 1000 + 0.05)  # the server now answers BUSY
    try:
        yield thread
    finally:
        thread.join(ms / 1000 + 30)
        with redis.Redis(port=port) as admin:
            admin.config_set(setting, before)
    if failure:
        raise failure[0]


def is_busy_reply(exc: BaseException) -> bool:
    return isinstance(exc, redis.exceptions.ResponseError) and str(exc).startswith("BUSY")


@contextlib.contextmanager
def out_of_memory(client: redis.Redis) -> Iterator[int]:
    """While the block runs, maxmemory is below the memory in use with the noeviction policy: every
    command flagged denyoom (XADD, XGROUP CREATE, EVAL of a writing script) is refused with -OOM;
    XACK, XREADGROUP and DEL still work. Yields the limit set. The old settings come back after."""
    before = client.config_get("maxmemory")["maxmemory"]
    policy = client.config_get("maxmemory-policy")["maxmemory-policy"]
    used = int(client.info("memory")["used_memory"])
    limit = max(1, used // 2)
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", limit)
    try:
        yield limit
    finally:
        client.config_set("maxmemory", before)
        client.config_set("maxmemory-policy", policy)


def unblock_readers(client: redis.Redis, stream: str, group: str, start_id: str = "$") -> bool:
    """Delete the stream under the consumers blocked in XREADGROUP, then recreate it (empty) with
    its group at `start_id`. Redis 7.0 answers the blocked readers `-UNBLOCKED the stream key no
    longer exists`; Valkey 9.1 and Redis 8.2 answer `-NOGROUP No such key ... or consumer group`
    (at once, not at the end of the block). Everything in the stream and the group is
    gone: use it only when the test no longer needs them. Returns whether the group was recreated
    here (False: a service recreated it first)."""
    client.delete(stream)
    try:
        client.xgroup_create(stream, group, id=start_id, mkstream=True)
    except redis.exceptions.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise
        return False
    return True


def restart(server: DevServer, crash: bool = True, down_seconds: float = 0.0) -> None:
    """Stop the server (SIGKILL when `crash`, else SIGTERM) and start it again on the same port and
    directory; with DURABLE among its arguments it comes back with every acknowledged write."""
    if crash:
        server.kill()
    else:
        server.stop()
    time.sleep(down_seconds)
    server.start(timeout=30)


class MasterDown:
    """A replica of `master` with `replica-serve-stale-data no`: while the master is down (or its
    link is broken) the replica answers nearly every command `-MASTERDOWN Link with MASTER is down
    and replica-serve-stale-data is set to 'no'.`, which redis-py raises as MasterDownError.

    Point the services at `replica.port` (directly or through FaultProxy.retarget) and stop the
    master to make them see it."""

    def __init__(self, master: DevServer) -> None:
        self.master = master
        self.replica = DevServer(
            master.kind,
            extra_args=["--replicaof", "127.0.0.1", str(master.port), "--replica-serve-stale-data", "no"],
        )

    def start(self, timeout: float = 30) -> MasterDown:
        self.replica.start(timeout)
        self.wait_linked(timeout)
        return self

    def wait_linked(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        with redis.Redis(port=self.replica.port) as client:
            while time.monotonic() < deadline:
                with contextlib.suppress(redis.exceptions.RedisError):
                    if client.info("replication").get("master_link_status") == "up":
                        return
                time.sleep(0.1)
        raise AssertionError(f"replica on {self.replica.port} did not link to its master in {timeout}s")

    def answers_masterdown(self) -> bool:
        with redis.Redis(port=self.replica.port, socket_timeout=5) as client:
            try:
                client.xlen("any-stream")
            except redis.exceptions.MasterDownError:
                return True
            return False

    def close(self) -> None:
        self.replica.stop()
        shutil.rmtree(self.replica.directory, ignore_errors=True)
