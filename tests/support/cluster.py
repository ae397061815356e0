"""Real replicated setups for the tests, on loopback: a Redis Cluster (3 primaries, 1 replica each)
and a Sentinel group (1 primary, 1 replica, 3 sentinels), with the faults the tests inflict on
them: kill a primary and wait for its replica's promotion, move a key's slot to another primary
(step by step, so a test can hold the slot mid-migration), and SENTINEL FAILOVER.

Both run on Debian's redis-server or the embedded Valkey (same `kind` as DevServer); the cluster
is created with Debian's redis-cli, which speaks the cluster protocol of both."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import redis

from streamgroup.devserver import DevServer, free_port, server_binary
from streamgroup.keys import StreamKeys

NODE_TIMEOUT_MS = 2000  # how long a silent primary takes to be judged failed (then its replica takes over)
SETTLE_TIMEOUT = 90.0  # generous: the machine is shared and slow

# A cluster and a Sentinel group on Debian's Redis 7.0 and on Valkey 9 (both support cluster mode);
# Redis 8.2 runs every single-server test. FAULT_KINDS: the kinds of the setups a test kills or
# fails over (fresh_cluster, sentinel_group, the services' failover tests).
CLUSTER_KINDS = ("redis", "valkey")
FAULT_KINDS = ("redis", "valkey")


def wait_for(condition: Callable[[], object], what: str, timeout: float = SETTLE_TIMEOUT, interval: float = 0.1):
    """Poll until condition() is truthy (a Redis error counts as not yet); return its value."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = condition()
            if value:
                return value
        except (redis.exceptions.RedisError, OSError, LookupError) as exc:
            last_error = exc
        time.sleep(interval)
    raise TimeoutError(f"timed out waiting for {what}" + (f" (last error: {last_error})" if last_error else ""))


def _client(port: int, **options: object) -> redis.Redis:
    return redis.Redis(port=port, socket_connect_timeout=1, socket_timeout=5, decode_responses=True, **options)


