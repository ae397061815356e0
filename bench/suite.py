"""The five measurements of issue 5, against one private Debian redis-server 7.0 (the shards
section adds a 3-node Redis Cluster of its own: bench/shards.py).

How time is taken, the same for every approach: the harness polls the server every 2 ms from its
own connection (XINFO GROUPS for consumers, XLEN for producers). A run starts at the last poll
that saw nothing read (or added) yet and ends at the first poll that saw every message read and
nothing pending (or every message added). Process start-up and imports count for none of them,
and the figure errs on the slow side by at most one poll interval.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import redis

from bench.handlers import FLUSH_FIELD
from streamgroup.devserver import DevServer, free_port

ROOT = Path(__file__).resolve().parent.parent
POLL = 0.002
MODULES = {"producer": "streamgroup_producer", "consumer": "streamgroup_consumer", "reclaimer": "streamgroup_reclaimer"}
# Result labels the report looks up to compute the target ratios.
SG_CONSUMER = "streamgroup consumer"
SG_PRODUCER = "streamgroup producer (500 producers, one script call per tick)"
SG_CONSUMER_VARIANTS: dict[str, dict[str, object]] = {
    "streamgroup": {"HANDLER": "streamgroup.handlers:noop"},
    "streamgroup-one-batch": {"HANDLER": "streamgroup.handlers:noop", "READ_AHEAD": "false"},
    "streamgroup-fields": {"HANDLER": "bench.handlers:read_fields"},
}


@dataclass
class Sizes:
    """How much work each measurement does; `quick` is for the smoke test."""

    messages: int = 200_000  # consumer and producer throughput, fast approaches
    slow_messages: int = 50_000  # the original design's loop (one XACK round trip per message)
    faststream_single_messages: int = 20_000  # FastStream one message per call (~1,500/s)
    single_xadd_messages: int = 20_000  # producer with one XADD round trip per message
    runs: int = 3
    slow_runs: int = 3
    latency_rate: int = 5_000
    latency_seconds: float = 10.0
    io_seconds: float = 4.0  # each IO-bound run is sized to take about this long
    consumer_batch: int = 1000

    @classmethod
    def quick(cls) -> Sizes:
        return cls(
            messages=2_000,
            slow_messages=1_000,
            faststream_single_messages=500,
            single_xadd_messages=1_000,
            runs=1,
            slow_runs=1,
            latency_seconds=1.0,
            io_seconds=0.3,
        )


@dataclass
class Result:
    section: str
    name: str
    value: float  # messages/s, seconds or MiB (see unit)
    unit: str
    runs: list[float] = field(default_factory=list)
    messages: int = 0
    verified: bool = False
    note: str = ""


@dataclass
class Report:
    results: list[Result] = field(default_factory=list)
    settings: dict[str, object] = field(default_factory=dict)

    def add(self, result: Result) -> Result:
        self.results.append(result)
        print(
            f"  {result.section:<9} {result.name:<48} {result.value:>12,.1f} {result.unit:<6}"
            f" runs={[round(v, 1) for v in result.runs]} verified={result.verified}",
            flush=True,
        )
        return result

    def get(self, section: str, name: str) -> Result | None:
        return next((r for r in self.results if r.section == section and r.name == name), None)

    def to_json(self) -> dict:
        return {"settings": self.settings, "results": [asdict(r) for r in self.results]}


class BenchError(RuntimeError):
    pass


# --- processes -------------------------------------------------------------------------------------


def service_env(url: str, **settings: object) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STREAMGROUP_", "BENCH_"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["STREAMGROUP_REDIS_URL"] = url
    env["STREAMGROUP_LOG_FORMAT"] = "json"
    env["STREAMGROUP_METRICS_PORT"] = "0"
    for key, value in settings.items():
        env[key if key.startswith("BENCH_") else f"STREAMGROUP_{key.upper()}"] = str(value)
    return env


class Proc:
    """One child process with its output in a log file."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        with open(log, "ab") as out:
            self.process = subprocess.Popen(args, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def check_alive(self) -> None:
        if not self.alive():
            raise BenchError(f"{self.log.name} exited with {self.process.returncode}: {self.tail()}")

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def stop(self, timeout: float = 30) -> int:
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise BenchError(f"{self.log.name} did not stop within {timeout}s") from None

    def wait(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise BenchError(f"{self.log.name} did not finish within {timeout}s: {self.tail()}") from None


def proc_status(pid: int, key: str) -> float:
    """VmRSS / VmHWM of a live process in MiB (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return 0.0


class RssSampler:
    """Samples VmRSS of some processes every 50 ms in a thread; keeps the largest value seen."""

    def __init__(self, procs: dict[str, Proc]) -> None:
        self.procs = procs
        self.peak = dict.fromkeys(procs, 0.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.sample()

    def sample(self) -> None:
        for name, proc in self.procs.items():
            self.peak[name] = max(self.peak[name], proc_status(proc.pid, "VmRSS"))

    def stop(self) -> dict[str, tuple[float, float]]:
        """(largest sampled VmRSS, VmHWM) per process; call while the processes still run."""
        self._stop.set()
        self._thread.join()
        self.sample()
        return {name: (self.peak[name], proc_status(p.pid, "VmHWM")) for name, p in self.procs.items()}


# --- the bench -------------------------------------------------------------------------------------


class Bench:
    def __init__(self, server: DevServer, sizes: Sizes, workdir: Path) -> None:
        self.server, self.sizes, self.workdir = server, sizes, workdir
        self.url = server.url
        self.r = redis.Redis(port=server.port, decode_responses=True)
        self.report = Report()
        self._seq = 0

    def name(self, prefix: str) -> str:
        self._seq += 1
        return f"{prefix}-{self._seq}"

    def log_path(self, name: str) -> Path:
        return self.workdir / f"{name}.log"

    def service(self, kind: str, name: str, url: str | None = None, **settings: object) -> Proc:
        env = service_env(url or self.url, CONSUMER_NAME=name, **settings)
        return Proc([sys.executable, "-m", MODULES[kind]], env, self.log_path(name))

    def loop(self, loop: str, name: str, **args: object) -> Proc:
        argv = [sys.executable, "-m", "bench.loops", loop, "--url", self.url]
        for key, value in args.items():
            argv += [f"--{key}", str(value)]
        return Proc(argv, service_env(self.url), self.log_path(name))

    # -- helpers

    def fill(self, stream: str, count: int, batch: int = 1000) -> None:
        """Add {producer, serial} entries, as streamgroup's producer would, in pipelined batches."""
        sent = 0
        while sent < count:
            size = min(batch, count - sent)
            pipe = self.r.pipeline(transaction=False)
            for i in range(size):
                pipe.xadd(stream, {"producer": (sent + i) % 500 + 1, "serial": (sent + i) // 500 + 1})
            pipe.execute()
            sent += size

    def group_info(self, stream: str, group: str, client: redis.Redis | redis.RedisCluster | None = None) -> dict:
        for info in (client or self.r).xinfo_groups(stream):
            if info["name"] == group:
                return info
        raise BenchError(f"group {group} of {stream} does not exist")

    def time_group(
        self, stream: str, group: str, total: int, procs: list[Proc], timeout: float, base: int = 0
    ) -> float:
        """Seconds from the last poll with nothing read (beyond `base`) to the first with all `total`
        read and nothing pending."""

        def sample() -> tuple[bool, bool, str]:
            info = self.group_info(stream, group)
            read, pending = info["entries-read"] or 0, info["pending"]
            return (
                read <= base and pending == 0,
                read >= total and pending == 0,
                f"{read}/{total} read, {pending} pending",
            )

        return self.time_until_done(sample, procs, timeout, group)

    def time_stream(self, stream: str, total: int, procs: list[Proc], timeout: float) -> float:
        """Seconds from the last poll with an empty stream to the first with `total` entries."""

        def sample() -> tuple[bool, bool, str]:
            length = self.r.xlen(stream)
            return length == 0, length >= total, f"{length}/{total} added"

        return self.time_until_done(sample, procs, timeout, stream)

    @staticmethod
    def time_until_done(
        sample: Callable[[], tuple[bool, bool, str]], procs: list[Proc], timeout: float, what: str
    ) -> float:
        """Poll `sample` (-> not started yet, done, progress) every POLL seconds; the clock runs from
        the last poll that saw nothing started to the first that saw everything done."""
        started = time.perf_counter()
        deadline = time.monotonic() + timeout
        while True:
            idle, done, progress = sample()
            now = time.perf_counter()
            if idle:
                started = now
            elif done:
                return now - started
            if time.monotonic() > deadline:
                raise BenchError(f"{what}: {progress} after {timeout}s")
            for proc in procs:
                if not proc.alive() and proc.process.returncode != 0:
                    raise BenchError(f"{proc.log.name} failed: {proc.tail()}")
            time.sleep(POLL)

    def verify_group(self, stream: str, group: str, total: int) -> None:
        """Every message read by the group and acknowledged: XINFO GROUPS pending 0, lag 0."""
        info = self.group_info(stream, group)
        summary = self.r.xpending(stream, group)
        if info["entries-read"] != total or info["pending"] != 0 or info["lag"] != 0 or summary["pending"] != 0:
            raise BenchError(f"{stream}/{group} not fully acknowledged: {info}, XPENDING {summary}")

    def wait_consumers(
        self,
        stream: str,
        group: str,
        names: list[str],
        procs: list[Proc],
        timeout: float = 60,
        client: redis.Redis | redis.RedisCluster | None = None,
    ) -> None:
        """Until every consumer has made its first read (it is then blocked waiting for entries)."""
        deadline = time.monotonic() + timeout
        while True:
            present = {c["name"] for c in (client or self.r).xinfo_consumers(stream, group)}
            if set(names) <= present:
                time.sleep(0.2)  # the history read is done; let each settle into its blocking read
                return
            for proc in procs:
                proc.check_alive()
            if time.monotonic() > deadline:
                raise BenchError(f"consumers {set(names) - present} did not start within {timeout}s")
            time.sleep(0.02)

    @staticmethod
    def median(values: list[float]) -> float:
        return statistics.median(values)

    # -- 1. consumer throughput

    def consumer_throughput(self) -> None:
        s = self.sizes
        stream = "bench:consume"
        self.r.delete(stream)
        self.fill(stream, s.messages)
        self.report.settings["consumer"] = {
            "messages": s.messages,
            "streamgroup": f"HANDLER=streamgroup.handlers:noop BATCH_SIZE={s.consumer_batch} CONCURRENCY=1",
        }
        approaches: list[tuple[str, str, int, int]] = [
            (SG_CONSUMER, "streamgroup", s.messages, s.runs),
            ("streamgroup consumer, READ_AHEAD=false", "streamgroup-one-batch", s.messages, s.runs),
            ("streamgroup consumer, handler reading every field", "streamgroup-fields", s.messages, s.runs),
            ("hand-tuned redis-py (count=1000, XACK per batch)", "handtuned", s.messages, s.runs),
            ("original design (count=10, XACK per message)", "original", min(s.slow_messages, s.messages), s.slow_runs),
            ("FastStream 0.7, one message per call", "faststream", s.faststream_single_messages, s.slow_runs),
            ("FastStream 0.7, batch=True", "faststream-batch", s.messages, s.runs),
        ]
        for label, kind, count, runs in approaches:
            base = s.messages - count  # a smaller run reads only the last `count` entries
            start = "0" if base == 0 else self.r.xrevrange(stream, count=count + 1)[-1][0]
            rates, peaks, server_usec = [], [], []
            for _ in range(runs):
                self.r.config_resetstat()
                group = self.name(f"g-{kind}")
                # Created here for every approach, so all read the same pre-filled entries.
                self.r.xgroup_create(stream, group, id=start, entries_read=base)
                consumer = self.name("c")
                if kind.startswith("streamgroup"):
                    proc = self.service(
                        "consumer", consumer, STREAM=stream, GROUP=group, BATCH_SIZE=s.consumer_batch, BLOCK_MS=100,
                        **SG_CONSUMER_VARIANTS[kind],
                    )  # fmt: skip
                else:
                    proc = self.loop(kind, consumer, stream=stream, group=group, consumer=consumer, count=count)
                sampler = RssSampler({"p": proc})
                try:
                    elapsed = self.time_group(stream, group, s.messages, [proc], timeout=600, base=base)
                finally:
                    rss = sampler.stop()["p"]
                    code = proc.stop() if kind.startswith("streamgroup") else proc.wait(60)
                if code != 0:
                    raise BenchError(f"{label} exited with {code}: {proc.tail()}")
                self.verify_group(stream, group, s.messages)
                server_usec.append(self.server_usec_per_entry(count))
                self.r.xgroup_destroy(stream, group)
                rates.append(count / elapsed)
                peaks.append(rss)
            usec = self.median(server_usec)
            note = f"{runs} run(s); Redis spent {usec:.1f} us per entry on its XREADGROUP and XACK calls"
            self.report.add(Result("consumer", label, self.median(rates), "msg/s", rates, count, True, note))
            if kind == "streamgroup":
                self.add_memory("consumer, no-op throughput run", peaks, count)

    def server_usec_per_entry(self, count: int) -> float:
        """Server CPU time of the run's XREADGROUP and XACK calls (INFO commandstats, reset before
        the run) per entry: what Redis itself needs, whoever the client is."""
        stats = self.r.info("commandstats")
        usec = sum(stats.get(f"cmdstat_{name}", {}).get("usec", 0) for name in ("xreadgroup", "xack"))
        return usec / count

    def add_memory(self, label: str, peaks: list[tuple[float, float]], count: int) -> None:
        """Report the peak resident memory of a service over its runs: (sampled VmRSS, VmHWM) pairs."""
        rss_max, hwm = max(p[0] for p in peaks), max(p[1] for p in peaks)
        self.report.add(
            Result("memory", label, hwm, "MiB", [rss_max, hwm], count, True,
                   f"VmHWM; largest sampled VmRSS {rss_max:.1f} MiB")
        )  # fmt: skip

    # -- 2. producer throughput

    def producer_throughput(self) -> None:
        s = self.sizes
        self.report.settings["producer"] = {
            "messages": s.messages,
            "streamgroup": "PRODUCERS=500 PRODUCER_INTERVAL_MS=0 MAX_MESSAGES=N",
        }
        approaches = [
            (SG_PRODUCER, "streamgroup", s.messages, s.runs),
            ("hand-tuned redis-py, pipelined batches of 500", "produce-pipelined", s.messages, s.runs),
            ("one XADD round trip per message", "produce-single", s.single_xadd_messages, s.runs),
            ("redis-benchmark XADD, -P 50 (50 clients)", "redis-benchmark", s.messages, s.runs),
        ]
        for label, kind, count, runs in approaches:
            rates, peaks = [], []
            for _ in range(runs):
                stream = self.name("bench:produce")
                name = self.name("p")
                if kind == "streamgroup":
                    proc = self.service(
                        "producer", name, STREAM=stream, PRODUCERS=500, PRODUCER_INTERVAL_MS=0, MAX_MESSAGES=count
                    )
                elif kind == "redis-benchmark":
                    argv = ["redis-benchmark", "-h", "127.0.0.1", "-p", str(self.server.port), "-n", str(count)]
                    argv += ["-P", "50", "-c", "50", "--csv", "XADD", stream, "*", "f", "v"]
                    proc = Proc(argv, dict(os.environ), self.log_path(name))
                else:
                    proc = self.loop(kind, name, stream=stream, count=count)
                sampler = RssSampler({"p": proc})
                elapsed = self.time_stream(stream, count, [proc], timeout=600)
                rss = sampler.stop()["p"]
                code = proc.wait(60)
                if code != 0:
                    raise BenchError(f"{label} exited with {code}: {proc.tail()}")
                length = self.r.xlen(stream)
                if length != count:
                    raise BenchError(f"{label}: {length} entries added, expected {count}")
                self.r.delete(stream)
                rates.append(count / elapsed)
                peaks.append(rss)
            self.report.add(Result("producer", label, self.median(rates), "msg/s", rates, count, True))
            if kind == "streamgroup":
                self.add_memory("producer, throughput run", peaks, count)

    # -- 3. end-to-end latency (and memory of all three services together)

    def latency(self) -> None:
        s = self.sizes
        stream, group = "bench:latency", "g-latency"
        self.r.delete(stream)
        self.r.xgroup_create(stream, group, id="0", mkstream=True)
        total = int(s.latency_rate * s.latency_seconds)
        # 10 ms ticks: asyncio's sleep overshoots 1 ms ticks by a third, which missed the rate.
        producers, interval_ms = max(1, s.latency_rate // 100), 10
        lat_file = self.workdir / "latency.json"
        metrics_port = free_port()
        consumer = self.service(
            "consumer", "c-latency", STREAM=stream, GROUP=group, HANDLER="bench.handlers:record_latency",
            BATCH_SIZE=s.consumer_batch, METRICS_PORT=metrics_port, BENCH_LATENCY_FILE=lat_file,
        )  # fmt: skip
        reclaimer = self.service(
            "reclaimer", "reclaimer-latency", STREAM=stream, GROUP=group, RECLAIM_INTERVAL_MS=1000,
            HANDLER="streamgroup.handlers:noop",
        )  # fmt: skip
        procs = {"consumer": consumer, "reclaimer": reclaimer}
        try:
            self.wait_consumers(stream, group, ["c-latency"], [consumer, reclaimer])
            producer = self.service(
                "producer", "p-latency", STREAM=stream, PRODUCERS=producers, PRODUCER_INTERVAL_MS=interval_ms,
                MAX_MESSAGES=total,
            )  # fmt: skip
            procs["producer"] = producer
            sampler = RssSampler(procs)
            produce_time = self.time_stream(
                stream, total, [producer, consumer, reclaimer], timeout=s.latency_seconds * 5 + 60
            )
            rss = sampler.stop()
            if producer.wait(30) != 0:
                raise BenchError(f"producer failed: {producer.tail()}")
            self.time_group(stream, group, total, [consumer], timeout=60)
            self.r.xadd(stream, {FLUSH_FIELD: "1"})
            deadline = time.monotonic() + 30
            while not lat_file.exists():
                consumer.check_alive()
                if time.monotonic() > deadline:
                    raise BenchError("the consumer did not write its latencies")
                time.sleep(0.05)
            self.time_group(stream, group, total + 1, [consumer], timeout=30)
            self.verify_group(stream, group, total + 1)
            ack_hist = histogram(metrics_port, "streamgroup_end_to_end_latency_seconds")
        finally:
            for proc in procs.values():
                if proc.alive():
                    proc.process.send_signal(signal.SIGTERM)
            for proc in procs.values():
                code = proc.wait(30)
                if code != 0:
                    raise BenchError(f"{proc.log.name} exited with {code}: {proc.tail()}")
        values = sorted(json.loads(lat_file.read_text()))
        if len(values) != total:
            raise BenchError(f"latency: {len(values)} messages recorded, expected {total}")
        rate = total / produce_time
        note = f"{total} messages at {rate:,.0f} msg/s achieved"
        self.report.settings["latency"] = {
            "messages": total,
            "target_rate": s.latency_rate,
            "achieved_rate": rate,
            "producer": f"PRODUCERS={producers} PRODUCER_INTERVAL_MS={interval_ms} MAX_MESSAGES={total}",
            "consumer": f"HANDLER=bench.handlers:record_latency BATCH_SIZE={s.consumer_batch} CONCURRENCY=1",
            "ack_histogram": ack_hist,
        }
        for label, q in (("p50", 0.50), ("p99", 0.99)):
            self.report.add(Result("latency", label, percentile(values, q) * 1000, "ms", [], total, True, note))
        self.report.add(Result("latency", "max", values[-1] * 1000, "ms", [], total, True, note))
        for label, q in (("p50", 0.50), ("p99", 0.99)):
            bound = histogram_quantile_bound(ack_hist, q)
            self.report.add(
                Result("latency", f"{label} to ack, histogram bucket bound", bound * 1000, "ms", [], total, True,
                       "consumer's streamgroup_end_to_end_latency_seconds; upper bound of the bucket holding it")
            )  # fmt: skip
        for name, (peak, hwm) in rss.items():
            self.report.add(
                Result("memory", f"{name}, latency run (all three services)", hwm, "MiB", [peak, hwm], total, True,
                       f"VmHWM; largest sampled VmRSS {peak:.1f} MiB")
            )  # fmt: skip

    # -- 4. IO-bound scaling

    def io_scaling(self) -> None:
        s = self.sizes
        per_second = 100  # one 10 ms handler call at a time
        self.report.settings["io"] = {"handler": "streamgroup.handlers:sleep_10ms (async, asyncio.sleep(0.01))"}
        for concurrency in (1, 8, 32):
            batch = 10 if concurrency == 1 else 8 * concurrency
            count = max(20, int(per_second * concurrency * s.io_seconds))
            rate = self.io_run(count, processes=1, concurrency=concurrency, batch=batch)
            self.report.add(
                Result("io", f"concurrency {concurrency}, 1 process", rate, "msg/s", [rate], count, True,
                       f"CONCURRENCY={concurrency} BATCH_SIZE={batch}")
            )  # fmt: skip
        for processes in (1, 2, 4, 8):
            count = max(20, int(per_second * processes * s.io_seconds))
            rate = self.io_run(count, processes=processes, concurrency=1, batch=10)
            self.report.add(
                Result("io", f"{processes} process(es), concurrency 1", rate, "msg/s", [rate], count, True,
                       "CONCURRENCY=1 BATCH_SIZE=10")
            )  # fmt: skip

    # -- where the consumer's time goes

    def profile(self) -> None:
        from bench.profile import profile_consumer  # it builds on this module

        profile_consumer(self)

    # -- sharded streams

    def shards(self) -> None:
        from bench.shards import shard_scaling  # it builds on this module

        shard_scaling(self)

    def io_run(self, count: int, processes: int, concurrency: int, batch: int) -> float:
        stream, group = self.name("bench:io"), "g-io"
        self.r.xgroup_create(stream, group, id="0", mkstream=True)
        names = [self.name("c-io") for _ in range(processes)]
        procs = [
            self.service(
                "consumer",
                name,
                STREAM=stream,
                GROUP=group,
                HANDLER="streamgroup.handlers:sleep_10ms",
                CONCURRENCY=concurrency,
                BATCH_SIZE=batch,
                BLOCK_MS=100,
            )  # fmt: skip
            for name in names
        ]
        try:
            self.wait_consumers(stream, group, names, procs)
            # All consumers wait in XREADGROUP BLOCK; the clock starts with the first entry added.
            fill = threading.Thread(target=self.fill, args=(stream, count))
            fill.start()
            elapsed = self.time_group(stream, group, count, procs, timeout=count / (50 * processes * concurrency) + 60)
            fill.join()
        finally:
            for proc in procs:  # all at once: each notices within BLOCK_MS
                if proc.alive():
                    proc.process.send_signal(signal.SIGTERM)
            codes = [proc.wait(30) for proc in procs]
        if any(codes):
            raise BenchError(f"IO consumers exited with {codes}")
        self.verify_group(stream, group, count)
        self.r.delete(stream)
        return count / elapsed


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    index = max(0, min(len(sorted_values) - 1, int(-(-q * len(sorted_values) // 1)) - 1))
    return sorted_values[index]


def histogram(port: int, name: str) -> list[tuple[float, float]]:
    """Cumulative (upper bound, count) buckets of a histogram from a service's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    buckets = []
    for line in text.splitlines():
        if line.startswith(name + "_bucket"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            buckets.append((float(le), float(line.rsplit(" ", 1)[1])))
    return buckets


def histogram_quantile_bound(buckets: list[tuple[float, float]], q: float) -> float:
    total = buckets[-1][1] if buckets else 0
    for bound, cumulative in buckets:
        if total and cumulative >= q * total:
            return bound
    return float("nan")


SECTIONS: dict[str, Callable[[Bench], None]] = {
    "consumer": Bench.consumer_throughput,
    "producer": Bench.producer_throughput,
    "latency": Bench.latency,
    "io": Bench.io_scaling,
    "profile": Bench.profile,
    "shards": Bench.shards,
}


def run(sections: list[str], sizes: Sizes, workdir: Path) -> Report:
    """Run the chosen sections against one fresh private redis-server 7.0 (memory is measured
    inside the consumer, producer and latency sections)."""
    if shutil.which("redis-server") is None or shutil.which("redis-benchmark") is None:
        raise BenchError("needs Debian's redis-server and redis-tools (redis-benchmark): make system-deps")
    with DevServer("redis") as server:
        bench = Bench(server, sizes, workdir)
        bench.report.settings["server"] = bench.r.info("server")["redis_version"]
        for section in sections:
            print(f"== {section}", flush=True)
            started = time.monotonic()
            SECTIONS[section](bench)
            print(f"   ({section}: {time.monotonic() - started:.0f} s)", flush=True)
        return bench.report
