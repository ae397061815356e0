"""Where the consumer's time goes: streamgroup's consumer at full speed under py-spy, its samples
sorted into the stages of a batch. The figures show what the optimisations in docs/benchmarks.md
were chosen by; they are shares of samples, not timings."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bench.suite import Bench, Proc

# (frame marker, stage): a sample goes to the first stage whose marker is on its stack.
STAGES = (
    ("decode_batch", "turning entries into Messages (a UTF-8 check, one object each)"),
    ("record_acked", "metrics: throughput and end-to-end latency per acknowledgement"),
    ("observe_many", "metrics: handler-duration histogram"),
    ("GroupReader.receive", "taking replies: socket reads and hiredis parsing"),
    ("GroupReader.send", "packing and sending the next read with the acknowledgements"),
    ("_drain_sync", "calling the handler, timing each call (on the handler thread)"),
    ("run_in_executor", "handing each batch to the handler thread and back"),
    ("call_soon_threadsafe", "handing each batch to the handler thread and back"),
    ("_read_from_self", "handing each batch to the handler thread and back"),
    ("_chain_future", "handing each batch to the handler thread and back"),
    ("_SelectorSocketTransport", "socket reads by the event loop"),
)
OTHER = "the event loop itself, leases and bookkeeping"
RATE = 250  # samples per second per thread
PROFILE_SCALE = 4


def profile_consumer(bench: Bench) -> None:
    from bench.suite import BenchError, Proc, Result, service_env

    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(py_spy).exists():
        raise BenchError("needs py-spy (pip install -e '.[dev]')")
    s = bench.sizes
    messages = s.messages * PROFILE_SCALE  # a few seconds' worth: enough samples to sort
    stream, group, name = "bench:profile", "g-profile", "c-profile"
    bench.r.delete(stream)
    bench.fill(stream, messages)
    bench.r.xgroup_create(stream, group, id="0")
    raw = bench.workdir / "profile.raw"
    env = service_env(
        bench.url, CONSUMER_NAME=name, STREAM=stream, GROUP=group, HANDLER="streamgroup.handlers:noop",
        BATCH_SIZE=s.consumer_batch, BLOCK_MS=100,
    )  # fmt: skip
    options = ["--rate", str(RATE), "--format", "raw", "--threads", "--nonblocking"]
    argv = [py_spy, "record", *options, "--output", str(raw), "--", sys.executable, "-m", "streamgroup_consumer"]
    spy = Proc(argv, env, bench.log_path("profile"))
    try:
        bench.time_group(stream, group, messages, [spy], timeout=600)
    finally:
        _stop_profiled_child(spy)
    bench.verify_group(stream, group, messages)
    bench.r.xgroup_destroy(stream, group)
    if not raw.exists():
        raise BenchError(f"py-spy wrote no profile: {spy.tail()}")
    shares, total = stages(raw.read_text())
    bench.report.settings["profile"] = {
        "command": " ".join(["py-spy", "record", *options, "--", "python", "-m", "streamgroup_consumer"]),
        "samples": total,
        "streamgroup": f"HANDLER=streamgroup.handlers:noop BATCH_SIZE={s.consumer_batch}",
    }
    for stage, count in shares:
        bench.report.add(Result("profile", stage, 100.0 * count / total, "%", [], messages, True, f"{count} samples"))


def _stop_profiled_child(spy: Proc) -> None:
    """SIGTERM the consumer py-spy started (py-spy then writes its file and exits by itself)."""
    children = Path(f"/proc/{spy.pid}/task/{spy.pid}/children")
    pids = children.read_text().split() if children.exists() else []
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGTERM)
    spy.wait(60)


IDLE_LEAVES = (
    "EpollSelector.select",  # the event loop waiting for Redis
    "_worker (concurrent/futures/thread.py",  # the handler thread waiting for a batch
)


def stages(raw: str) -> tuple[list[tuple[str, int]], int]:
    """Busy samples per stage, largest first, and their total; imports and idle waits left out."""
    counts: Counter[str] = Counter()
    for line in raw.splitlines():
        stack, _, number = line.rpartition(" ")
        leaf = stack.rpartition(";")[2]
        if not stack or "_find_and_load" in stack or leaf.startswith(IDLE_LEAVES):
            continue
        counts[next((stage for marker, stage in STAGES if marker in stack), OTHER)] += int(number)
    total = sum(counts.values())
    return counts.most_common(), total