@dataclass
class DevCluster:
    """A Redis Cluster of `primaries` primaries with `replicas` replica(s) each, on loopback ports."""

    kind: str = "redis"
    primaries: int = 3
    replicas: int = 1
    nodes: list[DevServer] = field(default_factory=list)

    @property
    def url(self) -> str:
        """A URL naming one node, as a user would give it: the client discovers the rest."""
        return self.live_nodes()[0].url

    def start(self) -> DevCluster:
        try:
            for _ in range(self.primaries * (1 + self.replicas)):
                node = DevServer(
                    self.kind,
                    extra_args=[
                        "--cluster-enabled", "yes",
                        "--cluster-config-file", "nodes.conf",
                        "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
                        # The bus defaults to port + 10000, which a free port above 55535 cannot have.
                        "--cluster-port", str(free_port()),
                        # A replica is promoted however long its link was down: killing a primary
                        # must always end in a failover, never in a cluster that stays down.
                        "--cluster-replica-validity-factor", "0",
                    ],
                )  # fmt: skip
                self.nodes.append(node.start())
            addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
            subprocess.run(
                ["redis-cli", "--cluster", "create", *addresses,
                 "--cluster-replicas", str(self.replicas), "--cluster-yes"],
                check=True, capture_output=True, timeout=120,
            )  # fmt: skip
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
            shutil.rmtree(node.directory, ignore_errors=True)

    def __enter__(self) -> DevCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- state --------------------------------------------------------------------------------

    def live_nodes(self) -> list[DevServer]:
        return [node for node in self.nodes if node.process is not None and node.process.poll() is None]

    def node(self, port: int) -> DevServer:
        return next(node for node in self.nodes if node.port == port)

    def client(self, port: int | None = None) -> redis.Redis:
        """A plain (not cluster-aware) client for one node; the first live one by default."""
        return _client(port if port is not None else self.live_nodes()[0].port)

    def cluster_client(self) -> redis.RedisCluster:
        return redis.RedisCluster(host="127.0.0.1", port=self.live_nodes()[0].port, decode_responses=True)

    def slot_of(self, key: str) -> int:
        with self.client() as client:
            return int(client.execute_command("CLUSTER", "KEYSLOT", key))

    def owner_of_slot(self, slot: int) -> int:
        """Port of the primary that serves `slot`, as the live nodes agree."""
        with self.client() as client:
            for start, end, primary, *_ in client.execute_command("CLUSTER", "SLOTS"):
                if int(start) <= slot <= int(end):
                    return int(primary[1])
        raise LookupError(f"slot {slot} is not served")

    def owner_of(self, key: str) -> int:
        return self.owner_of_slot(self.slot_of(key))

    def primary_ports(self) -> list[int]:
        ports = []
        for node in self.live_nodes():
            with _client(node.port) as client:
                if client.info("replication")["role"] == "master":
                    ports.append(node.port)
        return ports

    def replicas_of(self, primary_port: int) -> list[int]:
        with _client(primary_port) as client:
            info = client.info("replication")
        return [int(info[f"slave{i}"]["port"]) for i in range(int(info["connected_slaves"]))]

    def wait_healthy(self, timeout: float = SETTLE_TIMEOUT) -> None:
        """Every live node says cluster_state:ok and agrees on one owner per slot; with every node
        alive, every primary has its replicas online (so a kill can be followed by a promotion)."""

        def healthy() -> bool:
            live = self.live_nodes()
            views = set()
            for node in live:
                with _client(node.port) as client:
                    if client.cluster("info")["cluster_state"] != "ok":
                        return False
                    slots = client.execute_command("CLUSTER", "SLOTS")
                    views.add(tuple(sorted((int(s), int(e), int(p[1])) for s, e, p, *_ in slots)))
            if len(views) != 1:
                return False
            if len(live) < len(self.nodes):
                return True  # after a kill the promoted replica has no replica of its own
            for port in self.primary_ports():
                with _client(port) as client:
                    info = client.info("replication")
                    linked = [info[f"slave{i}"] for i in range(int(info["connected_slaves"]))]
                    if sum(1 for replica in linked if replica["state"] == "online") < self.replicas:
                        return False
            return True

        wait_for(healthy, "cluster_state:ok on every node", timeout)

    # -- faults -------------------------------------------------------------------------------

    def kill_primary_of(self, key: str) -> tuple[int, int]:
        """SIGKILL the primary serving `key`, wait until one of its replicas serves the slot and
        the cluster is ok again. Returns (killed port, promoted port)."""
        slot = self.slot_of(key)
        victim = self.owner_of_slot(slot)
        replicas = self.replicas_of(victim)
        assert replicas, f"primary {victim} has no replica to promote"
        self.node(victim).kill()

        def promoted() -> int | None:
            for port in replicas:
                with _client(port) as client:
                    role, state = client.info("replication")["role"], client.cluster("info")["cluster_state"]
                    if role == "master" and state == "ok":
                        return port
            return None

        new_primary = wait_for(promoted, f"a replica of {victim} to be promoted")
        wait_for(lambda: self.owner_of_slot(slot) == new_primary, f"slot {slot} served by {new_primary}")
        self._wait_ok_everywhere()
        return victim, new_primary

    def _wait_ok_everywhere(self) -> None:
        def ok() -> bool:
            for node in self.live_nodes():
                with _client(node.port) as client:
                    if client.cluster("info")["cluster_state"] != "ok":
                        return False
            return True

        wait_for(ok, "cluster_state:ok on every live node")

    def begin_slot_move(self, slot: int, target: int) -> int:
        """Mark `slot` migrating on its owner and importing on `target`. Returns the source port."""
        source = self.owner_of_slot(slot)
        assert source != target, "the slot is already there"
        with _client(target) as dst, _client(source) as src:
            source_id, target_id = src.execute_command("CLUSTER", "MYID"), dst.execute_command("CLUSTER", "MYID")
            dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
            src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
        return source

    def migrate_keys(self, slot: int, source: int, target: int) -> int:
        """MIGRATE every key of `slot` from source to target (the slot stays migrating). Returns how many."""
        moved = 0
        with _client(source) as src:
            while keys := src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
                src.execute_command("MIGRATE", "127.0.0.1", target, "", 0, 10_000, "KEYS", *keys)
                moved += len(keys)
        return moved

    def finish_slot_move(self, slot: int, target: int) -> None:
        """Assign `slot` to target on every primary (target first, as redis-cli does)."""
        with _client(target) as dst:
            target_id = dst.execute_command("CLUSTER", "MYID")
        ports = [target] + [port for port in self.primary_ports() if port != target]
        for port in ports:
            with _client(port) as client:
                client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
        wait_for(lambda: self._everyone_says(slot, target), f"every node to serve slot {slot} from {target}")

    def _everyone_says(self, slot: int, owner: int) -> bool:
        for node in self.live_nodes():
            with _client(node.port) as client:
                for start, end, primary, *_ in client.execute_command("CLUSTER", "SLOTS"):
                    if int(start) <= slot <= int(end) and int(primary[1]) != owner:
                        return False
        return True

    def move_slot_of(self, key: str, target: int | None = None) -> tuple[int, int]:
        """Move the slot holding `key` (and every key in it) to another primary, as
        `redis-cli --cluster reshard` does for one slot. Returns (source port, target port)."""
        slot = self.slot_of(key)
        source = self.owner_of_slot(slot)
        if target is None:
            target = next(port for port in self.primary_ports() if port != source)
        self.begin_slot_move(slot, target)
        self.migrate_keys(slot, source, target)
        self.finish_slot_move(slot, target)
        return source, target

    def reshard(self, source: int, target: int, slots: int) -> None:
        """`redis-cli --cluster reshard`: move `slots` slots (with their keys) from source to target."""
        with _client(source) as src, _client(target) as dst:
            source_id, target_id = src.execute_command("CLUSTER", "MYID"), dst.execute_command("CLUSTER", "MYID")
        subprocess.run(
            ["redis-cli", "--cluster", "reshard", f"127.0.0.1:{target}", "--cluster-from", source_id,
             "--cluster-to", target_id, "--cluster-slots", str(slots), "--cluster-yes"],
            check=True, capture_output=True, timeout=300,
        )  # fmt: skip
        self._wait_ok_everywhere()


