"""The benchmark suite at a tiny size, so it cannot rot: every section runs against a real
redis-server 7.0 with the real services and comparison loops, every run is verified (all messages
acknowledged or added, nothing pending), and the markdown and chart are written. Timings are
printed by the suite, never asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench.profile import OTHER, STAGES
from bench.suite import SG_CONSUMER, SG_PRODUCER

ROOT = Path(__file__).resolve().parent.parent


def test_bench_quick_runs_every_section_and_writes_the_report(tmp_path: Path) -> None:
    output, chart, raw = tmp_path / "benchmarks.md", tmp_path / "benchmarks.png", tmp_path / "results.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--output", str(output), "--chart", str(chart), "--json", str(raw)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    print(done.stdout)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]

    data = json.loads(raw.read_text())
    results = {(r["section"], r["name"]): r for r in data["results"]}
    assert all(r["verified"] for r in results.values())
    assert all(r["value"] > 0 for r in results.values())

    consumers = [r for (section, _), r in results.items() if section == "consumer"]
    assert [r["name"] for r in consumers] == [
        SG_CONSUMER,
        "streamgroup consumer, READ_AHEAD=false",
        "streamgroup consumer, handler reading every field",
        "hand-tuned redis-py (count=1000, XACK per batch)",
        "original design (count=10, XACK per message)",
        "FastStream 0.7, one message per call",
        "FastStream 0.7, batch=True",
    ]
    assert results["consumer", SG_CONSUMER]["messages"] == 2_000
    producers = [r for (section, _), r in results.items() if section == "producer"]
    assert len(producers) == 4
    assert results["producer", SG_PRODUCER]["messages"] == 2_000
    # One second at 5,000 msg/s: every message's latency was recorded by the handler.
    assert results["latency", "p99"]["messages"] == 5_000
    assert (
        results["latency", "p50"]["value"] <= results["latency", "p99"]["value"] <= results["latency", "max"]["value"]
    )
    io = [name for section, name in results if section == "io"]
    assert len(io) == 7
    memory = [name for section, name in results if section == "memory"]
    assert {"consumer, no-op throughput run", "producer, throughput run"} <= set(memory)
    assert any(name.startswith("reclaimer") for name in memory)
    profile = {name: r["value"] for (section, name), r in results.items() if section == "profile"}
    assert profile and set(profile) <= {stage for _, stage in STAGES} | {OTHER}
    assert abs(sum(profile.values()) - 100) < 0.01, "every busy sample counted once"
    assert {t["name"] for t in data["targets"]} >= {"consumer / hand-tuned loop", "end-to-end p99 at 5,000 msg/s"}

    shards = [name for section, name in results if section == "shards"]
    assert shards == [
        f"{n} shard{'s' if n > 1 else ''} on {placement}, {what}"
        for n in (1, 2, 3)
        for placement in ("one server", "3-node cluster")
        for what in ("end to end", "Redis CPU per message (busiest node)")
    ]
    # On the cluster, shard i has node i to itself: n shards leave 3 - n nodes without one.
    for n in (1, 2, 3):
        note = results["shards", f"{n} shard{'s' if n > 1 else ''} on 3-node cluster, end to end"]["note"]
        assert note.count("(shard ") == n and note.count("(no shard)") == 3 - n, note
    assert all(results["shards", name]["messages"] == 2_000 for name in shards)

    text = output.read_text()
    headings = ("## Targets", "## Consumer throughput", "## Producer throughput", "## End-to-end latency", "## Where",
                "## Sharded streams")  # fmt: skip
    for heading in headings:
        assert heading in text
    assert "`python -m bench --quick" in text
    assert "In this run the busiest cluster node spent" in text
    assert "![benchmark chart](benchmarks.png)" in text
    assert chart.read_bytes().startswith(b"\x89PNG")
