"""`make run`'s stack: embedded Valkey, producer, three consumers, reclaimer; Ctrl-C stops it cleanly,
the output stays readable (a progress line, not a line per message) and nothing is left behind."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from support.processes import service_env


def test_run_stack_starts_everything_and_stops_cleanly_on_ctrl_c(tmp_path) -> None:
    env = service_env("unused")
    del env["STREAMGROUP_REDIS_URL"]  # the stack starts its own embedded Valkey
    del env["STREAMGROUP_LOG_FORMAT"]  # and logs for people by default
    env["STREAMGROUP_PRODUCER_INTERVAL_MS"] = "100"
    log = tmp_path / "stack.log"
    with open(log, "wb") as out:
        stack = subprocess.Popen(
            [sys.executable, "-m", "streamgroup.devstack"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 90
        while "progress: produced" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.5)
        stack.send_signal(signal.SIGINT)
        code = stack.wait(60)
    output = log.read_text()
    assert code == 0, output
    for name in ("reclaimer", "consumer-1", "consumer-2", "consumer-3", "producer"):
        assert f"consumer={name}" in output, f"{name} did not log"
    assert re.search(r"progress: produced \d+, processed \d+, lag \d+, pending \d+, dead letters 0", output), output
    assert "[streamgroup.handler]" not in output, "no log line per message"
    data = Path(re.search(r"\(data in (\S+)\)", output).group(1))
    assert data.name.startswith("streamgroup-server-")
    assert not data.exists(), "the embedded server's temporary folder is removed on exit"
    summary = re.search(r"summary: produced (\d+), processed (\d+), pending (\d+)", output)
    assert summary, output[-3000:]
    produced, processed, pending = map(int, summary.groups())
    assert produced > 0
    assert processed == produced, "the producer stopped first, so the consumers finished everything"
    assert pending == 0