SENTINEL_MASTER = "streamgroup"
# Sentinel demotes an old primary with REPLICAOF (SLAVEOF on older servers); without them it stays
# a primary that takes writes, so a client that does not follow the failover is seen to stay.
UNDEMOTABLE = ["--rename-command", "REPLICAOF", "", "--rename-command", "SLAVEOF", ""]


@dataclass
class DevSentinel:
    """One primary, one replica and three sentinels watching them under SENTINEL_MASTER."""

    kind: str = "redis"
    sentinels: int = 3
    master_name: str = SENTINEL_MASTER
    # e.g. UNDEMOTABLE: a primary Sentinel cannot turn into a replica after a failover
    primary_args: list[str] = field(default_factory=list)
    servers: list[DevServer] = field(default_factory=list)
    sentinel_ports: list[int] = field(default_factory=list)
    directory: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="streamgroup-sentinel-")))
    _processes: list[subprocess.Popen] = field(default_factory=list)

    @property
    def addresses(self) -> str:
        """The value for STREAMGROUP_REDIS_SENTINELS."""
        return ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)

    @property
    def url(self) -> str:
        """A URL for the data nodes (credentials, TLS, db); its host and port are not used."""
        return self.servers[0].url

    def start(self) -> DevSentinel:
        try:
            primary = DevServer(self.kind, extra_args=self.primary_args).start()
            self.servers.append(primary)
            replica = DevServer(self.kind, extra_args=["--replicaof", "127.0.0.1", str(primary.port)])
            self.servers.append(replica.start())
            for index in range(self.sentinels):
                self._start_sentinel(index, primary.port)
            self.wait_settled(primary.port)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_sentinel(self, index: int, primary_port: int) -> None:
        port = free_port()
        directory = self.directory / f"sentinel-{index}"
        directory.mkdir()
        config = directory / "sentinel.conf"  # sentinel rewrites its config: it must be its own file
        config.write_text(
            f"port {port}\nbind 127.0.0.1\ndir {directory}\nlogfile sentinel.log\n"
            f"sentinel monitor {self.master_name} 127.0.0.1 {primary_port} 2\n"
            f"sentinel down-after-milliseconds {self.master_name} {NODE_TIMEOUT_MS}\n"
            f"sentinel failover-timeout {self.master_name} 10000\n"
        )
        self._processes.append(
            subprocess.Popen(
                [str(server_binary(self.kind)), str(config), "--sentinel"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        )
        self.sentinel_ports.append(port)

    def stop(self) -> None:
        for process in self._processes:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        for server in self.servers:
            server.stop()
            shutil.rmtree(server.directory, ignore_errors=True)
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> DevSentinel:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def primary_port(self) -> int:
        """The primary every sentinel names."""
        answers = set()
        for port in self.sentinel_ports:
            with _client(port) as sentinel:
                answers.add(int(sentinel.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master_name)[1]))
        if len(answers) != 1:
            raise LookupError(f"sentinels disagree on the primary: {sorted(answers)}")
        return answers.pop()

    def wait_settled(self, primary_port: int, timeout: float = SETTLE_TIMEOUT) -> None:
        """Every sentinel names primary_port, knows the replica and the other sentinels; the
        primary says it is one and its replica is online."""

        def settled() -> bool:
            for port in self.sentinel_ports:
                with _client(port) as sentinel:
                    state = sentinel.sentinel_master(self.master_name)
                    if int(state["port"]) != primary_port or state["num-slaves"] < len(self.servers) - 1:
                        return False
                    if state["num-other-sentinels"] < len(self.sentinel_ports) - 1 or not state["is_master"]:
                        return False
                    if state["is_sdown"] or state["is_odown"]:
                        return False
            with _client(primary_port) as primary:
                info = primary.info("replication")
                online = [info[f"slave{i}"] for i in range(int(info["connected_slaves"]))]
                return info["role"] == "master" and sum(r["state"] == "online" for r in online) == len(self.servers) - 1

        wait_for(settled, f"sentinels to agree on primary {primary_port}", timeout)

    def failover(self, settle: bool = True) -> tuple[int, int]:
        """SENTINEL FAILOVER; wait until every sentinel names the replica as primary and (settle)
        the old primary replicates from it. Returns (old primary port, new primary port)."""
        old = self.primary_port()
        with _client(self.sentinel_ports[0]) as sentinel:
            wait_for(
                lambda: sentinel.execute_command("SENTINEL", "FAILOVER", self.master_name),
                "SENTINEL FAILOVER to be accepted",
            )
        new = wait_for(lambda: (port := self.primary_port()) != old and port, "the sentinels to name a new primary")
        if settle:
            self.wait_settled(new)
        return old, new


# -- accounting across a failover ------------------------------------------------------------

ORIGINAL_ID = "x-streamgroup-original-id"
SOURCE_STREAM = "x-streamgroup-stream"


Entry = tuple[str, str]  # (stream key, entry id): entry ids alone repeat across shards


@dataclass
class Tally:
    """Every message of a run, after a fault: what the producer was told Redis added, what Redis
    kept, what the handlers recorded (on a server outside the fault) and what was dead-lettered."""

    promised: int  # entries the producer was told were added (it exited 0 after MAX_MESSAGES)
    kept: dict[Entry, tuple[str, str, str]]  # entry -> (run, producer, serial) of what the shards hold
    handled: dict[Entry, int]  # entry -> successful handler runs
    dead: set[Entry]  # (source stream, original id) of the dead-letter streams' entries

    @property
    def lost_by_redis(self) -> int:
        """Added and acknowledged to the producer, then gone: asynchronous replication's loss."""
        return self.promised - len(set(self.kept.values()))

    @property
    def lost_by_us(self) -> set[Entry]:
        """Kept by Redis, yet neither handled nor dead-lettered."""
        return set(self.kept) - set(self.handled) - self.dead

    @property
    def duplicated(self) -> int:
        return sum(count - 1 for count in self.handled.values() if count > 1)

    @property
    def handled_then_lost(self) -> int:
        """Handled, then lost by Redis with the rest of what the old primary had not passed on."""
        return len(set(self.handled) - set(self.kept))

    def summary(self, what: str) -> str:
        return (
            f"{what}: produced {self.promised}, kept by Redis {len(self.kept)}, handled "
            f"{len(set(self.handled) & set(self.kept))}, dead-lettered {len(self.dead)}, duplicated "
            f"{self.duplicated}, lost by Redis {self.lost_by_redis} (of which handled before the loss "
            f"{self.handled_then_lost}), lost by us {len(self.lost_by_us)}"
        )


def tally(
    data: redis.Redis | redis.RedisCluster, recorder: redis.Redis, shards: Sequence[StreamKeys], promised: int
) -> Tally:
    """`data`: a client (decode_responses) of the services' Redis; `recorder`: the record of
    support.handlers.record_sharded; `shards`: every stream and dead-letter stream of the run."""
    kept: dict[Entry, tuple[str, str, str]] = {}
    dead: set[Entry] = set()
    for keys in shards:
        for entry_id, fields in data.xrange(keys.stream):
            kept[(keys.stream, entry_id)] = (fields["run"], fields["producer"], fields["serial"])
        if data.exists(keys.dead_letter):
            dead |= {(f[SOURCE_STREAM], f[ORIGINAL_ID]) for _, f in data.xrange(keys.dead_letter)}
    handled = Counter(tuple(row.split(" ")[1:3]) for row in recorder.lrange("done-sharded", 0, -1))
    return Tally(promised, kept, dict(handled), dead)
