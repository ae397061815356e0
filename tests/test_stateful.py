"""The rule, proved by random interleavings: real consumer and reclaimer processes against a real
server, driven by a seeded random sequence of steps (produce, start/stop/kill/pause services,
handler outcomes chosen per message, cut and slow connections, error replies, server restarts),
with the invariant checked after every step and once more at quiescence:

  every produced entry is acknowledged after a handler call returned for it, or in the dead-letter
  stream exactly once with its original fields, or still pending (only mid-run); none is
  acknowledged without a successful handler call; no entry whose handler always succeeds is
  dead-lettered (unless the test itself killed consumers holding it often enough); an entry whose
  handler always fails is retried until MAX_DELIVERIES, then dead-lettered; and no service exits
  on its own, except when the handler kills its process (op `exit`).

Why not hypothesis' RuleBasedStateMachine: with real processes and a real server an example takes
tens of seconds and its outcome depends on timing, so shrinking would re-run unreliably for hours.
Instead a run is a seeded random program; a failure prints the seed, the families and the steps,
and STREAMGROUP_STATEFUL_SEED replays the same program.

Knobs (docs/reliability.md): STREAMGROUP_STATEFUL_RUNS (runs per server, default 1),
STREAMGROUP_STATEFUL_STEPS (steps per run, default 14), STREAMGROUP_STATEFUL_SEED (replay one),
STREAMGROUP_STATEFUL_FAMILIES (comma-separated, or `all`, the default).
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from streamgroup.devserver import DevServer, free_port
from streamgroup.settings import Settings
from support import faults
from support.accounting import GROUP, STREAM
from support.processes import ServiceProcess, Services, wait_for
from support.proxy import FaultProxy

DEAD = f"{STREAM}:dead"
META = b"x-streamgroup-"
MAX_DELIVERIES = 3
CLAIM_MIN_IDLE_MS = 4000
REDIS_TIMEOUT_MS = 1000
HANDLER_TIMEOUT_MS = 1500
CONSUMER_NAME_LEASE_MS = 3000
DRAIN_STALL_SECONDS = 60  # the drain gives up once nothing moved for that long
DRAIN_CAP_FACTOR = 4  # and at the latest after this many times as long
EXIT_BY_HANDLER = 86  # support.handlers.EXIT_BY_HANDLER (that module only imports inside a service)

# Every family of steps, each switchable on its own (STREAMGROUP_STATEFUL_FAMILIES).
FAMILIES = {
    # handler outcomes, chosen per message (besides `ok`, always on)
    "raise": "the handler raises an Exception",
    "poison": "the handler raises PoisonMessage",
    "base": "the handler raises a BaseException (SystemExit, KeyboardInterrupt, CancelledError)",
    "hang": "the handler never returns (STREAMGROUP_HANDLER_TIMEOUT_MS)",
    "exit": "the handler kills its process (os._exit), as a segfault would",
    "repeated_fields": "messages repeat a field name ([tag, a, tag, b])",
    # handler flavours, chosen per process (plain sync is always on)
    "async": "async def handlers",
    "decorated_async": "async def behind an ordinary functools.wraps decorator",
    # processes
    "sigterm": "a service is stopped (SIGTERM)",
    "sigkill": "a service is killed (SIGKILL) and restarted under its name",
    "sigstop": "a service is frozen (SIGSTOP) and resumed",
    # network, through the proxy
    "cut": "every connection is cut",
    "slow": "replies are delayed past STREAMGROUP_REDIS_TIMEOUT_MS",
    # server
    "busy": "BUSY: another client's script runs for seconds",
    "oom": "OOM: maxmemory below what is used, noeviction",
    "masterdown": "MASTERDOWN: the services talk to a replica whose master is down",
    "unblocked": "UNBLOCKED: the stream is deleted under blocked readers (Redis 7.0), then recreated",
    "restart": "the server dies and restarts from its AOF",
}

OUTCOMES = ("raise", "poison", "base", "hang", "exit")
FAILING = {"raise", "base", "hang"}  # fail on every delivery: retried up to MAX_DELIVERIES
FLAVOURS = {"sync": "stateful", "async": "stateful_async", "decorated_async": "stateful_decorated_async"}
SHARED_FAULTS = ("cut", "slow", "busy", "oom", "masterdown", "unblocked", "restart")


class InvariantViolation(AssertionError):
    pass


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name) or default)


def enabled_families() -> frozenset[str]:
    chosen = os.environ.get("STREAMGROUP_STATEFUL_FAMILIES", "").strip()
    if not chosen or chosen == "all":
        return frozenset(FAMILIES)
    names = frozenset(name.strip() for name in chosen.split(",") if name.strip())
    unknown = names - set(FAMILIES)
    assert not unknown, f"STREAMGROUP_STATEFUL_FAMILIES: unknown {sorted(unknown)}; known: {sorted(FAMILIES)}"
    return names


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


@dataclass
class Snapshot:
    """The group as Redis holds it, read in one transaction (so nothing moves between its parts)."""

    pel: dict[str, tuple[str, int]]  # id -> (consumer, deliveries)
    last_delivered: str
    dead: dict[str, list[list[bytes]]]  # original id -> its copies (repeated names collapsed: count them only)

    def acked(self, entry_id: str) -> bool:
        return entry_id not in self.pel and _id_key(entry_id) <= _id_key(self.last_delivered)


@dataclass
class Ledger:
    """What the handlers wrote: every call, every success."""

    calls: Counter = field(default_factory=Counter)
    successes: Counter = field(default_factory=Counter)


@dataclass
class Proc:
    name: str
    kind: str  # consumer or reclaimer
    flavour: str
    settings: dict
    process: ServiceProcess
    paused: bool = False
    killed_by_test: bool = False


class StatefulRun:
    def __init__(
        self, kind: str, seed: int, steps: int, families: frozenset[str], workdir: Path, drain_seconds: float
    ) -> None:
        self.kind, self.seed, self.steps, self.families = kind, seed, steps, families
        self.drain_seconds = drain_seconds
        self.node_id = "tests/test_stateful.py"
        self.rng = random.Random(seed)
        self.workdir = workdir
        self.ledger_dir = workdir / "ledger"
        self.ledger_dir.mkdir(parents=True)
        self.server = DevServer(kind, extra_args=faults.DURABLE).start()
        self.proxy = FaultProxy(self.server.port)
        self.services = Services(self.proxy.url, workdir)
        self.client = redis.Redis(port=self.server.port, socket_timeout=30)
        self.raw = redis.Redis(port=self.server.port, socket_timeout=30)  # replies unparsed: repeated names kept
        self.raw.response_callbacks.pop("XRANGE")
        self.client.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
        self.masterdown: faults.MasterDown | None = None
        self.produced: dict[str, tuple[str, list[bytes]]] = {}  # id -> (op, flat fields)
        self.archived: set[str] = set()  # settled before the stream was deleted (unblocked)
        self.excuses: Counter = Counter()  # id -> test-made events that may have cost it a delivery
        self.procs: dict[str, Proc] = {}
        self.serial = 0
        self.history: list[str] = []
        self.violations: list[str] = []
        self.unexpected_exits: list[str] = []

    # --- running --------------------------------------------------------------------------------
    def run(self) -> None:
        try:
            self.step("start reclaimer", self.start_reclaimer)
            self.step("start consumer", self.start_consumer)
            for _ in range(self.steps):
                name, action = self.choose()
                self.step(name, action)
            self.step("drain", self.drain)
        finally:
            self.close()

    def step(self, name: str, action: Callable[[], object]) -> None:
        detail = action()
        self.history.append(f"{len(self.history) + 1:3d}. {name}{f' ({detail})' if detail else ''}")
        time.sleep(self.rng.uniform(0.2, 1.0))
        self.supervise()
        self.check()
        if self.violations:
            self.violations = list(dict.fromkeys(self.violations))
            raise InvariantViolation(self.report())

    def choose(self) -> tuple[str, Callable[[], object]]:
        """A random step among those of the enabled families."""
        has = self.families.__contains__
        consumers = [p for p in self.live() if p.kind == "consumer"]
        running = [p for p in consumers if not p.paused]  # a frozen process cannot act on SIGTERM
        options: list[tuple[str, Callable[[], object], float]] = [
            ("produce", self.produce, 4.0),
            ("wait", lambda: time.sleep(self.rng.uniform(0.5, 3)), 1.0),
        ]
        if len(consumers) < 3:
            options.append(("start consumer", self.start_consumer, 1.5))
        if has("sigterm") and running:
            options.append(("SIGTERM", lambda: self.sigterm(self.rng.choice(running)), 1.0))
        live = self.live()
        if has("sigkill") and live:
            options.append(("SIGKILL", lambda: self.sigkill(self.rng.choice(live)), 1.0))
        paused = [p for p in self.procs.values() if p.paused]
        if has("sigstop") and (paused or live):
            target = paused[0] if paused else self.rng.choice(live)
            options.append(("SIGCONT" if paused else "SIGSTOP", lambda: self.toggle_pause(target), 1.0))
        for fault in SHARED_FAULTS:
            if has(fault):
                options.append((fault, getattr(self, f"fault_{fault}"), 0.6 if fault == "unblocked" else 1.0))
        names, actions, weights = zip(*options, strict=True)
        index = self.rng.choices(range(len(names)), weights=weights)[0]
        return names[index], actions[index]

    def live(self) -> list[Proc]:
        return [p for p in self.procs.values() if p.process.alive()]

    # --- steps ----------------------------------------------------------------------------------
    def produce(self) -> str:
        outcomes = [op for op in OUTCOMES if op in self.families]
        count = self.rng.randint(1, 20)
        ops = Counter()
        for _ in range(count):
            op = self.rng.choice(outcomes) if outcomes and self.rng.random() < 0.15 else "ok"
            self._add(op)
            ops[op] += 1
        return ", ".join(f"{n} {op}" for op, n in sorted(ops.items()))

    def _add(self, op: str, *extra: bytes) -> str:
        flat = [b"key", uuid.uuid4().hex.encode(), b"op", op.encode(), *extra]
        if "repeated_fields" in self.families and self.rng.random() < 0.3:
            flat += [b"tag", b"first", b"tag", b"second"]
        entry_id = self.client.execute_command("XADD", STREAM, "*", *flat).decode()
        self.produced[entry_id] = (op, flat)
        return entry_id

    def _settings(self) -> dict:
        settings = {
            "BATCH_SIZE": self.rng.choice([1, 5, 20]),
            "CONCURRENCY": self.rng.choice([1, 2]),
            "READ_AHEAD": self.rng.choice(["true", "false"]),
            "BLOCK_MS": 500,
            "MAX_DELIVERIES": MAX_DELIVERIES,
            "CLAIM_MIN_IDLE_MS": CLAIM_MIN_IDLE_MS,
            "RECLAIM_INTERVAL_MS": 500,
            "REDIS_TIMEOUT_MS": REDIS_TIMEOUT_MS,
            "SHUTDOWN_GRACE_SECONDS": 2,
            "TESTHANDLER_LEDGER_DIR": self.ledger_dir,
        }
        # Only where the setting exists (issue 9 item 11): today's code exits 2 on an unknown variable.
        if "handler_timeout_ms" in Settings.model_fields:
            settings["HANDLER_TIMEOUT_MS"] = HANDLER_TIMEOUT_MS
        # A consumer restarted after a death (SIGKILL, os._exit) waits until its dead predecessor's
        # name lease runs out (issue 9 item 13): shortened as CLAIM_MIN_IDLE_MS is, or the deaths
        # this test causes would spend its drain time waiting.
        if "consumer_name_lease_ms" in Settings.model_fields:
            settings["CONSUMER_NAME_LEASE_MS"] = CONSUMER_NAME_LEASE_MS
        return settings

    def _launch(self, kind: str, name: str, flavour: str, settings: dict) -> Proc:
        process = self.services.start(
            kind,
            name=name,
            HANDLER=f"support.handlers:{FLAVOURS[flavour]}",
            STREAMGROUP_METRICS_PORT=free_port(),  # overrides Services' 0: /healthz without waiting for it
            **settings,
        )
        process.metrics_port = int(process.env["STREAMGROUP_METRICS_PORT"])
        proc = Proc(name, kind, flavour, settings, process)
        self.procs[name] = proc
        return proc

    def _flavour(self) -> str:
        return self.rng.choice(["sync"] + [f for f in ("async", "decorated_async") if f in self.families])

    def start_consumer(self) -> str:
        self.serial += 1
        proc = self._launch("consumer", f"c{self.serial}", self._flavour(), self._settings())
        return f"{proc.name}, {proc.flavour}, {proc.settings['BATCH_SIZE']}/batch"

    def start_reclaimer(self) -> str:
        proc = self._launch("reclaimer", "reclaimer", self._flavour(), self._settings())
        return proc.flavour

    def _held_by(self, name: str) -> set[str]:
        return {entry_id for entry_id, (owner, _) in self.snapshot().pel.items() if owner == name}

    def sigterm(self, proc: Proc) -> str:
        proc.killed_by_test = True
        proc.process.signal(signal.SIGTERM)
        code = proc.process.wait(60)
        self.excuses.update(self._held_by(proc.name))
        del self.procs[proc.name]
        # SIGTERM: exit 0 after handing off, or the signal's code if the grace ran out
        if code not in (0, -signal.SIGTERM, 128 + signal.SIGTERM):
            self.unexpected_exits.append(f"{proc.name} exited {code} on SIGTERM:\n{proc.process.output[-1500:]}")
        return f"{proc.name} exited {code}"

    def sigkill(self, proc: Proc) -> str:
        proc.killed_by_test = True
        proc.process.kill()
        self.excuses.update(self._held_by(proc.name))
        return proc.name  # restarted under its name by supervise(), as Kubernetes restarts a container

    def toggle_pause(self, proc: Proc) -> str:
        if proc.paused:
            self.excuses.update(self._held_by(proc.name))
            proc.process.signal(signal.SIGCONT)
            proc.paused = False
            return f"{proc.name} resumed"
        proc.process.signal(signal.SIGSTOP)
        proc.paused = True
        time.sleep(0.2)
        self.excuses.update(self._held_by(proc.name))
        return f"{proc.name} frozen"

    def _shared_fault(self, action: Callable[[], object]) -> object:
        """A fault every service sees: whatever was pending or delivered meanwhile may cost a delivery."""
        before = self.snapshot()
        detail = action()
        after = self.snapshot()
        low, high = _id_key(before.last_delivered), _id_key(after.last_delivered)
        delivered = {i for i in self.produced if low < _id_key(i) <= high}
        self.excuses.update(set(before.pel) | set(after.pel) | delivered)
        return detail

    def fault_cut(self) -> str:
        return self._shared_fault(lambda: f"{self.proxy.cut()} connections")

    def fault_slow(self) -> str:
        seconds = self.rng.uniform(1, 4)

        # Entries whose handler finishes inside the window, so that their settling (an ack, a
        # dead-letter script) gets a late reply: whatever the client re-sends then runs twice.
        finishing = [op for op in ("poison", "raise") if op in self.families] + ["ok"]
        for op in finishing:
            self._add(op, b"delay_ms", b"400")

        def slow() -> str:
            time.sleep(0.2)  # read by now, their handlers busy
            self.proxy.delay(REDIS_TIMEOUT_MS / 1000 * 1.5)
            time.sleep(seconds)
            self.proxy.delay(0)
            return f"{seconds:.1f}s"

        return self._shared_fault(slow)

    def fault_busy(self) -> str:
        ms = self.rng.randint(1000, 4000)

        def busy() -> str:
            with faults.busy(self.server.port, ms):
                pass
            return f"{ms} ms"

        return self._shared_fault(busy)

    def fault_oom(self) -> str:
        seconds = self.rng.uniform(1, 4)

        consumers = len([p for p in self.live() if p.kind == "consumer"])
        start_one = self.rng.random() < 0.5 and consumers < 3

        def oom() -> str:
            with faults.out_of_memory(self.client):
                started = self.start_consumer() if start_one else None  # a restart while Redis is full
                time.sleep(seconds)
            return f"{seconds:.1f}s{f', started {started}' if started else ''}"

        return self._shared_fault(oom)

    def fault_restart(self) -> str:
        crash = self.rng.random() < 0.5

        def restart() -> str:
            faults.restart(self.server, crash=crash, down_seconds=self.rng.uniform(0, 2))
            self.proxy.cut()
            return "SIGKILL" if crash else "SIGTERM"

        return self._shared_fault(restart)

    def fault_masterdown(self) -> str:
        if self.masterdown is None:
            self.masterdown = faults.MasterDown(self.server).start()
        seconds = self.rng.uniform(1, 4)

        def masterdown() -> str:
            self.server.stop()
            self.proxy.retarget(self.masterdown.replica.port)
            self.proxy.cut()
            time.sleep(seconds)  # every command through the proxy: -MASTERDOWN
            self.server.start(timeout=30)
            self.proxy.retarget(self.server.port)
            self.proxy.cut()
            self.masterdown.wait_linked()
            return f"{seconds:.1f}s"

        return self._shared_fault(masterdown)

    def fault_unblocked(self) -> str:
        """Deleting the stream deletes its entries: only once all of them are settled."""
        self.drain()
        self.check()
        self.archived |= set(self.produced)
        self.produced = {}
        recreated = faults.unblock_readers(self.client, STREAM, GROUP, start_id="$")
        return "group recreated by the test" if recreated else "group recreated by a service"

    # --- supervision and invariants ------------------------------------------------------------
    def supervise(self) -> None:
        """Restart what died, as Kubernetes would; a death the test did not cause is a violation
        unless the handler was told to kill the process."""
        for proc in list(self.procs.values()):
            if proc.process.alive() and not proc.paused and _says_not_live(proc.process):
                # Kubernetes' liveness probe: /healthz 503 (abandoned handler threads piling up).
                # The kubelet then stops the container as any other: SIGTERM, and SIGKILL only
                # once the grace period is over; so the service hands off what it holds and gives
                # its name back, and its successor need not wait for the lease to run out.
                proc.killed_by_test = True
                self.excuses.update(self._held_by(proc.name))
                proc.process.signal(signal.SIGTERM)
                try:
                    proc.process.wait(30)
                except subprocess.TimeoutExpired:
                    proc.process.kill()
                self.history.append(f"     {proc.name} said it is not live: stopped and restarted")
            if proc.process.alive():
                continue
            code = proc.process.process.returncode
            if not proc.killed_by_test and code != EXIT_BY_HANDLER:
                self.unexpected_exits.append(
                    f"{proc.kind} {proc.name} ({proc.flavour}) exited {code} by itself:\n{proc.process.output[-1500:]}"
                )
            self._launch(proc.kind, proc.name, proc.flavour, proc.settings)
        if not any(p.kind == "reclaimer" for p in self.procs.values()):
            self.start_reclaimer()

    def snapshot(self) -> Snapshot:
        with self.client.pipeline(transaction=True) as pipe:
            pipe.xpending_range(STREAM, GROUP, "-", "+", 1_000_000)
            pipe.xinfo_groups(STREAM)
            pipe.xrange(DEAD)
            pending, groups, dead = pipe.execute(raise_on_error=False)
        if isinstance(groups, Exception):  # the stream is gone (unblocked) and not recreated yet
            pending, groups = [], []
        group = next((g for g in groups if g["name"] == GROUP.encode()), None)
        pel = {row["message_id"].decode(): (row["consumer"].decode(), row["times_delivered"]) for row in pending}
        copies: dict[str, list[list[bytes]]] = {}
        for _, fields in dead if not isinstance(dead, Exception) else []:
            flat = [part for pair in fields.items() for part in pair]
            copies.setdefault(fields[META + b"original-id"].decode(), []).append(flat)
        last = group["last-delivered-id"].decode() if group else "0-0"
        return Snapshot(pel, last, copies)

    def dead_copies_raw(self) -> dict[str, list[list[bytes]]]:
        """:dead as Redis holds it, field/value pairs in order, repeated names included."""
        copies: dict[str, list[list[bytes]]] = {}
        for _, flat in self.raw.execute_command("XRANGE", DEAD, "-", "+") or []:
            pairs = dict(zip(flat[::2], flat[1::2], strict=True))
            copies.setdefault(pairs[META + b"original-id"].decode(), []).append(list(flat))
        return copies

    def read_ledger(self) -> Ledger:
        ledger = Ledger()
        for path in self.ledger_dir.glob("*.ledger"):
            for line in path.read_text().splitlines():
                kind, entry_id, *_ = line.split(" ")
                (ledger.successes if kind == "ok" else ledger.calls)[entry_id] += 1
        return ledger

    def check(self) -> None:
        """The invariant that holds at every moment (read Redis first, then the ledger: a success
        is written before the ack, so an acked entry's success is always found)."""
        if self.unexpected_exits:
            self.violations += [f"service exited on its own: {text}" for text in self.unexpected_exits]
            self.unexpected_exits = []
        snap = self.snapshot()
        dead = self.dead_copies_raw()
        ledger = self.read_ledger()
        for entry_id, copies in dead.items():
            if len(copies) > 1:
                self.violations.append(f"{entry_id} is in {DEAD} {len(copies)} times")
        for entry_id, (op, flat) in self.produced.items():
            copies = dead.get(entry_id, [])
            for copy in copies:
                original = _strip_meta(copy)
                if original != flat:
                    self.violations.append(f"{entry_id}: dead-letter copy holds {original!r}, was {flat!r}")
            if op == "ok" and copies and 2 * self.excuses[entry_id] < MAX_DELIVERIES:
                reason = dict(zip(copies[0][::2], copies[0][1::2], strict=True)).get(META + b"error", b"?")
                self.violations.append(
                    f"innocent {entry_id} (op ok, {ledger.calls[entry_id]} calls, {ledger.successes[entry_id]} "
                    f"successes, {self.excuses[entry_id]} test-made faults) dead-lettered: {reason.decode()}"
                )
            if snap.acked(entry_id) and not copies and entry_id not in snap.dead and not ledger.successes[entry_id]:
                self.violations.append(
                    f"{entry_id} (op {op}, {ledger.calls[entry_id]} calls) acknowledged without a successful call"
                )
            if op != "ok" and ledger.successes[entry_id]:
                self.violations.append(f"{entry_id} (op {op}) recorded a success: the test handler is wrong")

    def settled(self) -> bool:
        snap = self.snapshot()
        return all(snap.acked(i) or i in snap.dead for i in self.produced)

    def _progress(self) -> tuple[int, int]:
        """(entries settled, handler calls so far): either growing means the group is not stuck."""
        snap = self.snapshot()
        ledger = self.read_ledger()
        settled = sum(1 for i in self.produced if snap.acked(i) or i in snap.dead)
        return settled, sum(ledger.calls.values())

    def drain(self) -> str:
        """Quiescence: everything resumed and running, then wait until every entry is acknowledged
        or dead-lettered; then every entry must have its final state."""
        for proc in self.procs.values():
            if proc.paused:
                self.excuses.update(self._held_by(proc.name))
                proc.process.signal(signal.SIGCONT)
                proc.paused = False
        if not any(p.kind == "consumer" for p in self.live()):
            self.start_consumer()
        # Quiescence is reached when nothing moves any more, not after a fixed time: every message
        # that kills its process (op exit) or hangs (op hang) costs MAX_DELIVERIES process restarts
        # and claim windows before it is isolated and dead-lettered, one at a time, while its
        # batch-mates wait their turn; a run with many of them is slow but not stuck. So the wait
        # ends once no entry settled and no handler call happened for `drain_seconds` (or at a
        # hard cap); whatever is unsettled then is reported.
        now = time.monotonic()
        stalled_at, cap = now + self.drain_seconds, now + DRAIN_CAP_FACTOR * self.drain_seconds
        progress = self._progress()
        while not self.settled() and time.monotonic() < min(stalled_at, cap):
            self.supervise()
            if self.unexpected_exits:
                break
            time.sleep(0.5)
            if (now_progress := self._progress()) != progress:
                progress, stalled_at = now_progress, time.monotonic() + self.drain_seconds
        self.check()
        snap = self.snapshot()
        ledger = self.read_ledger()
        unsettled = [i for i in self.produced if not (snap.acked(i) or i in snap.dead)]
        if unsettled:
            by_op = Counter(self.produced[i][0] for i in unsettled)
            sample = [
                f"{i} op={self.produced[i][0]} pel={snap.pel.get(i)} calls={ledger.calls[i]}" for i in unsettled[:5]
            ]
            self.violations.append(
                f"not settled at quiescence: {len(unsettled)} of {len(self.produced)} ({dict(by_op)}), e.g. {sample}"
            )
        for entry_id, (op, _) in self.produced.items():
            if entry_id in unsettled:
                continue
            copies = snap.dead.get(entry_id, [])
            if op == "ok" and not copies and not ledger.successes[entry_id]:
                self.violations.append(f"{entry_id} (op ok) settled without a successful call")
            if op != "ok" and not copies:
                self.violations.append(f"{entry_id} (op {op}) acknowledged, not dead-lettered")
            if op in FAILING and ledger.calls[entry_id] > MAX_DELIVERIES + 2 * self.excuses[entry_id]:
                self.violations.append(
                    f"{entry_id} (op {op}) handled {ledger.calls[entry_id]} times, more than {MAX_DELIVERIES} "
                    f"deliveries ({self.excuses[entry_id]} test-made faults)"
                )
            if op in FAILING and copies:
                given_up_at = int(dict(zip(copies[0][::2], copies[0][1::2], strict=True))[META + b"deliveries"])
                if given_up_at < MAX_DELIVERIES:
                    self.violations.append(
                        f"{entry_id} (op {op}) dead-lettered after {given_up_at} deliveries, before {MAX_DELIVERIES}"
                    )
        settled = len(self.produced) - len(unsettled)
        return f"{settled} settled, {sum(1 for i in self.produced if i in snap.dead)} dead-lettered"

    def report(self) -> str:
        families = ",".join(sorted(self.families))
        lines = [
            f"invariant violated on {self.kind} (seed {self.seed}); replay with",
            f"  STREAMGROUP_STATEFUL_SEED={self.seed} STREAMGROUP_STATEFUL_STEPS={self.steps} "
            f"STREAMGROUP_STATEFUL_FAMILIES={families} pytest '{self.node_id}'",
            "violations:",
            *(f"  - {v}" for v in self.violations[:20]),
            f"  ({len(self.violations)} in all)" if len(self.violations) > 20 else "",
            "steps:",
            *self.history,
        ]
        return "\n".join(lines)

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.paused and proc.process.alive():
                proc.process.signal(signal.SIGCONT)
        self.services.stop_all()
        self.proxy.close()
        if self.masterdown is not None:
            self.masterdown.close()
        self.client.close()
        self.raw.close()
        self.server.close()


def _says_not_live(process: ServiceProcess) -> bool:
    """/healthz answered 503; no answer (starting, or gone) is not taken as a verdict."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{process.metrics_port}/healthz", timeout=2):
            return False
    except urllib.error.HTTPError as exc:
        return exc.code == 503
    except OSError:
        return False


def _strip_meta(flat: list[bytes]) -> list[bytes]:
    """The original field/value list of a dead-letter copy: its pairs without the x-streamgroup- ones."""
    pairs = zip(flat[::2], flat[1::2], strict=True)
    return [part for name, value in pairs if not name.startswith(META) for part in (name, value)]


def _seeds() -> list[int]:
    if os.environ.get("STREAMGROUP_STATEFUL_SEED"):
        return [int(os.environ["STREAMGROUP_STATEFUL_SEED"])]
    return [random.randrange(1 << 32) for _ in range(_env_int("STREAMGROUP_STATEFUL_RUNS", 1))]


def _run(
    kind: str,
    families: frozenset[str],
    tmp_path: Path,
    node_id: str,
    drain_seconds: float = DRAIN_STALL_SECONDS,
) -> None:
    steps = _env_int("STREAMGROUP_STATEFUL_STEPS", 14)
    for number, seed in enumerate(_seeds()):
        print(f"stateful run on {kind}: seed {seed}, {steps} steps, families {','.join(sorted(families))}")
        run = StatefulRun(kind, seed, steps, families, tmp_path / f"run-{number}", drain_seconds)
        run.node_id = node_id
        try:
            run.run()
        finally:
            print("\n".join(run.history))


# pytest-timeout's 300 s is too short for a run whose drain may take DRAIN_CAP_FACTOR stall budgets
# (or for several runs, or long ones: STREAMGROUP_STATEFUL_RUNS/_STEPS).
STATEFUL_TIMEOUT = _env_int("STREAMGROUP_STATEFUL_RUNS", 1) * (
    _env_int("STREAMGROUP_STATEFUL_STEPS", 14) * 20 + (DRAIN_CAP_FACTOR + 1) * DRAIN_STALL_SECONDS
)


@pytest.mark.slow
@pytest.mark.timeout(STATEFUL_TIMEOUT)
def test_stateful(server: DevServer, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """Random interleavings of every enabled family on each server kind."""
    _run(server.kind, enabled_families(), tmp_path, request.node.nodeid)


# --- The injectors themselves, on every server kind ----------------------------------------------


def _blocked_read(port: int, results: list) -> threading.Thread:
    def read() -> None:
        try:
            with redis.Redis(port=port) as reader:
                results.append(reader.xreadgroup(GROUP, "reader", {STREAM: ">"}, block=5000))
        except redis.exceptions.RedisError as exc:
            results.append(exc)

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    time.sleep(0.5)  # blocked by now
    return thread


def test_the_injectors_make_the_server_answer_what_they_promise(server: DevServer) -> None:
    with DevServer(server.kind, extra_args=faults.DURABLE) as own, redis.Redis(port=own.port) as client:
        client.xgroup_create(STREAM, GROUP, id="$", mkstream=True)
        client.xadd(STREAM, {"n": "1"})

        with faults.busy(own.port, 1000), pytest.raises(redis.exceptions.ResponseError) as refused:
            client.xlen(STREAM)
        assert faults.is_busy_reply(refused.value)
        assert client.xlen(STREAM) == 1

        with faults.out_of_memory(client):
            with pytest.raises(redis.exceptions.OutOfMemoryError):
                client.xadd(STREAM, {"n": "2"})
            assert client.xack(STREAM, GROUP, "0-1") == 0  # not denyoom: still served
        client.xadd(STREAM, {"n": "2"})

        client.xreadgroup(GROUP, "reader", {STREAM: ">"})  # nothing new left: the next read blocks
        results: list = []
        reader = _blocked_read(own.port, results)
        faults.unblock_readers(client, STREAM, GROUP)
        reader.join(10)
        # Redis 7.0: UNBLOCKED; Valkey 9.1 and Redis 8.2: NOGROUP (the group went with the stream)
        expected = "UNBLOCKED" if server.kind == "redis" else "NOGROUP"
        assert isinstance(results[0], redis.exceptions.ResponseError), results
        assert str(results[0]).startswith(expected)
        assert client.xlen(STREAM) == 0 and client.xinfo_groups(STREAM)[0]["name"] == GROUP.encode()

        client.xadd(STREAM, {"n": "3"})
        master_down = faults.MasterDown(own).start()
        try:
            assert not master_down.answers_masterdown()
            own.stop()
            assert wait_for(master_down.answers_masterdown, timeout=30, what="MASTERDOWN")
            own.start()
            master_down.wait_linked()
        finally:
            master_down.close()

        faults.restart(own, crash=True)
        with redis.Redis(port=own.port) as again:
            assert again.xlen(STREAM) == 1  # appendfsync always: nothing acknowledged is lost


def test_the_fault_proxy_cuts_delays_and_retargets(server: DevServer) -> None:
    proxy = FaultProxy(server.port)
    try:
        with redis.Redis(port=proxy.port, socket_timeout=1, retry=Retry(NoBackoff(), 0)) as client:
            assert client.ping()
            cut = threading.Timer(0.3, proxy.cut)
            cut.start()
            with pytest.raises(redis.exceptions.ConnectionError):  # cut while waiting for the reply
                client.blpop(["nothing-comes"], timeout=0.9)
            cut.join()
            assert client.ping()  # a new connection is accepted
            proxy.delay(1.5)
            with pytest.raises(redis.exceptions.TimeoutError):
                client.ping()
            proxy.delay(0)
            proxy.cut()
            assert client.ping()
            with DevServer(server.kind) as other:
                redis.Redis(port=other.port).set("where", "other")
                proxy.retarget(other.port)
                proxy.cut()
                with contextlib.suppress(redis.exceptions.ConnectionError):  # unless redis-py noticed the cut
                    client.ping()
                assert client.get("where") == b"other"
    finally:
        proxy.close()
