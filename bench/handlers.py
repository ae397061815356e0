"""Handlers the benchmark plugs into streamgroup's real consumer (STREAMGROUP_HANDLER=bench.handlers:NAME)."""

from __future__ import annotations

import json
import os
import time

from streamgroup import Message

FLUSH_FIELD = "bench-flush"
_latencies: list[float] = []


def record_latency(message: Message) -> None:
    """Record, per message, the time from the entry ID's timestamp (when Redis added it, in whole
    milliseconds) to the handler call. An entry carrying the bench-flush field writes the recorded
    values to $BENCH_LATENCY_FILE (the process may exit without running atexit hooks)."""
    now = time.time()
    if FLUSH_FIELD in message.fields:
        path = os.environ["BENCH_LATENCY_FILE"]
        with open(path + ".tmp", "w") as out:
            json.dump(_latencies, out)
        os.replace(path + ".tmp", path)
        return
    _latencies.append(now - int(message.id.partition("-")[0]) / 1000.0)


def read_fields(message: Message) -> None:
    """No work besides reading the fields as text, as nearly every real handler does. streamgroup
    decodes them only when asked; this shows what that costs when they are."""
    message.fields  # noqa: B018 - the read is the point
